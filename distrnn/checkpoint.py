"""Atomic training checkpoints: saving, pruning, and choosing the one to resume from.

A checkpoint is what `accelerator.save_state` writes (model, optimizer, scheduler, sampler, every
rank's RNG states) plus meta.json (training position, resolved config, number of processes, W&B
run id). It is written as .tmp-step-N and renamed when complete, so a save killed half-way leaves
the previous checkpoint usable. The main process decides every question about the shared folder
(which checkpoint to resume, whether one exists) and the other ranks use its answer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distrnn import faults
from distrnn.config import MATCH, Change, Config, changes_since, read_yaml
from distrnn.distributed import agree, from_main
from distrnn.errors import DistrnnError
from distrnn.run_folder import CheckpointFolder, RunFolder


@dataclass
class Position:
    """Where training stands: resume continues at the next unseen batch of `epoch`."""

    epoch: int = 0  # the epoch in progress, 0-based
    step_in_epoch: int = 0  # batches of that epoch already trained
    global_step: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation during training


def estimated_bytes(parameters: int, num_processes: int) -> int:
    """Weights + Adam's two moments in fp32, plus each rank's RNG state (~20 KB)."""
    return 3 * 4 * parameters + 20_000 * num_processes


def read_meta(checkpoint: CheckpointFolder) -> dict[str, Any]:
    try:
        return json.loads(checkpoint.meta.read_text())
    except (OSError, ValueError) as e:
        raise DistrnnError(f"checkpoint '{checkpoint.path}' is unreadable ({e}); pass another with --resume PATH") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(accelerator: Accelerator, folder: RunFolder, position: Position, meta: dict[str, Any], keep: int,
         needed_bytes: int, tensors: list[str]) -> Path:
    """Collective: every rank calls it (Accelerate saves each rank's RNG state)."""
    final, tmp = folder.checkpoint(position.global_step), folder.checkpoint(position.global_step, tmp=True)
    if from_main(accelerator, final.is_complete()):  # e.g. a stop right after a periodic save
        return final.path

    def make_room() -> None:
        folder.check_free_space(needed_bytes)
        shutil.rmtree(tmp.path, ignore_errors=True)
        tmp.path.mkdir(parents=True)

    agree(accelerator, make_room, here=accelerator.is_main_process)
    agree(accelerator, lambda: _save_state(accelerator, tmp))

    def publish() -> None:
        check_complete(tmp, tensors)
        faults.delay_publish()
        meta_all = {"position": asdict(position), "num_processes": accelerator.num_processes,
                    "saved_at": time.time(), **meta}
        _write_atomic(tmp.meta, json.dumps(meta_all, indent=2))
        os.replace(tmp.path, final.path)
        prune(folder, keep)

    agree(accelerator, publish, here=accelerator.is_main_process)
    return final.path


def _save_state(accelerator: Accelerator, tmp: CheckpointFolder) -> None:
    try:
        faults.fail_save()
        accelerator.save_state(str(tmp.path))
    except OSError as e:  # the previous checkpoint is untouched: only tmp was being written
        raise DistrnnError(f"could not write checkpoint {tmp.path} ({e.strerror or e}); the previous checkpoint "
                           "is intact: free some space and run the same command again to resume") from None


def untie_weights(models: list, weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate's save_state pre-hook: every tensor gets its own storage before it is written.

    On CUDA nn.RNN keeps its weights as views of one flat cuDNN buffer; safetensors keeps one name per
    storage (accelerate's clean_state_dict_for_safetensors), and 7 of the 8 RNN tensors were dropped.
    """
    for i, state in enumerate(weights):
        weights[i] = type(state)((name, tensor.clone()) for name, tensor in state.items())


def load_weights(models: list, input_dir: str) -> None:
    """accelerate's load_state pre-hook: the model's weights through load_state_dict, which copies into
    the existing tensors; safetensors' load_model, which load_state would use, refuses a model whose
    tensors share storage (cuDNN's flat buffer on a GPU). Loaded models leave the list, as the hook
    contract asks, so accelerate does not load them again."""
    from accelerate.utils import extract_model_from_parallel
    from safetensors.torch import load_file

    for model in list(models):
        net = extract_model_from_parallel(model)
        net.load_state_dict(load_file(str(CheckpointFolder(Path(input_dir)).weights),
                                      device=str(next(net.parameters()).device)))
        models.remove(model)


def check_complete(folder: CheckpointFolder, expected: list[str]) -> None:
    """A checkpoint missing any model tensor is never published: it would not resume or evaluate."""
    from safetensors import safe_open

    with safe_open(str(folder.weights), framework="pt") as f:
        missing = sorted(set(expected) - set(f.keys()))
    if missing:
        raise DistrnnError(f"checkpoint {folder.path} is incomplete ({len(missing)} of {len(expected)} model tensors "
                           f"missing, e.g. {missing[0]}); it was not published and the previous one is intact")


def prune(folder: RunFolder, keep: int) -> None:
    complete = [c for c in folder.all_checkpoints() if c.is_complete()]
    for old in complete[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)


def newest(folder: RunFolder) -> tuple[CheckpointFolder | None, list[CheckpointFolder]]:
    """The newest complete checkpoint, and the incomplete ones passed over."""
    found = folder.all_checkpoints()
    complete = [c for c in found if c.is_complete()]
    return (complete[-1] if complete else None), [c for c in found if not c.is_complete()]


def find_resume(folder: RunFolder, resume: str) -> tuple[CheckpointFolder | None, list[str]]:
    """The checkpoint `--resume auto|never|PATH` selects, and warnings to print."""
    if resume == "never":
        return None, []
    if resume != "auto":
        given = CheckpointFolder(Path(resume))
        if given.is_complete():
            return given, []
        folder = RunFolder(resume)
    found, skipped = newest(folder)
    if found is None and resume != "auto":
        raise DistrnnError(f"--resume {resume}: no complete checkpoint there; pass a checkpoints/step-* folder "
                           "or a run folder that has one, or --resume never")
    return found, [f"skipping incomplete checkpoint {c.path} (a save was interrupted)" for c in skipped]


def check_resume(folder: RunFolder, cfg: Config, found: CheckpointFolder | None, meta: dict[str, Any] | None,
                 num_processes: int) -> list[Change]:
    """The config changes a resume applies; the others are refused with one line naming every key.

    The same table (each key's resume policy in config.py) guards a finished run in the folder.
    """
    finished = folder.is_finished() and cfg.checkpoint.resume == "auto"
    if meta is None:  # nothing to resume: only a finished run's config.yaml can object
        if not (finished and folder.config.is_file()):
            return []
        saved = read_yaml(folder.config)
    else:
        saved = meta["config"]
    changes = changes_since(saved, cfg)
    refused = [c for c in changes if not c.allowed(cfg)]
    if refused and finished:
        listed = ", ".join(f"{c.key}: {c.old} -> {c.new}" for c in refused)
        raise DistrnnError(f"{folder.root} holds a finished run with another config ({listed}); pass another "
                           "--output-dir, or --resume never to start over there")
    if refused:
        old = ", ".join(f"{c.key}={c.old}" for c in refused)
        new = ", ".join(f"{c.key}={c.new}" for c in refused)
        why = "; the onecycle schedule is fixed at the start" if any(c.policy != MATCH for c in refused) else ""
        raise DistrnnError(f"checkpoint {found.path} has {old} but this run asks for {new}{why}; use the same "
                           "config, another --output-dir, or --resume never")
    if meta is not None:
        position = meta["position"]
        begun = position["epoch"] + (1 if position["step_in_epoch"] else 0)
        if cfg.train.epochs < begun:
            raise DistrnnError(f"checkpoint {found.path} is {begun} epoch(s) in; train.epochs={cfg.train.epochs} "
                               f"cannot undo that: ask for {begun} or more, or --resume never")
    if meta is not None and meta["num_processes"] != num_processes:
        raise DistrnnError(f"checkpoint {found.path} was saved by {meta['num_processes']} process(es) and this run "
                           f"has {num_processes}; resume with --num-processes {meta['num_processes']}")
    return changes if meta is not None else []
