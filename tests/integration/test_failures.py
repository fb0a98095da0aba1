"""Failures on any rank and node, and what a resume may change (real processes, gloo).

Two `distrnn train --num-machines 2` launchers on this machine stand for two nodes: each has its own
environment, so one "node" can have a damaged local disk, or a disk quota, that the other has not.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time

import psutil
import pytest
import torch

from distrnn.ranks.preemption import REQUEUE_EXIT_CODE
from tests.helpers import (
    counts,
    distrnn,
    finish,
    header,
    newest_checkpoint,
    one_line_error,
    replace,
    start_distrnn,
    wait_for_step,
)

TINY = ["--config", "smoke", "--set", "data.train_samples=640", "--set", "data.test_samples=500", "--no-wandb",
        "--set", "train.collective_timeout_s=60"]
HOST = socket.gethostname().split(".")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(out, env0: dict, env1: dict, *extra: str) -> list[tuple[int, str, float]]:
    """Machine rank 0 and 1, one CPU process each; (exit code, stderr, seconds) of each processes."""
    common = ["train", "--mode", "cpu", "--num-machines", "2", "--main-process-ip", "127.0.0.1",
              "--main-process-port", str(free_port()), "--output-dir", str(out), *TINY, *extra]
    start = time.monotonic()
    procs = [start_distrnn(*common, "--machine-rank", str(rank), env={"OMP_NUM_THREADS": "1", **env})
             for rank, env in enumerate((env0, env1))]
    results = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=180)
        results.append((proc.returncode, stderr, time.monotonic() - start))
    return results


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error" in line]


def test_a_data_problem_on_one_nodes_disk_is_printed_by_that_rank(tmp_path, data_dir, raw_copy):
    replace(raw_copy, "t10k-labels-idx1-ubyte", header(2049, 10000) + bytes(5))
    (rank0, err0, _), (rank1, err1, seconds) = two_nodes(tmp_path / "run", {"DISTRNN_DATA_DIR": str(data_dir)},
                                                         {"DISTRNN_DATA_DIR": str(raw_copy.parent.parent)})
    assert rank0 != 0 and rank1 != 0 and seconds < 60
    assert error_lines(err1) == [f"distrnn.train: error on rank 1 (node {HOST}): MNIST file "
                                 f"{raw_copy}/t10k-labels-idx1-ubyte is 13 bytes but its header promises 10000 labels: "
                                 "it is truncated or damaged; replace it"]
    assert error_lines(err0) == []  # printed once, by the rank that had it
    assert "Traceback" not in err0 + err1


def test_a_checkpoint_that_only_rank_1_cannot_write_is_reported_by_rank_1(tmp_path, data_dir):
    out = tmp_path / "run"
    env = {"DISTRNN_DATA_DIR": str(data_dir)}
    (rank0, err0, _), (rank1, err1, seconds) = two_nodes(out, env, {**env, "DISTRNN_FAULTS": "save-oserror"})
    assert rank0 != 0 and rank1 != 0 and seconds < 60
    [line] = error_lines(err1)
    assert line.startswith(f"distrnn.train: error on rank 1 (node {HOST}): could not write checkpoint "
                           f"{out}/checkpoints/.tmp-step-00000005 (Disk quota exceeded); "
                           "the previous checkpoint is intact")
    assert error_lines(err0) == [] and "lost contact" not in err0
    assert not list((out / "checkpoints").glob("step-*"))  # nothing half-written was published


def test_an_unreadable_config_in_the_run_folder_stops_every_rank_at_once(tmp_path, data_dir):
    """Found by the main process only; the other rank must not wait out the collective timeout (300 s)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a finished run ...
    (out / "config.yaml").write_text("model:\n  cell: rnn\n   bad: indent\n")  # ... whose config is damaged
    start = time.monotonic()
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", *TINY[:-2], "--data-dir", str(data_dir),
                     "--output-dir", str(out), timeout=240)
    assert time.monotonic() - start < 60
    line = one_line_error(result)
    assert line == f"distrnn.train: error: config file '{out}/config.yaml' line 3 is not valid YAML: mapping values " \
                   "are not allowed here"


RUN = ["--config", "smoke", "--set", "data.train_samples=2000", "--set", "data.test_samples=500", "--no-wandb",
       "--set", "train.log_every=2", "--set", "checkpoint.every_steps=10"]


def stop_after_first_checkpoint(out, data_dir, *extra: str) -> None:
    proc = start_distrnn("train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir),
                         "--output-dir", str(out), *RUN, *extra)
    wait_for_step(proc, out, 10)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-2000:]


