"""A stop request that comes after training finished (torchrun's exit barrier, waiting for the other
machines) is no stop: the run exits 0, not 75 (a SLURM script would requeue a finished job). Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil

from tests.helpers import BIN, REPO, process_env


def wait_until(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        assert proc.poll() is None, f"distrnn ended (exit {proc.returncode}) before {what}"
        time.sleep(0.05)


def test_sigterm_after_the_workers_finished_exits_0(tmp_path, data_dir):
    """The launcher is held after its workers ended (hold-launcher=FILE, as the exit barrier holds it) and
    gets SIGTERM then. Before: "stopped by SIGTERM while starting ...; nothing was trained yet", exit 75."""
    out, release = tmp_path / "run", tmp_path / "release"
    log_out, log_err = tmp_path / "stdout", tmp_path / "stderr"
    args = [str(BIN / "distrnn"), "train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke",
            "--set", "data.train_samples=640", "--set", "train.eval_train_set=false", "--no-wandb",
            "--data-dir", str(data_dir), "--output-dir", str(out)]
    with log_out.open("w") as stdout, log_err.open("w") as stderr:
        proc = subprocess.Popen(args, cwd=REPO, env=process_env({"DISTRNN_FAULTS": f"hold-launcher={release}"}),
                                stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        wait_until(lambda: (out / "summary.json").is_file() and not psutil.Process(proc.pid).children(),
                   "the run finished and its workers ended", proc)
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: "SIGTERM" in log_err.read_text(), "the launcher said it had SIGTERM", proc, timeout=60)
        release.touch()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr_text = log_err.read_text()
    assert code == 0, stderr_text[-3000:]
    assert "nothing was trained" not in stderr_text
    assert json.loads((out / "summary.json").read_text())["steps"] > 0
