"""A hang in one line (who, where, which collective) and its evidence in RUN/hang/ (real processes, gloo).

The frozen rank (SIGSTOP) is in test_failures.py, beside the other failures it is told apart from. These runs
leave tests/collective_check off: it would stop a rank that skips a collective before the hang this reports.
"""

from __future__ import annotations

import json
import re
import socket
import time

from tests.helpers import distrnn

HOST = socket.gethostname().split(".")[0]
TIMEOUT_S = 10
RUN = ["train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke", "--set", "data.train_samples=640",
       "--set", "data.test_samples=500", "--no-wandb", "--set", f"train.collective_timeout_s={TIMEOUT_S}"]
NO_CHECK = {"DISTRNN_TEST_COLLECTIVE_CHECK": "0"}


def hang(tmp_path, data_dir, fault: str, **env: str):
    """(the one error line, the bundle's files parsed, seconds) of a 2-process run with `fault`."""
    out = tmp_path / "run"
    start = time.monotonic()
    result = distrnn(*RUN, "--data-dir", str(data_dir), "--output-dir", str(out), timeout=300,
                     env={**NO_CHECK, "DISTRNN_FAULTS": fault, **env})
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    bundle = {path.name: json.loads(path.read_text()) for path in sorted((out / "hang").iterdir())}
    assert line.endswith(f"; no collective finished within train.collective_timeout_s={TIMEOUT_S} s and the run "
                         f"was stopped; evidence in {out / 'hang'}/")
    assert bundle["report.json"]["line"] in line
    return line, bundle, elapsed


def test_a_rank_that_skips_a_collective_is_named_with_where_the_ranks_records_first_differ(tmp_path, data_dir):
    """Rank 1 skips the non-finite check's all-reduce (its 16th collective, trainer.py): gloo pairs its next
    all-reduce with rank 0's skipped one, and the two wait in different collectives."""
    line, bundle, elapsed = hang(tmp_path, data_dir, "skip-collective=1:16", TORCH_FR_BUFFER_SIZE="64")
    pids = {r: bundle["report.json"]["ranks"][str(r)]["pid"] for r in (0, 1)}
    assert re.fullmatch(
        rf"distrnn\.train: error: rank 0 \(node {HOST}, pid {pids[0]}\) is in trainer\.py:\d+ all_reduce #16 while "
        r"rank 1 waits in counting\.py:\d+ all_reduce #17; their records first differ at #16: rank 0 called "
        r"all_reduce \[\[\d+\]\] at trainer\.py:\d+, rank 1 called all_reduce \[\[\d+\]\] at progress\.py:\d+; .*",
        line), line
    assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"]
    for rank in (0, 1):
        own = bundle[f"rank-{rank}.json"]
        assert own["rank"] == rank and own["pid"] == pids[rank]
        failed = "".join(own["failed"])  # the traceback of the collective it waited in
        assert "in all_reduce" in failed and re.search(r"(trainer|counting)\.py", failed), failed[-2000:]
        assert "distrnn-heartbeat" in own["stacks"]
        assert own["versions"]["torch"] and own["environment"]["WORLD_SIZE"] == "2"
        # torch's own record, asked for with TORCH_FR_BUFFER_SIZE
        assert own["flight_recorder"]["entries"][-1]["profiling_name"] == "gloo:all_reduce"
    assert elapsed < 60 + TIMEOUT_S + 20, f"{elapsed:.0f} s"  # start-up and 9 steps, then the report


def test_a_rank_busy_outside_any_collective_is_told_from_a_frozen_one(tmp_path, data_dir):
    """slow-rank with a 10-minute step: rank 1 computes (its heartbeat beats) while rank 0 waits in DDP's
    gradient all-reduce (through the rank timing's communication hook)."""
    line, bundle, _ = hang(tmp_path, data_dir, "slow-rank=1:600000")
    pid = bundle["report.json"]["ranks"]["1"]["pid"]
    assert re.fullmatch(
        rf"distrnn\.train: error: rank 1 \(node {HOST}, pid {pid}\) is busy outside any collective at "
        r"faults\.py:\d+ \(its heartbeat is alive\); its last collective was #6 all_gather_object at "
        r"rank_timing\.py:\d+ while rank 0 waits in rank_timing\.py:\d+ all_reduce #7; .*", line), line
    assert bundle["report.json"]["frozen"] == []
    assert "rank-0.json" in bundle  # rank 1 was busy: it was stopped by torchrun, with nothing of its own to add
