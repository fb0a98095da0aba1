"""Options are declared once; what `distrnn` parses reaches the worker unchanged."""

from __future__ import annotations

import click
import pytest

from distrnn import cli, evaluate, train
from distrnn.config.options import CONFIG_OPTIONS, EVALUATE_OPTIONS, to_args


def parse(command: click.Command, args: list[str]) -> dict:
    with command.make_context(command.name or "x", list(args)) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("args", [
    [],
    ["--config", "fast", "--set", "a.b=1", "--set", "c.d=2", "--no-wandb", "--lr", "0.01", "--epochs", "2"],
    ["--wandb", "--data-dir", "/d", "--output-dir", "/o", "--seed", "3", "--precision", "bf16", "--batch-size", "8",
     "--resume", "never"],
])
def test_train_options_reach_the_worker_unchanged(args):
    outer = parse(cli.train_command, ["--mode", "cpu", *args])
    forwarded = to_args(CONFIG_OPTIONS, outer)
    inner = parse(train.main, forwarded)
    assert inner == {k: v for k, v in outer.items() if k in inner}
    assert set(inner) == {o.name for o in CONFIG_OPTIONS}


def test_evaluate_options_reach_the_worker_unchanged():
    outer = parse(cli.evaluate_command,
                  ["--checkpoint", "runs/x", "--mode", "cpu", "--limit", "5", "--batch-size", "9"])
    inner = parse(evaluate.main, to_args(EVALUATE_OPTIONS, outer))
    assert inner == {"checkpoint": "runs/x", "data_dir": None, "batch_size": 9, "limit": 5, "precision": None}


def test_both_hops_show_the_same_help():
    for outer, inner, options in [(cli.train_command, train.main, CONFIG_OPTIONS),
                                  (cli.evaluate_command, evaluate.main, EVALUATE_OPTIONS)]:
        for option in options:
            assert option in outer.params and option in inner.params
