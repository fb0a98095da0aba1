"""Shared fixtures: real MNIST, real processes, and one 2-process smoke run reused by several tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def mnist_dir() -> Path:
    return Path(os.environ.get("DISTRNN_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real MNIST; in CI its absence is a failure, elsewhere a skip with the reason."""
    root = mnist_dir()
    if not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file():
        message = f"real MNIST not found under {root}/MNIST/raw; set DISTRNN_DATA_DIR"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return root


def run(args: list[str], timeout: float = 600, env: dict[str, str] | None = None, cwd: Path = REPO):
    """Run a real command (distrnn, python -m ...) and return the CompletedProcess."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("DISTRNN_DEBUG", None)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def distrnn(*args: str, **kwargs):
    return run([str(BIN / "distrnn"), *args], **kwargs)


def counts(output: str) -> list[tuple[int, int]]:
    """Every 'Got C / N with accuracy A' line as (C, N)."""
    return [(int(c), int(n)) for c, n in re.findall(r"^Got (\d+) / (\d+) with accuracy [\d.]+$", output, re.M)]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`distrnn train` with 2 CPU processes (gloo) on the smoke config, W&B offline."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", "--config", "configs/smoke.yaml",
                     "--data-dir", str(data_dir), "--output-dir", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result
