"""The shipped SLURM scripts, run by real sbatch/srun/scontrol on the two-node test cluster
(tests/slurm/cluster.sh, started by .ci/run). CPU processes with gloo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import slurm_environment
from tests.helpers import REPO, WANDB_OFFLINE, counts, distrnn, read_bundle

SMOKE = ["--config", "smoke"]



@pytest.fixture(scope="module")
def slurm_env(data_dir) -> dict[str, str]:
    return slurm_environment(data_dir)


def sbatch(env: dict[str, str], *args: str, wait: bool = True, timeout: float = 600) -> tuple[int, str]:
    """Submit a job; return (its exit code once it ended if `wait`, else 0; the job id). Not `sbatch --wait`:
    Slurm 22.05's polls after 2, 8 and 32 s, so a job of 12 s was seen ending after 42 (measured here)."""
    # The test nodes have 2 CPUs and no GPUs: override the scripts' GPU-cluster requests.
    cmd = ["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    job_id = result.stdout.strip().split(";")[0]
    assert result.returncode == 0 and job_id.isdigit(), result.stderr
    if not wait:
        return 0, job_id
    wait_for_end(env, job_id, timeout)
    return job_exit_code(env, job_id), job_id


def job_field(env: dict[str, str], job_id: str, name: str) -> str | None:
    """One field of `scontrol show job` (None while the job is unknown to the controller)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else None


def job_exit_code(env: dict[str, str], job_id: str) -> int:
    """The batch script's exit code (scontrol's ExitCode=CODE:SIGNAL; what `sbatch --wait` would return)."""
    code, signal_number = map(int, job_field(env, job_id, "ExitCode").split(":"))
    return code or (128 + signal_number if signal_number else 0)


def job_log(name: str, job_id: str) -> str:
    return (REPO / "logs" / f"{name}-{job_id}.out").read_text()


def job_state(env: dict[str, str], job_id: str) -> str:
    return job_field(env, job_id, "JobState") or "UNKNOWN"


@pytest.fixture(scope="module")
def single_node_job(slurm_env, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("slurm") / "run"
    code, job_id = sbatch({**slurm_env, **WANDB_OFFLINE, "DISTRNN_OUTPUT_DIR": str(out)}, "--job-name=distrnn-test",
                          "slurm/train.sh", *SMOKE)
    log = job_log("distrnn-test", job_id)
    assert code == 0, log[-3000:]
    return out, log


def test_train_sh_runs_the_smoke_config(single_node_job):
    out, log = single_node_job
    got = counts(log)
    assert [seen for _, seen in got] == [10_000, 10_000]  # train subset of 10000, all 10000 test images
    assert "restart count 0" in log
    assert "W&B ran offline; upload with: wandb sync" in log
    assert json.loads((out / "summary.json").read_text())["test_seen"] == 10_000


@pytest.fixture(scope="module")
def multinode_job(slurm_env, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("slurm-mn") / "run"
    # Both test nodes share this machine's 2 cores: one thread per process instead of two each.
    code, job_id = sbatch({**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"},
                          "--job-name=distrnn-mn", "--nodes=2", "slurm/train_multinode.sh", *SMOKE)
    log = job_log("distrnn-mn", job_id)
    assert code == 0, log[-3000:]
    return out, log


def test_multinode_script_forms_one_group_across_two_nodes(multinode_job, data_dir):
    out, log = multinode_job
    assert "machine rank 0" in log and "machine rank 1" in log
    assert "distrnn: 2 process(es)" in log  # one process on each node, one world of 2
    # Each node has its own network stack (tests/slurm/cluster.sh); the host name resolves to 127.0.0.1 on both,
    # so gloo must use the interface that routes to the head node, with the node's own address.
    head = re.search(r"head node \S+ \((\S+)\)", log).group(1)
    addresses = {rank: re.search(rf"^distrnn: machine {rank}: gloo uses interface eth0 \((\S+), the route to "
                                 rf"{re.escape(head)}\)$", log, re.M) for rank in (0, 1)}
    assert all(addresses.values()), log[-3000:]
    assert addresses[0].group(1) == head != addresses[1].group(1), addresses
    assert not any(a.group(1).startswith("127.") for a in addresses.values())
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    single = distrnn("evaluate", "--checkpoint", str(out), "--mode", "cpu", "--num-processes", "1",
                     "--data-dir", str(data_dir), "--limit", "10000")
    assert single.returncode == 0, single.stderr[-2000:]
    # the first 10000 training images (the smoke subset) and the 10000 test images: 2 nodes == 1 process
    assert counts(log)[-2:] == counts(single.stdout)


def test_a_hang_in_a_two_node_job_ends_the_job_with_exit_3_and_the_evidence_in_its_run_folder(slurm_env, tmp_path):
    """Rank 1 (the second node) skips the non-finite check's all-reduce (DISTRNN_FAULTS reaches both nodes through
    sbatch's environment): the job's log has the hang report's line, the job exits 3, and RUN/hang/ holds the
    report and both ranks' evidence, written from both nodes."""
    out = tmp_path / "run"
    env = {**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1",
           "DISTRNN_FAULTS": "skip-collective=1:16", "DISTRNN_TEST_COLLECTIVE_CHECK": "0"}
    code, job_id = sbatch(env, "--job-name=distrnn-hang", "--nodes=2", "slurm/train_multinode.sh", *SMOKE, "--no-wandb",
                          "--set", "data.train_samples=640", "--set", "data.test_samples=500",
                          "--set", "train.collective_timeout_s=10")
    log = job_log("distrnn-hang", job_id)
    assert code == 3, log[-3000:]
    bundle = read_bundle(out)
    assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"], log[-3000:]
    report = bundle["report.json"]
    pids = {r: report["ranks"][str(r)]["pid"] for r in (0, 1)}
    evidence = re.escape(str(out / "hang"))
    assert re.search(
        rf"error.*: rank 0 \(node \S+, pid {pids[0]}\) is in trainer\.py:\d+ all_reduce #16 while rank 1 waits in "
        r"\S+ all_reduce #17; their records first differ at #16: .*; no collective finished within "
        rf"train\.collective_timeout_s=10 s and the run was stopped; evidence in {evidence}/", log), log[-3000:]
    assert report["line"] in log
    for rank in (0, 1):
        assert bundle[f"rank-{rank}.json"]["environment"]["SLURM_JOB_ID"] == job_id  # written on its own node


