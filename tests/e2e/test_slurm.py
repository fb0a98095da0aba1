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

from tests.conftest import require
from tests.helpers import BIN, REPO, counts, distrnn

SLURM_CONF = Path(os.environ.get("DISTRNN_SLURM_STATE", "/tmp/distrnn-slurm")) / "slurm.conf"
SMOKE = ["--config", "smoke"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_env(data_dir) -> dict[str, str]:
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF), "DISTRNN_DATA_DIR": str(data_dir),
           "DISTRNN_MODE": "cpu", "DISTRNN_VENV": str(BIN.parent), "WANDB_MODE": "offline"}
    env.pop("DISTRNN_DEBUG", None)
    ok = shutil.which("sbatch") and SLURM_CONF.is_file() and subprocess.run(
        ["sinfo", "-h"], env=env, capture_output=True, timeout=30).returncode == 0
    require(bool(ok), f"no SLURM cluster answers (SLURM_CONF={SLURM_CONF}); start one with: bash tests/slurm/cluster.sh up")
    (REPO / "logs").mkdir(exist_ok=True)
    return env


def sbatch(env: dict[str, str], *args: str, wait: bool = True, timeout: float = 600) -> tuple[int, str]:
    """Submit a job; return (exit code of `sbatch --wait`, or 0, and the job id)."""
    # The test nodes have 2 CPUs and no GPUs: override the scripts' GPU-cluster requests.
    cmd = ["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", *(["--wait"] if wait else []), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), result.stderr
    return result.returncode, job_id


def job_log(name: str, job_id: str) -> str:
    return (REPO / "logs" / f"{name}-{job_id}.out").read_text()


def job_state(env: dict[str, str], job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


@pytest.fixture(scope="module")
def single_node_job(slurm_env, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("slurm") / "run"
    code, job_id = sbatch({**slurm_env, "DISTRNN_OUTPUT_DIR": str(out)}, "--job-name=distrnn-test",
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


def test_multinode_script_forms_one_group_across_two_nodes(slurm_env, tmp_path, data_dir):
    out = tmp_path / "run"
    # Both test nodes share this machine's 2 cores: one thread per process instead of two each.
    code, job_id = sbatch({**slurm_env, "DISTRNN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"},
                          "--job-name=distrnn-mn", "--nodes=2",
                          "slurm/train_multinode.sh", *SMOKE)
    log = job_log("distrnn-mn", job_id)
    assert code == 0, log[-3000:]
    assert "machine rank 0" in log and "machine rank 1" in log
    assert "distrnn: 2 process(es)" in log  # one process on each node, one world of 2
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    single = distrnn("evaluate", "--checkpoint", str(out), "--mode", "cpu", "--num-processes", "1",
                     "--data-dir", str(data_dir), "--limit", "10000")
    assert single.returncode == 0, single.stderr[-2000:]
    # the first 10000 training images (the smoke subset) and the 10000 test images: 2 nodes == 1 process
    assert counts(log)[-2:] == counts(single.stdout)


def test_preempted_job_is_requeued_and_resumes_to_the_same_result(slurm_env, single_node_job, tmp_path):
    reference_out, reference_log = single_node_job
    out = tmp_path / "run"
    _, job_id = sbatch({**slurm_env, "DISTRNN_OUTPUT_DIR": str(out)}, "--job-name=distrnn-pre", "slurm/train.sh",
                       *SMOKE, "--set", "train.log_every=2", wait=False)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert time.monotonic() < deadline and job_state(slurm_env, job_id) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, check=True)

    # The job checkpoints, requeues itself, and runs again once SLURM's requeue delay (the credential
    # lifetime, 10 s on the test cluster) has passed.
    deadline = time.monotonic() + 600
    while (state := job_state(slurm_env, job_id)) != "COMPLETED":
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job_log("distrnn-pre", job_id)[-3000:]
        assert time.monotonic() < deadline, f"job still {state}"
        time.sleep(0.5)
    log = job_log("distrnn-pre", job_id)
    assert "stopped by SIGUSR1" in log and f"requeueing job {job_id}" in log
    assert "restart count 1" in log and "resumed from" in log
    assert counts(log)[-2:] == counts(reference_log)[-2:]  # same final train and test counts
