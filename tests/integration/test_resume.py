"""Checkpoints, exact resume, preemption signals and rank failure, with real processes and signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from distrnn.ranks.preemption import REQUEUE_EXIT_CODE
from tests.helpers import (
    BIN,
    WANDB_OFFLINE,
    counts,
    distrnn,
    flip_byte,
    newest_checkpoint,
    one_line_error,
    run_warnings,
    start_distrnn,
    wait_for_step,
)

# Two epochs of 4000 images: 63 steps an epoch with 1 process, 32 with 2; a checkpoint every 10 steps.
STEPS = {1: 63, 2: 32}
RUN = ["--config", "smoke", "--set", "data.train_samples=4000", "--set", "data.test_samples=2000",
       "--set", "train.epochs=2", "--set", "train.log_every=2", "--set", "checkpoint.every_steps=10",
       "--set", "train.collective_timeout_s=20"]



def train_args(out: Path, processes: int, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "--mode", "cpu", "--num-processes", str(processes), "--data-dir", str(data_dir),
            "--output-dir", str(out), *RUN, *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["model"]


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


def latest_meta(run_dir: Path) -> dict:
    return json.loads((newest_checkpoint(run_dir) / "meta.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The reference each interrupted run must match, per number of processes (trained lazily)."""
    runs: dict[tuple[int, str], tuple[Path, str]] = {}

    def get(processes: int, loader: str = "memory") -> tuple[Path, str]:
        if (processes, loader) not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{processes}{loader}") / "run"
            result = distrnn(*train_args(out, processes, data_dir, "--no-wandb", "--set", f"data.loader={loader}"))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[(processes, loader)] = (out, result.stdout)
        return runs[(processes, loader)]

    return get


def interrupt(out: Path, processes: int, data_dir: Path, sig: signal.Signals, at_step: int = 10, *extra: str,
              env: dict[str, str] | None = None):
    proc = start_distrnn(*train_args(out, processes, data_dir, *extra), env=env)
    wait_for_step(proc, out, at_step)
    os.kill(proc.pid, sig)  # the launcher, as SLURM or a terminal would
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("processes, sig, loader, wandb", [(1, signal.SIGUSR1, "memory", False),
                                                           (2, signal.SIGUSR1, "torchvision", False),
                                                           (2, signal.SIGTERM, "memory", True)])
def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, data_dir, uninterrupted,
                                                                       processes, sig, loader, wandb):
    """Both data paths: Accelerate's sharded DataLoader (skip_first_batches) and the in-memory loader. W&B's
    one run over both starts is checked once (W&B offline costs ~5 s a start, whatever the case)."""
    reference, reference_stdout = uninterrupted(processes, loader)
    out = tmp_path / "run"
    trackers = ["--wandb" if wandb else "--no-wandb"]
    code, _, stderr = interrupt(out, processes, data_dir, sig, 4, *trackers, "--set", f"data.loader={loader}",
                                env=WANDB_OFFLINE)
    assert code == REQUEUE_EXIT_CODE, stderr[-3000:]
    assert f"stopped by {sig.name}" in stderr
    meta = latest_meta(out)
    assert meta["position"]["epoch"] == 0 and 0 < meta["position"]["step_in_epoch"] < STEPS[processes]
    assert not (out / "model.pt").exists()

    resumed = distrnn(*train_args(out, processes, data_dir, *trackers, "--set", f"data.loader={loader}"),
                      env=WANDB_OFFLINE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-" in resumed.stdout
    assert_bit_identical(out, reference)
    assert counts(resumed.stdout) == counts(reference_stdout)
    if not wandb:
        return

    # W&B: one run id across both starts, its step counter continuing where the first stopped
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1
    steps = []
    for run in wandb_runs:
        records = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(run)],
                                 capture_output=True, text=True, timeout=120).stdout.splitlines()
        steps.append([json.loads(r)["history"]["step"]["num"] for r in records if '"type":"history"' in r])
    assert steps[0] and steps[1] and steps[1][0] > steps[0][-1] >= meta["position"]["global_step"] - 2
    assert steps[1][-1] == 2 * STEPS[processes]


