"""A full disk, on a real tmpfs (mounting one needs root, as CI has): the exact line the user sees before training
and when a save fails mid-run (docs/errors.md). The rest of the error cases: tests/integration/test_errors.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import distrnn, newest_checkpoint, start_distrnn, wait_for_step
from tests.integration.test_errors import TINY, error_line


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 24 MB (the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    require(result.returncode == 0, f"cannot mount a tmpfs to test a full disk: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))


def test_full_disk_is_refused_before_training(small_disk, data_dir):
    fill(small_disk, 2 * 2**20)
    line = error_line(distrnn("train", "--mode", "cpu", *TINY, "--data-dir", str(data_dir),
                              "--output-dir", str(small_disk / "run")))
    assert line.startswith("distrnn.train: error: only ")
    assert line.endswith(f"MB free for run folder {small_disk}/run, about 16.9 MB needed for checkpoints; "
                         "free some space or pass another --output-dir")


def test_a_failed_save_keeps_the_previous_checkpoint(small_disk, data_dir):
    out = small_disk / "run"
    args = ["train", "--mode", "cpu", "--config", "smoke", "--set", "data.train_samples=4000",
            "--set", "data.test_samples=500", "--set", "checkpoint.every_steps=25", "--set", "checkpoint.keep=1",
            "--set", "train.log_every=2", "--no-wandb", "--data-dir", str(data_dir), "--output-dir", str(out)]
    proc = start_distrnn(*args)
    wait_for_step(proc, out, 26)  # the checkpoint of step 25 is complete; the next is 24 steps (~1 s) away
    fill(small_disk, 2**20)  # less than one more checkpoint needs
    _, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(args, proc.returncode, "", stderr)
    line = error_line(result)
    assert line.startswith("distrnn.train: error: only ") and "needed for checkpoints" in line
    kept = newest_checkpoint(out)
    assert kept.name == "step-00000025" and (kept / "model.safetensors").is_file()

    (small_disk / "filler").unlink()
    resumed = distrnn(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {kept}" in resumed.stdout
