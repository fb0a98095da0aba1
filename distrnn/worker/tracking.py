"""Metrics out of the main process: JSON lines in the run folder, and W&B and TensorBoard through
Accelerate's trackers.

Other ranks log nothing. Tracker problems (no key, no network, bad entity, a package not installed)
never stop training: they become one warning and the run continues, offline or without that tracker.
Each tracker is started, fed and finished on its own, so one failing never takes the other with it.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from PIL import Image

from distrnn.config.schema import WandbConfig, flatten
from distrnn.errors import first_line
from distrnn.run.folder import RunFolder

LABELS = {"wandb": "W&B", "tensorboard": "TensorBoard"}  # accelerate's tracker name -> the name warnings use
TENSORBOARD_MISSING = ("TensorBoard is not installed; training continues without it (pip install tensorboard, "
                       "or drop it from --log-with)")


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """{"model.hidden_size": 256, ...}: TensorBoard's hparams take only scalars and strings (a nested
    dict raises), so sections become dotted keys and lists become comma-separated text."""
    return {name: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            for name, value in flatten(config).items()}


def write_hparams(writer: Any, values: dict[str, Any]) -> None:
    """The run's config as TensorBoard hparams, in the writer's own event file (see _start_tensorboard).
    The summaries come from the writer's own package: accelerate falls back to tensorboardX (which Ray Train
    installs) when tensorboard is missing, and torch's summaries would need the missing package."""
    if type(writer).__module__.startswith("tensorboardX"):
        from tensorboardX.summary import hparams as hparams_summaries
    else:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

    for summary in hparams_summaries(values, {}):  # experiment, session start, session end
        writer.file_writer.add_summary(summary)
    writer.flush()


def choose_wandb_mode() -> str | None:
    """Honour WANDB_MODE; without an API key go offline so a run never waits on a login prompt."""
    if os.environ.get("WANDB_MODE"):
        return None
    if not has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
        return "offline"
    return None


