"""A run folder that holds an older run: `--resume never` starts over there without mixing the two, and
`--resume RUN_FOLDER` of another run reads that folder without changing it. Real processes (gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import distrnn, flip_byte, newest_checkpoint, one_line_error, run_warnings

# 640 images: 10 steps an epoch with 1 process, 5 with 2; a checkpoint every 3 steps and at each epoch's end.
SMALL = ["--config", "smoke", "--set", "data.train_samples=640", "--set", "train.eval_train_set=false",
         "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep=3", "--no-wandb"]


def train(out: Path, data_dir: Path, processes: int, *extra: str):
    return distrnn("train", "--mode", "cpu", "--num-processes", str(processes), "--data-dir", str(data_dir),
                   "--output-dir", str(out), *SMALL, *extra)


@pytest.fixture(scope="module")
def older_run(tmp_path_factory, data_dir) -> Path:
    """A finished run, seed 0, 2 epochs in 1 process: its checkpoints are steps 15, 18 and 20."""
    out = tmp_path_factory.mktemp("older") / "run"
    result = train(out, data_dir, 1, "--epochs", "2", "--set", "train.seed=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_seeds(run: Path) -> dict[str, int]:
    return {p.name: json.loads((p / "meta.json").read_text())["config"]["train"]["seed"]
            for p in sorted((run / "checkpoints").glob("step-*"))}


def test_resume_never_moves_the_older_run_aside_and_keeps_only_the_new_runs_files(tmp_path, older_run, data_dir):
    """Before: exit 0, and the folder's checkpoints were all the older run's (the new run's were skipped or
    pruned as older), so a later --resume auto continued the older run."""
    out = tmp_path / "run"
    shutil.copytree(older_run, out)
    before = snapshot(out)
    result = train(out, data_dir, 2, "--resume", "never", "--set", "train.seed=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    new_summary = json.loads((out / "summary.json").read_text())
    assert set(checkpoint_seeds(out).values()) == {1}, checkpoint_seeds(out)
    assert json.loads((newest_checkpoint(out) / "meta.json").read_text())["position"]["global_step"] == \
        new_summary["steps"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert max(steps) == new_summary["steps"], "metrics.jsonl still holds the older run's lines"

    aside = list((out / "previous").iterdir()) if (out / "previous").is_dir() else []
    assert len(aside) == 1, f"expected the older run in one folder under {out}/previous: {aside}"
    assert snapshot(aside[0]) == {name: data for name, data in before.items() if name != ".hold"}
    moved = [line for line in result.stdout.splitlines() if str(aside[0]) in line]
    assert len(moved) == 1 and "--resume never" in moved[0], result.stdout[-3000:]


def test_resume_from_another_runs_folder_passes_over_its_damaged_checkpoint_without_renaming_it(
        tmp_path, older_run, data_dir):
    """Before: the other run's newest checkpoint was renamed to .damaged-step-N in its folder, which this run
    does not hold (docs/checkpoints.md: a checkpoint named with --resume PATH that does not verify is not moved)."""
    other = tmp_path / "other"
    shutil.copytree(older_run, other)
    newest = newest_checkpoint(other)
    flip_byte(newest / "model.safetensors")
    before = snapshot(other)
    previous = sorted(p for p in (other / "checkpoints").glob("step-*") if p != newest)[-1]
    out = tmp_path / "run"
    result = train(out, data_dir, 2, "--epochs", "2", "--resume", str(other))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert snapshot(other) == before, "the other run's folder was changed"
    warnings = run_warnings(result.stdout)
    assert len(warnings) == 2 and str(newest) in warnings[0] and "damaged" in warnings[0], warnings
    assert "set aside" not in warnings[0], warnings
    assert f"resumed from {previous}: " in result.stdout


def test_a_save_meeting_another_lineages_checkpoint_of_its_step_is_refused_not_skipped(tmp_path, older_run, data_dir):
    """--resume PATH further back than the folder's newest checkpoint: its step 18 meets the folder's own step
    18 of the first lineage. Before: that save was skipped in silence (exit 0), and the folder kept the
    first lineage's checkpoints under the new run's model files."""
    out = tmp_path / "run"
    shutil.copytree(older_run, out)
    checkpoints = snapshot(out / "checkpoints")
    back = sorted((out / "checkpoints").glob("step-*"))[0]
    result = train(out, data_dir, 1, "--epochs", "2", "--resume", str(back))
    line = one_line_error(result)
    clash = out / "checkpoints" / sorted((out / "checkpoints").glob("step-*"))[1].name
    assert f"{clash} is another run's checkpoint" in line, line
    assert snapshot(out / "checkpoints") == checkpoints
