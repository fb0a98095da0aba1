"""What measuring where the time goes costs: the default config's training steps in one CPU process, with
distrnn's per-step time split (rank_timing.RankTiming) as it runs, and with its marks and reports swapped for
no-ops (nothing in distrnn can turn them off), side by side in interleaved rounds. Reports the ratio of
samples/s.

    python -m benchmarks.timing_cost               # 6 rounds of 150 steps each way, medians
    python -m benchmarks.timing_cost --rounds 2 --steps 50

Needs DISTRNN_DATA_DIR (real MNIST). W&B off. Prints a Markdown table and RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from unittest import mock

from benchmarks.bench import machine


def timed_steps(trainer, steps: int) -> float:
    """Seconds for `steps` optimizer steps (train_step + after_step, logging every log_every as in a run)."""
    batches = iter(trainer.epoch_batches())
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(batches))
        trainer.after_step()
    return time.perf_counter() - start


def main() -> None:
    from accelerate.state import AcceleratorState

    from distrnn import rank_timing
    from distrnn.config import load_config
    from distrnn.distributed import make_accelerator, teardown
    from distrnn.preemption import STOP_SIGNALS, StopRequest
    from distrnn.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    seconds: dict[str, list[float]] = {"measured (as distrnn runs)": [], "not measured": []}
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config("default", [f"data.dir={os.environ.get('DISTRNN_DATA_DIR', './data')}", "wandb.enabled=false",
                                      f"train.output_dir={work}/run", "checkpoint.every_steps=null"])
        accelerator = make_accelerator("no", 0, 300, work)
        trainer = Trainer(cfg, accelerator, StopRequest())
        trainer.progress.start_epoch(0)
        timed_steps(trainer, 20)  # warm-up
        for _ in range(args.rounds):
            for name in seconds:
                with ExitStack() as stack:
                    if name == "not measured":
                        for method in ("mark", "restart"):
                            stack.enter_context(mock.patch.object(rank_timing.RankTiming, method, lambda *a: None))
                        stack.enter_context(mock.patch.object(rank_timing.RankTiming, "report", lambda *a: {}))
                    seconds[name].append(timed_steps(trainer, args.steps))
        trainer.close()
        teardown(accelerator)
        AcceleratorState._reset_state(True)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    batch = cfg.train.batch_size
    rates = {name: args.steps * batch / statistics.median(values) for name, values in seconds.items()}
    ratio = rates["measured (as distrnn runs)"] / rates["not measured"]
    info = machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}; default config, 1 CPU process; "
          f"{args.rounds} interleaved rounds of {args.steps} steps each way, medians. Command: "
          f"`python -m benchmarks.timing_cost --rounds {args.rounds} --steps {args.steps}`\n")
    print("| training steps | samples/s |\n| --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")
    print(f"\nThe time split costs {100 * (1 - ratio):.2f}% of throughput (measured / not measured = {ratio:.4f}).")
    print("RESULT " + json.dumps({"machine": info, "samples_per_s": rates, "ratio": ratio, "rounds": args.rounds,
                                  "steps": args.steps}))


if __name__ == "__main__":
    main()
