"""The run folder owns every path in it; its pre-flight checks fail with one line."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from distrnn.errors import DistrnnError
from distrnn.run.folder import RunFolder


def test_every_path_lives_under_the_run_folder(tmp_path):
    folder = RunFolder(tmp_path / "run")
    paths = [folder.config, folder.metrics, folder.model, folder.summary, folder.checkpoints, folder.debug,
             folder.wandb_parent, folder.checkpoint(7).path, folder.checkpoint(7, tmp=True).path,
             folder.debug_file(3, 1)]
    assert all(p == folder.root or folder.root in p.parents for p in paths)
    assert (folder.checkpoint(7).path.name == "step-00000007"
            and folder.checkpoint(7, tmp=True).path.name == ".tmp-step-00000007")
    assert folder.checkpoint(7).step == folder.checkpoint(7, tmp=True).step == 7


def test_checkpoint_weights_file_is_accelerates():
    from accelerate.utils.constants import SAFE_WEIGHTS_NAME

    assert RunFolder("x").checkpoint(1).weights.name == SAFE_WEIGHTS_NAME


def test_prepare_writes_the_config(tmp_path):
    folder = RunFolder(tmp_path / "a" / "b")
    folder.prepare("model: {}\n", needed_bytes=1)
    assert folder.config.read_text() == "model: {}\n"
    assert not folder.is_finished()


def test_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DistrnnError, match=r"cannot write to run folder .*/file/run \(Not a directory\); pass a "
                                           r"writable --output-dir"):
        RunFolder(tmp_path / "file" / "run").prepare("", needed_bytes=1)


def test_too_little_space_is_one_line(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**20, 99 * 2**20, 2**20))
    with pytest.raises(DistrnnError, match=r"only 1.0 MB free for run folder .*, about 16.9 MB needed for "
                                           r"checkpoints; free some space or pass another --output-dir"):
        RunFolder(tmp_path).check_free_space(int(16.9 * 2**20))
