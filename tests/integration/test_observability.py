"""Where each rank's time goes, with 2 real processes: the per-rank split logged and kept, a slow rank named
(DISTRNN_FAULTS=slow-rank), and a profile on request."""

from __future__ import annotations

import json
import re
from pathlib import Path

from distrnn.worker.rank_timing import SLOW_INTERVALS, SLOW_MARGIN
from tests.helpers import distrnn

# 4000 images, 32 steps of 2 x 64, the split logged every 3 steps: 10 intervals.
RUN = ["train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke", "--set", "data.train_samples=4000",
       "--set", "data.test_samples=500", "--set", "train.eval_train_set=false", "--set", "train.log_every=3",
       "--no-wandb"]
SLOW = re.compile(r"^warning: rank (\d) \(node (\S+)\) is ([\d.]+)x slower than the median rank: compute (\d+) ms vs "
                  r"(\d+) ms per step$", re.M)


def train(out: Path, data_dir: Path, *extra: str, env: dict[str, str] | None = None):
    result = distrnn(*RUN, "--data-dir", str(data_dir), "--output-dir", str(out), *extra, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_slowed_rank_is_named_once_and_the_split_is_logged_per_rank(tmp_path, data_dir):
    out = tmp_path / "run"
    result = train(out, data_dir, env={"DISTRNN_FAULTS": "slow-rank=1:80"})  # 80 ms more per step on rank 1
    warnings = SLOW.findall(result.stdout)
    assert len(warnings) == 1, result.stdout[-3000:]  # at most once a minute
    rank, _, ratio, slow, median = warnings[0]
    assert rank == "1" and float(ratio) >= 1.5 and int(slow) - int(median) >= 60
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    split = [entry for entry in logged if "time/compute_ms/max" in entry]
    assert len(split) == 10 and all(entry["time/slowest_rank"] == 1 for entry in split[1:])
    for phase in ("data", "compute", "allreduce", "optimizer"):
        assert all(e[f"time/{phase}_ms/min"] <= e[f"time/{phase}_ms/median"] <= e[f"time/{phase}_ms/max"]
                   for e in split)
    # rank 0 waits for rank 1 in the all-reduce: the slow rank's time shows up there
    assert split[-1]["time/allreduce_ms/max"] >= 40
    ranks = json.loads((out / "summary.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == 32 for r in ranks)
    assert ranks[1]["compute_ms_per_step"] - ranks[0]["compute_ms_per_step"] >= 60
    assert all(r["peak_rss_mb"] > 100 and r["samples_per_s"] > 0 and r["peak_gpu_mb"] is None for r in ranks)


def test_with_no_rank_slowed_a_rank_is_named_exactly_when_the_logged_split_shows_it(tmp_path, data_dir):
    """The warning's rule checked against the run's own logged split: a rank is named if and only if its compute
    was more than SLOW_MARGIN times the other's for SLOW_INTERVALS intervals in a row. On a quiet machine that
    does not happen without a fault; beside a neighbour test on the 2 cores (make test-all runs two at a time) it
    can, and is then real (seen once: rank 1 at 79 ms against 47 ms a step)."""
    out = tmp_path / "run"
    result = train(out, data_dir)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    split = [entry for entry in logged if "time/compute_ms/max" in entry]
    assert len(split) == 10
    streak: dict[int, int] = {}
    expected = None
    for entry in split:  # two ranks: only the slower one can be SLOW_MARGIN times the other
        slower = entry["time/slowest_rank"]
        if entry["time/compute_ms/max"] > SLOW_MARGIN * entry["time/compute_ms/min"]:
            streak = {slower: streak.get(slower, 0) + 1}
        else:
            streak = {}
        if expected is None and streak.get(slower, 0) >= SLOW_INTERVALS:
            expected = slower
    named = [int(rank) for rank, *_ in SLOW.findall(result.stdout)]
    assert named == ([] if expected is None else [expected]), (named, split)


def test_a_profile_on_request_writes_one_trace_per_rank(tmp_path, data_dir):
    out = tmp_path / "run"
    result = train(out, data_dir, "--set", "train.profile_steps=5-8")
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank-{rank}.json").read_text())
        assert trace["traceEvents"], rank
        [line] = [line for line in result.stdout.splitlines() if line.startswith(f"profile: rank {rank},")]
        assert re.fullmatch(rf"profile: rank {rank}, steps 5-8 -> {out}/profile/rank-{rank}\.json; most time in: "
                            r"(.+ \d+%, ){2}.+ \d+%", line), line
    assert result.stderr.strip() == ""  # no profiler noise


def test_without_profile_steps_nothing_is_recorded(tmp_path, data_dir):
    out = tmp_path / "run"
    train(out, data_dir, "--set", "train.epochs=1", "--set", "data.train_samples=640")
    assert not (out / "profile").exists()
