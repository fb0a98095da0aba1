"""Fixtures: real MNIST, and one 2-process smoke run reused by several end-to-end tests.

The tiers are folders (tests/README.md): unit/ starts no process (`make check`), integration/ starts real processes on
this machine (`make test` adds it), cluster/ needs root or a cluster (`make test-all`, what CI runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from distrnn.data import mnist
from tests.helpers import BIN, IN_CI, REPO, WANDB_OFFLINE, distrnn, mnist_dir

SLURM_CONF = Path(os.environ.get("DISTRNN_SLURM_STATE", "/tmp/distrnn-slurm")) / "slurm.conf"


def require(condition: bool, message: str) -> None:
    """Missing real data, SLURM or root: a failure in CI, a skip with the reason elsewhere."""
    if not condition:
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def slurm_environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment the SLURM tests submit with, once a cluster answers (tests/slurm/cluster.sh up).
    Its PATH starts with the cluster's wrappers of sbatch, srun, scontrol, ... (the controller is reachable only
    from the cluster's network namespaces; they run the real commands there); the jobs inherit that PATH."""
    path = os.pathsep.join([str(SLURM_CONF.parent / "bin"), os.environ.get("PATH", os.defpath)])
    env = {**os.environ, "PATH": path, "SLURM_CONF": str(SLURM_CONF), "DISTRNN_DATA_DIR": str(data_dir),
           "DISTRNN_MODE": "cpu", "DISTRNN_VENV": str(BIN.parent),
           "WANDB_MODE": "disabled", **extra}  # W&B off unless a job asks (tests/helpers.py WANDB_OFFLINE says why)
    env.pop("DISTRNN_DEBUG", None)
    ok = shutil.which("sbatch", path=path) and SLURM_CONF.is_file() and subprocess.run(
        ["sinfo", "-h"], env=env, capture_output=True, timeout=30).returncode == 0
    require(bool(ok), f"no SLURM cluster answers (SLURM_CONF={SLURM_CONF}); "
                      "start one with: bash tests/slurm/cluster.sh up")
    (REPO / "logs").mkdir(exist_ok=True)
    return env


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = mnist_dir()
    require((root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file(),
            f"real MNIST not found under {root}/MNIST/raw; set DISTRNN_DATA_DIR")
    return root


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`distrnn train` with 2 CPU processes (gloo) on the smoke config, W&B offline."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke",
                     "--data-dir", str(data_dir), "--output-dir", str(out), timeout=600, env=WANDB_OFFLINE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture
def raw_copy(tmp_path, data_dir) -> Path:
    """A data folder whose files link to the real MNIST, so one file can be damaged cheaply."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist.RAW_FILES:
        (raw / name).symlink_to(data_dir / "MNIST" / "raw" / name)
    return raw



@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without xdist (no -n) it is never called
def pytest_xdist_make_scheduler(config, log):
    """`-n 2` (make test-all): a module's tests run on one worker, so its module-scoped runs train once, and the
    cluster tier is one queue, one test at a time (one SLURM cluster; no two tests timing a fault side by side).
    Written as a scheduler because xdist 3.8's `xdist_group` marks are lost under pytest 9.2 (it renames
    `item._nodeid`, which pytest 9.2 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndOneClusterQueue(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "tests/cluster" if module.startswith("tests/cluster/") else module

    config.option.loadscopereorder = False  # collection order: the cluster queue (the longest) first, unit/ last
    return ModulesAndOneClusterQueue(config, log)
