"""slurm/sweep_array.sh: a grid of runs as a SLURM job array, on the two-node test cluster
(tests/slurm/cluster.sh), then `distrnn report` ranking its trials. CPU processes with gloo.

The helpers are small copies of tests/cluster/test_slurm.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from distrnn.config.schema import load_config
from distrnn.run.folder import RunFolder
from distrnn.tools import report
from tests.conftest import slurm_environment
from tests.helpers import BIN, REPO, one_line_error, run

SCRIPT = "slurm/sweep_array.sh"
LEARNING_RATES = ("0.0005", "0.002", "0.001")  # one task each, in this order
# 4000 images (3500 trained, 500 held out): ~55 steps, time enough to preempt one task mid-way.
SMALL = ["--config", "smoke", "--set", "data.train_samples=4000", "--set", "data.val_samples=500",
         "--set", "train.log_every=2", "--set", "train.eval_every=10"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")



# --- the script's own checks: no cluster needed (they run before srun) ----------------------------------

def run_task(task: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_NAME": "t", "SLURM_ARRAY_JOB_ID": "7"} if task is not None else {})
    env.update({"SLURM_ARRAY_TASK_ID": task} if task is not None else {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("task", "args", "says"), [
    (None, ["sweeps/grid.txt"], "not a job array task"),
    ("0", [], "no grid file"),
    ("0", ["sweeps/no-such-grid.txt"], "is not a readable file"),
    ("6", ["sweeps/grid.txt", "--config", "fast"],
     "task 6 has no line in sweeps/grid.txt (6 lines): submit with --array=0-5"),
    ("0", ["sweeps/grid.txt", "--output-dir", "x"], "--output-dir: each task's run folder is set by this script"),
    ("0", ["sweeps/grid.txt", "--set", "train.output_dir=x"], "train.output_dir=x: each task's run folder"),
])
def test_a_task_that_cannot_run_its_line_stops_with_one_line(task, args, says):
    result = run_task(task, *args)
    assert result.returncode == 2 and says in one_line_error(result)


def test_an_empty_line_or_grid_is_refused(tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("optim.lr=0.001\n\noptim.lr=0.003\n")
    assert f"line 2 of {grid} (task 1) is empty" in one_line_error(run_task("1", str(grid)))
    grid.write_text("")
    assert f"grid file {grid} is empty" in one_line_error(run_task("0", str(grid)))


def test_the_example_grid_is_valid_for_the_fast_config_and_the_usage_line_matches_it():
    lines = (REPO / "sweeps" / "grid.txt").read_text().splitlines()
    for line in lines:
        load_config("fast", ["data.val_samples=5000", *line.split()])  # a bad key or value raises
    assert len(set(lines)) == len(lines)
    usage = re.search(r"sbatch --array=0-(\d+) slurm/sweep_array.sh sweeps/grid.txt", (REPO / SCRIPT).read_text())
    assert usage and int(usage.group(1)) == len(lines) - 1


# --- on the cluster -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_env(data_dir) -> dict[str, str]:
    # A stale DISTRNN_OUTPUT_DIR (one slurm/train.sh reads) must not be shared by the tasks.
    return slurm_environment(data_dir, DISTRNN_OUTPUT_DIR="runs/must-be-ignored")


def job_state(env: dict[str, str], job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_for_step(env: dict[str, str], job: str, metrics: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.is_file()
               and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines())):
        assert time.monotonic() < deadline, f"step {step} not reached"
        assert job_state(env, job) not in ENDED, job_state(env, job)
        time.sleep(0.2)


def wait_for_end(env: dict[str, str], job: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(env, job)) not in ENDED:
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    return state


@pytest.fixture(scope="module")
def sweep(slurm_env, tmp_path_factory) -> tuple[str, list[Path], list[str]]:
    """A 3-task array over the learning rate; task 1 is preempted once and requeued.
    Returns the array id, each task's run folder and each task's log."""
    grid = tmp_path_factory.mktemp("grid") / "grid.txt"
    grid.write_text("".join(f"optim.lr={lr}\n" for lr in LEARNING_RATES))
    name = f"distrnn-sweep{os.getpid()}"
    cmd = ["sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", f"--job-name={name}", "--array=0-2",
           SCRIPT, str(grid), *SMALL]
    submitted = subprocess.run(cmd, cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=60)
    array = submitted.stdout.strip().split(";")[0]
    assert array.isdigit(), submitted.stderr
    folders = [REPO / "runs" / f"{name}-{array}" / str(task) for task in range(3)]
    try:
        wait_for_step(slurm_env, f"{array}_1", folders[1] / "metrics.jsonl", 4)
        subprocess.run(["scancel", "--signal=USR1", "--batch", f"{array}_1"], env=slurm_env, check=True)
        states = [wait_for_end(slurm_env, f"{array}_{task}") for task in range(3)]
        logs = [(REPO / "logs" / f"{name}-{array}_{task}.out").read_text() for task in range(3)]
        assert states == ["COMPLETED"] * 3, [log[-2000:] for log in logs]
        yield array, folders, logs
    finally:
        shutil.rmtree(folders[0].parent, ignore_errors=True)


def test_each_task_trains_its_line_in_its_own_folder(sweep):
    array, folders, logs = sweep
    for task, (folder, log, lr) in enumerate(zip(folders, logs, LEARNING_RATES)):
        assert f"run folder runs/{folder.parent.name}/{task}," in log and f"line {task + 1} of 3: optim.lr={lr}" in log
        resolved = yaml.safe_load(RunFolder(folder).config.read_text())
        assert resolved["optim"]["lr"] == float(lr) and resolved["data"]["val_samples"] == 500
        assert json.loads(RunFolder(folder).summary.read_text())["test_seen"] == 10_000
    assert not (REPO / "runs" / "must-be-ignored").exists()


def test_only_the_preempted_task_is_requeued_and_it_resumes_in_its_folder(sweep):
    array, _, logs = sweep
    assert "stopped by SIGUSR1" in logs[1] and f"requeueing job {array}_1" in logs[1]
    assert "restart count 1" in logs[1] and "resumed from" in logs[1]
    assert logs[1].count(f"run folder runs/distrnn-sweep{os.getpid()}-{array}/1,") == 2  # the same folder twice
    for task in (0, 2):
        assert "restart count 1" not in logs[task] and "requeueing" not in logs[task]


def expected_rows(folders: list[Path]) -> list[list[str]]:
    """The table summary.json calls for, best validation accuracy first, formatted independently of report.py."""
    summaries = [(folder.name, json.loads(RunFolder(folder).summary.read_text())) for folder in folders]
    ranked = sorted(summaries, key=lambda item: -item[1]["best_val_accuracy"])  # stable: ties keep task order
    return [[label, f"{s['best_val_accuracy']:.2f}% ({s['best_val_step']})", str(s["steps"]),
             f"{s['train_seconds']:.1f}", f"{s['samples_per_s']:.0f}",
             f"{s['test_accuracy']:.2f}% ({s['test_correct']} / {s['test_seen']})",
             f"{s['train_accuracy']:.2f}% ({s['train_correct']} / {s['train_seen']})"] for label, s in ranked]


def test_report_ranks_the_trials_by_validation_accuracy(sweep, tmp_path):
    """Needs data.val_samples: best_val_accuracy in summary.json and val_accuracy in its history."""
    _, folders, _ = sweep
    result = run([str(BIN / "distrnn"), "report", *map(str, folders), "--output", str(tmp_path / "sweep.png")])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| run | best validation accuracy (step) | steps |")
    assert [[c.strip() for c in row.strip("|").split("|")] for row in lines[2:]] == expected_rows(folders)
    _, _, acc_step, _ = report.draw(report.load_runs(tuple(map(str, folders)))).axes[:4]
    assert acc_step.get_title() == "validation accuracy against step"
    assert all(len(line.get_xdata()) >= 5 for line in acc_step.get_lines())  # every 10 of ~55 steps, and the end
