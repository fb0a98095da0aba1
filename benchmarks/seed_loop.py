"""The seed notebook's training loop, as written there, for side-by-side timing.

Only additions: a fixed seed, the test accuracy after each epoch (timed apart from training), an
optional step limit for the quick mode, and a JSON result line. Run by benchmarks/bench.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.optim as optim
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from torch.utils.data import DataLoader

input_size = 28
hidden_size = 256
num_layers = 2
num_classes = 10
sequence_length = 28
learning_rate = 0.001
batch_size = 64
num_epochs = 3

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RNN(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers, num_classes):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.rnn = nn.RNN(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size * sequence_length, num_classes)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(device)
        out, _ = self.rnn(x, h0)
        out = out.reshape(out.shape[0], -1)
        out = self.fc(out)
        return out


def test_accuracy(loader, model) -> float:
    num_correct = num_samples = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device=device).squeeze(1)
            y = y.to(device=device)
            _, predictions = model(x).max(1)
            num_correct += int((predictions == y).sum())
            num_samples += predictions.size(0)
    model.train()
    return 100.0 * num_correct / num_samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--epochs", type=int, default=num_epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    # The same denormal flush distrnn uses, so the comparison is of the loops, not of this setting
    # (without it a CPU run here fell from ~3000 to as low as 60 samples/s).
    torch.set_flush_denormal(True)

    train_dataset = datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor(), download=False)
    test_dataset = datasets.MNIST(args.data_dir, train=False, transform=transforms.ToTensor(), download=False)
    train_loader = DataLoader(dataset=train_dataset, batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(dataset=test_dataset, batch_size=batch_size, shuffle=True)

    model = RNN(input_size, hidden_size, num_layers, num_classes).to(device)
    loss_function = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=learning_rate)

    history, train_seconds, samples = [], 0.0, 0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for batch_idx, (data, targets) in enumerate(train_loader):
            data = data.to(device=device).squeeze(1)
            targets = targets.to(device=device)
            scores = model(data)
            loss = loss_function(scores, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += data.size(0)
            if args.max_steps is not None and batch_idx + 1 >= args.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - start
        history.append({"epoch": epoch + 1, "test_accuracy": test_accuracy(test_loader, model),
                        "train_seconds": train_seconds})
    result = {
        "history": history, "train_seconds": train_seconds, "samples_per_s": samples / train_seconds,
        "test_accuracy": history[-1]["test_accuracy"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
