"""`distrnn k8s-manifest ... > trainjob.yaml`: a Kubeflow Trainer v2 TrainJob that runs `distrnn train`.

The TrainJob uses the torch-distributed runtime, which starts one pod per node with PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT set, as for a bare torchrun:
`distrnn train` reads them (distrnn.launcher.engines), so the pod command needs no machine flags. The run folder
lives on a shared volume (a PersistentVolumeClaim mounted on every pod), so a restarted set of pods resumes
from its newest checkpoint that verifies. Preemption: a pod's SIGTERM makes every rank save a checkpoint
and exit 75 within the grace period; JobSet restarts the whole set on a failure, and the new pods resume.

Contract tested, not run on a Kubernetes cluster: the manifest validates against the kubeflow-trainer-api
models (pip install kubeflow-trainer-api), and two "pods" in network namespaces with exactly Trainer v2's
variables train, lose a pod, restart and resume (tests/cluster/test_kubernetes.py).
"""

from __future__ import annotations

import shlex
from typing import Any

import click
import yaml

from distrnn.errors import CONTEXT_SETTINGS

CONTAINER = "node"  # the torch-distributed runtime's replicated job and container
MOUNT = "/runs"


def trainjob(name: str, image: str, nodes: int, procs_per_node: int | None, claim: str, train_args: list[str],
             data_dir: str, gpus_per_node: int, grace_seconds: int) -> dict[str, Any]:
    """The TrainJob as a plain mapping (what kubectl applies)."""
    command = ["distrnn", "train", "--output-dir", f"{MOUNT}/{name}", "--data-dir", data_dir, *train_args]
    trainer: dict[str, Any] = {"image": image, "command": command, "numNodes": nodes,
                               "env": [{"name": "WANDB_MODE", "value": "offline"}]}
    if procs_per_node is not None:
        trainer["numProcPerNode"] = procs_per_node
    if gpus_per_node:
        trainer["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": str(gpus_per_node)}}
    pod = {"terminationGracePeriodSeconds": grace_seconds,  # time for every rank to save a checkpoint on SIGTERM
           "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": claim}}],
           "containers": [{"name": CONTAINER, "volumeMounts": [{"name": "runs", "mountPath": MOUNT}]}]}
    replicated = {"name": CONTAINER, "template": {"spec": {"template": {"spec": pod}}}}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": name},
        "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                "name": "torch-distributed"},
                 "trainer": trainer,
                 "runtimePatches": [{"manager": "distrnn.k8s-manifest", "trainingRuntimeSpec": {
                     "template": {"spec": {"replicatedJobs": [replicated]}}}}]},
    }


@click.command(name="k8s-manifest", context_settings=CONTEXT_SETTINGS)
@click.option("--name", default="distrnn", show_default=True, help="The TrainJob's name (and the run folder's).")
@click.option("--image", required=True, help="A container image with distrnn installed.")
@click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True, help="Pods (machines).")
@click.option("--procs-per-node", type=click.IntRange(min=1), default=None,
              help="Processes per pod [default: the runtime's auto: one per GPU, else one].")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--volume-claim", default="distrnn-runs", show_default=True,
              help=f"A PersistentVolumeClaim every pod mounts at {MOUNT} (ReadWriteMany: the run folder is shared).")
@click.option("--data-dir", default=f"{MOUNT}/data", show_default=True, help="Folder holding MNIST/raw, in the pods.")
@click.option("--grace-seconds", type=click.IntRange(min=1), default=120, show_default=True,
              help="How long a pod has after SIGTERM to save its checkpoint.")
@click.argument("train_args", nargs=-1, metavar="[-- DISTRNN TRAIN ARGUMENTS]")
def command(name: str, image: str, nodes: int, procs_per_node: int | None, gpus_per_node: int, volume_claim: str,
            data_dir: str, grace_seconds: int, train_args: tuple[str, ...]) -> None:
    """Write a Kubeflow Trainer v2 TrainJob (torch-distributed runtime) that runs `distrnn train` on every pod;
    arguments after -- go to `distrnn train`. Apply it with `kubectl apply -f`."""
    manifest = trainjob(name, image, nodes, procs_per_node, volume_claim, list(train_args), data_dir, gpus_per_node,
                        grace_seconds)
    click.echo(f"# distrnn k8s-manifest: {shlex.join(manifest['spec']['trainer']['command'])}")
    click.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)
