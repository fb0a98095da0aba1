"""The worker processes of a run: how many, on which device (`plan_this_machine`, from `--mode/--num-processes`;
`plan_training`, `distrnn train`'s plan over its machines), and starting them: the worker in this process when it
is one process, else torchrun's agent in this process (distrnn.launcher.agent).

Each plan names the accelerate launch config in launch/ (installed as distrnn.launch) that starts the
same processes with `accelerate launch --config_file launch/*.yaml -m distrnn.train` (`distrnn env`
shows it); distrnn's own launcher does not need them.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from distrnn.errors import DistrnnError, first_line, run_cli
from distrnn.launcher import engines
from distrnn.launcher.agent import free_port, run_agent
from distrnn.launcher.network import gloo_interface, wait_for_main
from distrnn.ranks.devices import USE_CPU_VARIABLE, runs_on_cpu, visible_gpus
from distrnn.ranks.launcher_watch import LAUNCHER_PID_VARIABLE
from distrnn.run.hold import RUN_ID_VARIABLE

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
    supervised: bool = False  # even one worker runs under torchrun's agent (--max-restarts)

    @property
    def uses_cpu(self) -> bool:
        return self.mode == "cpu"

    @property
    def in_process(self) -> bool:
        """One process on one machine: no launcher, no second interpreter."""
        return self.num_processes == 1 and self.machines is None and not self.supervised


def plan_this_machine(mode: str, num_processes: int | None, gpus: int | None = None) -> Plan:
    """The processes on this machine and their device, from --mode and --num-processes (`gpus`: this machine's
    visible GPUs, counted when None). One machine, no restarts: `distrnn evaluate`'s plan, and the start of
    `distrnn train`'s (plan_training)."""
    if gpus is None:
        gpus = 0 if mode == "cpu" else visible_gpus()  # --mode cpu need not import torch to plan
    if num_processes is not None and num_processes < 1:
        raise DistrnnError(f"--num-processes must be >= 1, got {num_processes}")
    on_cpu = runs_on_cpu(mode, gpus)
    if mode == "auto":
        mode = "cpu" if on_cpu else "ddp" if gpus > 1 else "gpu"
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


def plan_training(mode: str, num_processes: int | None, num_machines: int | None, machine_rank: int | None,
                  main_ip: str | None, main_port: int | None, max_restarts: int = 0) -> Plan:
    """`distrnn train`'s plan: the command line's flags, and for each machine flag it leaves out what the engine
    that started it says (engines.py: a Kubeflow TrainJob's PET_* variables, a PyTorchJob's, ...)."""
    engine = engines.detect()
    machines = num_machines if num_machines is not None else (engine.machines or 1)
    if machines > 1:
        machine_rank = machine_rank if machine_rank is not None else engine.rank
        main_ip, main_port = main_ip or engine.address, main_port or engine.port
    here = plan_this_machine(mode, num_processes if num_processes is not None else engine.processes)
    p = on_machines(here, machines, machine_rank, main_ip, main_port)
    if max_restarts and p.in_process:  # one worker, but under torchrun's agent: it can be started again
        p = Plan(p.mode, 1, p.launch_config, p.machines, supervised=True)
    return p


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


# How long the machines of a multi-machine run wait for each other at start-up: SLURM starts every node's
# task within seconds, but a node can take minutes to import torch from a shared file system or to pull a
# container. 5 minutes covers that and still ends a job whose main machine never came long before a
# typical time limit.
RENDEZVOUS_TIMEOUT_S = 300


def launch(p: Plan, module: str, worker_args: list[str], rendezvous_timeout: int = RENDEZVOUS_TIMEOUT_S,
           max_restarts: int = 0) -> int:
    """Run the workers and return their exit code (restarting failed workers up to `max_restarts` times)."""
    if p.uses_cpu:
        # Without it an Accelerator on a machine with GPUs would take one; the workers inherit it.
        os.environ[USE_CPU_VARIABLE] = "true"
    if p.in_process:
        return run_here(module, worker_args)
    env = worker_env(p)
    return run_agent(lambda: torchrun_args(p, module, worker_args, rendezvous_timeout), env,
                     lambda error: describe_rendezvous(error, p, rendezvous_timeout), max_restarts)


