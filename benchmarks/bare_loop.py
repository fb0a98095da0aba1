"""The ceiling: the reference model's forward + backward + Adam on batches already in memory, no
framework (no Accelerate, no loader, no logging, no checks). distrnn's training loop is measured
against this in the same benchmark run.

    python -m benchmarks.bare_loop --batch-size 64 --precision no
    python -m benchmarks.bare_loop --batch-size 512 --precision bf16

Prints one line: RESULT {"samples_per_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from distrnn.config.schema import ModelConfig
from distrnn.model import StackedRNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--samples", type=int, default=30_000, help="timed samples, after 10 warm-up steps")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as distrnn does: denormals slowed a CPU run up to 50x
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = StackedRNN(ModelConfig()).to(device)
    # The optimizer distrnn uses (fused Adam), so the gap measured is the framework's, not the optimizer's.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    steps = max(args.samples // args.batch_size, 1)
    batches = [(torch.rand(args.batch_size, 28, 28, device=device),
                torch.randint(0, 10, (args.batch_size,), device=device)) for _ in range(16)]

    def step(i: int) -> None:
        images, labels = batches[i % len(batches)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(10):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"batch_size": args.batch_size, "precision": args.precision, "steps": steps,
                                  "seconds": seconds, "samples_per_s": steps * args.batch_size / seconds}))


if __name__ == "__main__":
    main()