def test_a_resume_applies_a_new_learning_rate_and_says_so(tmp_path, data_dir):
    out = tmp_path / "run"
    stop_after_first_checkpoint(out, data_dir)
    resumed_at = json.loads((newest_checkpoint(out) / "meta.json").read_text())["position"]["global_step"]
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir), "--output-dir",
                     str(out), *RUN, "--lr", "0.005")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume: optim.lr changed from 0.001 to 0.005 (may change with a constant schedule)" in result.stdout
    lrs = {json.loads(line)["step"]: json.loads(line).get("train/lr")
           for line in (out / "metrics.jsonl").read_text().splitlines()}
    after = [lr for step, lr in lrs.items() if step > resumed_at and lr is not None]
    assert after and set(after) == {0.005}  # the optimizer uses what config.yaml and W&B record
    assert {lr for step, lr in lrs.items() if step <= resumed_at and lr is not None} == {0.001}  # kept, W&B off
    assert "lr: 0.005" in (out / "config.yaml").read_text()


def test_a_resume_cannot_change_a_onecycle_schedule(tmp_path, data_dir):
    out = tmp_path / "run"
    stop_after_first_checkpoint(out, data_dir, "--set", "optim.schedule=onecycle")
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir), "--output-dir",
                     str(out), *RUN, "--set", "optim.schedule=onecycle", "--epochs", "3")
    line = one_line_error(result)
    assert line.endswith("has train.epochs=1 but this run asks for train.epochs=3; the onecycle schedule is fixed at "
                         "the start; use the same config, another --output-dir, or --resume never")


def test_a_finished_run_trains_on_for_more_epochs_as_if_it_had_asked_for_them(tmp_path, data_dir):
    """--epochs 2 on a finished 1-epoch run with a constant learning rate: the same as 2 epochs at once."""
    args = ["train", "--mode", "cpu", "--data-dir", str(data_dir), *RUN]
    once = distrnn(*args, "--output-dir", str(tmp_path / "both"), "--epochs", "2")
    first = distrnn(*args, "--output-dir", str(tmp_path / "run"))
    assert once.returncode == 0 and first.returncode == 0, once.stderr[-2000:] + first.stderr[-2000:]
    more = distrnn(*args, "--output-dir", str(tmp_path / "run"), "--epochs", "2")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resume: train.epochs changed from 1 to 2" in more.stdout
    assert counts(more.stdout) == counts(once.stdout)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2 * 32


# --- NCCL's ways of failing, on gloo -------------------------------------------------------------

def alive(process: psutil.Process) -> bool:
    """Running, not a zombie: an orphaned worker's exit is reaped by whoever adopted it, if anyone does."""
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def kill_all(workers: list[psutil.Process]) -> None:
    """Whatever is left of `workers`: each started in a session of its own, none dies with its launcher's group."""
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.kill()


def workers_of(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "distrnn.train" in " ".join(p.cmdline())]


def test_a_frozen_rank_is_named_as_unresponsive_within_the_collective_timeout(tmp_path, data_dir):
    """SIGSTOP keeps a rank's sockets open, as a rank stuck under NCCL does: the others notice it only through
    the collective timeout (10 s here). Before: 53 s (with 20 s), a raw torch line and "rank 1 was killed by
    SIGKILL"."""
    out = tmp_path / "run"
    proc = start_distrnn("train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir),
                         "--output-dir", str(out), *RUN, "--set", "train.collective_timeout_s=10")
    wait_for_step(proc, out, 4)
    workers = workers_of(proc)
    [frozen] = [w for w in workers if w.environ().get("RANK") == "1"]
    frozen.suspend()
    start = time.monotonic()
    try:
        code, _, stderr = finish(proc, timeout=120)
        elapsed = time.monotonic() - start
        left = psutil.wait_procs(workers, timeout=10)[1]
    finally:  # torchrun's workers have sessions of their own: finish's kill misses them
        kill_all(workers)
    assert not left, "workers left behind"
    assert 10 <= elapsed < 10 + 20, f"{elapsed:.1f} s"
    assert code == 3, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.strip()]
    # where it froze (the heartbeat's last look at it, at most 1 s before) and its last collective, against
    # where rank 0 waits: the next sequence number (one more collective than rank 1 made)
    match = re.fullmatch(
        rf"distrnn\.train: error: rank 1 \(node {HOST}, pid {frozen.pid}\) is frozen or unreachable \(no heartbeat "
        r"for (\d+) s, the last from (\w+\.py:\d+)\); its last collective was #(\d+) (\w+) at (\w+\.py:\d+) while "
        r"rank 0 waits in (\w+\.py:\d+) (\w+) #(\d+); no collective finished within "
        rf"train\.collective_timeout_s=10 s and the run was stopped \(the frozen rank too\); evidence in "
        rf"{out / 'hang'}/; run the same command again to resume from the last checkpoint", line)
    assert match, line
    assert 10 <= int(match[1]) < 10 + 20 and int(match[8]) == int(match[3]) + 1
    report = json.loads((out / "hang" / "report.json").read_text())
    assert report["frozen"] == [1] and report["line"] in line
    rank0 = json.loads((out / "hang" / "rank-0.json").read_text())  # the frozen rank has none of its own
    assert sorted(p.name for p in (out / "hang").iterdir()) == ["rank-0.json", "report.json"]
    assert rank0["record"]["in"]["seq"] == int(match[8]) and rank0["flight_recorder"] is None  # off unless asked


