"""Which engine started distrnn, and what it says about the machines of the run.

- Kubeflow Trainer v2 (a TrainJob on the torch-distributed runtime) sets, for a bare torchrun with static
  rendezvous, PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT;
- a Kubeflow PyTorchJob (training-operator v1) sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE (its pods) and RANK
  (this pod), for one launcher per pod;
- SLURM sets SLURM_JOB_ID (slurm/*.sh pass distrnn their own flags);
- Ray: `distrnn train --launcher ray` (distrnn.launcher.ray), RAY_ADDRESS for the cluster;
- plain torchrun: TORCHELASTIC_RUN_ID (distrnn started inside a torchrun worker).
`distrnn train` takes what the engine says for every machine flag the command line leaves out, so a pod
runs `distrnn train --config fast` and nothing else; `distrnn env` shows what was read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

TRAINER_V2 = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
PYTORCHJOB = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


@dataclass(frozen=True)
class Engine:
    name: str
    variables: dict[str, str] = field(default_factory=dict)  # what it read
    machines: int | None = None
    rank: int | None = None
    address: str | None = None
    port: int | None = None
    processes: int | None = None  # per machine; None: distrnn's own choice (--mode auto)

    def describe(self) -> str:
        read = ", ".join(f"{name}={value}" for name, value in self.variables.items())
        return f"{self.name}" + (f" ({read})" if read else "")


def detect(env: Mapping[str, str] = os.environ) -> Engine:
    if all(name in env for name in TRAINER_V2):
        per_node = env["PET_NPROC_PER_NODE"]
        return Engine("Kubeflow Trainer (TrainJob)", {n: env[n] for n in TRAINER_V2}, int(env["PET_NNODES"]),
                      int(env["PET_NODE_RANK"]), env["PET_MASTER_ADDR"], int(env["PET_MASTER_PORT"]),
                      int(per_node) if per_node.isdigit() else None)  # "auto", "cpu", "gpu": distrnn's choice
    if all(name in env for name in PYTORCHJOB) and "TORCHELASTIC_RUN_ID" not in env:
        return Engine("Kubeflow PyTorchJob", {n: env[n] for n in PYTORCHJOB}, int(env["WORLD_SIZE"]), int(env["RANK"]),
                      env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    if "SLURM_JOB_ID" in env:
        names = ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_RESTART_COUNT")
        return Engine("SLURM", {n: env[n] for n in names if n in env})
    if "RAY_ADDRESS" in env:
        return Engine("Ray", {"RAY_ADDRESS": env["RAY_ADDRESS"]})
    if "TORCHELASTIC_RUN_ID" in env:
        names = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        return Engine("torchrun", {n: env[n] for n in names if n in env})
    return Engine("none (a plain command)")
