"""The stacked RNN classifier: plain PyTorch, no distributed code.

The reference (the seed notebook) is nn.RNN(28, 256, 2, tanh) over the 28 rows of an image,
h0 = zeros, and one linear layer over the outputs of all 28 steps: 276,490 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from distrnn.config import ModelConfig

_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class StackedRNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_size = cfg.input_size
        self.sequence_length = cfg.sequence_length
        self.all_steps = cfg.head == "all-steps"
        extra = {"nonlinearity": cfg.nonlinearity} if cfg.cell == "rnn" else {}
        # h0 defaults to zeros, exactly as the seed's explicit torch.zeros.
        self.rnn = _CELLS[cfg.cell](cfg.input_size, cfg.hidden_size, cfg.num_layers, batch_first=True, **extra)
        head_in = cfg.hidden_size * (cfg.sequence_length if self.all_steps else 1)
        self.fc = nn.Linear(head_in, cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (batch, 1, 28, 28) or (batch, 28, 28); each step reads input_size pixels."""
        x = images.reshape(images.shape[0], self.sequence_length, self.input_size)
        out, _ = self.rnn(x)
        features = out.reshape(out.shape[0], -1) if self.all_steps else out[:, -1]
        return self.fc(features)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
