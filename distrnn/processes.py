"""The worker processes of a run: how many, on which device (`plan`, from `--mode/--num-processes`),
and starting them: the worker in this process when it is one process, else accelerate's launcher
(torchrun) in this process.

The accelerate launch configs that `plan` names live in launch/ (installed as distrnn.launch); users
of `accelerate launch --config_file launch/*.yaml` read the same files.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from distrnn.devices import check_allocated_gpus_usable, visible_gpus
from distrnn.errors import DistrnnError, debug_enabled, run_cli
from distrnn.preemption import AGENT_SIGNALS, forward_to_children

MODES = ("auto", "cpu", "gpu", "ddp")


def launch_config(name: str) -> Path:
    return Path(str(resources.files("distrnn.launch") / name))


@dataclass(frozen=True)
class Machines:
    """Several machines, one launcher each (slurm/train_multinode.sh fills these from SLURM's variables)."""

    count: int
    rank: int
    main_ip: str
    main_port: int


@dataclass(frozen=True)
class Plan:
    mode: str  # cpu, gpu or ddp
    num_processes: int  # on this machine
    launch_config: Path
    machines: Machines | None = None

    @property
    def uses_cpu(self) -> bool:
        return self.mode == "cpu"

    @property
    def in_process(self) -> bool:
        """One process on one machine: no launcher, no second interpreter."""
        return self.num_processes == 1 and self.machines is None


def plan(mode: str, num_processes: int | None, gpus: int | None = None) -> Plan:
    if gpus is None:
        gpus = 0 if mode == "cpu" else visible_gpus()  # --mode cpu need not import torch to plan
    if num_processes is not None and num_processes < 1:
        raise DistrnnError(f"--num-processes must be >= 1, got {num_processes}")
    if mode == "auto":
        check_allocated_gpus_usable(gpus)
        mode = "ddp" if gpus > 1 else "gpu" if gpus == 1 else "cpu"
        if mode == "ddp" and num_processes == 1:
            mode = "gpu"
    if mode in ("gpu", "ddp") and gpus == 0:
        raise DistrnnError(f"--mode {mode} needs a GPU but none is visible; use --mode cpu (or auto)")
    if mode == "gpu":
        if num_processes not in (None, 1):
            raise DistrnnError(f"--mode gpu runs 1 process, got --num-processes {num_processes}; use --mode ddp")
        return Plan("gpu", 1, launch_config("gpu.yaml"))
    if mode == "ddp":
        n = gpus if num_processes is None else num_processes
        if n > gpus:
            raise DistrnnError(f"--num-processes {n} is more than the {gpus} visible GPU(s); use at most {gpus}")
        if n < 2:
            raise DistrnnError(f"--mode ddp needs at least 2 GPUs (found {gpus}); use --mode gpu")
        return Plan("ddp", n, launch_config("ddp.yaml"))
    n = num_processes or 1
    return Plan("cpu", n, launch_config("cpu.yaml" if n == 1 else "cpu_multi.yaml"))


def on_machines(p: Plan, count: int, rank: int | None, main_ip: str | None, main_port: int | None) -> Plan:
    """The same plan spread over `count` machines (launch/multinode.yaml)."""
    if count == 1:
        return p
    if count < 1:
        raise DistrnnError(f"--num-machines must be >= 1, got {count}")
    if rank is None or main_ip is None or main_port is None:
        raise DistrnnError("--num-machines > 1 needs --machine-rank, --main-process-ip and --main-process-port "
                           "(slurm/train_multinode.sh sets them)")
    if not 0 <= rank < count:
        raise DistrnnError(f"--machine-rank must be 0..{count - 1}, got {rank}")
    if p.mode == "gpu":
        p = Plan("ddp", 1, p.launch_config)
    return Plan(p.mode, p.num_processes, launch_config("multinode.yaml"), Machines(count, rank, main_ip, main_port))


def accelerate_args(p: Plan, module: str, worker_args: list[str]) -> list[str]:
    """The arguments of `accelerate launch` for this plan."""
    args = ["--config_file", str(p.launch_config)]
    if p.machines is not None:
        m = p.machines
        args += ["--num_machines", str(m.count), "--num_processes", str(m.count * p.num_processes),
                 "--machine_rank", str(m.rank), "--main_process_ip", m.main_ip, "--main_process_port", str(m.main_port)]
    elif p.num_processes > 1:
        args += ["--num_processes", str(p.num_processes)]
    if p.uses_cpu and not os.environ.get("OMP_NUM_THREADS"):
        import psutil

        # What accelerate would pick (physical cores / processes), passed so it does not warn about it.
        args += ["--num_cpu_threads_per_process", str(max(1, (psutil.cpu_count(logical=False) or 1) // p.num_processes))]
    return args + ["-m", module, *worker_args]


def launch(p: Plan, module: str, worker_args: list[str]) -> int:
    """Run the workers and return their exit code."""
    if p.uses_cpu:
        # The torchrun path ignores the launch config's use_cpu; this keeps the workers on CPU.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return run_here(module, worker_args) if p.in_process else run_accelerate(p, module, worker_args)


def run_here(module: str, worker_args: list[str]) -> int:
    """The worker's own entry point, in this process: one interpreter start instead of two
    (measured here: each start imports torch and accelerate, ~2 s)."""
    return run_cli(importlib.import_module(module).main, prog=module, args=worker_args)


def run_accelerate(p: Plan, module: str, worker_args: list[str]) -> int:
    """Run accelerate's launcher in this process and return the workers' exit code.

    In-process rather than as a subprocess so that a failed worker ends with its own one-line
    error, not with the launcher's traceback (CalledProcessError / ChildFailedError).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(accelerate_args(p, module, worker_args))
    args.signals_to_handle = AGENT_SIGNALS  # passed on to torchrun by accelerate's multi_gpu_launcher
    forward_to_children()
    if not debug_enabled():
        _quiet_torchrun_agent()
    try:
        launch_command(args)
    except ConnectionError:  # accelerate: the rendezvous port is taken on the main machine
        port = p.machines.main_port if p.machines else "0"
        raise DistrnnError(f"rendezvous port {port} is taken by another process on this machine; pick another "
                           "--main-process-port") from None
    except SignalException as e:  # Ctrl-C (SIGINT), SIGHUP, SIGQUIT: torchrun's agent stopped the workers
        return 128 + int(e.sigval)
    except subprocess.CalledProcessError as e:
        return _worker_exit(0, e.returncode)
    except ChildFailedError as e:
        return failed_workers_exit(e)
    return 0


def failed_workers_exit(error) -> int:
    """The exit code for torchrun's ChildFailedError, naming a rank a signal killed.

    A killed rank is the cause: the others' errors ("lost contact with another rank") follow from it.
    torchrun's get_first_failure() orders by whole-second timestamps, so when the agent sees both in
    one poll they tie and it answers the lowest rank; a signal's victim is looked for first instead.
    """
    killed = sorted(rank for rank, failure in error.failures.items() if failure.exitcode < 0)
    rank = killed[0] if killed else error.get_first_failure()[0]
    return _worker_exit(rank, error.failures[rank].exitcode)


def _worker_exit(rank: int, code: int) -> int:
    """A worker that raised printed its own line; one killed by a signal could not, so say it here."""
    if code < 0:
        print(f"distrnn: worker rank {rank} was killed by {signal.Signals(-code).name}; the other workers "
              "were stopped; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 128 - code
    return code


def _quiet_torchrun_agent() -> None:
    """torchrun's agent logs each worker's exit as warnings and a multi-line error report; the
    workers' own one-line errors (and _worker_exit) already say what happened."""
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
