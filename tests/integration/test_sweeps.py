"""The W&B sweep (sweeps/fast.yaml with sweeps/trial.sh) without a W&B server.

What is tested: the file loads the way `wandb sweep` loads it and passes the checks `wandb sweep` makes
before sending it; every value it can draw is a valid fast config; and one drawn trial, started by
wandb's own agent code (`Agent._command_run`, which builds the command from the sweep's `command` and
runs it), trains in its own run folder as the sweep's W&B run (offline) and reports the metric the
sweep maximises. Not tested here: creating the sweep on a W&B server, the server's own schema check,
its Bayesian search, and `wandb agent` fetching trials (there is no server).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distrnn.config.schema import load_config
from distrnn.run.folder import RunFolder
from tests.helpers import BIN, REPO, one_line_error, run

SWEEP = REPO / "sweeps" / "fast.yaml"
PARAMETERS = {"optim.lr", "train.batch_size", "optim.pct_start"}
# After the agent's arguments, so they win: a trial of seconds instead of minutes.
SMALL = ["data.train_samples=2000", "train.epochs=1", "data.val_samples=500"]

# In a process of its own: the agent sets WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH in os.environ.
AGENT = """
import json, os, sys
from wandb.wandb_agent import Agent
config, run_id, values, extra = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
agent = Agent(api=None, queue=None, sweep_id=os.environ["WANDB_SWEEP_ID"])
agent._sweep_command = [*config["command"], *extra]  # what Agent.run takes from the sweep on the server
agent._command_run({"type": "run", "run_id": run_id, "program": config["program"],
                    "args": {name: {"value": value} for name, value in values.items()}})
sys.exit(agent._run_processes[run_id].wait())
"""


def sweep_config() -> dict[str, Any]:
    from wandb.sdk.launch.sweeps.utils import load_sweep_config  # what `wandb sweep FILE` reads it with

    config = load_sweep_config(str(SWEEP))
    assert config, f"wandb could not load {SWEEP}"
    return config


def sample(parameters: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One trial's values, drawn by each parameter's distribution (those the sweep uses; others fail)."""
    values = {}
    for name, spec in parameters.items():
        if "values" in spec:
            values[name] = rng.choice(spec["values"])
        elif spec["distribution"] == "log_uniform_values":
            values[name] = math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        else:
            assert spec["distribution"] == "uniform", f"{name}: teach sample() {spec['distribution']}"
            values[name] = rng.uniform(spec["min"], spec["max"])
    return values


def test_the_sweep_file_is_what_wandb_sweep_accepts():
    from wandb.apis.public.sweeps import _validate_config_and_fill_distribution

    config = sweep_config()
    _validate_config_and_fill_distribution(config)  # `wandb sweep`'s own check before it sends the file
    assert config["metric"] == {"name": "best_val_accuracy", "goal": "maximize"}
    assert config["method"] in ("random", "bayes", "grid") and set(config["parameters"]) == PARAMETERS
    command = config["command"]
    assert command[:2] == ["bash", "${program}"] and (REPO / config["program"]).is_file()
    assert " ".join(command[2:]) == "--config fast --set data.val_samples=5000 ${args_no_hyphens}"


def test_every_value_the_sweep_can_draw_is_a_valid_fast_config():
    for name, spec in sweep_config()["parameters"].items():
        for value in spec.get("values") or [spec["min"], spec["max"]]:
            cfg = load_config("fast", ["data.val_samples=5000", f"{name}={value}"])  # refused with one line if not
            section, key = name.split(".")
            assert getattr(getattr(cfg, section), key) == value


def test_trial_sh_outside_an_agent_is_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SWEEP_ID", "WANDB_RUN_ID")}
    result = subprocess.run(["bash", "sweeps/trial.sh", "--config", "fast"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "wandb agent" in one_line_error(result)


@pytest.fixture(scope="module")
def trial(tmp_path_factory, data_dir) -> tuple[Path, dict[str, Any], subprocess.CompletedProcess]:
    """One trial as the agent starts it, from the repository root, with fake sweep and run ids."""
    sweep_id, run_id = f"testsweep{os.getpid()}", "trial0"
    config = sweep_config()
    values = sample(config["parameters"], random.Random(0))
    env = {"WANDB_SWEEP_ID": sweep_id, "WANDB_PROJECT": "distrnn",  # the agent sets both from the sweep's path
           "WANDB_DIR": str(tmp_path_factory.mktemp("wandb-agent")), "WANDB_MODE": "offline",
           "DISTRNN_DATA_DIR": str(data_dir), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = run([sys.executable, "-c", AGENT, json.dumps(config), run_id, json.dumps(values), *SMALL], env=env)
    yield REPO / "runs" / "sweeps" / sweep_id / run_id, values, result
    shutil.rmtree(REPO / "runs" / "sweeps" / sweep_id, ignore_errors=True)
    with contextlib.suppress(OSError):  # runs/sweeps too, unless real sweeps are in it
        (REPO / "runs" / "sweeps").rmdir()


def test_a_trial_trains_the_drawn_values_in_its_own_run_folder(trial):
    folder, values, result = trial
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resolved = yaml.safe_load(RunFolder(folder).config.read_text())
    assert {name: resolved[name.split(".")[0]][name.split(".")[1]] for name in PARAMETERS} == values
    assert resolved["optim"]["schedule"] == "onecycle" and resolved["train"]["precision"] == "auto"  # fast
    assert (resolved["data"]["train_samples"], resolved["data"]["val_samples"]) == (2000, 500)
    assert resolved["train"]["output_dir"] == str(Path("runs", "sweeps", folder.parent.name, folder.name))
    assert RunFolder(folder).summary.is_file()


def test_the_trial_is_the_sweeps_wandb_run(trial):
    """wandb.init in the trial takes the agent's run id, project and sweep parameters, whatever distrnn asks."""
    folder, values, result = trial
    assert result.returncode == 0, result.stderr[-3000:]
    (offline,) = (folder / "wandb").glob("offline-run-*")
    inspected = run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(offline)])
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    wandb_run = json.loads(inspected.stdout)
    assert (wandb_run["run_id"], wandb_run["name"], wandb_run["project"]) == (folder.name, folder.name, "distrnn")
    assert {name: wandb_run["config"][name] for name in PARAMETERS} == values  # the sweep's own parameters
    assert wandb_run["config"]["optim"]["lr"] == values["optim.lr"]  # and distrnn's resolved config beside them


def test_the_trial_reports_the_metric_the_sweep_maximises(trial):
    """Needs data.val_samples (best_val_accuracy in summary.json and in the W&B run summary)."""
    folder, _, result = trial
    assert result.returncode == 0, result.stderr[-3000:]
    metric = sweep_config()["metric"]["name"]
    summary = json.loads(RunFolder(folder).summary.read_text())
    assert isinstance(summary[metric], float) and 0 <= summary[metric] <= 100
    (offline,) = (folder / "wandb").glob("offline-run-*")
    inspected = run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(offline)])
    assert json.loads(inspected.stdout)["summary"][metric] == summary[metric]  # what the sweep's controller reads
