"""Where a run starts: the checkpoint to continue from (or none), and the config that start implies,
decided once by the main process before anything is built (`decide_resume`); every rank uses its answer.

`--resume auto` takes the newest checkpoint of the run folder that verifies (damaged ones are set aside),
`--resume PATH` a given checkpoint or run folder, `--resume never` none (the earlier run moves aside, see
run/folder.py). A resume is refused, with one line naming every key, when the config changed a key its
policy keeps (config/schema.py); on another number of processes the global batch is kept (run/layout.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distrnn.config.schema import MATCH, Change, Config, changes_since
from distrnn.config.values import read_yaml
from distrnn.errors import DistrnnError
from distrnn.ranks.collectives import agree, from_main, main_print
from distrnn.run import integrity
from distrnn.run.folder import CheckpointFolder, RunFolder
from distrnn.run.hold import FolderHold
from distrnn.run.layout import Layout, config_with, first_requested, resume_layout


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts, decided before anything is built from its config."""

    checkpoint: CheckpointFolder | None  # the one to continue from; None: a fresh start
    meta: dict[str, Any] | None  # its meta.json
    cfg: Config  # the config to train with: the given one, in the layout the resume implies
    requested: tuple[int, int]  # (per-process batch, accumulation) the run's config asked for at its first start


def read_meta(checkpoint: CheckpointFolder) -> dict[str, Any]:
    try:
        return json.loads(checkpoint.meta.read_text())
    except (OSError, ValueError) as e:
        raise DistrnnError(f"checkpoint '{checkpoint.path}' is unreadable ({e}); "
                           "pass another with --resume PATH") from None


def newest_verified(folder: RunFolder, held: bool) -> tuple[CheckpointFolder | None, list[str]]:
    """The newest checkpoint that verifies, and warnings: incomplete ones passed over, damaged ones set aside
    (`held`: this run holds the folder) or passed over where they are (another run's folder: never changed)."""
    found = folder.all_checkpoints()
    warnings = [f"skipping incomplete checkpoint {c.path} (a save was interrupted)"
                for c in found if not c.is_complete()]
    for checkpoint in reversed([c for c in found if c.is_complete()]):
        what = integrity.damage(checkpoint.path, checkpoint.meta)
        if what is None:
            return checkpoint, warnings
        if held:
            aside = integrity.set_aside(checkpoint.path)
            warnings.append(f"checkpoint {checkpoint.path} is damaged ({what}); set aside as {aside.name}")
        else:
            warnings.append(f"checkpoint {checkpoint.path} is damaged ({what}); passed over and left as it is "
                            "(another run's folder)")
    return None, warnings


def find_resume(folder: RunFolder, resume: str) -> tuple[CheckpointFolder | None, list[str]]:
    """The checkpoint `--resume auto|never|PATH` selects, and warnings to print."""
    if resume == "never":
        return None, []
    held = True  # the run's own folder (--resume auto)
    if resume != "auto":
        given = CheckpointFolder(Path(resume))
        if given.is_complete():
            what = integrity.damage(given.path, given.meta)
            if what is not None:
                raise DistrnnError(f"--resume {resume}: that checkpoint is damaged ({what}); pass another, or a run "
                                   "folder, or --resume never")
            return given, []
        given_folder = RunFolder(resume)
        held, folder = given_folder.root.resolve() == folder.root.resolve(), given_folder
    found, warnings = newest_verified(folder, held)
    if found is None and resume != "auto":
        raise DistrnnError(f"--resume {resume}: no complete checkpoint there; pass a checkpoints/step-* folder "
                           "or a run folder that has one, or --resume never")
    if found is None and folder.damaged_checkpoints():
        raise DistrnnError(f"no checkpoint in {folder.checkpoints} verifies (set aside: "
                           f"{', '.join(p.name for p in folder.damaged_checkpoints())}); start afresh with "
                           "--resume never, or pass another --output-dir")
    if found is not None and any("is damaged" in w for w in warnings):
        warnings.append(f"resuming from {found.path}, the newest checkpoint that verifies")
    return found, warnings


def check_resume(folder: RunFolder, cfg: Config, found: CheckpointFolder | None,
                 meta: dict[str, Any] | None) -> list[Change]:
    """The config changes a resume applies; the others are refused with one line naming every key.

    The same table (each key's resume policy in config/schema.py) guards a finished run in the folder.
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
    return changes if meta is not None else []


def decide_resume(accelerator: Accelerator, cfg: Config, folder: RunFolder, hold: FolderHold,
                  needed_bytes: int) -> ResumePoint:
    """Collective (one gather and one broadcast): the main process takes the folder's hold, chooses the
    checkpoint, checks the config against it, chooses the layout (the global batch kept on another number of
    processes) and prepares the folder (`needed_bytes` free); every rank gets its answer."""
    say = main_print(accelerator)

    def decide() -> ResumePoint:
        held = hold.take()
        found, warnings = find_resume(folder, cfg.checkpoint.resume)
        meta = read_meta(found) if found else None
        changes = check_resume(folder, cfg, found, meta)
        layout, moved = (resume_layout(meta, cfg, accelerator.num_processes, found.path) if meta
                         else (Layout.configured(cfg, accelerator.num_processes), None))
        chosen = config_with(cfg, layout)
        aside = folder.prepare(chosen.to_yaml(), needed_bytes=needed_bytes, start_over=cfg.checkpoint.resume == "never")
        for warning in held + warnings:
            say(f"warning: {warning}")
        if aside:
            say(f"--resume never: the earlier run's files in {folder.root} were moved to {aside}")
        for change in changes:
            if change.key not in ("train.batch_size", "train.grad_accum_steps"):  # said by `moved`
                say(f"resume: {change.key} changed from {change.old} to {change.new} ({change.policy})")
        if moved:
            say(f"resume: {moved}")
        return ResumePoint(found, meta, chosen, first_requested(meta, cfg))

    return from_main(accelerator, agree(accelerator, decide, here=accelerator.is_main_process))
