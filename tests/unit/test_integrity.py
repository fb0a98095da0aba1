"""Trusted files on hand-made folders: what is recorded, what verifies, what is set aside; the run-folder hold."""

from __future__ import annotations

import json
import os
import time

import pytest

from distrnn.errors import DistrnnError
from distrnn.run import checkpoint, integrity, resume
from distrnn.run.folder import RunFolder
from distrnn.run.hold import RUN_ID_VARIABLE, STALE_AFTER_S, FolderHold, Holder
from distrnn.run.model_files import load_model
from tests.helpers import flip_byte


def published(folder: RunFolder, step: int) -> None:
    """A checkpoint as checkpoint.save publishes it: its files, then meta.json recording them."""
    ckpt = folder.checkpoint(step)
    ckpt.path.mkdir(parents=True)
    (ckpt.path / "model.safetensors").write_bytes(os.urandom(4000))
    (ckpt.path / "optimizer.bin").write_bytes(os.urandom(9000))
    (ckpt.path / "random_states_1.pkl").write_bytes(os.urandom(300))
    files = integrity.record(ckpt.path)
    ckpt.meta.write_text(json.dumps({"position": {"epoch": 0, "step_in_epoch": step, "global_step": step},
                                     "files": files}))


@pytest.fixture
def folder(tmp_path) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    for step in (20, 40, 60):
        published(run, step)
    return run


