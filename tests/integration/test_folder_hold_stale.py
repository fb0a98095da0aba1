"""The run-folder hold: two runs racing to take over one stale hold (real processes), and the SLURM rules
that say whether a hold is live (squeue faked by a stand-in script on PATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrnn.errors import DistrnnError
from distrnn.run.hold import RUN_ID_VARIABLE, STALE_AFTER_S, FolderHold, Holder
from tests.helpers import process_env

# Takes the hold, says "held" or "refused: <the one line>", and keeps holding until its stdin closes.
TAKER = """
import sys
from pathlib import Path
from distrnn.errors import DistrnnError
from distrnn.run.hold import FolderHold
hold = FolderHold(Path(sys.argv[1]))
try:
    hold.take()
    print("held", flush=True)
except DistrnnError as e:
    print(f"refused: {e}", flush=True)
sys.stdin.read()
hold.release()
"""


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout} s"
        time.sleep(0.02)


def test_two_runs_taking_over_one_stale_hold_at_once_one_wins_the_other_is_refused(tmp_path):
    """Both judge the hold stale; the first takes it over and holds; then the second goes on. Before: the
    second removed the first's new hold without reading it again, and both held the folder."""
    path, pauses = tmp_path / "run" / ".hold", tmp_path / "pauses"
    path.parent.mkdir()
    pauses.mkdir()
    path.write_text(json.dumps({**Holder.me().__dict__, "pid": 2**22 - 7, "slurm_job": None}))  # gone
    env = process_env({"DISTRNN_FAULTS": f"takeover-pause={pauses}"})
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", RUN_ID_VARIABLE):
        env.pop(name, None)
    runs = [subprocess.Popen([sys.executable, "-c", TAKER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        wait_for(lambda: all((pauses / f"judged-{r.pid}").exists() for r in runs), "both runs judging the hold")
        first, second = runs
        (pauses / f"go-{first.pid}").touch()
        assert first.stdout.readline().strip() == "held"
        (pauses / f"go-{second.pid}").touch()
        answer = second.stdout.readline().strip()
        assert answer.startswith(f"refused: {path.parent} is in use by another run (host "), answer
        assert f"pid {first.pid}," in answer
        assert FolderHold(path).read().pid == first.pid
    finally:
        for run in runs:
            run.communicate(input="", timeout=60)
    assert not path.exists()  # the winner released it


def squeue_says(tmp_path: Path, monkeypatch, state: str) -> None:
    """A stand-in squeue first on PATH, answering `state` for any job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho '{state}'\n" if state else "#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def not_refreshed_for_long(path: Path, **fields) -> dict:
    """A hold on another node, last refreshed longer ago than STALE_AFTER_S."""
    old = {**Holder.me().__dict__, "host": "node7", "pid": 12, "started": time.time() - 5000,
           "refreshed": time.time() - STALE_AFTER_S - 60, "run_id": None, **fields}
    path.write_text(json.dumps(old))
    return old


@pytest.fixture
def outside_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID", RUN_ID_VARIABLE):
        monkeypatch.delenv(name, raising=False)


def test_a_suspended_slurm_job_keeps_its_hold_however_long_it_was_not_refreshed(tmp_path, monkeypatch, outside_slurm):
    """A suspended job's process is stopped and cannot refresh. Before: after 10 minutes its hold was taken."""
    squeue_says(tmp_path, monkeypatch, "SUSPENDED")
    path = tmp_path / ".hold"
    not_refreshed_for_long(path, slurm_job="77")
    with pytest.raises(DistrnnError, match=r"is in use by another run \(host node7, pid 12, SLURM job 77"):
        FolderHold(path).take()


@pytest.mark.parametrize("state, why", [("RUNNING", "it was not refreshed for"),
                                        ("", "SLURM job 77 is no longer known"),
                                        ("COMPLETED", "SLURM job 77 is completed")])
def test_a_slurm_hold_is_stale_when_its_job_ended_or_it_runs_but_was_not_refreshed(tmp_path, monkeypatch,
                                                                                    outside_slurm, state, why):
    squeue_says(tmp_path, monkeypatch, state)
    path = tmp_path / ".hold"
    old = not_refreshed_for_long(path, slurm_job="77")
    hold = FolderHold(path)
    [warning] = hold.take()
    assert warning.startswith(f"took over the stale hold on {tmp_path} ({Holder(**old).describe()}): {why}")
    hold.release()


def test_two_runs_in_one_allocation_are_told_apart_from_a_requeue(tmp_path, monkeypatch, outside_slurm):
    """Two `srun distrnn train` in one salloc share SLURM_JOB_ID and restart count (a requeue raises it).
    Before: the second took the first's live hold over silently."""
    squeue_says(tmp_path, monkeypatch, "RUNNING")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    path = tmp_path / ".hold"
    path.write_text(json.dumps({**Holder.me().__dict__, "host": "node7", "pid": 12, "slurm_restart": 0}))
    with pytest.raises(DistrnnError, match=r"is in use by another run \(host node7, pid 12, SLURM job 4242"):
        FolderHold(path).take()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued: its own hold
    hold = FolderHold(path)
    assert hold.take() == []
    assert (hold.read().pid, hold.read().slurm_restart) == (os.getpid(), 1)
    hold.release()
