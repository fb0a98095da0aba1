"""What the hang report's records cost: a collective called plain, through distrnn's collective log
(ranks/collective_log.py), and through it with the crash record that distrnn's launcher's workers also write
(ranks/crash_record.py), side by side in alternating rounds, with torch's flight recorder off and on (a
process each: torch reads TORCH_FR_BUFFER_SIZE once), and the heartbeat's publishing of a full record once a
second. One gloo process (a world of one: the call's own cost, no peer to wait for).

    python -m benchmarks.collective_record_cost              # 10 rounds of 5,000 all-reduces each way
    python -m benchmarks.collective_record_cost --rounds 3

Prints a Markdown table and RESULT {json}. A training step calls about one to two collectives (DDP's gradient
all-reduce, one bucket for these models, and every log interval a few more): the per-step cost is the extra
per collective times that, plus the publishing's share of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench import machine
from distrnn.testing import faults


def _calls(all_reduce, tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        all_reduce(tensor)
    return (time.perf_counter() - start) / n


def child(rounds: int, calls: int) -> dict:
    """In a process of its own: microseconds per all-reduce plain and recorded, and per publish."""
    import torch
    import torch.distributed as dist

    from distrnn.ranks.collective_log import RING, CollectiveLog
    from distrnn.ranks.crash_record import CrashRecord

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        tensor, plain = torch.zeros(2, dtype=torch.int64), dist.all_reduce
        log = CollectiveLog().install()
        recorded = dist.all_reduce
        log.uninstall()
        crash = CrashRecord(Path(folder), 0, Path(folder) / "hang")  # what distrnn's launcher's workers run with
        with_crash = CollectiveLog(crash).install()
        both = dist.all_reduce
        pairs = []
        for r in range(rounds):
            order = [(plain, "plain"), (recorded, "recorded"), (both, "both")][:: 1 if r % 2 else -1]
            times = {name: _calls(call, tensor, calls) for call, name in order}
            pairs.append(times)
        for _ in range(RING):
            recorded(tensor)
        start = time.perf_counter()
        for _ in range(2000):
            json.dumps(log.snapshot())
        publish = (time.perf_counter() - start) / 2000
        with_crash.uninstall()
        crash.close()
        dist.destroy_process_group()
    return {"plain_us": statistics.median(p["plain"] for p in pairs) * 1e6,
            "recorded_us": statistics.median(p["recorded"] for p in pairs) * 1e6,
            "with_crash_record_us": statistics.median(p["both"] for p in pairs) * 1e6,
            "ratio": statistics.median(p["both"] / p["plain"] for p in pairs), "publish_us": publish * 1e6}


def main() -> None:
    faults.refuse_in_measurements("benchmarks.collective_record_cost")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.rounds, args.calls)))
        return
    results = {}
    for entries in ("0", "256"):  # the flight recorder off (distrnn's default), and on (TORCH_FR_BUFFER_SIZE=256)
        out = subprocess.run([sys.executable, "-m", "benchmarks.collective_record_cost", "--child", "--rounds",
                              str(args.rounds), "--calls", str(args.calls)], capture_output=True, text=True,
                             env={**os.environ, "TORCH_FR_BUFFER_SIZE": entries}, check=True)
        results[entries] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"collective record cost on {machine()}\n")
    print("| flight recorder | all-reduce, plain | recorded | recorded + crash record | ratio (all to plain) | "
          "publishing a full record (once a second) |")
    print("|---|---|---|---|---|---|")
    for entries, r in results.items():
        print(f"| TORCH_FR_BUFFER_SIZE={entries} | {r['plain_us']:.1f} us | {r['recorded_us']:.1f} us | "
              f"{r['with_crash_record_us']:.1f} us | {r['ratio']:.2f}x | {r['publish_us']:.0f} us |")
    print("RESULT " + json.dumps({"machine": machine(), "rounds": args.rounds, "calls": args.calls, **results}))


if __name__ == "__main__":
    main()
