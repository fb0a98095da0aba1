"""The fault campaign's short form (python -m benchmarks.faults --quick): 2 machines in network namespaces, 3
faults from a seeded schedule (a worker killed, a preemption, a checkpoint corrupted and a worker killed), each
answered by the same command again; the full campaign is a benchmark (docs/faults.md)."""

from __future__ import annotations

import json
import sys

from distrnn.testing import netns
from tests.conftest import require
from tests.helpers import run


def test_a_short_fault_campaign_loses_no_sample_and_ends_as_the_uninterrupted_run(tmp_path, data_dir):
    require(netns.available() is None, f"no network namespaces here: {netns.available()}")
    result = run([sys.executable, "-m", "benchmarks.faults", "--quick", "--seed", "11", "--out", str(tmp_path),
                  "--data-dir", str(data_dir)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    clean, faulted = results["runs"]
    faults = faulted["faults"]
    assert sorted(f["kind"] for f in faults) == ["corrupt", "kill-worker", "preempt"]  # the seed's schedule
    assert faulted["attempts"] == 1 + len(faults)  # one restart per fault, none that failed by itself
    for f in faults:
        assert f["detected_s"] is not None and f["detected_s"] < 30, f  # each of these is found at once
        assert f["recovered_s"] is not None and f["resumed_from"] <= f["step"], f
    corrupt = next(f for f in faults if f["kind"] == "corrupt")
    assert corrupt["note"].startswith("flipped a byte of step-")  # the resume had to pass over that checkpoint
    assert corrupt["steps_redone"] > 0
    preempt = next(f for f in faults if f["kind"] == "preempt")
    assert preempt["exit_codes"] == [75, 75] and preempt["steps_redone"] == 0  # checkpointed at the stop
    exact = faulted["exact"]  # from the sample ledgers of both runs
    assert exact["steps"] == exact["steps_clean"] > 0
    assert (exact["samples_lost"], exact["samples_duplicated"], exact["steps_unlike_clean"]) == (0, 0, 0)
    assert clean["test"][1] == 2000 and faulted["test"] == clean["test"]  # exact counts, the same model
    assert 0 < faulted["goodput"] < 1
    assert netns.leftovers() == []
