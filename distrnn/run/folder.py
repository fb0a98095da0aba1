"""The run folder: every path in it, and the checks made before a run writes to it.

    RUN/config.yaml          the resolved config
    RUN/metrics.jsonl        every logged metric, one JSON object a line
    RUN/model.pt             final weights + config (what `distrnn evaluate` reads)
    RUN/model.safetensors    the same without pickle; the config in its metadata
    RUN/confusion.png, .csv  the final test confusion matrix; RUN/errors.png the most confident mistakes
    RUN/summary.json         final counts, accuracy, time; its presence means "finished"
    RUN/checkpoints/step-N/  accelerate's save_state + meta.json (with every file's size and checksum);
                             .tmp-step-N while being written, .damaged-step-N once set aside
    RUN/manifest.json        the size and checksum of model.pt and model.safetensors
    RUN/.hold                which run owns the folder (hold.py)
    RUN/best/                the best model by validation accuracy (checkpoint.keep_best)
    RUN/debug/               what a non-finite loss left behind
    RUN/hang/                a hang's evidence: report.json, rank-R.json (ranks/hang_report.py)
    RUN/profile/rank-R.json  train.profile_steps: each rank's trace
    RUN/wandb/               W&B's own folder (offline runs)
    RUN/tensorboard/         TensorBoard's event files (`tensorboard --logdir RUN/tensorboard`)
    RUN/previous/<UTC time>/ an earlier run's files, moved there by a run started with --resume never

Other modules ask this one for paths; no file name is spelled anywhere else.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from distrnn.errors import DistrnnError
from distrnn.run.integrity import DAMAGED_PREFIX, fsync_folder

# summary.json "ranks": each rank's training time per optimizer step in these phases (time_phase_key).
# Written by the worker (worker/rank_timing.py), drawn by `distrnn report` (tools/time_split.py): defined here,
# with the file both read, because the tools do not import the worker (torch, accelerate).
TIME_PHASES = ("data", "compute", "allreduce", "optimizer")


def time_phase_key(phase: str) -> str:
    """summary.json "ranks": the key of one phase's milliseconds per optimizer step."""
    return f"{phase}_ms_per_step"


CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CheckpointFolder:
    """One checkpoint: what accelerate's save_state writes, plus meta.json."""

    path: Path

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"  # accelerate's SAFE_WEIGHTS_NAME (tested)

    @property
    def step(self) -> int:
        return int(self.path.name.removeprefix(TMP_PREFIX).removeprefix(CHECKPOINT_PREFIX))

    def is_complete(self) -> bool:
        """Renamed from .tmp-* (so every rank finished writing) and holding its meta.json."""
        return not self.path.name.startswith(TMP_PREFIX) and self.meta.is_file()


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"

    @property
    def model_safetensors(self) -> Path:
        """The same weights without pickle, the resolved config in the safetensors metadata."""
        return self.root / "model.safetensors"

    @property
    def manifest(self) -> Path:
        """integrity.record of the model files, written with them."""
        return self.root / "manifest.json"

    @property
    def hold(self) -> Path:
        return self.root / ".hold"

    @property
    def hang(self) -> Path:
        """A collective timeout's evidence (ranks/hang_report.py): the report and each answering rank's record."""
        return self.root / "hang"

    @property
    def confusion_png(self) -> Path:
        return self.root / "confusion.png"

    @property
    def confusion_csv(self) -> Path:
        return self.root / "confusion.csv"

    @property
    def errors_png(self) -> Path:
        return self.root / "errors.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        """checkpoint.keep_best: the model with the best validation accuracy (a folder load_model reads)."""
        return self.root / "best"

    @property
    def profile(self) -> Path:
        """train.profile_steps: one Chrome trace per rank (profiling.py)."""
        return self.root / "profile"

    @property
    def debug(self) -> Path:
        return self.root / "debug"

    @property
    def wandb_parent(self) -> Path:
        """The folder W&B makes its own wandb/ folder in (wandb.init's dir)."""
        return self.root

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files, hparams included (no sub-folders)."""
        return self.root / "tensorboard"

    @property
    def previous(self) -> Path:
        """Earlier runs' files, moved aside by a run started over here (--resume never): previous/<UTC time>/."""
        return self.root / "previous"

    def run_files(self) -> list[Path]:
        """What a run writes here, and so what a new run would overwrite or mix with, where it exists."""
        paths = [self.config, self.metrics, self.model, self.model_safetensors, self.manifest, self.confusion_png,
                 self.confusion_csv, self.errors_png, self.summary, self.checkpoints, self.best, self.profile,
                 self.debug, self.wandb_parent / "wandb", self.tensorboard]
        return [p for p in paths if p.exists() or p.is_symlink()]

    def checkpoint(self, step: int, tmp: bool = False) -> CheckpointFolder:
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        return CheckpointFolder(self.checkpoints / (TMP_PREFIX + name if tmp else name))

    def damaged_checkpoints(self) -> list[Path]:
        """Checkpoints set aside because they did not verify (integrity.set_aside: .damaged-step-N)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.name.startswith(DAMAGED_PREFIX + CHECKPOINT_PREFIX))

    def all_checkpoints(self) -> list[CheckpointFolder]:
        """Complete and incomplete checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [CheckpointFolder(p) for p in self.checkpoints.iterdir()
                 if p.is_dir() and p.name.removeprefix(TMP_PREFIX).startswith(CHECKPOINT_PREFIX)]
        return sorted(found, key=lambda c: (c.step, c.is_complete()))

    def debug_file(self, step: int, rank: int) -> Path:
        return self.debug / f"nonfinite-step-{step}-rank-{rank}.pt"

    def is_finished(self) -> bool:
        return self.summary.is_file()

    def prepare(self, config_yaml: str, needed_bytes: int, start_over: bool = False) -> Path | None:
        """Create the folder, prove it writable, move an earlier run's files aside when starting over (where
        to: returned), check free space, and save the resolved config."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise DistrnnError(f"cannot write to run folder {self.root} ({e.strerror}); "
                               "pass a writable --output-dir") from None
        aside = self.move_aside_earlier_run() if start_over else None
        self.check_free_space(needed_bytes)
        self.config.write_text(config_yaml)
        return aside

    def move_aside_earlier_run(self) -> Path | None:
        """Every file of an earlier run into previous/<UTC time>/ (never deleted); None when there was none.
        Moved, not left beside the new run's: its checkpoints have the higher step numbers, so pruning kept
        them and dropped the new run's, and --resume auto would have continued the earlier run."""
        found = self.run_files()
        if not found:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target, n = self.previous / stamp, 2
        while target.exists():  # two starts within one second
            target, n = self.previous / f"{stamp}-{n}", n + 1
        try:
            target.mkdir(parents=True)
            for path in found:
                os.replace(path, target / path.name)
            fsync_folder(target)
            fsync_folder(self.root)
        except OSError as e:
            raise DistrnnError(f"cannot move the earlier run in {self.root} to {target} ({e.strerror or e}); move "
                               "it away by hand, or pass another --output-dir") from None
        return target

    def check_free_space(self, needed_bytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed_bytes:
            raise DistrnnError(f"only {free / 2**20:.1f} MB free for run folder {self.root}, about "
                               f"{needed_bytes / 2**20:.1f} MB needed for checkpoints; free some space or pass another "
                               "--output-dir")
