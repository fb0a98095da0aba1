"""The stacked RNN classifier: plain PyTorch, no distributed code.

The reference (the seed notebook) is nn.RNN(28, 256, 2, tanh) over the 28 rows of an image,
h0 = zeros, and one linear layer over the outputs of all 28 steps: 276,490 parameters.
"""

import warnings

import torch
from torch import nn

from distrnn.config.schema import ModelConfig

_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
# Mean and std of MNIST's 60,000 training pixels in [0, 1] (torchvision's MNIST example uses the same).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def rnn_dtype_outside_autocast(device_type: str, autocast_enabled: bool,
                               autocast_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to run the recurrent layers in by hand, or None to leave them to autocast.

    Autocast's wrapper for cuDNN RNNs (aten/src/ATen/cudnn/AutocastRNN.cpp) casts weights and inputs
    to fp16 whatever the autocast dtype, so under bf16 autocast on a GPU the RNN would run in fp16,
    without a loss scaler. There the RNN runs outside autocast, in bf16, instead.
    """
    if device_type == "cuda" and autocast_enabled and autocast_dtype == torch.bfloat16:
        return torch.bfloat16
    return None


class StackedRNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_size = cfg.input_size
        self.sequence_length = cfg.sequence_length
        self.all_steps = cfg.head == "all-steps"
        self.normalize_input = cfg.normalize_input
        self.mean, self.std = MNIST_MEAN, MNIST_STD  # attributes, not globals: TorchScript reads these
        extra = {"nonlinearity": cfg.nonlinearity} if cfg.cell == "rnn" else {}
        # h0 defaults to zeros, exactly as the seed's explicit torch.zeros.
        self.rnn = _CELLS[cfg.cell](cfg.input_size, cfg.hidden_size, cfg.num_layers, batch_first=True, **extra)
        if cfg.recurrent_init == "orthogonal":
            for name, weight in self.rnn.named_parameters():
                if name.startswith("weight_hh"):  # per gate block for gru/lstm, whole for rnn
                    for block in weight.data.chunk(weight.shape[0] // weight.shape[1]):
                        nn.init.orthogonal_(block)
        head_in = cfg.hidden_size * (cfg.sequence_length if self.all_steps else 1)
        self.fc = nn.Linear(head_in, cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (batch, 1, 28, 28) or (batch, 28, 28); each step reads input_size pixels."""
        x = images.reshape(images.shape[0], self.sequence_length, self.input_size)
        if self.normalize_input:
            x = (x - self.mean) / self.std
        # How to run the RNN under a GPU's autocast is a training-time choice; TorchScript cannot compile it
        # (no device argument to is_autocast_enabled) and an exported fp32 graph has no use for it. The
        # scripting compiler skips this branch, so the exported graph is this forward, nothing copied.
        dtype: torch.dtype | None = None  # TorchScript reads this annotation: no `X | None`
        if not torch.jit.is_scripting():
            device = x.device.type
            dtype = rnn_dtype_outside_autocast(device, torch.is_autocast_enabled(device),
                                               torch.get_autocast_dtype(device))
        out = self.recurrent(x) if dtype is None else self.recurrent_in(x, dtype)
        features = out.reshape(out.shape[0], -1) if self.all_steps else out[:, -1]
        return self.fc(features)

    def recurrent(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out

    @torch.jit.unused
    def recurrent_in(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The recurrent layers in `dtype`, outside autocast: copies of the weights in `dtype` (the
        gradients flow back to the fp32 parameters, as under autocast)."""
        weights = {name: p.to(dtype) for name, p in self.rnn.named_parameters()}
        with torch.autocast(x.device.type, enabled=False), warnings.catch_warnings():
            # cuDNN copies these fresh bf16 weights into its flat buffer (and says so, once a run): the
            # copy is the cast autocast would make anyway.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            out, _ = torch.func.functional_call(self.rnn, weights, (x.to(dtype),))
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
