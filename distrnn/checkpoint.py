"""Atomic checkpoints in the run folder, and finding the one to resume from.

Layout: RUN/checkpoints/step-00000123/ holds what `accelerator.save_state` writes (model, optimizer,
scheduler, sampler, every rank's RNG states) plus meta.json (training position, resolved config,
number of processes, W&B run id). A checkpoint is written as .tmp-step-*, renamed when complete,
and only then does RUN/checkpoints/latest move; a save killed half-way leaves the previous one usable.
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

from distrnn.config import Config, flatten
from distrnn.distributed import main_then_agree
from distrnn.errors import DistrnnError
from distrnn.run_folder import check_free_space

META_FILE = "meta.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
# Keys whose change makes a checkpoint meaningless for the requested run.
MUST_MATCH = ("model.", "train.batch_size", "data.train_samples")


@dataclass
class Position:
    """Where training stands: resume continues at the next unseen batch of `epoch`."""

    epoch: int = 0  # the epoch in progress, 0-based
    step_in_epoch: int = 0  # batches of that epoch already trained
    global_step: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # per finished epoch


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / META_FILE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DistrnnError(f"checkpoint '{path}' is unreadable ({e}); pass another with --resume PATH") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(accelerator: Accelerator, run_dir: Path, position: Position, cfg: Config, extra: dict[str, Any],
         needed_bytes: int) -> Path:
    """Collective: every rank calls it (Accelerate saves each rank's RNG state)."""
    root = checkpoints_dir(run_dir)
    name = f"step-{position.global_step:08d}"
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    if final.exists():  # e.g. a step checkpoint that fell on the epoch's last step
        return final
    main_then_agree(accelerator, lambda: check_free_space(run_dir, needed_bytes))
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except OSError as e:  # the previous checkpoint is untouched: only tmp was being written
        raise DistrnnError(f"could not write checkpoint {tmp} ({e.strerror or e}); the previous checkpoint is "
                           "intact: free some space and run the same command again to resume") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # A hook for the kill-during-save test: widens the window between writing and renaming.
        time.sleep(float(os.environ.get("DISTRNN_TEST_SAVE_DELAY_S", "0")))
        meta = {"position": asdict(position), "config": cfg.to_dict(), "num_processes": accelerator.num_processes,
                "saved_at": time.time(), **extra}
        _write_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
        os.replace(tmp, final)
        _write_atomic(root / LATEST_FILE, name + "\n")
        _prune(root, cfg.checkpoint.keep)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if _complete(p))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and the incomplete ones passed over."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None, []
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name.removeprefix(TMP_PREFIX))
    incomplete = [p for p in entries if not _complete(p)]
    complete = [p for p in entries if _complete(p)]
    return (complete[-1] if complete else None), incomplete


def find_resume(run_dir: Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume auto|never|PATH` selects, and warnings to print."""
    if resume == "never":
        return None, []
    if resume == "auto":
        found, skipped = latest(run_dir)
        return found, [f"skipping incomplete checkpoint {p} (a save was interrupted)" for p in skipped]
    path = Path(resume)
    if _complete(path):
        return path, []
    found, skipped = latest(path)
    if found is None:
        raise DistrnnError(f"--resume {resume}: no complete checkpoint there; pass a checkpoints/step-* folder "
                           "or a run folder that has one, or --resume never")
    return found, [f"skipping incomplete checkpoint {p} (a save was interrupted)" for p in skipped]


def check_compatible(meta: dict[str, Any], cfg: Config, num_processes: int, where: Path) -> None:
    """Refuse a checkpoint of another model or data layout, naming the first difference."""
    saved, wanted = flatten(meta["config"]), flatten(cfg.to_dict())
    for key in sorted(wanted):
        if key.startswith(MUST_MATCH) and saved.get(key) != wanted[key]:
            raise DistrnnError(f"checkpoint {where} has {key}={saved.get(key)} but this run asks for {key}={wanted[key]}; "
                               "use the same config, another --output-dir, or --resume never")
    if meta["num_processes"] != num_processes:
        raise DistrnnError(f"checkpoint {where} was saved by {meta['num_processes']} process(es) and this run has "
                           f"{num_processes}; resume with --num-processes {meta['num_processes']}")
