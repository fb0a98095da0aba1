"""One training process's run: watch its launcher, make the Accelerator and the heartbeats, run the Trainer's
fit, turn a lost peer into one line, and release what it took. Called by the entry module (`python -m
distrnn.train`) and by Ray's workers (distrnn/launcher/ray.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from distrnn.config.schema import Config
from distrnn.ranks.collective_log import CollectiveLog
from distrnn.ranks.collectives import Heartbeats, make_accelerator, peer_failure, teardown
from distrnn.ranks.crash_record import CrashRecord
from distrnn.ranks.hang_request import ReportRequests
from distrnn.ranks.launcher_watch import LauncherWatch
from distrnn.ranks.preemption import StopRequest
from distrnn.run.folder import RunFolder
from distrnn.run.hold import FolderHold

if TYPE_CHECKING:
    from distrnn.run.checkpoint import OnSaved


def run_training(cfg: Config, on_checkpoint: OnSaved | None = None) -> dict[str, Any]:
    """This process's part of a run: the Trainer's fit, with a lost peer turned into one line. `on_checkpoint`
    (path, step) is called on every rank after each checkpoint is published (Ray's launcher reports them)."""
    from distrnn.worker.trainer import build_trainer

    stop_request = StopRequest()  # first, so a signal during start-up is not lost
    folder = RunFolder(cfg.train.output_dir)
    requests = ReportRequests(folder.hang)  # before the hold: `distrnn hang-report` finds the run by it
    hold = FolderHold(folder.hold)  # taken (decide_resume) before anything is written there
    watch = LauncherWatch.start()  # before the process group: joining it can wait for a launcher already gone
    accelerator = trainer = heartbeats = None
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    crash = CrashRecord.start(folder.hang) if several else None
    log = CollectiveLog(crash).install() if several else None  # numbered from the first
    try:
        accelerator = make_accelerator(cfg.train.precision, cfg.train.seed, cfg.train.collective_timeout_s,
                                       cfg.train.output_dir,
                                       tf32=cfg.train.tf32, deterministic=cfg.train.deterministic)
        heartbeats = Heartbeats.start(accelerator, log, requests)
        trainer = build_trainer(cfg, accelerator, stop_request, hold, on_checkpoint)
        return trainer.fit()
    except Exception as e:
        lost = peer_failure(accelerator, e, heartbeats, cfg.train.collective_timeout_s, folder.hang)
        if lost is None:
            raise
        raise lost from None
    finally:
        if heartbeats is not None:
            heartbeats.close()
        requests.close()
        if trainer is not None:
            trainer.close()
        if log is not None:
            log.uninstall()
        if crash is not None:
            crash.close()
        hold.release()  # also when the Trainer failed to start after taking it
        try:
            teardown(accelerator)
        finally:
            if watch is not None:  # last: a launcher can be lost during the teardown too
                watch.close()
