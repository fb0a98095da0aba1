"""Elastic resume with real processes: a checkpoint continues on another number of processes with the same
samples applied by every optimizer step (a ledger of the trainer's real updates: DISTRNN_FAULTS=sample-ledger),
and in-job restarts."""

from __future__ import annotations

import json
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from distrnn.ranks.preemption import REQUEUE_EXIT_CODE
from tests.helpers import counts, distrnn, one_line_error, start_distrnn, wait_for_step

# 1600 images, global batch 128 (64 per process on 2): 13 optimizer steps an epoch (odd, the last one wrapped
# around to the epoch's start), 26 in all; a checkpoint every 10; every step checked, so stop-at stops there.
RUN = ["--config", "smoke", "--set", "data.train_samples=1600", "--set", "data.test_samples=1000", "--no-wandb",
       "--set", "train.epochs=2", "--set", "train.log_every=1", "--set", "checkpoint.every_steps=10",
       "--set", "train.collective_timeout_s=30", "--set", "train.eval_train_set=false"]
STEPS = 26


def train_args(out: Path, processes: int, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "--mode", "cpu", "--num-processes", str(processes), "--data-dir", str(data_dir),
            "--output-dir", str(out), *RUN, *extra]


def faults_env(ledger: Path, stop_at_step: int | None = None) -> dict[str, str]:
    """The sample ledger into `ledger`, and a stop (as SIGUSR1) at exactly `stop_at_step` if given."""
    ledger.mkdir(parents=True, exist_ok=True)
    stop = [f"stop-at={stop_at_step}"] if stop_at_step else []
    return {"DISTRNN_FAULTS": ",".join([f"sample-ledger={ledger}", *stop])}


@dataclass
class Update:
    """What one optimizer step applied, over every rank."""

    samples: Counter = field(default_factory=Counter)  # the multiset of training indices
    micro_batches: int = 0


def read_ledger(*folders: Path) -> dict[tuple[int, int], Update]:
    """(epoch, optimizer step) -> what that step applied."""
    updates: dict[tuple[int, int], Update] = {}
    for folder in folders:
        for file in folder.glob("rank-*.jsonl"):
            for line in file.read_text().splitlines():
                entry = json.loads(line)
                update = updates.setdefault((entry["epoch"], entry["step"]), Update())
                update.micro_batches += len(entry["micro_batches"])
                for indices in entry["micro_batches"]:
                    update.samples.update(indices)
    return updates