def test_scancel_signal_urg_asks_a_live_two_node_job_for_its_report_and_the_job_goes_on(slurm_env, tmp_path):
    """docs/hangs.md's command: SIGURG reaches every process of the job's steps; the workers answer it with a
    report while the job keeps training (it is then cancelled: 2 epochs of 60000 would take minutes)."""
    out = tmp_path / "run"
    env = {**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    _, job_id = sbatch(env, "--job-name=distrnn-ask", "--nodes=2", "slurm/train_multinode.sh", *SMOKE, "--no-wandb",
                       "--set", "data.train_samples=60000", "--set", "train.epochs=2", wait=False)
    try:
        wait_for_step(env, job_id, out / "metrics.jsonl", 20)
        subprocess.run(["scancel", "--signal=URG", job_id], env=env, check=True)
        deadline = time.monotonic() + 30
        while not (out / "hang" / "report.json").is_file():
            assert time.monotonic() < deadline, "no report within 30 s"
            time.sleep(0.2)
        bundle = read_bundle(out)
        assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"]
        assert bundle["report.json"]["asked"] is True
        assert job_state(env, job_id) == "RUNNING"
    finally:
        subprocess.run(["scancel", job_id], env=env)
        wait_for_end(env, job_id)
    assert f"distrnn: hang report (asked): {bundle['report.json']['line']}" in job_log("distrnn-ask", job_id)


def wait_for_step(env: dict[str, str], job: str, metrics: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.is_file()
               and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines())):
        assert time.monotonic() < deadline, f"step {step} not reached"
        assert job_state(env, job) in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED",
                                       "COMPLETING"), job_state(env, job)
        time.sleep(0.2)


