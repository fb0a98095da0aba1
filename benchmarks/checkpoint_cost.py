"""What trusting a checkpoint costs: distrnn's whole checkpoint save (checkpoint.save: save_state, the
completeness check, meta.json, the rename, pruning) of the reference model, in one process, four ways side by
side in interleaved rounds: as distrnn does it, and with its checksums, its fsyncs, or both left out (the
benchmark swaps integrity.record / integrity.fsync_* for no-ops; nothing in distrnn can turn them off).
SHA-256 of the same files is timed too, for the choice of checksum.

    python -m benchmarks.checkpoint_cost              # 20 rounds, medians
    python -m benchmarks.checkpoint_cost --rounds 5

CPU, W&B off, into a temporary folder (pass --dir to measure another file system). Prints a Markdown table
and RESULT {json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

from benchmarks.bench import machine
from distrnn.config.schema import ModelConfig
from distrnn.model import StackedRNN
from distrnn.run import checkpoint, integrity
from distrnn.run.checkpoint import Position
from distrnn.run.folder import RunFolder
from distrnn.testing import faults

WAYS = {"as distrnn saves": (), "without checksums": ("record",), "without fsyncs": ("fsync",),
        "without either": ("record", "fsync")}


def without(stack: ExitStack, parts: tuple[str, ...]) -> None:
    if "record" in parts:
        stack.enter_context(mock.patch.object(integrity, "record", lambda *a, **k: {}))
    if "fsync" in parts:
        for name in ("fsync_tree", "fsync_folder", "fsync_file"):
            stack.enter_context(mock.patch.object(integrity, name, lambda *a, **k: None))


def main() -> None:
    faults.refuse_in_measurements("benchmarks.checkpoint_cost")
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dir", default=None, help="where to write [default: a temporary folder]")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*(lambda m: (m, torch.optim.Adam(m.parameters(), fused=True)))(
        StackedRNN(ModelConfig())))
    model(torch.rand(8, 28, 28)).sum().backward()
    optimizer.step()  # Adam's two moments exist: the checkpoint has its real size (3.3 MB)
    tensors = list(model.state_dict())
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    sha256: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        step = 0
        for _ in range(args.rounds):
            for way, parts in WAYS.items():
                folder, step = RunFolder(Path(work) / way.replace(" ", "-")), step + 1
                folder.checkpoints.mkdir(parents=True, exist_ok=True)
                with ExitStack() as stack:
                    without(stack, parts)
                    start = time.perf_counter()
                    path = checkpoint.write_checkpoint(accelerator, folder, Position(global_step=step),
                                                       {"config": {}}, keep=3, needed_bytes=0, tensors=tensors)
                    seconds[way].append(time.perf_counter() - start)
            start = time.perf_counter()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                hashlib.sha256(file.read_bytes()).hexdigest()
            sha256.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    base = medians["without either"]
    info = machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}; checkpoint {size / 1e6:.1f} MB in "
          f"{args.dir or tempfile.gettempdir()}; {args.rounds} interleaved rounds, medians. Command: "
          f"`python -m benchmarks.checkpoint_cost --rounds {args.rounds}`\n")
    print("| save | ms | x without either |\n| --- | --- | --- |")
    for way, value in medians.items():
        print(f"| {way} | {value * 1000:.1f} | {value / base:.2f} |")
    full = medians["as distrnn saves"]
    print(f"\nIn distrnn's save, the checksums (XXH3-64, read while the fsyncs wait) add "
          f"{100 * (full / medians['without checksums'] - 1):.1f}% and the fsyncs "
          f"{100 * (full / medians['without fsyncs'] - 1):.1f}%; without fsyncs to hide behind, the checksums "
          f"would add {100 * (medians['without fsyncs'] / base - 1):.1f}%. SHA-256 of the same files alone: "
          f"{1000 * statistics.median(sha256):.1f} ms ({100 * statistics.median(sha256) / full:.1f}% of a save).")
    print("RESULT " + json.dumps({"machine": info, "checkpoint_bytes": size, "rounds": args.rounds,
                                  "median_seconds": medians, "sha256_seconds": statistics.median(sha256)}))


if __name__ == "__main__":
    main()
