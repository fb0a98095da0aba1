"""The `distrnn` command: parse, validate, then hand over to accelerate's launcher."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import click

from distrnn import launcher
from distrnn.config import load_config
from distrnn.errors import run_cli
from distrnn.options import config_options, overrides_from

_CONTEXT = {"help_option_names": ["-h", "--help"]}

mode_option = click.option(
    "--mode", type=click.Choice(launcher.MODES), default="auto", show_default=True,
    help="auto: DDP on all GPUs if several, one GPU if one, else CPU.",
)
processes_option = click.option(
    "--num-processes", type=int, default=None,
    help="Processes to start [default: 1 on CPU, all visible GPUs with ddp]. On CPU, >1 uses gloo.",
)


@click.group(context_settings=_CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (or DISTRNN_DEBUG=1).")
def main(debug: bool) -> None:
    """Train a stacked RNN on MNIST on a CPU, one GPU, DDP or SLURM, with exact global accuracy."""
    if debug:
        os.environ["DISTRNN_DEBUG"] = "1"


@main.command(context_settings=_CONTEXT)
@mode_option
@processes_option
@click.option("--num-machines", type=int, default=1, show_default=True, help="Machines in a multi-node run.")
@click.option("--machine-rank", type=int, default=None, help="This machine's rank (0 on the main machine).")
@click.option("--main-process-ip", default=None, help="Address of the machine with rank 0.")
@click.option("--main-process-port", type=int, default=None, help="Rendezvous port on the machine with rank 0.")
@config_options
def train(mode: str, num_processes: int | None, num_machines: int, machine_rank: int | None,
          main_process_ip: str | None, main_process_port: int | None, config_file: str | None, **params: Any) -> None:
    """Train (config: defaults < --config FILE < flags and --set KEY=VALUE)."""
    overrides = overrides_from(params)
    cfg = load_config(config_file, overrides)  # fail here, once, not in every worker
    plan = launcher.plan(mode, num_processes)
    plan = launcher.on_machines(plan, num_machines, machine_rank, main_process_ip, main_process_port)
    launcher.check_precision(plan, cfg.train.precision)
    worker_args = (["--config", config_file] if config_file else []) + [a for o in overrides for a in ("--set", o)]
    sys.exit(launcher.launch(plan, "distrnn.train", worker_args))


@main.command(context_settings=_CONTEXT)
@click.option("--checkpoint", required=True, help="A run folder (holding model.pt) or a model.pt file.")
@mode_option
@processes_option
@click.option("--data-dir", default=None, help="Folder holding MNIST/raw [default: the one stored with the model].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Evaluation batch size per process.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of each split.")
def evaluate(checkpoint: str, mode: str, num_processes: int | None, data_dir: str | None, batch_size: int | None,
             limit: int | None) -> None:
    """Exact train and test accuracy of a saved model, sharded across processes."""
    from distrnn.evaluate import load_model

    load_model(checkpoint)  # a missing or torn file fails here with one line
    plan = launcher.plan(mode, num_processes)
    args = ["--checkpoint", checkpoint]
    args += ["--data-dir", data_dir] if data_dir else []
    args += ["--batch-size", str(batch_size)] if batch_size else []
    args += ["--limit", str(limit)] if limit else []
    sys.exit(launcher.launch(plan, "distrnn.evaluate", args))


@main.command(context_settings=_CONTEXT)
def env() -> None:
    """Versions, devices, and the launch config `--mode auto` would use."""
    import accelerate
    import torch
    import torchvision
    import wandb

    import distrnn

    click.echo(f"distrnn      {distrnn.__version__}")
    click.echo(f"python       {platform.python_version()} ({platform.machine()})")
    for module in (torch, torchvision, accelerate, wandb, click):
        click.echo(f"{module.__name__:<12} {getattr(module, '__version__', '?')}")
    click.echo(f"cpu cores    {os.cpu_count()} (torch threads {torch.get_num_threads()})")
    gpus = launcher.visible_gpus()
    click.echo(f"gpus         {gpus}")
    for i in range(gpus):
        click.echo(f"  cuda:{i}     {torch.cuda.get_device_name(i)} (bf16: {torch.cuda.is_bf16_supported()})")
    click.echo(f"data dir     {os.environ.get('DISTRNN_DATA_DIR', './data')}")
    plan = launcher.plan("auto", None, gpus)
    click.echo(f"auto mode    {plan.mode}, {plan.num_processes} process(es), {plan.launch_config}")
    click.echo(plan.launch_config.read_text().rstrip())


def entry() -> None:
    run_cli(main, prog="distrnn")


if __name__ == "__main__":
    entry()
