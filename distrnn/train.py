"""The training worker: one process of a run, started by `distrnn train` or `accelerate launch -m distrnn.train`.

Parses, then calls: the loop itself is `distrnn.trainer.Trainer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from distrnn.config import Config, load_config
from distrnn.distributed import Heartbeats, make_accelerator, peer_failure, run_worker, teardown
from distrnn.folder_hold import FolderHold
from distrnn.options import config_options, overrides_from
from distrnn.preemption import StopRequest
from distrnn.run_folder import RunFolder

if TYPE_CHECKING:
    from distrnn.checkpoint import OnSaved


def run_training(cfg: Config, on_checkpoint: OnSaved | None = None) -> dict[str, Any]:
    """This process's part of a run: the Trainer's fit, with a lost peer turned into one line. `on_checkpoint`
    (path, step) is called on every rank after each checkpoint is published (Ray's launcher reports them)."""
    from distrnn.trainer import Trainer

    stop_request = StopRequest()  # first, so a signal during start-up is not lost
    hold = FolderHold(RunFolder(cfg.train.output_dir).hold)  # taken by the Trainer before it writes there
    accelerator = trainer = heartbeats = None
    try:
        accelerator = make_accelerator(cfg.train.precision, cfg.train.seed, cfg.train.collective_timeout_s,
                                       cfg.train.output_dir,
                                       tf32=cfg.train.tf32, deterministic=cfg.train.deterministic)
        heartbeats = Heartbeats.start(accelerator)
        trainer = Trainer(cfg, accelerator, stop_request, hold, on_checkpoint)
        return trainer.fit()
    except Exception as e:
        lost = peer_failure(accelerator, e, heartbeats, cfg.train.collective_timeout_s)
        if lost is None:
            raise
        raise lost from None
    finally:
        if heartbeats is not None:
            heartbeats.close()
        if trainer is not None:
            trainer.close()
        hold.release()  # also when the Trainer failed to start after taking it
        teardown(accelerator)


@config_options
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(config_file: str | None, **params: Any) -> None:
    """Train the stacked RNN on MNIST (one worker process; start it with `accelerate launch` or `distrnn train`)."""
    run_training(load_config(config_file, overrides_from(params)))


if __name__ == "__main__":
    run_worker(main, prog="distrnn.train")
