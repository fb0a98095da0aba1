"""Kubernetes by contract: no control plane can be installed here, so what a Kubeflow Trainer v2 TrainJob (and a
PyTorchJob) gives a pod is reproduced exactly: two "pods" with network stacks of their own (distrnn/testing/netns.py),
the master's service name resolving inside them only, exactly the variables the operator sets, and the pod
command `distrnn k8s-manifest` writes. JobSet restarts the whole set on a failure: so does the test."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from distrnn.testing import netns
from tests.conftest import require
from tests.helpers import BIN, REPO, counts, distrnn, finish, process_env, read_bundle

SERVICE = "distrnn-node-0-0.distrnn"  # the headless service name of node 0's pod, as Trainer v2 names it
PORT = 29400


@pytest.fixture
def two_pods():
    require(netns.available() is None, f"no network namespaces here: {netns.available()}")
    with netns.machines(2, names={SERVICE: 0}) as made:
        yield made
    assert netns.leftovers() == []


def pod_command(tmp_path, data_dir) -> list[str]:
    """What `distrnn k8s-manifest` puts in the TrainJob, with this machine's paths for the shared volume."""
    result = distrnn("k8s-manifest", "--image", "example/distrnn:1", "--nodes", "2", "--data-dir", str(data_dir), "--",
                     "--mode", "cpu", "--config", "smoke", "--set", "data.train_samples=4000", "--no-wandb",
                     "--set", "checkpoint.every_steps=4", "--set", "train.log_every=2",
                     "--set", "train.collective_timeout_s=20")
    assert result.returncode == 0, result.stderr
    command = yaml.safe_load(result.stdout)["spec"]["trainer"]["command"]
    command[command.index("--output-dir") + 1] = str(tmp_path / "runs" / "distrnn")  # the PVC's mount
    return [str(BIN / command[0]), *command[1:]]


@pytest.fixture(scope="module")
def uninterrupted_counts(tmp_path_factory, data_dir) -> list[tuple[int, int]]:
    """The pods' run without a lost or evicted pod, as 2 processes on one machine (threads as in a pod): a resume
    is bit-identical (docs/checkpoints.md), so its counts are these."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    command = pod_command(tmp, data_dir)
    args = command[command.index("train") + 1:]
    result = distrnn("train", *args, "--num-processes", "2", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [seen for _, seen in counts(result.stdout)] == [4000, 10_000]
    return counts(result.stdout)


def start_pods(pods, command: list[str], variables) -> list[subprocess.Popen]:
    procs = []
    for rank, pod in enumerate(pods):
        env = {k: v for k, v in process_env({"OMP_NUM_THREADS": "1", **variables(rank)}).items()
               if not k.startswith(("PET_", "SLURM_")) or k in variables(rank)}
        env.pop("GLOO_SOCKET_IFNAME", None)
        procs.append(pod.popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True))
    return procs


def kill_pod(proc: subprocess.Popen) -> None:
    """What deleting a pod (or losing its node) does: every process in it dies at once. (Its launcher alone is
    not enough: torchrun starts each worker in a session of its own.)"""
    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)


def trainer_v2(rank: int) -> dict[str, str]:
    """Exactly what the torch-distributed runtime sets on node `rank`'s pod (numProcPerNode left to auto)."""
    return {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": SERVICE, "PET_MASTER_PORT": str(PORT)}


def pytorchjob(rank: int) -> dict[str, str]:
    """What a PyTorchJob (training-operator v1) sets on replica `rank`: the pods' world, not the processes'."""
    return {"MASTER_ADDR": SERVICE, "MASTER_PORT": str(PORT), "WORLD_SIZE": "2", "RANK": str(rank)}


def finish_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    return [finish(proc, timeout) for proc in procs]


def test_the_manifest_validates_against_kubeflow_trainers_own_models(tmp_path):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    result = distrnn("k8s-manifest", "--image", "example/distrnn:1", "--nodes", "4", "--procs-per-node", "2",
                     "--gpus-per-node", "2", "--volume-claim", "shared-runs", "--", "--config", "fast")
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest  # every key known, none lost
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 2)
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert trainer["command"][:2] == ["distrnn", "train"] and trainer["command"][-2:] == ["--config", "fast"]
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"