def stop_at(out: Path, processes: int, data_dir: Path, step: int, ledger: Path, *extra: str) -> str:
    result = distrnn(*train_args(out, processes, data_dir, *extra), env=faults_env(ledger, step))
    assert result.returncode == REQUEUE_EXIT_CODE, result.stderr[-3000:]
    assert f"stopped by SIGUSR1 at step {step};" in result.stderr
    return result.stdout


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted 2-process run, with its ledger."""
    out = tmp_path_factory.mktemp("elastic-reference") / "run"
    ledger = out.parent / "ledger"
    result = distrnn(*train_args(out, 2, data_dir), env=faults_env(ledger))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout, read_ledger(ledger)


def assert_trained_like(reference, out: Path, stdout: str, moved: dict[tuple[int, int], Update]) -> None:
    """Update by update (exact): every optimizer step applied the samples of the uninterrupted run's step, and
    the run took as many steps; then the weights and the test count, which only come close."""
    ref_out, ref_stdout, ref_ledger = reference
    assert len(ref_ledger) == STEPS

    def applied(update: Update) -> str:
        return f"{update.micro_batches} micro-batches, {sum(update.samples.values())} samples"

    none = Update()  # a step one run did not take
    differ = [f"epoch {epoch} step {step}: {applied(moved.get((epoch, step), none))} (uninterrupted: "
              f"{applied(ref_ledger.get((epoch, step), none))})" for epoch, step in sorted(set(moved) | set(ref_ledger))
              if moved.get((epoch, step), none).samples != ref_ledger.get((epoch, step), none).samples]
    assert differ == [], f"{len(differ)} updates differ from the uninterrupted run's: {'; '.join(differ[:4])}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["global_batch"] == 128
    # Not bit for bit: the reduction order changes with the number of processes (measured: 2e-8 here).
    a, b = weights(out), weights(ref_out)
    gap = max((a[name] - b[name]).abs().max().item() for name in a)
    assert gap < 1e-3, gap
    (correct, seen), (ref_correct, _) = counts(stdout)[-1], counts(ref_stdout)[-1]
    assert seen == 1000 and abs(correct - ref_correct) <= 10  # test accuracy within 1 point


def test_a_run_moved_from_2_to_1_to_4_and_back_to_2_processes_applies_the_same_samples_at_every_update(
        reference, tmp_path, data_dir):
    """Stopped at odd steps: 5 (mid-epoch), 13 (the first epoch's end) and 17 (the second epoch), with the
    1-process part accumulating 2 batches of 64 per update and the 4-process part 32 per process."""
    out, ledgers = tmp_path / "run", [tmp_path / f"ledger-{i}" for i in range(4)]
    stop_at(out, 2, data_dir, 5, ledgers[0])
    shrunk = stop_at(out, 1, data_dir, 13, ledgers[1])
    grown = stop_at(out, 4, data_dir, 17, ledgers[2])
    last = distrnn(*train_args(out, 2, data_dir), env=faults_env(ledgers[3]))
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resume: 2 -> 1 processes; global batch 128 kept as 64 per process x 2 accumulation" in shrunk
    assert "resume: 1 -> 4 processes; global batch 128 kept as 32 per process x 1 accumulation" in grown
    assert "resume: 4 -> 2 processes; global batch 128 kept as 64 per process x 1 accumulation" in last.stdout
    assert_trained_like(reference, out, last.stdout, read_ledger(*ledgers))


def test_a_run_grown_to_4_processes_with_accumulation_then_moved_to_1_applies_the_same_samples_at_every_update(
        reference, tmp_path, data_dir):
    """2 processes (64 x 1) stopped at step 5; 4 processes with the split the user chose, 16 per process x 2
    accumulation (ranks 2 and 3 new: no saved state of their own), stopped at 19; finished on 1 process with
    32 x 4."""
    out, ledgers = tmp_path / "run", [tmp_path / f"ledger-{i}" for i in range(3)]
    stop_at(out, 2, data_dir, 5, ledgers[0])
    grown = stop_at(out, 4, data_dir, 19, ledgers[1], "--set", "train.batch_size=16", "--set",
                    "train.grad_accum_steps=2")
    last = distrnn(*train_args(out, 1, data_dir, "--set", "train.batch_size=32", "--set", "train.grad_accum_steps=4"),
                   env=faults_env(ledgers[2]))
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resume: 2 -> 4 processes; global batch 128 kept as 16 per process x 2 accumulation" in grown
    assert "resume: 4 -> 1 processes; global batch 128 kept as 32 per process x 4 accumulation" in last.stdout
    assert_trained_like(reference, out, last.stdout, read_ledger(*ledgers))


def test_a_resume_with_accumulation_still_applies_the_partial_group_that_ends_an_epoch(tmp_path, data_dir):
    """data.loader=torchvision on 1 process, 64 x 2, one epoch: 25 batches, so its 13th update applies one
    (Accelerate's end of the DataLoader ends it). Stopped at step 5 and resumed: bit for bit the uninterrupted run,
    13 steps each."""
    accumulate = ["--set", "data.loader=torchvision", "--set", "train.grad_accum_steps=2", "--set", "train.epochs=1"]
    runs = {name: tmp_path / name for name in ("uninterrupted", "resumed")}
    whole = distrnn(*train_args(runs["uninterrupted"], 1, data_dir, *accumulate))
    assert whole.returncode == 0, whole.stderr[-3000:]
    stop_at(runs["resumed"], 1, data_dir, 5, tmp_path / "ledger", *accumulate)
    resumed = distrnn(*train_args(runs["resumed"], 1, data_dir, *accumulate))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads((run / "summary.json").read_text())["steps"] for run in runs.values()]
    assert steps == [13, 13]
    a, b = weights(runs["uninterrupted"]), weights(runs["resumed"])
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_global_batch_that_3_processes_cannot_share_is_refused_in_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    stop_at(out, 2, data_dir, 5, tmp_path / "ledger")
    line = one_line_error(distrnn(*train_args(out, 3, data_dir)))
    assert line.endswith("has a global batch of 128, which 3 processes cannot share equally; resume on 1, 2, 4, 8, "
                         "16, 32, 64 processes (the divisors of 128), or --resume never")


def test_a_killed_worker_is_restarted_in_the_same_job_and_the_counts_stay_exact(reference, tmp_path, data_dir):
    ref_out, ref_stdout, _ = reference
    out = tmp_path / "run"
    proc = start_distrnn(*train_args(out, 2, data_dir), "--max-restarts", "1")
    wait_for_step(proc, out, 14)  # after the checkpoint at step 10, mid-epoch
    [victim] = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "distrnn.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert ("distrnn: restart 1 of 1 after worker rank 1 was killed by SIGKILL; resuming from the newest checkpoint "
            "that verifies") in stderr
    assert "resumed from" in stdout
    assert counts(stdout)[-2:] == counts(ref_stdout)[-2:]  # exact: the same counts as never interrupted
    assert all(torch.equal(weights(out)[name], weights(ref_out)[name]) for name in weights(out))


def test_an_error_that_would_repeat_is_not_restarted(tmp_path, data_dir):
    result = distrnn(*train_args(tmp_path / "run", 2, tmp_path / "no-data"), "--max-restarts", "3")
    assert result.returncode == 1
    assert "restart" not in result.stderr
    assert one_line_error(result).startswith("distrnn.train: error: MNIST not found in")
