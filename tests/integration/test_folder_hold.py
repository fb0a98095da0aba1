"""A run whose folder hold another run took stops, with real processes (2 gloo workers)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time

import psutil

from tests.helpers import finish, one_line_error, start_distrnn, wait_for_step

# 32 steps an epoch on 2 processes, each step 150 ms longer on rank 0 (a sleep, no CPU): ~25 s of training,
# far longer than the hold's checks take to notice.
RUN = ["--config", "smoke", "--set", "data.train_samples=4000", "--set", "data.test_samples=1000",
       "--set", "train.epochs=5", "--set", "train.log_every=2", "--set", "checkpoint.every_steps=10",
       "--set", "train.eval_train_set=false", "--no-wandb"]


def test_a_run_whose_hold_was_taken_stops_with_one_line_and_writes_nothing_more(tmp_path, data_dir):
    """Before: the run stopped refreshing its hold and trained on into the other run's folder to the end."""
    out = tmp_path / "run"
    proc = start_distrnn("train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir),
                         "--output-dir", str(out), *RUN, env={"DISTRNN_FAULTS": "slow-rank=0:150"})
    wait_for_step(proc, out, 2, timeout=300)
    other = {"host": socket.gethostname().split(".")[0], "pid": os.getpid(), "started": psutil.Process().create_time(),
             "refreshed": time.time(), "slurm_job": None, "slurm_restart": 0, "run_id": None}  # this live process
    (out / ".hold.test").write_text(json.dumps(other))
    os.replace(out / ".hold.test", out / ".hold")
    code, stdout, stderr = finish(proc, timeout=120)
    assert code == 1, stderr[-3000:]
    line = one_line_error(subprocess.CompletedProcess([], code, stdout, stderr))
    match = re.fullmatch(rf"distrnn.train: error: {out} was taken over by another run \(host \S+, pid {os.getpid()}, "
                         r"since [\d-]+ [\d:]+\); stopped at step (\d+) without saving \(it is that run's folder "
                         r"now\); pass another --output-dir to train elsewhere", line)
    assert match, line
    stopped = int(match[1])
    saved = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    assert all(step <= stopped for step in saved), (saved, stopped)
    assert not (out / "model.pt").exists()
    assert json.loads((out / ".hold").read_text()) == other  # neither refreshed over nor removed by the loser