@pytest.mark.parametrize("variables", [trainer_v2, pytorchjob], ids=["trainjob", "pytorchjob"])
def test_two_pods_train_lose_one_restart_together_and_resume_with_exact_counts(two_pods, tmp_path, data_dir,
                                                                              variables, uninterrupted_counts):
    command = pod_command(tmp_path, data_dir)
    out = tmp_path / "runs" / "distrnn"
    # 1. the job runs: stopped by a lost pod once it has checkpoints (node 1's pod killed, as a node failure)
    procs = start_pods(two_pods, command, variables)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not list((out / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish_all(procs, 5)
        time.sleep(0.2)
    kill_pod(procs[1])
    started = time.monotonic()
    [(code0, out0, err0), _] = finish_all(procs, timeout=120)
    assert code0 != 0 and time.monotonic() - started < 20 + 20, err0[-2000:]
    assert "Traceback" not in err0
    # 2. JobSet restarts the whole set: both pods, the same command and variables; they resume
    (code0, out0, err0), (code1, _, err1) = finish_all(start_pods(two_pods, command, variables))
    assert code0 == 0 and code1 == 0, err0[-2000:] + err1[-2000:]
    assert "resumed from" in out0
    assert counts(out0) == uninterrupted_counts  # exact, over both pods, and the same training as without the loss
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 32
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


def test_a_pod_evicted_with_sigterm_checkpoints_both_pods_exit_75_and_the_restart_resumes(two_pods, tmp_path,
                                                                                         data_dir,
                                                                                         uninterrupted_counts):
    """Evicting one pod (a node drained, a preemptible node reclaimed) sends SIGTERM to its container's first
    process, `distrnn train`, and gives it terminationGracePeriodSeconds: the ranks agree to stop at one step,
    save one checkpoint and every pod exits 75; the restarted set resumes there."""
    command = pod_command(tmp_path, data_dir)
    out = tmp_path / "runs" / "distrnn"
    procs = start_pods(two_pods, command, trainer_v2)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish_all(procs, 5)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    (code0, out0, err0), (code1, _, err1) = finish_all(procs, timeout=120)
    assert (code0, code1) == (75, 75), err0[-2000:] + err1[-2000:]
    assert time.monotonic() - signalled < 120  # the manifest's default grace period
    assert "Traceback" not in err0 + err1
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved, "no checkpoint saved on the way out"
    (code0, out0, err0), (code1, _, err1) = finish_all(start_pods(two_pods, command, trainer_v2))
    assert code0 == 0 and code1 == 0, err0[-2000:] + err1[-2000:]
    assert f"resumed from {out}/checkpoints/{saved[-1]}" in out0
    assert counts(out0) == uninterrupted_counts


def test_a_frozen_pod_s_rank_ends_the_job_with_exit_3_and_the_evidence_on_the_shared_volume(two_pods, tmp_path,
                                                                                            data_dir):
    """Node 1's worker frozen (SIGSTOP) once the pods train: node 0's pod names it within the collective timeout
    (20 s in the pod command) + 20 s, exits 3, and RUN/hang/ on the shared volume holds the report and node 0's
    evidence; node 1's launcher then ends its frozen worker and exits 3 too (a pod that fails is what JobSet
    restarts the set for)."""
    out = tmp_path / "runs" / "distrnn"
    procs = start_pods(two_pods, pod_command(tmp_path, data_dir), trainer_v2)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish_all(procs, 5)
            time.sleep(0.2)
        [worker] = psutil.Process(procs[1].pid).children()
        worker.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        code0, _, err0 = finish(procs[0], timeout=120)
        assert time.monotonic() - frozen < 20 + 20, f"{time.monotonic() - frozen:.0f} s"
        code1, _, err1 = finish(procs[1], timeout=30)
    finally:
        if procs[1].poll() is None:
            kill_pod(procs[1])
    assert code0 == 3, err0[-3000:]
    assert code1 == 3 and "was stopped by its launcher after the run's hang report: rank 1" in err1, err1[-3000:]
    bundle = read_bundle(out)
    assert {"rank-0.json", "report.json"} <= set(bundle), sorted(bundle)
    line = bundle["report.json"]["line"]
    assert re.match(rf"rank 1 \(node \S+, pid {worker.pid}\) is frozen or unreachable \(no heartbeat for \d+ s, the "
                    r"last from \S+\); its last collective was #\d+ \S+ at \S+ while rank 0 waits in \S+ \S+ #\d+",
                    line), line
    assert line in err0 and f"evidence in {out / 'hang'}/" in err0
    assert bundle["report.json"]["frozen"] == [1]
    assert bundle["rank-0.json"]["environment"]["GROUP_RANK"] == "0"
