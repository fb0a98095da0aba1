"""`distrnn train --launcher ray` without a Ray cluster: its flags, Ray as an optional extra, and how a failed
Ray run is turned into an exit code and one line. The real multi-node runs: tests/e2e/test_ray.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distrnn.errors import ConfigError
from distrnn.ray_launcher import WorkerFailed, outcome, worker_counts
from tests.helpers import distrnn, one_line_error


def test_a_plain_install_imports_nothing_of_ray():
    code = ("import sys, distrnn.cli, distrnn.train, distrnn.trainer, distrnn.ray_launcher, distrnn.engines;"
            "from distrnn.cli import main;"
            "main.main(['train', '--help'], standalone_mode=False);"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]"


def test_without_ray_installed_the_launcher_says_what_to_install(tmp_path):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    result = distrnn("train", "--launcher", "ray", "--num-workers", "2", "--config", "smoke", "--no-wandb",
                     "--output-dir", str(tmp_path / "run"), env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert one_line_error(result) == "distrnn: error: --launcher ray needs Ray Train: pip install 'distrnn[ray]'"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, line", [
    (["--launcher", "ray", "--num-processes", "2"],
     "--num-processes is for --launcher torchrun; with --launcher ray use --num-workers"),
    (["--launcher", "ray", "--max-restarts", "1"],
     "--max-restarts is for --launcher torchrun; with --launcher ray use --num-workers"),
    (["--num-workers", "2"], "--num-workers is for --launcher ray; with --launcher torchrun use --num-processes or "
                             "--num-machines"),
    (["--max-failures", "1"], "--max-failures is for --launcher ray; with --launcher torchrun use --num-processes "
                              "or --num-machines"),
    (["--launcher", "ray", "--num-workers", "2-x"], "--num-workers 2-x: give a number of workers (2) or a range (2-4)"),
])
def test_each_launchers_flags_are_refused_by_the_other_in_one_line(tmp_path, args, line):
    result = distrnn("train", "--config", "smoke", "--output-dir", str(tmp_path / "run"), *args, timeout=120)
    assert result.returncode == 2
    assert one_line_error(result).startswith(f"distrnn: error: {line}")


@pytest.mark.parametrize("text, expected", [("1", 1), ("4", 4), ("2-4", (2, 4)), ("3-3", (3, 3))])
def test_worker_counts(text, expected):
    assert worker_counts(text) == expected


@pytest.mark.parametrize("text", ["0", "x", "4-2", "-2", "2-", "1.5", "0-2"])
def test_worker_counts_refused(text):
    with pytest.raises(ConfigError, match="give a number of workers"):
        worker_counts(text)


class FakeWorkerGroupError(Exception):
    """The shape of Ray's WorkerGroupError: worker_failures maps each failed rank to what Ray got back."""

    def __init__(self, worker_failures):
        super().__init__("Training failed due to worker errors:\n...")
        self.worker_failures = worker_failures


def wrapped(error: BaseException) -> Exception:
    """As Ray hands a worker's exception to the controller: inside a RayTaskError, as its cause."""
    outer = Exception("ray::RayTrainWorker.run_train_fn() (pid=1, ip=10.0.0.1)")
    outer.__cause__ = error
    return outer


def test_a_lost_worker_is_the_cause_and_exits_as_a_killed_one():
    failures = {0: wrapped(WorkerFailed(4)), 1: Exception("A worker health check failed.\nWorker info: ...")}
    assert outcome(FakeWorkerGroupError(failures)) == (137, "worker rank 1 was lost (A worker health check failed.)")


def test_workers_that_exited_give_their_status():
    failures = {1: wrapped(WorkerFailed(2)), 0: wrapped(WorkerFailed(4))}
    assert outcome(FakeWorkerGroupError(failures)) == (4, "worker rank 0 exited with 4 (it lost contact with "
                                                          "another rank)")
    assert outcome(FakeWorkerGroupError({1: wrapped(WorkerFailed(2))})) == (2, "worker rank 1 exited with 2")


def test_a_controller_failure_is_one_line_and_exit_1():
    assert outcome(Exception("the controller failed\ndetails")) == (1, "the controller failed")