def test_workers_whose_launcher_is_killed_during_set_up_end_themselves(tmp_path, data_dir):
    """Killed as soon as its workers exist, the launcher takes torchrun's rendezvous store with it: the workers,
    in sessions of their own, then joined a process group that could not form, for the whole collective timeout
    (60 s here; 45 s seen on two machines). Each watches its launcher from before the process group on."""
    proc = start_distrnn("train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir),
                         "--output-dir", str(tmp_path / "run"), *TINY)
    deadline = time.monotonic() + 60
    while len(workers := workers_of(proc)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no workers started"
        time.sleep(0.05)
    proc.kill()  # the launcher alone: no chance to stop its workers
    try:
        deadline = time.monotonic() + 15
        while (left := [w for w in workers if alive(w)]) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        kill_all(workers)
    _, stderr = proc.communicate(timeout=30)  # the workers held its pipes
    assert not left, f"workers still running 15 s after their launcher was killed: {left}"
    assert f"its launcher (pid {proc.pid}) is gone; stopping" in stderr, stderr[-3000:]


@pytest.mark.parametrize("stage", ["checkpoint", "trackers", "prepare"])
def test_a_start_up_failure_on_rank_1_stops_every_rank_at_once_with_its_line(tmp_path, data_dir, stage):
    """Loading the checkpoint, starting the trackers and moving the model to its device are agreed: rank 0
    stops at once, quietly, instead of meeting a lost rank 1 in DDP's constructor (30-300 s on NCCL)."""
    out, two = tmp_path / "run", ["train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir), *TINY]
    more = []
    if stage == "checkpoint":  # something to load: a finished epoch, continued for one more
        assert distrnn(*two, "--output-dir", str(out)).returncode == 0
        more = ["--epochs", "2"]
    start = time.monotonic()
    result = distrnn(*two, "--output-dir", str(out), *more, env={"DISTRNN_FAULTS": f"startup-error={stage}:1"})
    assert time.monotonic() - start < 60
    assert one_line_error(result) == (f"distrnn.train: error on rank 1 (node {HOST}): injected start-up fault: "
                                      f"{stage} failed on rank 1 (DISTRNN_FAULTS)")


def test_bf16_rnn_run_by_hand_trains_under_ddp_and_accumulation_as_autocast_does(tmp_path, data_dir):
    """The GPU's bf16 path (the RNN outside autocast with bf16 copies of its weights; DISTRNN_FAULTS makes a
    CPU take it) under DDP's gradient hooks and accumulation: the same weights, bit for bit, as CPU autocast's
    bf16 RNN, and exact counts."""
    args = ["train", "--mode", "cpu", "--num-processes", "2", "--data-dir", str(data_dir), *TINY,
            "--precision", "bf16", "--set", "train.grad_accum_steps=2"]
    by_hand = distrnn(*args, "--output-dir", str(tmp_path / "hand"), env={"DISTRNN_FAULTS": "cuda-bf16-rnn"})
    autocast = distrnn(*args, "--output-dir", str(tmp_path / "autocast"))
    assert by_hand.returncode == 0 and autocast.returncode == 0, by_hand.stderr[-2000:] + autocast.stderr[-2000:]
    assert counts(by_hand.stdout) == counts(autocast.stdout) and [n for _, n in counts(by_hand.stdout)] == [640, 500]
    hand, auto = (torch.load(tmp_path / name / "model.pt", weights_only=True)["model"] for name in ("hand", "autocast"))
    assert all(torch.equal(hand[name], auto[name]) for name in hand)
