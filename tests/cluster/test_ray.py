"""Ray Train for real: a Ray head node and a worker node with network stacks of their own (distrnn/testing/netns.py),
`distrnn train --launcher ray` with 2 workers spread over both, a node lost after the first checkpoint and
rejoined, and --max-failures 0 failing fast. One cluster for the module; every Ray process is started with a
temp dir of the module's own and killed by the network namespace it runs in (`ray stop` would stop every Ray
process on the host)."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from distrnn.testing import netns
from tests.conftest import require
from tests.helpers import BIN, REPO, WANDB_OFFLINE, counts, finish, process_env, read_bundle, wait_for_step

PORT = 6379
TRAIN = ["--mode", "cpu", "--config", "smoke", "--set", "data.train_samples=4000", "--no-wandb",
         "--set", "checkpoint.every_steps=4", "--set", "train.log_every=2", "--set", "train.collective_timeout_s=30"]


def ray_env(temp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Ray 2.60 turns token auth on for every new cluster; the module's cluster has a token of its own. W&B
    offline: the rejoin test checks its run (the others train --no-wandb)."""
    env = process_env({**WANDB_OFFLINE, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                       "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "token"), **(extra or {})})
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    return env


# The head's GCS marks a node dead after health_check_failure_threshold failed checks, one every
# health_check_period_ms (Ray's defaults: 5 x 3 s); Ray Train's elastic sizing sees it at the next tick of Ray's
# AutoscalingCoordinator (every 20 s, fixed). Checks every second let that tick see the lost node dead.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                   "RAY_health_check_failure_threshold": "5"}


def ray_start(machine: netns.Machine, temp: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(machine.command([str(BIN / "ray"), "start", "--node-ip-address", machine.address,
                                             "--num-cpus", "1", "--temp-dir", str(temp / name), "--disable-usage-stats",
                                             *args]), env=ray_env(temp, env), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@dataclass
class RayCluster:
    """The module's Ray cluster: a head node and a worker node, each a machine of its own."""

    head: netns.Machine
    worker: netns.Machine
    temp: Path  # Ray's temp folders: short, because Ray's unix sockets live there (107 bytes at most)
    worker_starts: int = 0
    worker_up: bool = False

    def start_worker(self) -> None:
        """Ray on the worker machine, joining the head (a temp folder of its own for each start)."""
        self.worker_starts += 1
        ray_start(self.worker, self.temp, f"worker{self.worker_starts}", "--address", f"{self.head.address}:{PORT}")
        self.worker_up = True

    def lose_worker(self) -> None:
        self.worker.lose()
        self.worker_up = False


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """One cluster for the module (starting one took about as long as a test's training): each test that
    loses the worker node leaves it lost, and the next test starts it again (`ray`)."""
    require(netns.available() is None, f"no network namespaces here: {netns.available()}")
    require(subprocess.run([str(BIN / "python"), "-c", "import ray.train.torch"], capture_output=True).returncode == 0,
            "Ray Train is not installed: pip install 'distrnn[ray]'")
    temp = Path(tempfile.mkdtemp(prefix="dray", dir="/tmp"))
    (temp / "token").write_text(secrets.token_hex(32))
    (temp / "token").chmod(0o600)
    with netns.machines(2) as (head, worker):
        made = RayCluster(head, worker, temp)
        try:
            ray_start(head, temp, "head", "--head", "--port", str(PORT), "--include-dashboard=false",
                      env=FAST_NODE_DEATH)
            yield made
        finally:
            worker.lose()
            head.lose()
            shutil.rmtree(temp, ignore_errors=True)
    assert netns.leftovers() == []


@pytest.fixture
def ray(cluster: RayCluster) -> RayCluster:
    """The module's cluster with its worker node up."""
    if not cluster.worker_up:
        cluster.start_worker()
    return cluster


def train_on_ray(head: netns.Machine, temp: Path, out, data_dir, *extra: str, num_workers="2",
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    return head.popen([str(BIN / "distrnn"), "train", "--launcher", "ray", "--ray-address", f"{head.address}:{PORT}",
                       "--num-workers", num_workers, "--data-dir", str(data_dir), "--output-dir", str(out),
                       *TRAIN, *extra],
                      cwd=REPO, env=ray_env(temp, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                      start_new_session=True)


def registered_by_ray(out: Path) -> bool:
    """Ray's controller has taken a reported checkpoint into its books (its snapshot in the run folder)."""
    snapshot = out / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and '"checkpoints/step-' in snapshot.read_text()


def wait_for_ray_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 300
    while not registered_by_ray(out):
        assert time.monotonic() < deadline and proc.poll() is None, finish(proc, 5)
        time.sleep(0.2)


def test_two_workers_on_two_nodes_train_a_node_is_lost_and_rejoins_and_the_run_resumes(tmp_path, data_dir, ray):
    out = tmp_path / "run"
    proc = train_on_ray(ray.head, ray.temp, out, data_dir, "--max-failures", "1", "--wandb")  # offline
    wait_for_ray_checkpoint(proc, out)
    ray.lose_worker()  # the worker node's Ray, and the distrnn worker on it
    time.sleep(5)
    ray.start_worker()
    code, stdout, stderr = finish(proc, timeout=600)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    # the restarted workers resumed from the run folder holding Ray's latest checkpoint (in place, not a copy):
    # its newest checkpoint that verifies (launcher/ray.py restart_args)
    assert f"resume: checkpoint.resume changed from auto to {out}" in stdout, stdout[-5000:]
    assert f"resumed from {out}/checkpoints/step-" in stdout, stdout[-5000:]
    assert not [p for p in out.glob("checkpoint_*") if p.is_dir()], "Ray copied a checkpoint"
    assert [seen for _, seen in counts(without_ray_prefixes(stdout))[-2:]] == [4000, 10_000]  # exact, both workers
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 32
    # W&B from the main worker only: one run id over both starts, holding the exact counts
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1, wandb_runs
    inspected = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(wandb_runs[-1])],
                               capture_output=True, text=True, timeout=120)
    values = json.loads(inspected.stdout)["summary"]
    assert (values["test_seen"], values["test_correct"]) == (10_000, summary["test_correct"])


def test_an_elastic_range_goes_on_with_one_worker_when_a_node_is_lost_and_keeps_the_global_batch(tmp_path, data_dir,
                                                                                                 ray):
    """Ray 2.60's elastic mode: ScalingConfig(num_workers=(1, 2)); the lost node does not come back.

    Ray Train restarts the group at once, still counting the lost node's CPU (its death is not yet known), and
    waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) for 2 workers before it starts 1: 60 of this
    test's 112 s. 20 s is room enough for the 7 s a group of 2 took to start here (docs/running.md says so too)."""
    out = tmp_path / "run"
    proc = train_on_ray(ray.head, ray.temp, out, data_dir, "--max-failures", "1", num_workers="1-2",
                        env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"})
    wait_for_ray_checkpoint(proc, out)
    ray.lose_worker()
    code, stdout, stderr = finish(proc, timeout=600)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    own = without_ray_prefixes(stdout)
    assert re.search(r"^distrnn: 2 process\(es\).*global batch 128 \(64 per process x 2 x 1", own, re.M), own[-3000:]
    assert re.search(r"^distrnn: 1 process\(es\).*global batch 128 \(64 per process x 1 x 2", own, re.M), own[-3000:]
    assert [seen for _, seen in counts(own)[-2:]] == [4000, 10_000]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["steps"] == 32


def test_without_restarts_a_lost_node_fails_the_run_fast_in_one_line(tmp_path, data_dir, ray):
    out = tmp_path / "run"
    proc = train_on_ray(ray.head, ray.temp, out, data_dir, "--max-failures", "0")
    wait_for_ray_checkpoint(proc, out)
    ray.lose_worker()
    lost = time.monotonic()
    result = subprocess.CompletedProcess(proc.args, *finish(proc, timeout=180))
    assert time.monotonic() - lost < 120
    assert result.returncode == 137, result.stderr[-3000:]  # as a torchrun worker killed by SIGKILL
    own = drivers_own_lines(result.stderr)
    assert len(own) == 1 and "Traceback" not in "".join(own), own
    # Ray places ranks on nodes as it likes: the rank named is the one that ran on the node killed
    lost_rank = 0 if main_worker_ip(result.stdout, ray.head.address) == ray.worker.address else 1
    assert own[0].startswith("distrnn: error: the Ray run failed after 0 restart(s) (--max-failures): worker rank "
                             f"{lost_rank} was lost"), own


def test_a_hang_ends_the_ray_run_with_exit_3_and_the_evidence_in_its_run_folder(tmp_path, data_dir, ray):
    """Rank 1 spends 10 minutes in a step (DISTRNN_FAULTS, passed on to Ray's workers by the launcher): rank 0's
    collective times out, the heartbeats (through the process group's store, in rank 0) say rank 1 is busy outside
    any collective, the run ends with exit 3 and RUN/hang/ holds the report and rank 0's evidence."""
    out = tmp_path / "run"
    proc = train_on_ray(ray.head, ray.temp, out, data_dir, "--max-failures", "0",
                        "--set", "train.collective_timeout_s=10", env={"DISTRNN_FAULTS": "slow-rank=1:600000"})
    started = time.monotonic()
    result = subprocess.CompletedProcess(proc.args, *finish(proc, timeout=300))
    assert result.returncode == 3, result.stderr[-3000:]
    assert time.monotonic() - started < 120, "not ended by the collective timeout"
    bundle = read_bundle(out)
    assert {"rank-0.json", "report.json"} <= set(bundle), sorted(bundle)
    line = bundle["report.json"]["line"]
    assert re.fullmatch(r"rank 1 \(node \S+, pid \d+\) is busy outside any collective at faults\.py:\d+ \(its "
                        r"heartbeat is alive\); its last collective was #\d+ \S+ at \S+ while rank 0 waits in \S+ "
                        r"all_reduce #\d+", line), line
    assert line in result.stdout + result.stderr
    assert bundle["rank-0.json"]["environment"]["DISTRNN_FAULTS"] == "slow-rank=1:600000"


def test_sigterm_to_the_driver_saves_a_checkpoint_exits_75_and_the_same_command_resumes_from_it(tmp_path, data_dir,
                                                                                               ray):
    """A preemption notice under Ray: SIGTERM to the driver while the workers train (rank 0 300 ms slower a step,
    so that the run lasts; no periodic checkpoint, so the one after the notice is the only one). Before: Ray's
    own handler ended the driver and its workers with it, and the restart trained again every step since the
    last periodic checkpoint."""
    out = tmp_path / "run"
    command = (ray.head, ray.temp, out, data_dir, "--max-failures", "0", "--set", "checkpoint.every_steps=1000")
    proc = train_on_ray(*command, env={"DISTRNN_FAULTS": "slow-rank=0:300"})
    wait_for_step(proc, out, 2, timeout=300)
    proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(proc, timeout=120)
    assert code == 75, stdout[-3000:] + stderr[-3000:]
    [saved] = sorted((out / "checkpoints").glob("step-*"))
    step = int(saved.name.removeprefix("step-"))
    assert 2 <= step < 32, saved
    assert drivers_own_lines(stderr)[-2:] == [
        "distrnn: SIGTERM: the Ray workers save a checkpoint at their next check and stop",
        f"distrnn: error: stopped by SIGTERM: the Ray workers saved a checkpoint in {out}/checkpoints; run the same "
        "command again to resume"], stderr[-3000:]
    assert f"stopped by SIGTERM at step {step}; checkpoint {saved} saved" in without_ray_prefixes(stdout + stderr)
    assert not (out / "stop-request").exists()

    code, stdout, stderr = finish(train_on_ray(*command), timeout=300)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    own = without_ray_prefixes(stdout)
    assert f"resumed from {saved}" in own, own[-3000:]
    assert [seen for _, seen in counts(own)[-2:]] == [4000, 10_000]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 32, summary


def main_worker_ip(stdout: str, driver_ip: str) -> str:
    """The node of rank 0: the one worker that prints the progress lines, prefixed '(RayTrainWorker pid=P, ip=A)';
    Ray leaves ', ip=A' out for a worker on the driver's own node."""
    found = re.search(r"^\x1b\[[0-9;]*m\(([^)]*)\)\x1b\[0m epoch \d+/\d+ step ", stdout, re.M)
    assert found, stdout[-3000:]
    ip = re.search(r"\bip=([0-9.]+)", found.group(1))
    return ip.group(1) if ip else driver_ip


def without_ray_prefixes(output: str) -> str:
    """The workers' own lines, as they printed them."""
    return re.sub(r"^\x1b\[[0-9;]*m\([^)]*\)\x1b\[0m ", "", output, flags=re.M)


def drivers_own_lines(stderr: str) -> list[str]:
    """What the driver printed itself: Ray forwards every worker's and its controller's output to the driver,
    each line prefixed '(ActorName pid=..., ip=...)' (coloured), and a worker's failure with its traceback."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in stderr.splitlines()]
    return [line for line in lines if line and not line.startswith("(")]
