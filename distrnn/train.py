"""The training worker: one process of a run, started by `distrnn train` or `accelerate launch -m distrnn.train`.

Parses, then calls: the run is `distrnn.worker.training.run_training`, the loop `distrnn.worker.trainer`.
"""

from __future__ import annotations

from typing import Any

import click

from distrnn.config.options import config_options, overrides_from
from distrnn.config.schema import load_config
from distrnn.errors import CONTEXT_SETTINGS
from distrnn.ranks.collectives import run_worker
from distrnn.worker.training import run_training


@config_options
@click.command(context_settings=CONTEXT_SETTINGS)
def main(config_file: str | None, **params: Any) -> None:
    """Train the stacked RNN on MNIST (one worker process; start it with `accelerate launch` or `distrnn train`)."""
    run_training(load_config(config_file, overrides_from(params)))


if __name__ == "__main__":
    run_worker(main, prog="distrnn.train")
