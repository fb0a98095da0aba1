"""`distrnn train --launcher ray` without a Ray cluster, as real commands: its flags, and Ray as an optional
extra. The real multi-node runs: tests/cluster/test_ray.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import distrnn, one_line_error


def test_a_plain_install_imports_nothing_of_ray():
    code = ("import sys, distrnn.cli, distrnn.train, distrnn.worker.trainer, distrnn.launcher.ray,"
            " distrnn.launcher.engines;"
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


class FakeWorkerGroupError(Exception):
    """The shape of Ray's WorkerGroupError: worker_failures maps each failed rank to what Ray got back."""

    def __init__(self, worker_failures):
        super().__init__("Training failed due to worker errors:\n...")
        self.worker_failures = worker_failures


# --- what a restarted worker resumes from -------------------------------------------------------------
