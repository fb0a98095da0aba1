"""The `distrnn` command: parse, validate, then hand over to the launcher (or a tool module)."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Any

import click
from click.core import ParameterSource

from distrnn.config.options import (
    CONFIG_OPTIONS,
    EVALUATE_OPTIONS,
    overrides_from,
    to_args,
    with_options,
)
from distrnn.config.schema import default_data_dir, load_config
from distrnn.errors import CONTEXT_SETTINGS, DistrnnError, debug_enabled, run_cli
from distrnn.launcher import engines, processes
from distrnn.ranks import devices
from distrnn.ranks.devices import check_precision
from distrnn.testing import faults

mode_option = click.option(
    "--mode", type=click.Choice(processes.MODES), default="auto", show_default=True,
    help="auto: DDP on all GPUs if several, one GPU if one, else CPU.",
)
processes_option = click.option(
    "--num-processes", type=int, default=None,
    help="Processes to start [default: 1 on CPU, all visible GPUs with ddp]. On CPU, >1 uses gloo.",
)


class Commands(click.Group):
    """The tools after training are imported when named: `distrnn train` does not pay for matplotlib
    (report) or onnx (export)."""

    TOOLS = {"predict": "distrnn.tools.predict", "export": "distrnn.tools.export", "report": "distrnn.tools.report",
             "k8s-manifest": "distrnn.launcher.kubernetes", "hang-report": "distrnn.launcher.ask_hang_report"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.TOOLS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.TOOLS:
            return importlib.import_module(self.TOOLS[name]).command
        return super().get_command(ctx, name)


@click.group(cls=Commands, context_settings=CONTEXT_SETTINGS)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (or DISTRNN_DEBUG=1).")
def main(debug: bool) -> None:
    """Train a stacked RNN on MNIST on a CPU, one GPU, DDP or SLURM, with exact global accuracy."""
    if debug:
        os.environ["DISTRNN_DEBUG"] = "1"


@with_options(CONFIG_OPTIONS)
@main.command(name="train", context_settings=CONTEXT_SETTINGS)
@mode_option
@processes_option
@click.option("--num-machines", type=int, default=None,
              help="Machines in a multi-node run [default: what the engine says (a Kubeflow TrainJob's PET_NNODES, "
                   "a PyTorchJob's WORLD_SIZE), else 1]; likewise --machine-rank and the main process's address.")
@click.option("--machine-rank", type=int, default=None, help="This machine's rank (0 on the main machine).")
@click.option("--main-process-ip", default=None, help="Address of the machine with rank 0.")
@click.option("--main-process-port", type=int, default=None, help="Rendezvous port on the machine with rank 0.")
@click.option("--rendezvous-timeout", type=click.IntRange(min=1), default=processes.RENDEZVOUS_TIMEOUT_S,
              show_default=True, metavar="SECONDS",
              help="How long the machines of a multi-machine run wait for each other at start-up.")
@click.option("--launcher", type=click.Choice(["torchrun", "ray"]), default="torchrun", show_default=True,
              help="torchrun: distrnn's own launcher (one per machine); ray: Ray Train's TorchTrainer on a Ray "
                   "cluster (pip install 'distrnn[ray]').")
@click.option("--ray-address", default=None, help="The Ray cluster's address (ray start --head ...); "
              "[default: RAY_ADDRESS, else a local Ray].")
@click.option("--num-workers", default="1", show_default=True, metavar="N|MIN-MAX",
              help="--launcher ray: worker processes (a range: Ray Train's elastic mode).")
@click.option("--max-failures", type=click.IntRange(min=0), default=0, show_default=True,
              help="--launcher ray: restarts of the workers after a failure (a lost node), from the latest checkpoint.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start failed workers again (a worker killed, hung or cut off), resuming from the newest "
                   "checkpoint, up to this many times; errors that would repeat (config, data) end the run.")
def train_command(mode: str, num_processes: int | None, num_machines: int | None, machine_rank: int | None,
                  main_process_ip: str | None, main_process_port: int | None, rendezvous_timeout: int,
                  max_restarts: int, launcher: str, ray_address: str | None, num_workers: str, max_failures: int,
                  **params: Any) -> None:
    """Train (config: defaults < --config FILE < flags and --set KEY=VALUE)."""
    if not debug_enabled():  # before torch is imported: torch's C++ log lines (c10d's retries, with C++
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # stack traces) say what our one lines say,
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # and the profiler's own lines (6: none, measured)
    check_launcher_flags(launcher)
    cfg = load_config(params["config_file"], overrides_from(params))  # fail here, once, not in every worker
    if launcher == "ray":
        sys.exit(on_ray(cfg, mode, ray_address, num_workers, max_failures, to_args(CONFIG_OPTIONS, params)))
    plan = processes.plan_training(mode, num_processes, num_machines, machine_rank, main_process_ip,
                                   main_process_port, max_restarts)
    check_precision(cfg.train.precision, on_cpu=plan.uses_cpu)
    sys.exit(processes.launch(plan, "distrnn.train", to_args(CONFIG_OPTIONS, params), rendezvous_timeout,
                              max_restarts))


LAUNCHER_FLAGS = {  # each launcher's own flags: the other one would ignore them
    "torchrun": ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                 "rendezvous_timeout", "max_restarts"),
    "ray": ("ray_address", "num_workers", "max_failures"),
}


def check_launcher_flags(launcher: str) -> None:
    ctx = click.get_current_context()
    other = "ray" if launcher == "torchrun" else "torchrun"
    for name in LAUNCHER_FLAGS[other]:
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            instead = "--num-workers" if launcher == "ray" else "--num-processes or --num-machines"
            raise click.UsageError(f"--{name.replace('_', '-')} is for --launcher {other}; "
                                   f"with --launcher {launcher} use {instead}")


def on_ray(cfg, mode: str, address: str | None, num_workers: str, max_failures: int, worker_args: list[str]) -> int:
    from distrnn.launcher.ray import require_ray, run_on_ray, worker_counts

    workers = worker_counts(num_workers)
    require_ray()
    use_cpu = devices.runs_on_cpu(mode)  # as for torchrun: allocated GPUs torch cannot see are refused
    check_precision(cfg.train.precision, on_cpu=use_cpu)
    return run_on_ray(worker_args, address, workers, max_failures, cfg.train.output_dir, use_cpu,
                      cfg.train.collective_timeout_s)


@with_options(EVALUATE_OPTIONS)
@main.command(name="evaluate", context_settings=CONTEXT_SETTINGS)
@mode_option
@processes_option
def evaluate_command(mode: str, num_processes: int | None, **params: Any) -> None:
    """Exact train and test accuracy of a saved model, sharded across processes."""
    from distrnn.run.model_files import load_model

    load_model(params["checkpoint"])  # a missing or torn file fails here with one line
    plan = processes.plan_this_machine(mode, num_processes)
    sys.exit(processes.launch(plan, "distrnn.evaluate", to_args(EVALUATE_OPTIONS, params)))


@main.command(name="env", context_settings=CONTEXT_SETTINGS)
def env_command() -> None:
    """Versions, devices, and the launch config `--mode auto` would use."""
    import torch

    import distrnn

    click.echo(f"distrnn      {distrnn.__version__}")
    click.echo(f"python       {platform.python_version()} ({platform.machine()})")
    for name in ("torch", "torchvision", "accelerate", "wandb", "click"):
        try:
            version = importlib.import_module(name).__version__
        except ImportError:
            version = "not installed"
        click.echo(f"{name:<12} {version}")
    click.echo(f"cpu cores    {os.cpu_count()} (torch threads {torch.get_num_threads()})")
    cpu_name = devices.cpu_capabilities().get("cpu_name") or platform.processor() or "unknown"
    click.echo(f"cpu          {cpu_name}, {devices.cpu_capability()}, bf16: "
               f"{devices.cpu_bf16_native() or 'emulated (no AVX512-BF16, AMX or BF16)'}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    click.echo(f"torch cuda   {torch.version.cuda or 'none (a CPU-only build)'}, cuDNN {cudnn}, "
               f"built for {' '.join(torch.cuda.get_arch_list()) or 'no GPU architecture'}")
    click.echo(f"driver       {devices.nvidia_driver() or 'no NVIDIA driver found'}")
    gpus = devices.visible_gpus()
    click.echo(f"gpus         {gpus}" + (f" ({devices.allocated_gpus()})" if devices.allocated_gpus() else ""))
    for i in range(gpus):
        major, minor = torch.cuda.get_device_capability(i)
        click.echo(f"  cuda:{i}     {torch.cuda.get_device_name(i)} (sm_{major}{minor}, bf16: "
                   f"{'native' if devices.gpu_bf16_supported() else 'no'})")
    click.echo(f"data dir     {default_data_dir()}")
    click.echo(f"engine       {engines.detect().describe()}")
    click.echo(f"faults       {faults.injected() or 'none'} (DISTRNN_FAULTS: test fault injection)")
    click.echo(f"precision    {devices.choose_precision('auto', on_cpu=gpus == 0).describe()}")
    try:
        plan = processes.plan_this_machine("auto", None, gpus)
    except DistrnnError as e:
        click.echo(f"auto mode    refused: {e}")
        return
    click.echo(f"auto mode    {plan.mode}, {plan.num_processes} process(es), {plan.launch_config}")
    click.echo(plan.launch_config.read_text().rstrip())


def entry() -> None:
    sys.exit(run_cli(main, prog="distrnn"))


if __name__ == "__main__":
    entry()
