"""Finding, pruning and checking checkpoints, on hand-made run folders (no training)."""

from __future__ import annotations

import json

import pytest

from distrnn.config.schema import Config, build_config
from distrnn.errors import DistrnnError
from distrnn.run import checkpoint, integrity, resume
from distrnn.run.folder import RunFolder


def make(folder: RunFolder, step: int, complete: bool = True, tmp: bool = False, cfg: Config | None = None,
         processes: int = 1) -> None:
    ckpt = folder.checkpoint(step, tmp=tmp)
    ckpt.path.mkdir(parents=True)
    (ckpt.path / "model.safetensors").write_bytes(b"")
    if complete:
        ckpt.meta.write_text(json.dumps({"position": {"epoch": 0, "step_in_epoch": step, "global_step": step},
                                         "config": (cfg or Config()).to_dict(), "num_processes": processes,
                                         "files": integrity.record(ckpt.path)}))


@pytest.fixture
def folder(tmp_path) -> RunFolder:
    return RunFolder(tmp_path / "run")


def test_newest_complete_checkpoint_is_chosen_and_torn_ones_reported(folder):
    make(folder, 10)
    make(folder, 20)
    make(folder, 30, complete=False)  # killed before meta.json
    make(folder, 40, tmp=True)  # killed before the rename
    found, warnings = resume.find_resume(folder, "auto")
    assert found.path == folder.checkpoint(20).path
    assert sorted(warnings) == sorted(f"skipping incomplete checkpoint {folder.checkpoint(s, tmp=t).path} (a save was "
                                      "interrupted)" for s, t in [(30, False), (40, True)])


def test_steps_sort_numerically_not_by_name(folder):
    make(folder, 9)
    make(folder, 100_000_000)  # more digits than the zero padding
    assert resume.find_resume(folder, "auto")[0].step == 100_000_000


def test_resume_never_and_resume_path(folder, tmp_path):
    make(folder, 10)
    assert resume.find_resume(folder, "never") == (None, [])
    other = RunFolder(tmp_path / "other")
    make(other, 5)
    make(other, 6)
    assert resume.find_resume(folder, str(other.root))[0].step == 6  # a run folder
    assert resume.find_resume(folder, str(other.checkpoint(5).path))[0].step == 5  # one checkpoint
    with pytest.raises(DistrnnError, match="no complete checkpoint there"):
        resume.find_resume(folder, str(tmp_path / "empty"))


def test_empty_folder_has_nothing_to_resume(folder):
    assert resume.find_resume(folder, "auto") == (None, [])


def test_prune_keeps_the_newest_complete_ones(folder):
    for step in (10, 20, 30, 40):
        make(folder, step)
    make(folder, 50, complete=False)
    checkpoint.prune(folder, keep=2)
    assert [c.step for c in folder.all_checkpoints()] == [30, 40, 50]


def test_resume_applies_allowed_changes_and_refuses_the_rest(folder):
    make(folder, 10)
    found, _ = resume.find_resume(folder, "auto")
    meta = resume.read_meta(found)
    changes = resume.check_resume(folder, build_config(overrides=["optim.lr=0.005"]), found, meta)
    assert [(c.key, c.old, c.new) for c in changes] == [("optim.lr", 0.001, 0.005)]
    with pytest.raises(DistrnnError) as e:
        resume.check_resume(folder, build_config(overrides=["model.hidden_size=128", "train.seed=3"]),
                                found, meta)
    assert str(e.value) == (f"checkpoint {found.path} has model.hidden_size=256, train.seed=0 but this run asks for "
                            "model.hidden_size=128, train.seed=3; use the same config, another --output-dir, or "
                            "--resume never")
    assert resume.check_resume(folder, Config(), found, meta) == []  # another number of processes: run/layout.py


def test_onecycle_refusal_says_why(folder):
    onecycle = build_config(overrides=["optim.schedule=onecycle"])
    make(folder, 10, cfg=onecycle)
    found, _ = resume.find_resume(folder, "auto")
    with pytest.raises(DistrnnError, match="train.epochs=3 but this run asks for train.epochs=5; the onecycle "
                                           "schedule is fixed at the start"):
        resume.check_resume(folder, build_config(overrides=["optim.schedule=onecycle", "train.epochs=5"]), found,
                                resume.read_meta(found))


def test_finished_run_is_guarded_by_the_same_table(folder):
    make(folder, 10)
    folder.summary.write_text("{}")
    found, _ = resume.find_resume(folder, "auto")
    with pytest.raises(DistrnnError) as e:
        resume.check_resume(folder, build_config(overrides=["train.seed=1"]), found, resume.read_meta(found))
    assert str(e.value) == (f"{folder.root} holds a finished run with another config (train.seed: 0 -> 1); pass "
                            "another --output-dir, or --resume never to start over there")


def test_finished_run_without_checkpoints_is_guarded_by_its_config_yaml(folder):
    folder.root.mkdir(parents=True)
    folder.config.write_text(Config().to_yaml())
    folder.summary.write_text("{}")
    assert resume.check_resume(folder, build_config(overrides=["train.log_every=5"]), None, None) == []
    with pytest.raises(DistrnnError, match=r"holds a finished run with another config \(model.cell: rnn -> gru\)"):
        resume.check_resume(folder, build_config(overrides=["model.cell=gru"]), None, None)


def test_tensors_sharing_one_buffer_are_untied_before_saving():
    """cuDNN's layout: every RNN weight a view of one flat buffer (what save_state dropped 7 of 8 of)."""
    from collections import OrderedDict

    import torch

    flat = torch.arange(10.0)
    state = OrderedDict(a=flat[:4], b=flat[4:])
    weights = [state]
    checkpoint.untie_weights([], weights, "unused")
    a, b = weights[0]["a"], weights[0]["b"]
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert torch.equal(a, flat[:4]) and torch.equal(b, flat[4:]) and isinstance(weights[0], OrderedDict)


def test_a_checkpoint_missing_a_model_tensor_is_refused(folder):
    import torch
    from safetensors.torch import save_file

    ckpt = folder.checkpoint(5, tmp=True)
    ckpt.path.mkdir(parents=True)
    save_file({"fc.weight": torch.zeros(2)}, str(ckpt.weights))
    checkpoint.check_complete(ckpt, ["fc.weight"])
    with pytest.raises(DistrnnError, match=r"is incomplete \(2 of 3 model tensors missing, e.g. rnn.a\); it was not "
                                           r"published and the previous one is intact"):
        checkpoint.check_complete(ckpt, ["fc.weight", "rnn.a", "rnn.b"])


def test_fewer_epochs_than_the_checkpoint_has_begun_is_refused(folder):
    make(folder, 10)  # epoch 0, 10 steps in: one epoch begun
    found, _ = resume.find_resume(folder, "auto")
    meta = resume.read_meta(found)
    meta["position"]["epoch"] = 2  # two finished, the third begun
    with pytest.raises(DistrnnError, match=r"is 3 epoch\(s\) in; train.epochs=2 cannot undo that: ask for 3 or "
                                           r"more, or --resume never"):
        resume.check_resume(folder, build_config(overrides=["train.epochs=2"]), found, meta)
    assert resume.check_resume(folder, build_config(overrides=["train.epochs=5"]), found, meta)
