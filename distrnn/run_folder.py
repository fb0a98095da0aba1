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
    RUN/.hold                which run owns the folder (folder_hold.py)
    RUN/best/                the best model by validation accuracy (checkpoint.keep_best)
    RUN/debug/               what a non-finite loss left behind
    RUN/profile/rank-R.json  train.profile_steps: each rank's trace
    RUN/wandb/               W&B's own folder (offline runs)
    RUN/tensorboard/         TensorBoard's event files (`tensorboard --logdir RUN/tensorboard`)

Other modules ask this one for paths; no file name is spelled anywhere else.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from distrnn.errors import DistrnnError

CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = ".damaged-"  # integrity.set_aside


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

    def prepare(self, config_yaml: str, needed_bytes: int) -> None:
        """Create the folder, prove it writable, check free space, and save the resolved config."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise DistrnnError(f"cannot write to run folder {self.root} ({e.strerror}); pass a writable --output-dir") from None
        self.check_free_space(needed_bytes)
        self.config.write_text(config_yaml)

    def check_free_space(self, needed_bytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed_bytes:
            raise DistrnnError(f"only {free / 2**20:.1f} MB free for run folder {self.root}, about "
                               f"{needed_bytes / 2**20:.1f} MB needed for checkpoints; free some space or pass another "
                               "--output-dir")
