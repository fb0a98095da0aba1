"""What measuring where the time goes costs: the default config's training steps in one CPU process, with
distrnn's per-step time split (rank_timing.RankTiming) as it runs, and with its marks and reports swapped for
no-ops (nothing in distrnn can turn them off), side by side in rounds that alternate which goes first; the
ratio of each round's pair (this VM's speed drifts by tens of percent within minutes, so only pairs compare),
and, since that ratio is noisy, the cost of the timing calls themselves per step, timed alone.

    python -m benchmarks.timing_cost               # 20 rounds of 60 steps each way
    python -m benchmarks.timing_cost --rounds 2 --steps 30

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
from distrnn.testing import faults


def timed_steps(trainer, steps: int) -> float:
    """Seconds for `steps` optimizer steps (train_step + after_step, logging every log_every as in a run), from
    the start of the epoch again each time (an epoch has 938 steps)."""
    trainer.position.step_in_epoch = 0
    batches = iter(trainer.epoch_batches())
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(batches))
        trainer.after_step()
    return time.perf_counter() - start


def per_step_calls(timing, log_every: int, repeats: int = 20_000) -> float:
    """Seconds of the timing calls one optimizer step makes: 3 marks and a restart, and 1/log_every of a report."""
    start = time.perf_counter()
    for _ in range(repeats):
        timing.mark("data")
        timing.mark("compute")
        timing.mark("optimizer")
        timing.count_update()
        timing.restart()
    marks = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(200):
        timing.report(lambda *a: None)
    return marks + (time.perf_counter() - start) / 200 / log_every


def main() -> None:
    faults.refuse_in_measurements("benchmarks.timing_cost")
    from accelerate.state import AcceleratorState

    from distrnn.config.schema import load_config
    from distrnn.ranks.collectives import make_accelerator, teardown
    from distrnn.ranks.preemption import STOP_SIGNALS, StopRequest
    from distrnn.worker import rank_timing
    from distrnn.worker.trainer import build_trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    seconds: dict[str, list[float]] = {"measured (as distrnn runs)": [], "not measured": []}
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config("default", [f"data.dir={os.environ.get('DISTRNN_DATA_DIR', './data')}", "wandb.enabled=false",
                                      f"train.output_dir={work}/run", "checkpoint.every_steps=null"])
        accelerator = make_accelerator("no", 0, 300, work)
        trainer = build_trainer(cfg, accelerator, StopRequest())
        trainer.progress.start_epoch(0)
        timed_steps(trainer, 20)  # warm-up
        for round_ in range(args.rounds):
            for name in (list(seconds) if round_ % 2 == 0 else list(seconds)[::-1]):  # alternate who goes first
                with ExitStack() as stack:
                    if name == "not measured":
                        for method in ("mark", "restart"):
                            stack.enter_context(mock.patch.object(rank_timing.RankTiming, method, lambda *a: None))
                        stack.enter_context(mock.patch.object(rank_timing.RankTiming, "report", lambda *a: {}))
                    seconds[name].append(timed_steps(trainer, args.steps))
        calls = per_step_calls(trainer.progress.timing, cfg.train.log_every)
        trainer.close()
        teardown(accelerator)
        AcceleratorState._reset_state(True)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    batch = cfg.train.batch_size
    rates = {name: args.steps * batch / statistics.median(values) for name, values in seconds.items()}
    ratio = statistics.median(off / on for on, off in zip(*seconds.values()))  # samples/s measured / not measured
    step = statistics.median(seconds["not measured"]) / args.steps
    info = machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}; default config, 1 CPU process; "
          f"{args.rounds} interleaved rounds of {args.steps} steps each way, medians. Command: "
          f"`python -m benchmarks.timing_cost --rounds {args.rounds} --steps {args.steps}`\n")
    print("| training steps | samples/s |\n| --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")
    print(f"\nPaired rounds: measured / not measured samples/s = {ratio:.4f} (median of {args.rounds} pairs; this is "
          f"within the drift of the machine). The timing calls of one step, timed alone: {calls * 1e6:.1f} us, "
          f"{100 * calls / step:.3f}% of a {step * 1000:.1f} ms step.")
    print("RESULT " + json.dumps({"machine": info, "samples_per_s": rates, "paired_ratio": ratio,
                                  "calls_seconds_per_step": calls, "step_seconds": step, "rounds": args.rounds,
                                  "seconds": seconds,
                                  "steps": args.steps}))


if __name__ == "__main__":
    main()