def test_cudnn_weight_layout_saves_resumes_and_evaluates_like_the_plain_one(tmp_path, data_dir, uninterrupted):
    """On a GPU every RNN weight is a view of one cuDNN buffer; safetensors kept 1 of the 8 (emulated here)."""
    reference, reference_stdout = uninterrupted(1)
    out, cudnn = tmp_path / "run", {"DISTRNN_FAULTS": "cudnn-flat-weights"}
    code, _, stderr = interrupt(out, 1, data_dir, signal.SIGUSR1, 4, env=cudnn)
    assert code == REQUEUE_EXIT_CODE, stderr[-3000:]
    saved = newest_checkpoint(out)
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 10  # 8 RNN tensors + the head's weight and bias
    evaluated = distrnn("evaluate", "--checkpoint", str(saved), "--mode", "cpu", "--data-dir", str(data_dir),
                        "--limit", "500")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    resumed = distrnn(*train_args(out, 1, data_dir), env=cudnn)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(out, reference)  # the same training as without the emulated layout
    assert counts(resumed.stdout) == counts(reference_stdout)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, data_dir, uninterrupted):
    reference, reference_stdout = uninterrupted(1)
    out = tmp_path / "run"
    code, _, _ = interrupt(out, 1, data_dir, signal.SIGUSR1, 4)
    assert code == REQUEUE_EXIT_CODE
    good = latest_meta(out)["position"]["global_step"]

    # Resume with a save that takes 60 s, and kill the whole job while it is writing.
    proc = start_distrnn(*train_args(out, 1, data_dir), env={"DISTRNN_FAULTS": "publish-delay=60"})
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob(".tmp-step-*/model.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "no save started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert latest_meta(out)["position"]["global_step"] == good  # the torn save is not taken for complete

    resumed = distrnn(*train_args(out, 1, data_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: skipping incomplete checkpoint" in resumed.stdout
    assert f"checkpoints/step-{good:08d}: epoch 1" in resumed.stdout
    assert_bit_identical(out, reference)


def test_a_killed_rank_stops_the_others_quickly_and_resume_works(tmp_path, data_dir, uninterrupted):
    reference, _ = uninterrupted(2)
    out = tmp_path / "run"
    proc = start_distrnn(*train_args(out, 2, data_dir))
    wait_for_step(proc, out, 12)  # after the checkpoint at step 10
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "distrnn.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    victim = workers[1]
    victim.send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=90)  # fails the test instead of hanging
    elapsed = time.monotonic() - start
    assert proc.returncode == 128 + signal.SIGKILL  # the exit-code table (docs/checkpoints.md): 137
    assert elapsed < 45, f"took {elapsed:.0f} s to stop"
    assert "was killed by SIGKILL" in stderr
    assert "Traceback" not in stderr
    gone = psutil.wait_procs(workers, timeout=10)[1]
    assert not gone, f"left behind: {gone}"

    resumed = distrnn(*train_args(out, 2, data_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bit_identical(out, reference)


def test_checkpoint_rebuilds_its_model_and_refuses_another(tmp_path, data_dir):
    out = tmp_path / "run"
    code, _, _ = interrupt(out, 1, data_dir, signal.SIGUSR1, 4, "--set", "model.hidden_size=64",
                           "--set", "model.cell=gru")
    assert code == REQUEUE_EXIT_CODE
    checkpoint = newest_checkpoint(out)

    # evaluate needs no model flags: the config stored with the checkpoint rebuilds the GRU
    result = distrnn("evaluate", "--checkpoint", str(checkpoint), "--mode", "cpu",
                     "--data-dir", str(data_dir), "--limit", "500")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [seen for _, seen in counts(result.stdout)] == [500, 500]

    # resuming with another model is refused with one line naming the difference
    result = distrnn(*train_args(out, 1, data_dir, "--set", "model.hidden_size=128", "--set", "model.cell=gru"))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"distrnn.train: error: checkpoint {checkpoint} has model.hidden_size=64 but this run asks for "
                     "model.hidden_size=128; use the same config, another --output-dir, or --resume never"]


# --- checkpoints that can be trusted, a folder that one run owns --------------------------------------

@pytest.fixture(scope="module")
def stopped_at_25(tmp_path_factory, data_dir):
    """A run stopped at step >= 25 (checkpoints 10, 20 and the stop's), per number of processes: each damage
    test works on a copy of it."""
    runs: dict[int, Path] = {}

    def get(processes: int) -> Path:
        if processes not in runs:
            out = tmp_path_factory.mktemp(f"stopped{processes}") / "run"
            code, _, stderr = interrupt(out, processes, data_dir, signal.SIGUSR1, 25)
            assert code == REQUEUE_EXIT_CODE, stderr[-3000:]
            runs[processes] = out
        return runs[processes]

    return get


def damaged_resume(tmp_path, data_dir, uninterrupted, stopped_at_25, processes: int, damage) -> None:
    """A copy of the stopped run, its newest checkpoint damaged, resumed: one warning naming it, the previous
    checkpoint resumes, and the run ends bit-identical to an uninterrupted one."""
    reference, reference_stdout = uninterrupted(processes)
    out = tmp_path / "run"
    shutil.copytree(stopped_at_25(processes), out)
    newest = newest_checkpoint(out)
    previous = sorted(p for p in (out / "checkpoints").glob("step-*") if p != newest)[-1]
    what = damage(newest)
    resumed = distrnn(*train_args(out, processes, data_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = run_warnings(resumed.stdout)
    assert warnings == [f"warning: checkpoint {newest} is damaged ({what}); set aside as .damaged-{newest.name}",
                        f"warning: resuming from {previous}, the newest checkpoint that verifies"]
    assert f"resumed from {previous}: " in resumed.stdout
    assert (out / "checkpoints" / f".damaged-{newest.name}").is_dir()
    assert_bit_identical(out, reference)
    assert counts(resumed.stdout) == counts(reference_stdout)


def test_an_emptied_newest_weights_file_resumes_from_the_previous_checkpoint(tmp_path, data_dir, uninterrupted,
                                                                           stopped_at_25):
    """What a node crash leaves when the rename reached the disk before the data did. Before: a traceback
    (safetensors' "header too small") although older good checkpoints were there."""
    def empty(newest: Path) -> str:
        size = (newest / "model.safetensors").stat().st_size
        (newest / "model.safetensors").write_bytes(b"")
        return f"model.safetensors is 0 bytes, {size} when it was written"

    damaged_resume(tmp_path, data_dir, uninterrupted, stopped_at_25, 1, empty)


def test_a_flipped_byte_in_the_newest_optimizer_state_resumes_from_the_previous_checkpoint(tmp_path, data_dir,
                                                                                          uninterrupted,
                                                                                          stopped_at_25):
    """Before: the resume succeeded silently (exit 0) with a corrupted optimizer state."""
    def flip(newest: Path) -> str:
        flip_byte(newest / "optimizer.bin")
        return "optimizer.bin does not match its checksum (changed after it was written)"

    damaged_resume(tmp_path, data_dir, uninterrupted, stopped_at_25, 1, flip)


def test_a_damaged_file_of_rank_1_is_found_by_the_main_process_and_every_rank_resumes_the_same(tmp_path, data_dir,
                                                                                             uninterrupted,
                                                                                             stopped_at_25):
    def truncate(newest: Path) -> str:
        path = newest / "random_states_1.pkl"
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: size // 2])
        return f"random_states_1.pkl is {size // 2} bytes, {size} when it was written"

    damaged_resume(tmp_path, data_dir, uninterrupted, stopped_at_25, 2, truncate)


def test_a_save_that_fails_leaves_every_earlier_checkpoint_in_place(tmp_path, data_dir):
    """Pruning comes after a newer checkpoint is published: a failed save prunes nothing."""
    out = tmp_path / "run"
    code, _, _ = interrupt(out, 1, data_dir, signal.SIGUSR1, 25)
    assert code == REQUEUE_EXIT_CODE
    before = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert len(before) == 3  # checkpoint.keep
    failed = distrnn(*train_args(out, 1, data_dir), env={"DISTRNN_FAULTS": "save-oserror"})
    assert failed.returncode == 1
    assert re.fullmatch(rf"distrnn.train: error: could not write checkpoint {out}/checkpoints/\.tmp-step-\d+ \(Disk "
                        r"quota exceeded\); the previous checkpoint is intact: free some space and run the same "
                        r"command again to resume", one_line_error(failed))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == before  # nothing pruned


def test_a_second_run_into_a_folder_in_use_is_refused_while_the_first_finishes(tmp_path, data_dir):
    """Two `distrnn train` one second apart (a double sbatch). Before: both ran to the end, exit 0, each
    pruning the other's checkpoints and appending to the same metrics.jsonl."""
    out = tmp_path / "run"
    first = start_distrnn(*train_args(out, 1, data_dir))
    deadline = time.monotonic() + 120
    while not (out / ".hold").is_file():  # the first run holds the folder: the second starts now
        assert first.poll() is None and time.monotonic() < deadline, "the first run took no hold"
        time.sleep(0.05)
    second = distrnn(*train_args(out, 1, data_dir))
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 1
    line = one_line_error(second)
    assert re.fullmatch(rf"distrnn.train: error: {out} is in use by another run \(host \S+, pid {first.pid}, since "
                        r"[\d-]+ [\d:]+\); pass another --output-dir \(if that run is gone, remove \.hold: "
                        r"docs/checkpoints\.md, Checkpoint integrity\)", line), line
    assert not (out / ".hold").exists()  # released by the first at its end
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's log
