"""What the tests share: real MNIST, real processes, and reading what a run leaves behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def mnist_dir() -> Path:
    return Path(os.environ.get("DISTRNN_DATA_DIR", REPO.parent / "shared" / "data"))


# Every process the tests start: collectives refuse bool tensors, and every rank checks that all ranks call
# the same collective with the same shapes and dtypes (tests/collective_check/sitecustomize.py says why not
# TORCH_DISTRIBUTED_DEBUG=DETAIL).
COLLECTIVE_CHECK = {"PYTHONPATH": str(REPO / "tests" / "collective_check"), "DISTRNN_TEST_COLLECTIVE_CHECK": "1"}


# W&B, even offline, starts a service process in every run: measured 11.8 s against 6.6 s (W&B disabled) for a
# tiny 2-process `distrnn train` on this project's 2-core Intel Xeon (AVX512). So a test process has W&B off
# (WANDB_MODE=disabled: wandb.init returns at once and writes nothing) unless the test checks what W&B holds and
# asks for it with env=WANDB_OFFLINE.
WANDB_OFFLINE = {"WANDB_MODE": "offline"}


def process_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **COLLECTIVE_CHECK, **(extra or {})}
    # A test's own path first, then the check, then the caller's (a git worktree's checkout tested with one venv)
    paths = [(extra or {}).get("PYTHONPATH"), COLLECTIVE_CHECK["PYTHONPATH"], os.environ.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("DISTRNN_DEBUG", None)
    # Under pytest-xdist (make test-all runs two tests at a time on 2 cores) a test's processes get one thread
    # each unless the test says otherwise: torch's OpenMP threads spin while they wait, and two tests each running
    # 2 threads a process took the default config's reference run from 68 s (alone) to 675 s.
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in (extra or {}):
        env["OMP_NUM_THREADS"] = "1"
    return env


def run(args: list[str], timeout: float = 600, env: dict[str, str] | None = None, cwd: Path = REPO):
    """Run a real command (distrnn, python -m ...) and return the CompletedProcess."""
    return subprocess.run(args, cwd=cwd, env=process_env(env), capture_output=True, text=True, timeout=timeout)


def distrnn(*args: str, **kwargs):
    return run([str(BIN / "distrnn"), *args], **kwargs)


def start_distrnn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `distrnn ...` in the background (its own session, so a test can signal the whole job)."""
    return subprocess.Popen([str(BIN / "distrnn"), *args], cwd=REPO, env=process_env(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def train_small_model(out: Path, data_dir: Path, config: str = "smoke", samples: int = 2000) -> Path:
    """A model of a shipped config (its architecture and input normalisation) trained for one epoch on
    `samples` training images, in one CPU process (for predict and export tests)."""
    result = distrnn("train", "--mode", "cpu", "--config", config, "--epochs", "1", "--set",
                     f"data.train_samples={samples}", "--set", "train.eval_train_set=false", "--no-wandb",
                     "--data-dir", str(data_dir), "--output-dir", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


SLOW_RANK_WARNING = re.compile(r"^warning: rank \d+ \(node \S+\) is [\d.]+x slower than the median rank")


def run_warnings(output: str) -> list[str]:
    """A run's `warning:` lines, less the slow-rank warning. That one reports the machine, not the behaviour a
    test checks: with two tests at a time on 2 cores (make test-all) a neighbour can slow one rank 2.6x. The
    tests that check the warning itself (test_observability.py) read it directly."""
    return [line for line in output.splitlines() if line.startswith("warning:") and not SLOW_RANK_WARNING.match(line)]


def read_bundle(out: Path) -> dict[str, dict]:
    """A run folder's hang report and evidence (RUN/hang/), each file parsed."""
    return {path.name: json.loads(path.read_text()) for path in sorted((out / "hang").iterdir())}


def counts(output: str) -> list[tuple[int, int]]:
    """Every 'Got C / N with accuracy A' line as (C, N)."""
    return [(int(c), int(n)) for c, n in re.findall(r"^Got (\d+) / (\d+) with accuracy [\d.]+$", output, re.M)]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a process started with pipes; at the timeout its whole session is killed,
    and its children in sessions of their own (torchrun's workers, which hold its pipes: a frozen one would
    keep them open for ever)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def wait_for_handler(proc: subprocess.Popen, sig: signal.Signals, timeout: float = 120) -> None:
    """Block until `proc` catches `sig` (its bit in /proc/PID/status SigCgt): a signal sent before its handler
    exists ends the process by the default action instead (an interpreter importing torch takes 2-5 s)."""
    deadline = time.monotonic() + timeout
    status = Path(f"/proc/{proc.pid}/status")
    while True:
        caught = next(int(line.split()[1], 16) for line in status.read_text().splitlines()
                      if line.startswith("SigCgt:"))
        if caught & (1 << (int(sig) - 1)):
            return
        assert proc.poll() is None and time.monotonic() < deadline, f"no handler of {sig.name} in {timeout} s"
        time.sleep(0.05)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Block until metrics.jsonl records `step` or later; return the step seen."""
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


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint folder (what resume picks)."""
    complete = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "meta.json").is_file())
    assert complete, f"no complete checkpoint in {run_dir}"
    return complete[-1]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one line on stderr; fails if there is more, or a traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line.strip() for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("wandb:")]
    assert len(lines) == 1, lines
    message = lines[0].split(": error", 1)[-1]
    assert len(re.sub(r"/[^\s;,)'`]*", "", message)) <= 200, f"longer than ~200 characters (paths aside): {message}"
    return lines[0]


def replace(raw: Path, name: str, content: bytes) -> None:
    """Put `content` in place of the file `raw/name` (a link to the real MNIST, in raw_copy)."""
    (raw / name).unlink()
    (raw / name).write_bytes(content)


def header(magic: int, *dims: int) -> bytes:
    """An IDX header: the magic number, then each dimension, big-endian."""
    return b"".join(v.to_bytes(4, "big") for v in (magic, *dims))


def flip_byte(path: Path) -> None:
    """One byte in the middle of `path`, inverted: what a bad disk or a bad copy does."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
