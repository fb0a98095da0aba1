"""The run folder: checked before training starts, so that no run dies late for a cause known early."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from distrnn.config import Config, flatten
from distrnn.errors import DistrnnError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# Keys that may differ between a finished run and a new request for the same folder.
_FREE_KEYS = ("checkpoint.resume", "data.dir", "data.num_workers", "wandb.", "train.output_dir")


def check_finished_run(run_dir: Path, cfg: Config) -> None:
    """A folder holding a finished run is continued only with the same config or an explicit --resume PATH."""
    saved_file = run_dir / CONFIG_FILE
    if not (run_dir / SUMMARY_FILE).is_file() or not saved_file.is_file() or cfg.checkpoint.resume != "auto":
        return
    saved, wanted = flatten(yaml.safe_load(saved_file.read_text()) or {}), flatten(cfg.to_dict())
    changed = [k for k in sorted(wanted) if not k.startswith(_FREE_KEYS) and saved.get(k) != wanted[k]]
    if changed:
        first = changed[0]
        raise DistrnnError(
            f"{run_dir} holds a finished run with another config ({first}: {saved.get(first)} -> {wanted[first]}"
            f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); pass another --output-dir, "
            f"--resume never to start over there, or --resume {run_dir} to continue that run"
        )


def prepare(run_dir: Path, cfg: Config, needed_bytes: int) -> None:
    """Create the folder, prove it writable, check free space, and save the resolved config."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise DistrnnError(f"cannot write to run folder {run_dir} ({e.strerror}); pass a writable --output-dir") from None
    check_free_space(run_dir, needed_bytes)
    (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())


def check_free_space(run_dir: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise DistrnnError(f"only {free / 2**20:.1f} MB free for run folder {run_dir}, about {needed_bytes / 2**20:.1f} MB "
                           "needed for checkpoints; free some space or pass another --output-dir")


def checkpoint_bytes(parameters: int, num_processes: int) -> int:
    """Weights + Adam's two moments in fp32, plus each rank's RNG state (~20 KB)."""
    return 3 * 4 * parameters + 20_000 * num_processes
