"""Which engine started distrnn, and what it says about the machines of the run.

An engine is what started distrnn on a machine (SLURM, a Kubeflow TrainJob or PyTorchJob, Ray, torchrun) and
tells it, in environment variables, about the run's machines; distrnn only reads them.

Laid out as Lightning Fabric lays out its cluster environments (lightning/fabric/plugins/environments/): one
class per engine, whose static `detect(env)` says whether this process runs under it, and whose attributes hold
what it says: `machines` (how many), `rank` (this machine's), `address` and `port` (the main machine's) and
`processes` (per machine), None where it says nothing and distrnn chooses. `detect(env)` at the bottom asks the
classes in ORDER and takes the first that says yes, as Fabric's connector does
(`_choose_and_init_cluster_environment`); a plain command, last, always does.

`distrnn train` takes what the engine says for every machine flag the command line leaves out, so a pod
runs `distrnn train --config fast` and nothing else; `distrnn env` shows what was read (`describe()`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

TRAINER_V2 = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
PYTORCHJOB = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


class Engine:
    """What every engine has: its name, the variables it read (`reads`, those present, in that order) and what
    they say about the machines; read once, when it is detected."""

    name: str
    reads: tuple[str, ...] = ()
    machines: int | None = None
    rank: int | None = None
    address: str | None = None
    port: int | None = None
    processes: int | None = None  # per machine; None: distrnn's own choice (--mode auto)

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.variables = {name: env[name] for name in self.reads if name in env}  # what it read

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        """Whether this process runs under this engine."""
        raise NotImplementedError

    def describe(self) -> str:
        read = ", ".join(f"{name}={value}" for name, value in self.variables.items())
        return f"{self.name}" + (f" ({read})" if read else "")


class TrainJob(Engine):
    """Kubeflow Trainer v2, a TrainJob on the torch-distributed runtime: for a bare torchrun with static
    rendezvous, every pod gets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT
    (the Trainer's torch plugin, github.com/kubeflow/trainer pkg/runtime/framework/plugins/torch;
    distrnn.launcher.kubernetes writes such a TrainJob)."""

    name = "Kubeflow Trainer (TrainJob)"
    reads = TRAINER_V2

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        return all(name in env for name in TRAINER_V2)

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        super().__init__(env)
        self.machines, self.rank = int(env["PET_NNODES"]), int(env["PET_NODE_RANK"])
        self.address, self.port = env["PET_MASTER_ADDR"], int(env["PET_MASTER_PORT"])
        per_node = env["PET_NPROC_PER_NODE"]
        self.processes = int(per_node) if per_node.isdigit() else None  # "auto", "cpu", "gpu": distrnn's choice


class PyTorchJob(Engine):
    """A Kubeflow PyTorchJob (training-operator v1): every pod gets MASTER_ADDR, MASTER_PORT, WORLD_SIZE (the
    pods) and RANK (this pod), for one launcher per pod (github.com/kubeflow/training-operator
    pkg/controller.v1/pytorch/envvar.go; the user guide:
    https://www.kubeflow.org/docs/components/trainer/legacy-v1/user-guides/pytorch/).

    torchrun sets the same four names in every worker it starts, counting processes, not pods: where
    TORCHELASTIC_RUN_ID says this process is such a worker (a PyTorchJob pod that runs torchrun, or any
    torchrun), the four are torchrun's and this is not a PyTorchJob (Torchrun detects it)."""

    name = "Kubeflow PyTorchJob"
    reads = PYTORCHJOB

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        return all(name in env for name in PYTORCHJOB) and "TORCHELASTIC_RUN_ID" not in env

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        super().__init__(env)
        self.machines, self.rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        self.address, self.port = env["MASTER_ADDR"], int(env["MASTER_PORT"])


class Slurm(Engine):
    """SLURM: SLURM_JOB_ID in the processes of a job; shown with SLURM_JOB_NUM_NODES, SLURM_NODEID and
    SLURM_RESTART_COUNT where set (https://slurm.schedmd.com/sbatch.html#SECTION_OUTPUT-ENVIRONMENT-VARIABLES).
    Shown only: slurm/*.sh pass distrnn their own machine flags."""

    name = "SLURM"
    reads = ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_RESTART_COUNT")

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        return "SLURM_JOB_ID" in env


class Ray(Engine):
    """Ray: RAY_ADDRESS, the cluster that `ray.init()` and `distrnn train --launcher ray` (distrnn.launcher.ray)
    join (https://docs.ray.io/en/latest/ray-core/api/doc/ray.init.html). Shown only: Ray Train places the workers
    itself."""

    name = "Ray"
    reads = ("RAY_ADDRESS",)

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        return "RAY_ADDRESS" in env


class Torchrun(Engine):
    """Plain torchrun: distrnn started inside a torchrun worker, which has TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT (https://pytorch.org/docs/stable/elastic/run.html#environment-variables). Shown
    only: they count torchrun's processes, not machines."""

    name = "torchrun"
    reads = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        return "TORCHELASTIC_RUN_ID" in env


class PlainCommand(Engine):
    """No engine: distrnn started by hand or by a script; the command line says everything."""

    name = "none (a plain command)"

    @staticmethod
    def detect(env: Mapping[str, str] = os.environ) -> bool:
        return True


# The order detect() asks in: the first engine that says yes is the one. It matters where one engine's
# variables are present under another's:
ORDER: tuple[type[Engine], ...] = (
    TrainJob,  # the torchrun it starts sets TORCHELASTIC_RUN_ID, MASTER_ADDR, ... too: PET_* decide first
    PyTorchJob,  # says no inside a torchrun worker (its four names are torchrun's there), so Torchrun answers
    Slurm,  # a SLURM job may run torchrun, or a Ray cluster, inside it: SLURM is named
    Ray,
    Torchrun,  # after every engine that may start torchrun
    PlainCommand,  # always yes
)


def detect(env: Mapping[str, str] = os.environ) -> Engine:
    """The engine this process runs under: the first in ORDER that detects itself in `env`."""
    kind = next(kind for kind in ORDER if kind.detect(env))
    return kind(env)
