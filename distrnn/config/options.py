"""Command-line options declared once, shared by `distrnn` and the workers it starts.

`distrnn train` and `python -m distrnn.train` take the config options; `distrnn evaluate` and
`python -m distrnn.evaluate` take the evaluate options. The launcher forwards what it parsed to
the worker with `to_args`, so the two hops can never disagree on a flag or its help text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from distrnn.config.schema import PRECISIONS, key_fields
from distrnn.errors import ConfigError

# flag name -> config key: typed flags are shorthands for --set KEY=VALUE
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
TRACKERS = ("wandb", "tensorboard")


def key_help(flag: str) -> str:
    """A typed flag's help: its config key's own help text (declared once, in config/schema.py)."""
    name = TYPED_FLAGS[flag]
    return f"{key_fields()[name].metadata['help']} Sets {name}."


CONFIG_OPTIONS = [
    click.Option(["--config", "config_file"], default=None,
                 help="YAML config file, or the name of a shipped one (default, fast, smoke); defaults apply to "
                      "keys it leaves out."),
    click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE",
                 help="Override any config key, e.g. --set model.cell=gru (repeatable; wins over the file)."),
    click.Option(["--data-dir"], default=None, help=key_help("data_dir")),
    click.Option(["--output-dir"], default=None, help=key_help("output_dir")),
    click.Option(["--log-with"], default=None, metavar="wandb,tensorboard|none",
                 help="Trackers to log to, any subset or none [default: wandb]; metrics.jsonl is always written."),
    click.Option(["--wandb/--no-wandb"], default=None, help=key_help("wandb")),
    click.Option(["--seed"], type=int, default=None, help=key_help("seed")),
    click.Option(["--precision"], type=click.Choice(PRECISIONS), default=None, help=key_help("precision")),
    click.Option(["--epochs"], type=int, default=None, help=key_help("epochs")),
    click.Option(["--batch-size"], type=int, default=None, help=key_help("batch_size")),
    click.Option(["--lr"], type=float, default=None, help=key_help("lr")),
    click.Option(["--resume"], default=None, metavar="auto|never|PATH", help=key_help("resume")),
    # KEY=VALUE without --set, as W&B sweep agents (${args_no_hyphens}) and Hydra users write them.
    click.Argument(["positional"], nargs=-1, metavar="[KEY=VALUE]..."),
]

EVALUATE_OPTIONS = [
    click.Option(["--checkpoint"], required=True,
                 help="A run folder (holding model.pt), a model.pt file, or a checkpoints/step-* folder."),
    click.Option(["--data-dir"], default=None,
                 help="Folder holding MNIST/raw [default: the one stored with the model]."),
    click.Option(["--batch-size"], type=click.IntRange(min=1), default=None, help="Evaluation batch size per process."),
    click.Option(["--limit"], type=click.IntRange(min=1), default=None, help="Only the first N images of each split."),
    click.Option(["--precision"], type=click.Choice(PRECISIONS), default=None,
                 help="[default: the precision the model was trained in; fp16 becomes fp32 on a CPU]"),
]


def with_options(options: list[click.Option]) -> Callable[[click.Command], click.Command]:
    """Add `options` to a Click command (a decorator placed above @click.command)."""
    def add(command: click.Command) -> click.Command:
        command.params.extend(options)
        return command

    return add


def to_args(options: list[click.Parameter], params: dict[str, Any]) -> list[str]:
    """The command line that gives a worker the same values for `options` (what the user set)."""
    args: list[str] = []
    for option in options:
        value = params.get(option.name)
        if value is None or value == ():
            continue
        if isinstance(option, click.Argument):
            args += ["--", *value] if option is options[-1] else list(value)
        elif option.is_bool_flag and option.secondary_opts:
            args.append(option.opts[0] if value else option.secondary_opts[0])
        else:
            for item in value if option.multiple else [value]:
                args += [option.opts[0], str(item)]
    return args


def overrides_from(params: dict[str, Any]) -> list[str]:
    """--log-with, then typed flags, then --set, then positional KEY=VALUE: the later wins."""
    overrides = []
    if params.get("log_with") is not None:
        chosen = [t.strip() for t in params["log_with"].split(",") if t.strip() and t.strip() != "none"]
        unknown = sorted(set(chosen) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"--log-with {params['log_with']}: unknown tracker {unknown[0]!r}; use any of "
                              f"{', '.join(TRACKERS)}, or none")
        overrides += [f"{t}.enabled={str(t in chosen).lower()}" for t in TRACKERS]
    for flag, name in TYPED_FLAGS.items():
        value = params.get(flag)
        if value is not None:
            overrides.append(f"{name}={str(value).lower() if isinstance(value, bool) else value}")
    return overrides + list(params.get("overrides") or ()) + list(params.get("positional") or ())


def config_options(command: click.Command) -> click.Command:
    return with_options(CONFIG_OPTIONS)(command)
