"""Saving with real processes: every rank's part of a checkpoint, and what the published files look like."""

from __future__ import annotations

import os
import re
import stat

from distrnn.config.schema import Config
from distrnn.model import StackedRNN
from distrnn.run.folder import RunFolder
from distrnn.run.model_files import save_model
from tests.helpers import distrnn, one_line_error

PROCESSES, BATCH, SAVES = 2, 64, 20
SMALL = ["--config", "smoke", "--set", f"train.batch_size={BATCH}", "--set", "train.eval_train_set=false",
         "--set", "data.test_samples=500", "--no-wandb"]


def ordinary_mode() -> int:
    """What open() gives a new file under this process's umask (0644 under 022): the runs inherit it."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def saved_steps(output: str) -> list[int]:
    return [int(step) for step in re.findall(r"^checkpoint \S+/step-(\d+) \(", output, re.M)]


def test_a_two_process_run_saves_at_every_step_on_a_slow_metadata_file_system(tmp_path, data_dir):
    """slow-open: the main process's temporary model.safetensors is in the folder when the other rank has written
    its part, and every open costs 20 ms more (NFS, Lustre). Each rank fsyncs only what it wrote; 20 saves in a row."""
    result = distrnn("train", "--mode", "cpu", "--num-processes", str(PROCESSES), *SMALL,
                     "--set", f"data.train_samples={SAVES * PROCESSES * BATCH}", "--set", "checkpoint.every_steps=1",
                     "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"),
                     env={"DISTRNN_FAULTS": "slow-open=20"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(set(saved_steps(result.stdout))) == list(range(1, SAVES + 1))


def test_published_files_are_readable_as_the_umask_allows(tmp_path, data_dir):
    """A teammate on a shared cluster evaluates a run's checkpoints and model files: none may keep the mode of a
    temporary file (0600, safetensors' own)."""
    run = tmp_path / "run"
    result = distrnn("train", "--mode", "cpu", *SMALL, "--set", "data.train_samples=640",
                     "--set", "checkpoint.every_steps=5", "--set", "checkpoint.keep_best=true",
                     "--set", "data.val_samples=200",
                     "--data-dir", str(data_dir), "--output-dir", str(run), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    published = [p for p in run.rglob("*") if p.is_file()]
    assert {"model.safetensors", "model.pt", "manifest.json", "optimizer.bin"} <= {p.name for p in published}
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in published}
    assert modes == dict.fromkeys(modes, oct(ordinary_mode()))



def test_a_run_folder_without_its_manifest_is_refused_by_every_command_that_loads_it(tmp_path):
    """Deleting RUN/manifest.json must not turn the model files' checksum check off."""
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    save_model(StackedRNN(Config().model).state_dict(), Config().to_dict(), run)
    run.manifest.unlink()
    image = tmp_path / "digit.npy"
    image.write_bytes(b"")  # never read: the model is refused first
    commands = {"evaluate": ["--mode", "cpu"], "predict": [str(image)],
                "export": ["--format", "torchscript", "--output", str(tmp_path / "exported.pt")]}
    for command, args in commands.items():
        result = distrnn(command, "--checkpoint", str(run.root), *args, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        assert one_line_error(result).split(": error: ", 1)[1] == (
            f"'{run.model}' cannot be verified: {run.manifest} is missing (distrnn writes it with every model file); "
            "copy it along with the model file, or use a checkpoint of the run (--checkpoint RUN/checkpoints/step-N)")
    assert not (tmp_path / "exported.pt").exists()


def test_auto_cadence_saves_at_the_interval_it_computed_and_both_ranks_agree(tmp_path, data_dir):
    """checkpoint.every_steps=auto: a probe save at step 20, then each save's measured cost and step time give the
    next periodic save's step (Young/Daly), the same on both ranks (a rank deciding alone would hang the save)."""
    steps = 160
    result = distrnn("train", "--mode", "cpu", "--num-processes", str(PROCESSES), *SMALL,
                     "--set", f"data.train_samples={steps * PROCESSES * BATCH}", "--set", "checkpoint.every_steps=auto",
                     "--set", "checkpoint.mtbf_s=2", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"),
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = re.findall(r"^checkpoint \S+/step-(\d+) \(|^checkpoint every (\d+) steps \(([\d.]+) s\): a save costs "
                        r"([\d.]+) s, a step ([\d.]+) ms, failures expected every (\d+) s$", result.stdout, re.M)
    saves = [int(e[0]) for e in events if e[0]]
    plans = [(int(e[1]), float(e[3]), float(e[4]) / 1000, float(e[5])) for e in events if e[1]]
    assert saves[0] == 20 and saves[-1] == steps  # the probe, and the epoch's end
    assert len(plans) == len(saves) >= 4  # a plan after every save (each followed steps)
    for (saved, next_saved), (interval, save_s, step_s, mtbf_s) in zip(zip(saves, saves[1:]), plans):
        assert mtbf_s == 2
        assert next_saved == min(saved + interval, steps)  # the epoch end comes first, or the planned step
        young_daly = (2 * save_s * mtbf_s) ** 0.5 / step_s  # from the printed (rounded) figures
        assert abs(interval - young_daly) <= max(1.0, 0.1 * young_daly)
