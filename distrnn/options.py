"""The config flags shared by `distrnn train` and the worker `python -m distrnn.train`.

Typed flags are shorthands for `--set key=value`; both feed the one typed config.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from distrnn.config import PRECISIONS

# flag name -> config key
TYPED_FLAGS = {
    "data_dir": "data.dir",
    "output_dir": "train.output_dir",
    "wandb": "wandb.enabled",
    "seed": "train.seed",
    "precision": "train.precision",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "resume": "checkpoint.resume",
}

_OPTIONS = [
    click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                 help="YAML config (see configs/); defaults apply to keys it leaves out."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override any config key, e.g. --set model.cell=gru (repeatable; wins over the file)."),
    click.option("--data-dir", default=None, help="Folder holding MNIST/raw [default: $DISTRNN_DATA_DIR or ./data]."),
    click.option("--output-dir", default=None, help="Run folder: config, metrics, model, W&B run."),
    click.option("--wandb/--no-wandb", default=None, help="Log to Weights & Biases (offline without an API key)."),
    click.option("--seed", type=int, default=None, help="Seed for weights, shuffling and every RNG."),
    click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                 help="Mixed precision; fp16 needs a GPU, bf16 works on CPU too."),
    click.option("--epochs", type=int, default=None, help="Training epochs."),
    click.option("--batch-size", type=int, default=None, help="Batch size per process."),
    click.option("--lr", type=float, default=None, help="Adam learning rate (peak, with optim.schedule=onecycle)."),
    click.option("--resume", default=None, metavar="auto|never|PATH",
                 help="auto: continue from the newest complete checkpoint in the run folder [default]; "
                      "never: start fresh; PATH: a checkpoint or run folder."),
]


def config_options(command: Callable) -> Callable:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def overrides_from(params: dict[str, Any]) -> list[str]:
    """Typed flags first, then --set, so an explicit --set wins."""
    overrides = []
    for flag, key in TYPED_FLAGS.items():
        value = params.get(flag)
        if value is not None:
            overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return overrides + list(params.get("overrides") or ())
