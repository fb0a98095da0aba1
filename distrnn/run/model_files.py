"""The model file format: saving the final model, and loading a model from anything a run leaves.

A model travels with the resolved config that built it, so evaluating it needs no model flags.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from distrnn.config.schema import Config, build_config
from distrnn.errors import DistrnnError
from distrnn.model import StackedRNN
from distrnn.run import integrity
from distrnn.run.folder import CheckpointFolder, RunFolder

CONFIG_KEY = "distrnn_config"  # model.safetensors metadata: the resolved config, as JSON


def save_model(state: dict[str, torch.Tensor], config: dict[str, Any], folder: RunFolder) -> None:
    """Weights plus the resolved config, twice: model.pt (what `distrnn evaluate` reads) and
    model.safetensors (no pickle; the config in its metadata, for tools other than distrnn)."""
    from safetensors.torch import save_file

    # Copies with their own storage: on a GPU the RNN's weights are views of one cuDNN buffer.
    weights = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in state.items()}
    torch.save({"model": weights, "config": config}, folder.model)
    save_file(weights, str(folder.model_safetensors), metadata={"format": "pt", CONFIG_KEY: json.dumps(config)})
    integrity.give_ordinary_mode(folder.model_safetensors)
    # Each file's size and checksum, so that a torn or changed file is named before it is used (load_model). These
    # two alone: the run folder also holds checkpoints and W&B's files, which W&B may be writing or removing.
    files = {p.name: integrity.describe(p) for p in (folder.model, folder.model_safetensors)}
    folder.manifest.write_text(json.dumps({"files": files}, indent=2) + "\n")
    for path in (folder.model, folder.model_safetensors, folder.manifest):
        integrity.fsync_file(path)
    integrity.fsync_folder(folder.root)


def save_model_folder(state: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    """save_model into the folder `path`, replacing what is there only once the new files are complete."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(state, config, RunFolder(tmp))
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_recorded(path: Path) -> None:
    """A model file is as recorded in the manifest.json beside it (RUN/, best/). distrnn writes one with every
    model file, so where distrnn saved a model, a manifest missing or silent about the file is refused: deleting
    it must not turn the check off. A model file by itself (copied, or edited) has no record to be checked by."""
    folder = RunFolder(path.parent)
    manifest = folder.manifest
    if not manifest.is_file() and not saved_by_distrnn(folder):
        return
    if not manifest.is_file():
        raise DistrnnError(unverifiable(path, f"{manifest} is missing"))
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise DistrnnError(f"'{manifest}', the record of {path.name}'s checksum, cannot be read ({e})") from None
    if path.name not in files:
        raise DistrnnError(unverifiable(path, f"{manifest} does not record it"))
    try:
        integrity.verify(path.parent, {path.name: files[path.name]})
    except integrity.Damaged as e:
        raise DistrnnError(f"'{path}' is damaged ({e}); use another copy, or a checkpoint of the run "
                           "(--checkpoint RUN/checkpoints/step-N)") from None


def saved_by_distrnn(folder: RunFolder) -> bool:
    """A folder save_model wrote (RUN/, best/): both model files are there, or a finished run's summary.json."""
    return (folder.model.is_file() and folder.model_safetensors.is_file()) or folder.is_finished()


def unverifiable(path: Path, why: str) -> str:
    return (f"'{path}' cannot be verified: {why} (distrnn writes it with every model file); copy it along with the "
            "model file, or use a checkpoint of the run (--checkpoint RUN/checkpoints/step-N)")


def load_model(source: str | Path) -> tuple[StackedRNN, Config]:
    """A run folder (its model.pt, or model.safetensors), either file, or a checkpoints/step-* folder; each
    verified against the sizes and checksums recorded when it was written."""
    path = Path(source)
    checkpoint = CheckpointFolder(path)
    if checkpoint.meta.is_file():
        what = integrity.damage(checkpoint.path, checkpoint.meta)
        if what is not None:
            raise DistrnnError(f"checkpoint '{checkpoint.path}' is damaged ({what}); pass another checkpoint or the "
                               "run folder")
        return _load_checkpoint(checkpoint)
    if path.is_dir():
        folder = RunFolder(path)
        path = (folder.model if folder.model.is_file() or not folder.model_safetensors.is_file()
                else folder.model_safetensors)
    if path.is_file():
        check_recorded(path)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_safetensors(path)
    if not path.is_file():
        raise DistrnnError(f"no saved model at '{source}'; pass a run folder holding {RunFolder('.').model.name}, "
                           "the file itself, or a checkpoints/step-* folder")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, stored = saved["model"], saved["config"]
    except Exception as e:  # a torn or foreign file: say which, not a traceback
        raise DistrnnError(f"'{path}' is not a distrnn model file ({type(e).__name__}: {e})") from None
    return rebuild(state, stored, path)


def _load_safetensors(path: Path) -> tuple[StackedRNN, Config]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads(f.metadata()[CONFIG_KEY])
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise DistrnnError(f"'{path}' is not a distrnn model file ({type(e).__name__}: {e})") from None
    return rebuild(state, stored, path)


def _load_checkpoint(checkpoint: CheckpointFolder) -> tuple[StackedRNN, Config]:
    from safetensors.torch import load_file

    try:
        stored = json.loads(checkpoint.meta.read_text())["config"]
        state = load_file(str(checkpoint.weights))
    except Exception as e:
        raise DistrnnError(f"'{checkpoint.path}' is not a complete distrnn checkpoint "
                           f"({type(e).__name__}: {e})") from None
    return rebuild(state, stored, checkpoint.path)


def rebuild(state: dict[str, torch.Tensor], stored: dict[str, Any], path: Path) -> tuple[StackedRNN, Config]:
    """The model as the stored config describes it, whatever flags the caller passes."""
    cfg = build_config(stored, where=f"the config stored in '{path}'")
    model = StackedRNN(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistrnnError(f"weights in '{path}' do not fit the config stored with them ({e})") from None
    return model, cfg