def run_here(module: str, worker_args: list[str]) -> int:
    """The worker's own entry point, in this process: one interpreter start instead of two
    (measured here: each start imports torch and accelerate, ~2 s)."""
    return run_cli(importlib.import_module(module).main, prog=module, args=worker_args)


def torchrun_args(p: Plan, module: str, worker_args: list[str], rendezvous_timeout: int) -> list[str]:
    """torchrun's command line for this plan. Every option is given, so that stray PET_* variables (which
    set torchrun's defaults) cannot change the run; static rendezvous, as accelerate's launcher used. On
    machines other than the main one this first waits for the main machine (network.wait_for_main)."""
    m = p.machines or Machines(1, 0, "127.0.0.1", free_port())
    if m.rank > 0:
        rendezvous_timeout = max(10, round(wait_for_main(m.main_ip, m.main_port, rendezvous_timeout)))
    return [f"--nnodes={m.count}", f"--nproc-per-node={p.num_processes}", f"--node-rank={m.rank}",
            f"--master-addr={m.main_ip}", f"--master-port={m.main_port}", "--rdzv-backend=static",
            f"--rdzv-conf=timeout={rendezvous_timeout}", "--max-restarts=0", "--monitor-interval=0.1",
            # the main thread handles every signal (distrnn.launcher.agent); these are what the agent would have
            "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", "--module", module, *worker_args]


def worker_env(p: Plan) -> dict[str, str]:
    """What the workers need besides torchrun's own variables (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    # Restarts share the hold. The full host name, not errors.host_name: this names one launcher uniquely and
    # is never shown (two machines may share a short name in different domains).
    env = {RUN_ID_VARIABLE: f"{socket.gethostname()}-{os.getpid()}-{time.time():.0f}",
           LAUNCHER_PID_VARIABLE: str(os.getpid())}  # torchrun's agent runs in this process: the workers' parent
    if not os.environ.get("OMP_NUM_THREADS"):
        import psutil

        # What accelerate's launcher picked: physical cores / processes on CPU, 1 beside a GPU each.
        cores = psutil.cpu_count(logical=False) or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // p.num_processes) if p.uses_cpu else 1)
    if p.uses_cpu and p.machines is not None:
        name, address, chosen = gloo_interface(p.machines.main_ip)
        how = "GLOO_SOCKET_IFNAME" if chosen else f"the route to {p.machines.main_ip}"
        print(f"distrnn: machine {p.machines.rank}: gloo uses interface {name} ({address}, {how})", flush=True)
        env["GLOO_SOCKET_IFNAME"] = name
    return env


def describe_rendezvous(error: BaseException, p: Plan, timeout: int) -> str | None:
    """One line for a start-up that failed before the workers ran; None for anything else (a bug)."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous import RendezvousError

    if not isinstance(error, (DistError, RendezvousError, TimeoutError, ConnectionError)):
        return None
    m = p.machines or Machines(1, 0, "127.0.0.1", 0)
    text, where = str(error), f"{m.main_ip}:{m.main_port}"
    if "EADDRINUSE" in text or "address already in use" in text:
        return f"rendezvous port {m.main_port} is taken by another process on this machine; pick another " \
               "--main-process-port"
    if "waiting for clients" in text:
        return (f"only {text.split('. ')[-1].split(' clients')[0]} machines reached the rendezvous at {where} within "
                f"{timeout} s (--rendezvous-timeout); start machines 1..{m.count - 1} with --main-process-ip "
                f"{m.main_ip} --main-process-port {m.main_port}")
    if "timed out" in text and "connect" in text:
        return (f"machine {m.rank} could not reach the main machine at {where} within {timeout} s "
                "(--rendezvous-timeout); start machine 0 with the same --main-process-port, and check that this "
                "machine can reach that address and port")
    return (f"machine {m.rank} lost the rendezvous at {where} ({first_line(error)}); the main machine stopped or "
            "is unreachable: run the same command again on every machine")
