"""A non-editable install (a built wheel in a fresh venv) trains from any directory."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO, run


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the distrnn wheel; its dependencies come from the test venv (a .pth line),
    whose editable distrnn is not seen: .pth files in a folder added that way are not processed."""
    tmp = tmp_path_factory.mktemp("install")
    built = run([str(BIN / "python"), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-w", str(tmp / "wheel"), str(REPO)], timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    venv = tmp / "venv"
    assert run([str(BIN / "python"), "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    site = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                    ).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp / "wheel").glob("distrnn-*.whl"))
    result = run([str(BIN / "python"), "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                  str(wheel)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def test_wheel_ships_the_configs_and_launch_configs(installed, tmp_path):
    where = run([str(installed / "bin" / "python"), "-c",
                 "import distrnn, distrnn.configs, distrnn.launch, distrnn.config.schema, distrnn.data.loaders,"
                 " distrnn.evaluation.evaluator, distrnn.launcher.processes, distrnn.ranks.collectives,"
                 " distrnn.run.checkpoint, distrnn.testing.faults, distrnn.tools.report, distrnn.worker.trainer;"
                 " print(distrnn.__file__)"], cwd=tmp_path)  # every subpackage is in the wheel
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed)  # the wheel, not the checkout
    env = run([str(installed / "bin" / "distrnn"), "env"], cwd=tmp_path, timeout=120)
    assert env.returncode == 0, env.stderr
    assert "distributed_type: 'NO'" in env.stdout and str(installed) in env.stdout


def test_installed_distrnn_trains_a_shipped_config_by_name_from_another_directory(installed, tmp_path, data_dir):
    out = tmp_path / "run"
    result = run([str(installed / "bin" / "distrnn"), "train", "--mode", "cpu", "--config", "smoke", "--no-wandb",
                  "--set", "data.train_samples=640", "--set", "data.test_samples=500", "--data-dir", str(data_dir),
                  "--output-dir", str(out)], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_seen"], summary["test_seen"]) == (640, 500)
    two = run([str(installed / "bin" / "distrnn"), "evaluate", "--checkpoint", str(out), "--mode", "cpu",
               "--num-processes", "2", "--limit", "300", "--data-dir", str(data_dir)], cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]  # the multi-process launch config is found too