def wait_for_end(env: dict[str, str], job: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(env, job)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    return state


PREEMPTIONS = 2  # of one two-node job (the requeue count reaches 2; tests/README.md)


def preempt(env: dict[str, str], job: str) -> None:
    """What SLURM does 90 s before the time limit: USR1 to the batch script."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)


def test_preempted_job_is_requeued_and_resumes_to_the_same_result(slurm_env, single_node_job, tmp_path):
    reference_out, reference_log = single_node_job
    out = tmp_path / "run"
    _, job_id = sbatch({**slurm_env, "DISTRNN_OUTPUT_DIR": str(out)}, "--job-name=distrnn-pre", "slurm/train.sh",
                       *SMOKE, "--set", "train.log_every=2", wait=False)
    wait_for_step(slurm_env, job_id, out / "metrics.jsonl", 4)
    preempt(slurm_env, job_id)

    # The job checkpoints, requeues itself, and runs again once SLURM's requeue delay (the credential
    # lifetime, 5 s on the test cluster) has passed.
    deadline = time.monotonic() + 600
    while (state := job_state(slurm_env, job_id)) != "COMPLETED":
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job_log("distrnn-pre", job_id)[-3000:]
        assert time.monotonic() < deadline, f"job still {state}"
        time.sleep(0.5)
    log = job_log("distrnn-pre", job_id)
    assert "stopped by SIGUSR1" in log and f"requeueing job {job_id}" in log
    assert "restart count 1" in log and "resumed from" in log
    assert counts(log)[-2:] == counts(reference_log)[-2:]  # same final train and test counts


def test_a_two_node_job_preempted_twice_is_requeued_every_time_and_ends_as_if_uninterrupted(
        slurm_env, multinode_job, tmp_path):
    """One rank leaves first after each stop; every task finishes before srun judges the step (75). Twice: the
    second preemption is the first of a requeued job (restart count 1 -> 2), which is what a third or a fifth
    would repeat."""
    _, reference_log = multinode_job
    out = tmp_path / "run"
    env = {**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    _, job = sbatch(env, "--job-name=distrnn-mnpre", "--nodes=2", "slurm/train_multinode.sh", *SMOKE,
                    "--set", "train.log_every=2", "--set", "checkpoint.every_steps=10", wait=False)
    metrics, stopped_at = out / "metrics.jsonl", 0
    for attempt in range(PREEMPTIONS):
        wait_for_step(env, job, metrics, stopped_at + 2)
        preempt(env, job)
        deadline = time.monotonic() + 300
        while f"restart count {attempt + 1}" not in (log := job_log("distrnn-mnpre", job)):
            assert "FAILED" not in job_state(env, job) and time.monotonic() < deadline, log[-3000:]
            time.sleep(0.5)
        stopped_at = max(int(m) for m in re.findall(r"stopped by SIGUSR1 at step (\d+)", log))
    assert wait_for_end(env, job) == "COMPLETED", job_log("distrnn-mnpre", job)[-3000:]
    log = job_log("distrnn-mnpre", job)
    assert log.count(f"requeueing job {job}") == PREEMPTIONS and log.count("resumed from") == PREEMPTIONS
    assert counts(log)[-2:] == counts(reference_log)[-2:]  # the same final train and test counts


def test_requeues_stop_at_the_cap(slurm_env, tmp_path):
    out = tmp_path / "run"
    env = {**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "DISTRNN_MAX_REQUEUES": "0"}
    _, job = sbatch(env, "--job-name=distrnn-cap", "slurm/train.sh", *SMOKE, "--set", "train.log_every=2", wait=False)
    wait_for_step(env, job, out / "metrics.jsonl", 4)
    preempt(env, job)
    assert wait_for_end(env, job) == "FAILED"
    log = job_log("distrnn-cap", job)
    assert f"distrnn: job {job} was requeued 0 times (DISTRNN_MAX_REQUEUES=0); not again: its checkpoint resumes " \
           f"with DISTRNN_OUTPUT_DIR={out} sbatch ..." in log
    assert "requeueing" not in log and "restart count 1" not in log


def test_in_a_job_array_only_the_preempted_task_is_requeued_and_each_task_has_its_run_folder(slurm_env):
    name = f"distrnn-arr{os.getpid()}"
    env = {k: v for k, v in slurm_env.items() if k != "DISTRNN_OUTPUT_DIR"}  # the default, per task
    _, array = sbatch(env, f"--job-name={name}", "--array=0-2", "--output=logs/%x-%A_%a.out", "slurm/train.sh",
                      *SMOKE, "--set", "data.train_samples=4000", "--set", "train.log_every=2", wait=False)
    folders = [REPO / "runs" / f"{name}-{array}_{task}" for task in range(3)]
    try:
        wait_for_step(env, f"{array}_1", folders[1] / "metrics.jsonl", 4)
        preempt(env, f"{array}_1")
        for task in range(3):
            assert wait_for_end(env, f"{array}_{task}") == "COMPLETED"
        logs = [(REPO / "logs" / f"{name}-{array}_{task}.out").read_text() for task in range(3)]
        assert f"requeueing job {array}_1" in logs[1] and "restart count 1" in logs[1] and "resumed from" in logs[1]
        for task in (0, 2):
            assert "restart count 1" not in logs[task] and "requeueing" not in logs[task]
        for folder in folders:
            assert json.loads((folder / "summary.json").read_text())["train_seen"] == 4000
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_the_docs_cpu_examples_run_as_written_on_a_two_cpu_node(slurm_env):
    """The #SBATCH lines ask for a GPU node's CPUs; the CPU examples in docs/running.md ask for what the node
    has."""
    page = (REPO / "docs" / "running.md").read_text()
    examples = re.findall(r"^(DISTRNN_MODE=cpu sbatch .*?)\s*(?:#.*)?$", page, re.M)
    assert len(examples) == 2, examples
    for example in examples:
        submitted = subprocess.run(["bash", "-c", example], cwd=REPO, env={**slurm_env, "OMP_NUM_THREADS": "1"},
                                   capture_output=True, text=True, timeout=60)
        job = submitted.stdout.split()[-1]
        assert submitted.returncode == 0 and job.isdigit(), submitted.stderr
        try:
            assert wait_for_end(slurm_env, job) == "COMPLETED"
            log = Path(job_field(slurm_env, job, "StdOut")).read_text()  # not a glob: job ids restart with a cluster
            assert "2 CPU(s) per task" in log and [n for _, n in counts(log)[-2:]] == [10_000, 10_000]
            assert "threads each" in log
        finally:
            for folder in (REPO / "runs").glob(f"*-{job}"):
                shutil.rmtree(folder, ignore_errors=True)


def test_a_two_node_job_continues_on_one_node_with_the_global_batch_kept(slurm_env, multinode_job, tmp_path):
    """A 2-node job preempted (its requeues used up: DISTRNN_MAX_REQUEUES=0), then submitted again on one node
    into the same run folder, as when fewer nodes are free: it resumes its 2-process checkpoint on 1 process
    (64 per process x 2 accumulation). SLURM's own requeue keeps the allocation's node count (`scontrol update
    NumNodes=` on the pending job changed nothing on Slurm 22.05 here), so the job is submitted anew."""
    _, reference_log = multinode_job
    out = tmp_path / "run"
    env = {**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1", "DISTRNN_MAX_REQUEUES": "0"}
    args = ["slurm/train_multinode.sh", *SMOKE, "--set", "train.log_every=2", "--set", "checkpoint.every_steps=10"]
    _, job = sbatch(env, "--job-name=distrnn-shrink", "--nodes=2", *args, wait=False)
    wait_for_step(env, job, out / "metrics.jsonl", 12)
    preempt(env, job)
    assert wait_for_end(env, job) == "FAILED"  # exit 75, not requeued
    assert "2 nodes" in job_log("distrnn-shrink", job)
    code, again = sbatch(env, "--job-name=distrnn-shrink", "--nodes=1", *args)
    log = job_log("distrnn-shrink", again)
    assert code == 0, log[-3000:]
    assert ", 1 nodes" in log
    assert "resume: 2 -> 1 processes; global batch 128 kept as 64 per process x 2 accumulation" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["global_batch"] == 128
    assert [seen for _, seen in counts(log)[-2:]] == [10_000, 10_000]
    # not bit for bit (the reduction order changed), within half a point of the uninterrupted 2-node run
    assert abs(counts(log)[-1][0] - counts(reference_log)[-1][0]) <= 50
