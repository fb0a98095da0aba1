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


def start_distrnn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `distrnn ...` in the background (its own session, so a test can signal the whole job)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("DISTRNN_DEBUG", None)
    return subprocess.Popen([str(BIN / "distrnn"), *args], cwd=REPO, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Block until metrics.jsonl records `step` or later; return the step seen."""
    import json
    import time

    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-3000:]}"
        if metrics.is_file():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")
