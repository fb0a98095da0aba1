"""Metrics out of the main process: JSON lines in the run folder, and W&B through Accelerate.

Other ranks log nothing. W&B problems (no key, no network, bad entity) never stop training:
they become one warning and the run continues, offline or without W&B.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import time
from typing import Any

from accelerate import Accelerator

from distrnn.config import WandbConfig
from distrnn.errors import first_line
from distrnn.run_folder import RunFolder


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> str | None:
    """Honour WANDB_MODE; without an API key go offline so a run never waits on a login prompt."""
    if os.environ.get("WANDB_MODE"):
        return None
    if not has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
        return "offline"
    return None


class RunLog:
    """`resumed_id`: the W&B run id stored in the checkpoint, so a resumed run continues that run."""

    def __init__(self, accelerator: Accelerator, folder: RunFolder, wandb: WandbConfig, config: dict[str, Any],
                 resumed_id: str | None = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = folder.metrics
        self.wandb_run = None
        if self.main and resumed_id is None:
            self.path.unlink(missing_ok=True)  # a fresh start in a reused folder
        if wandb.enabled:
            self._start_wandb(wandb, folder, config, resumed_id)
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
        kwargs: dict[str, Any] = {"dir": str(folder.trackers), "name": wandb.run_name or folder.root.name}
        if resumed_id:
            kwargs.update(id=resumed_id, resume="allow")
        if wandb.entity:
            kwargs["entity"] = wandb.entity
        if wandb.tags:
            kwargs["tags"] = list(wandb.tags)

        def init(init_kwargs: dict[str, Any]) -> None:
            self.accelerator.init_trackers(wandb.project, config=config, init_kwargs={"wandb": init_kwargs})
            if self.main:
                self.wandb_run = self.accelerator.get_tracker("wandb", unwrap=True)

        try:
            init(kwargs)
        except Exception as e:  # no network, bad entity, expired key: W&B must never stop training
            self.accelerator.trackers = []
            if went_offline:
                self.warn(f"W&B could not start ({type(e).__name__}: {first_line(e)}); training continues without W&B")
                return
            self.warn(f"W&B could not start online ({type(e).__name__}: {first_line(e)}); logging offline instead, "
                      "upload later with `wandb sync`")
            os.environ["WANDB_MODE"] = "offline"
            try:
                init({**kwargs, "mode": "offline"})
            except Exception as e2:
                self.accelerator.trackers = []
                self.warn(f"W&B could not start offline either ({type(e2).__name__}: {first_line(e2)}); "
                          "training continues without W&B")
                return
        if went_offline and self.main:
            print("wandb: no API key found, logging offline (run `wandb login` and set WANDB_MODE=online to go online)",
                  flush=True)

    def warn(self, message: str) -> None:
        if self.main:
            print(f"warning: {message}", flush=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.accelerator.trackers:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as e:
                self.accelerator.trackers = []
                self.warn(f"W&B logging failed ({type(e).__name__}: {e}); continuing without W&B")

    def results(self, test: Any, mistakes: list[tuple[Any, Any]], folder: RunFolder, step: int) -> None:
        """The final test confusion matrix (W&B's confusion-matrix chart, built from the exact counts, the
        table wandb.plot.confusion_matrix makes from per-sample lists) and a table of the mistakes."""
        if not (self.main and self.wandb_run is not None and self.accelerator.trackers):
            return
        import wandb

        cells = [[str(t), str(p), n] for t, row in enumerate(test.confusion) for p, n in enumerate(row)]
        chart = wandb.plot_table("wandb/confusion_matrix/v1", wandb.Table(columns=["Actual", "Predicted", "nPredictions"],
                                                                          data=cells),
                                 {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                                 {"title": "test confusion matrix"})
        rows = [[wandb.Image(pixels), m.label, m.prediction, m.probability] for pixels, m in mistakes]
        try:
            self.accelerator.log({"test/confusion_matrix": chart, "test/confusion": wandb.Image(str(folder.confusion_png)),
                                  "test/mistakes": wandb.Table(columns=["image", "true", "predicted", "probability"],
                                                               data=rows)}, step=step)
        except Exception as e:
            self.warn(f"W&B could not log the result tables ({type(e).__name__}: {first_line(e)})")

    def summary(self, values: dict[str, Any]) -> None:
        if self.main and self.wandb_run is not None and self.accelerator.trackers:
            try:
                self.wandb_run.summary.update(values)
            except Exception as e:
                self.warn(f"W&B summary failed ({type(e).__name__}: {e})")

    def close(self) -> None:
        """Finish W&B here (not in end_training) so that a W&B failure cannot fail the run.

        Offline, wandb itself then prints the `wandb sync <run folder>` command.
        """
        trackers, self.accelerator.trackers = self.accelerator.trackers, []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as e:
                self.warn(f"W&B could not finish ({type(e).__name__}: {e})")