class RunLog:
    """`resumed`: training continues from a checkpoint (metrics.jsonl goes on); `resumed_id`: the W&B run
    id stored in it, so a resumed run continues that W&B run."""

    def __init__(self, accelerator: Accelerator, folder: RunFolder, wandb: WandbConfig, config: dict[str, Any],
                 resumed: bool = False, resumed_id: str | None = None, tensorboard: bool = False):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = folder.metrics
        self.wandb_run = None
        if self.main and not resumed:
            self.path.unlink(missing_ok=True)  # a fresh start in a reused folder
        # Trackers live on the main process only. Each is started here on its own rather than by
        # accelerator.init_trackers, which starts them all in one go: one failing would stop the others.
        # WANDB_MODE=disabled asks for what --no-wandb does: wandb.init would return a run that logs nothing,
        # after importing wandb (and, for the result tables, pandas): 1.3 s of every run's start-up, measured
        # with cProfile on a 2-core Intel Xeon (AVX512).
        if self.main and wandb.enabled and os.environ.get("WANDB_MODE") != "disabled":
            self._start_wandb(wandb, folder, config, resumed_id)
        if self.main and tensorboard:
            self._start_tensorboard(folder, config, resumed)
        if os.environ.get("SLURM_JOB_ID"):  # which job, and how often it was requeued
            self.summary({"slurm/job_id": os.environ["SLURM_JOB_ID"],
                          "slurm/restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))})

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def _start_wandb(self, wandb: WandbConfig, folder: RunFolder, config: dict[str, Any],
                     resumed_id: str | None) -> None:
        if importlib.util.find_spec("wandb") is None:
            self.warn("W&B is not installed; training continues without it (pip install wandb, or pass --no-wandb)")
            return
        went_offline = choose_wandb_mode() == "offline"
        kwargs: dict[str, Any] = {"dir": str(folder.wandb_parent), "name": wandb.run_name or folder.root.name}
        if resumed_id:
            kwargs.update(id=resumed_id, resume="allow")
        if wandb.entity:
            kwargs["entity"] = wandb.entity
        if wandb.tags:
            kwargs["tags"] = list(wandb.tags)

        def init(init_kwargs: dict[str, Any]) -> None:
            tracker = WandBTracker(wandb.project, **init_kwargs)  # what init_trackers would make
            self._add(tracker, config)
            self.wandb_run = tracker.run

        try:
            init(kwargs)
        except Exception as e:  # no network, bad entity, expired key: W&B must never stop training
            if went_offline:
                self.warn(f"W&B could not start ({type(e).__name__}: {first_line(e)}); training continues without W&B")
                return
            self.warn(f"W&B could not start online ({type(e).__name__}: {first_line(e)}); logging offline instead, "
                      "upload later with `wandb sync`")
            os.environ["WANDB_MODE"] = "offline"
            try:
                init({**kwargs, "mode": "offline"})
            except Exception as e2:
                self.warn(f"W&B could not start offline either ({type(e2).__name__}: {first_line(e2)}); "
                          "training continues without W&B")
                return
        if went_offline and self.main:
            print("wandb: no API key found, logging offline (run `wandb login` and set WANDB_MODE=online to go online)",
                  flush=True)

    def _start_tensorboard(self, folder: RunFolder, config: dict[str, Any], resumed: bool) -> None:
        """Event files in RUN/tensorboard/, whatever W&B does.

        Accelerate's tracker writes to join(logging_dir, run_name); init_trackers would pass the
        Accelerator's logging_dir (its project_dir: the run folder) and the project name, i.e. RUN/distrnn/.
        Its store_init_configuration is not used: SummaryWriter.add_hparams writes into a new sub-folder
        named by the time (and accelerate a second one for hparams.yml), which TensorBoard lists as an
        extra, empty run at every start. The hparams go into the main event file instead, at a fresh
        start only: once per run folder.
        """
        tracker = TensorBoardTracker(folder.tensorboard.name, folder.tensorboard.parent)
        try:
            tracker.start()
            if not resumed:
                write_hparams(tracker.writer, hparams(config))
            self.accelerator.trackers.append(tracker)
        except Exception as e:  # not installed, a broken install, an unwritable folder: never a reason to stop
            # accelerate imports torch.utils.tensorboard (which needs tensorboard), failing that tensorboardX
            if isinstance(e, ModuleNotFoundError) and e.name in ("tensorboard", "tensorboardX"):
                self.warn(TENSORBOARD_MISSING)
            else:
                self._tensorboard_failed(tracker, e)

    def _tensorboard_failed(self, tracker: TensorBoardTracker, e: Exception) -> None:
        with suppress(Exception):  # a writer opened before the failure
            tracker.finish()
        hint = " (pip install --upgrade tensorboard, or drop it from --log-with)" if isinstance(e, ImportError) else ""
        self.warn(f"TensorBoard could not start ({type(e).__name__}: {first_line(e)}); training continues without "
                  f"it{hint}")

    def _add(self, tracker: GeneralTracker, config: dict[str, Any]) -> None:
        """What init_trackers does, for one tracker (W&B). Listed only once started, so a tracker that
        failed to start is never logged to or finished."""
        tracker.start()
        tracker.store_init_configuration(config)
        self.accelerator.trackers.append(tracker)

    def _tracker(self, name: str) -> GeneralTracker | None:
        """The live tracker called `name`: None if it was never started or was dropped after a failure."""
        if not self.main:
            return None
        return next((t for t in self.accelerator.trackers if t.name == name), None)

    def _each(self, what: str, call: Callable[[GeneralTracker], None]) -> None:
        """`call` on every live tracker; one that raises is dropped with a warning, the others go on."""
        for tracker in list(self.accelerator.trackers):
            try:
                call(tracker)
            except Exception as e:
                self.accelerator.trackers.remove(tracker)
                label = LABELS.get(tracker.name, tracker.name)
                self.warn(f"{label} {what} failed ({type(e).__name__}: {first_line(e)}); continuing without {label}")

    def warn(self, message: str) -> None:
        if self.main:
            print(f"warning: {message}", flush=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        # Tracker by tracker, not accelerator.log: that stops at the first tracker that raises.
        self._each("logging", lambda tracker: tracker.log(metrics, step=step))

    def results(self, test: Any, mistakes: list[tuple[Any, Any]], folder: RunFolder, step: int) -> None:
        """The final test confusion matrix and the most confident mistakes, in each tracker's own form."""
        wandb_tracker, board = self._tracker("wandb"), self._tracker("tensorboard")
        if wandb_tracker is not None and self.wandb_run is not None:
            self._wandb_results(wandb_tracker, test, mistakes, folder, step)
        if board is not None:
            self._tensorboard_results(board, folder, step)

    def _wandb_results(self, tracker: GeneralTracker, test: Any, mistakes: list[tuple[Any, Any]], folder: RunFolder,
                       step: int) -> None:
        """W&B's confusion-matrix chart (built from the exact counts, the table wandb.plot.confusion_matrix
        makes from per-sample lists), confusion.png and a table of the mistakes: W&B objects, so they go to
        the W&B tracker alone (TensorBoard's tracker takes numbers and text only)."""
        import wandb

        cells = [[str(t), str(p), n] for t, row in enumerate(test.confusion) for p, n in enumerate(row)]
        chart = wandb.plot_table("wandb/confusion_matrix/v1",
                                 wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells),
                                 {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                                 {"title": "test confusion matrix"})
        rows = [[wandb.Image(pixels), m.label, m.prediction, m.probability] for pixels, m in mistakes]
        try:
            tracker.log({"test/confusion_matrix": chart, "test/confusion": wandb.Image(str(folder.confusion_png)),
                                  "test/mistakes": wandb.Table(columns=["image", "true", "predicted", "probability"],
                                                               data=rows)}, step=step)
        except Exception as e:
            self.warn(f"W&B could not log the result tables ({type(e).__name__}: {first_line(e)})")

    def _tensorboard_results(self, tracker: GeneralTracker, folder: RunFolder, step: int) -> None:
        """confusion.png and errors.png as images, through the SummaryWriter itself: accelerate's
        tracker.log takes only numbers, text and dicts of numbers."""
        writer = tracker.tracker
        try:
            for tag, path in (("test/confusion", folder.confusion_png), ("test/mistakes", folder.errors_png)):
                if path.is_file():
                    with Image.open(path) as image:
                        writer.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
            writer.flush()
        except Exception as e:
            self.warn(f"TensorBoard could not log the result images ({type(e).__name__}: {first_line(e)})")

    def summary(self, values: dict[str, Any]) -> None:
        """The W&B run summary; TensorBoard has no such thing (summary.json holds every value)."""
        if self.wandb_run is not None and self._tracker("wandb") is not None:
            try:
                self.wandb_run.summary.update(values)
            except Exception as e:
                self.warn(f"W&B summary failed ({type(e).__name__}: {e})")

    def close(self) -> None:
        """Finish the trackers here (not in end_training) so that a tracker failure cannot fail the run;
        TensorBoard's writer is flushed and closed too, before a multi-process worker's os._exit.

        Offline, wandb itself then prints the `wandb sync <run folder>` command.
        """
        trackers, self.accelerator.trackers = self.accelerator.trackers, []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as e:
                self.warn(f"{LABELS.get(tracker.name, tracker.name)} could not finish ({type(e).__name__}: {e})")