@pytest.mark.parametrize("damage, what", [
    (lambda c: (c.path / "model.safetensors").write_bytes(b""), "model.safetensors is 0 bytes, 4000 when it was "
                                                                "written"),
    (lambda c: flip_byte(c.path / "optimizer.bin"), "optimizer.bin does not match its checksum (changed after "
                                                           "it was written)"),
    (lambda c: (c.path / "random_states_1.pkl").unlink(), "random_states_1.pkl is missing"),
    (lambda c: c.meta.write_text('{"position": '), "meta.json cannot be read (Expecting value: line 1 column 14 "
                                                   "(char 13))"),
    (lambda c: c.meta.write_text(json.dumps({"position": {"epoch": 0, "step_in_epoch": 60, "global_step": 60}})),
     "meta.json records no file sizes and checksums, which distrnn writes with every checkpoint"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_chosen(folder, damage, what):
    damage(folder.checkpoint(60))
    found, warnings = resume.find_resume(folder, "auto")
    assert found.step == 40
    assert warnings == [f"checkpoint {folder.checkpoint(60).path} is damaged ({what}); set aside as "
                        ".damaged-step-00000060",
                        f"resuming from {folder.checkpoint(40).path}, the newest checkpoint that verifies"]
    assert (folder.checkpoints / ".damaged-step-00000060").is_dir()  # kept, for a person to look at
    assert resume.find_resume(folder, "auto") == (found, [])  # and not looked at again


def test_when_no_checkpoint_verifies_one_line_says_how_to_start_afresh(folder):
    for step in (20, 40, 60):
        (folder.checkpoint(step).path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(DistrnnError) as e:
        resume.find_resume(folder, "auto")
    assert str(e.value) == (f"no checkpoint in {folder.checkpoints} verifies (set aside: .damaged-step-00000020, "
                            ".damaged-step-00000040, .damaged-step-00000060); start afresh with --resume never, or "
                            "pass another --output-dir")
    with pytest.raises(DistrnnError, match="no checkpoint in .* verifies"):  # still, the next time
        resume.find_resume(folder, "auto")


def test_a_damaged_checkpoint_named_by_path_is_refused_not_moved(folder):
    flip_byte(folder.checkpoint(40).path / "optimizer.bin")
    with pytest.raises(DistrnnError, match=r"that checkpoint is damaged \(optimizer.bin does not match"):
        resume.find_resume(folder, str(folder.checkpoint(40).path))
    assert folder.checkpoint(40).path.is_dir()


def test_pruning_never_touches_a_set_aside_checkpoint(folder):
    integrity.set_aside(folder.checkpoint(20).path)
    checkpoint.prune(folder, keep=1)
    assert [c.step for c in folder.all_checkpoints()] == [60]
    assert [p.name for p in folder.damaged_checkpoints()] == [".damaged-step-00000020"]


def test_model_files_are_verified_against_their_manifest(tmp_path):
    """evaluate, predict and export all load through load_model: one line for a damaged file."""
    from distrnn.config.schema import Config
    from distrnn.model import StackedRNN
    from distrnn.run.model_files import save_model

    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    save_model(StackedRNN(Config().model).state_dict(), Config().to_dict(), run)
    load_model(run.root)
    flip_byte(run.model)
    with pytest.raises(DistrnnError) as e:
        load_model(run.root)
    assert str(e.value) == (f"'{run.model}' is damaged (model.pt does not match its checksum (changed after it was "
                            "written)); use another copy, or a checkpoint of the run (--checkpoint "
                            "RUN/checkpoints/step-N)")
    load_model(run.model_safetensors)  # the other file is intact, and usable


@pytest.mark.parametrize("lose_the_record, why", [
    (lambda run: run.manifest.unlink(), "{manifest} is missing"),
    (lambda run: run.manifest.write_text(json.dumps({"files": {}})), "{manifest} does not record it"),
])
def test_a_model_file_whose_record_is_gone_is_refused_not_trusted(tmp_path, lose_the_record, why):
    """distrnn writes manifest.json with every model file: without it the checksum check would be off, silently."""
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    save_default_model(run)
    lose_the_record(run)
    for given, path in [(run.root, run.model), (run.model_safetensors, run.model_safetensors)]:
        with pytest.raises(DistrnnError) as e:
            load_model(given)
        assert str(e.value) == (f"'{path}' cannot be verified: {why.format(manifest=run.manifest)} (distrnn writes "
                                "it with every model file); copy it along with the model file, or use a checkpoint "
                                "of the run (--checkpoint RUN/checkpoints/step-N)")
    alone = tmp_path / "elsewhere" / "model.pt"  # copied by itself (or edited by hand): no record to check it by
    alone.parent.mkdir()
    alone.write_bytes(run.model.read_bytes())
    load_model(alone)


def run_folder_in_use(tmp_path) -> RunFolder:
    """A run folder as save_model finds it at the end of a run: W&B, TensorBoard and checkpoints beside it."""
    run = RunFolder(tmp_path / "run")
    for name in ("wandb/offline-run-1/files/output.log", "tensorboard/events.out.tfevents.1",
                 "checkpoints/step-00000020/optimizer.bin"):
        (run.root / name).parent.mkdir(parents=True, exist_ok=True)
        (run.root / name).write_bytes(os.urandom(1000))
    return run


def save_default_model(run: RunFolder) -> None:
    from distrnn.config.schema import Config
    from distrnn.model import StackedRNN
    from distrnn.run.model_files import save_model

    save_model(StackedRNN(Config().model).state_dict(), Config().to_dict(), run)


def test_the_model_record_reads_the_model_files_alone(tmp_path, monkeypatch):
    """Reading every checkpoint again at the end of a run costs as much as they weigh, for nothing."""
    run = run_folder_in_use(tmp_path)
    read, checksum = [], integrity.checksum
    monkeypatch.setattr(integrity, "checksum", lambda path: read.append(path.name) or checksum(path))
    save_default_model(run)
    assert sorted(read) == ["model.pt", "model.safetensors"]
    assert sorted(json.loads(run.manifest.read_text())["files"]) == ["model.pt", "model.safetensors"]


def test_a_file_vanishing_from_the_run_folder_during_the_record_does_not_fail_it(tmp_path, monkeypatch):
    """W&B is still writing in RUN/wandb when the final model is saved: a file it removes meanwhile is none of
    the manifest's business."""
    run = run_folder_in_use(tmp_path)
    log, checksum = run.root / "wandb/offline-run-1/files/output.log", integrity.checksum

    def while_w_and_b_removes_its_log(path):
        log.unlink(missing_ok=True)
        return checksum(path)

    monkeypatch.setattr(integrity, "checksum", while_w_and_b_removes_its_log)
    save_default_model(run)
    monkeypatch.undo()
    load_model(run.root)


# --- the hold ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stale, why", [
    (dict(pid=2**22 - 7), "its process 4194297 is gone"),  # beyond pid_max: never a live process
    (dict(host="elsewhere", refreshed=time.time() - STALE_AFTER_S - 5), "it was not refreshed for"),
])
def test_a_stale_hold_is_taken_over_with_a_warning(tmp_path, monkeypatch, stale, why):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / ".hold"
    old = {**Holder.me().__dict__, "started": time.time() - 1000, **stale}
    path.write_text(json.dumps(old))
    hold = FolderHold(path)
    [warning] = hold.take()
    assert warning.startswith(f"took over the stale hold on {tmp_path} ({Holder(**old).describe()}): {why}")
    assert hold.read().pid == os.getpid()
    hold.release()


def test_a_requeued_slurm_job_takes_over_its_own_hold_silently(tmp_path, monkeypatch):
    path = tmp_path / ".hold"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    path.write_text(json.dumps({**Holder.me().__dict__, "host": "node7", "slurm_restart": 0}))  # before the requeue
    hold = FolderHold(path)
    assert hold.take() == []
    assert (hold.read().slurm_job, hold.read().slurm_restart) == ("4242", 1)
    hold.release()


@pytest.mark.parametrize("mine, theirs, taken", [("ray-77", "ray-77", True), ("ray-77", "ray-78", False),
                                                 (None, None, False)])
def test_a_restarted_worker_of_the_same_run_takes_over_its_hold_and_another_run_does_not(tmp_path, monkeypatch,
                                                                                          mine, theirs, taken):
    """A live holder on another node (Ray's or torchrun's earlier workers, not yet known to be gone): only a
    restart of the same `distrnn train` (its launcher's DISTRNN_RUN_ID) may take the hold over."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv(RUN_ID_VARIABLE, raising=False)
    if mine:
        monkeypatch.setenv(RUN_ID_VARIABLE, mine)
    path = tmp_path / ".hold"
    path.write_text(json.dumps({**Holder.me().__dict__, "host": "node7", "pid": 12, "run_id": theirs}))
    hold = FolderHold(path)
    if taken:
        assert hold.take() == []
        assert hold.read().run_id == mine and hold.read().pid == os.getpid()
        hold.release()
    else:
        with pytest.raises(DistrnnError, match="is in use by another run"):
            hold.take()

