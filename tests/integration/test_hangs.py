"""A hang in one line (who, where, which collective) and its evidence in RUN/hang/ (real processes, gloo): when a
collective times out, and when a live run is asked (SIGUSR2 to `distrnn train`, `distrnn hang-report RUN`).

The frozen rank (SIGSTOP) is in test_failures.py, beside the other failures it is told apart from. These runs
leave tests/collective_check off: it would stop a rank that skips a collective before the hang this reports.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil

from tests.helpers import counts, distrnn, finish, read_bundle, start_distrnn

HOST = socket.gethostname().split(".")[0]
TIMEOUT_S = 10
RUN = ["train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke", "--set", "data.train_samples=640",
       "--set", "data.test_samples=500", "--no-wandb", "--set", f"train.collective_timeout_s={TIMEOUT_S}"]
NO_CHECK = {"DISTRNN_TEST_COLLECTIVE_CHECK": "0"}


def hang(tmp_path, data_dir, fault: str, **env: str):
    """(the one error line, the bundle's files parsed, seconds) of a 2-process run with `fault`."""
    out = tmp_path / "run"
    start = time.monotonic()
    result = distrnn(*RUN, "--data-dir", str(data_dir), "--output-dir", str(out), timeout=300,
                     env={**NO_CHECK, "DISTRNN_FAULTS": fault, **env})
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    bundle = read_bundle(out)
    assert line.endswith(f"; no collective finished within train.collective_timeout_s={TIMEOUT_S} s and the run "
                         f"was stopped; evidence in {out / 'hang'}/")
    assert bundle["report.json"]["line"] in line
    return line, bundle, elapsed


def test_a_rank_that_skips_a_collective_is_named_with_where_the_ranks_records_first_differ(tmp_path, data_dir):
    """Rank 1 skips the non-finite check's all-reduce (its 16th collective, trainer.py): gloo pairs its next
    all-reduce with rank 0's skipped one, and the two wait in different collectives."""
    line, bundle, elapsed = hang(tmp_path, data_dir, "skip-collective=1:16", TORCH_FR_BUFFER_SIZE="64")
    pids = {r: bundle["report.json"]["ranks"][str(r)]["pid"] for r in (0, 1)}
    assert re.fullmatch(
        rf"distrnn\.train: error: rank 0 \(node {HOST}, pid {pids[0]}\) is in trainer\.py:\d+ all_reduce #16 while "
        r"rank 1 waits in counting\.py:\d+ all_reduce #17; their records first differ at #16: rank 0 called "
        r"all_reduce \[\[\d+\]\] at trainer\.py:\d+, rank 1 called all_reduce \[\[\d+\]\] at progress\.py:\d+; .*",
        line), line
    assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"]
    for rank in (0, 1):
        own = bundle[f"rank-{rank}.json"]
        assert own["rank"] == rank and own["pid"] == pids[rank]
        failed = "".join(own["failed"])  # the traceback of the collective it waited in
        assert "in all_reduce" in failed and re.search(r"(trainer|counting)\.py", failed), failed[-2000:]
        assert "distrnn-heartbeat" in own["stacks"]
        assert own["versions"]["torch"] and own["environment"]["WORLD_SIZE"] == "2"
        # torch's own record, asked for with TORCH_FR_BUFFER_SIZE
        assert own["flight_recorder"]["entries"][-1]["profiling_name"] == "gloo:all_reduce"
    assert elapsed < 60 + TIMEOUT_S + 20, f"{elapsed:.0f} s"  # start-up and 9 steps, then the report


def test_a_rank_that_calls_a_collective_with_a_longer_tensor_is_named_by_the_launcher_of_the_rank_gloo_aborts(
        tmp_path, data_dir):
    """Rank 1 calls the non-finite check's all-reduce with one element more: gloo aborts rank 0, which receives
    it ("Received data size doesn't match expected size"), before any Python of rank 0 runs again. The launcher
    names it from the records its workers leave (ranks/crash_record.py), with where the records differ."""
    out = tmp_path / "run"
    start = time.monotonic()
    result = distrnn(*RUN, "--data-dir", str(data_dir), "--output-dir", str(out), timeout=300,
                     env={**NO_CHECK, "DISTRNN_FAULTS": "shape-mismatch=1:16:1"})
    elapsed = time.monotonic() - start
    assert result.returncode == 128 + signal.SIGABRT, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("distrnn: worker rank")]
    bundle = read_bundle(out)
    pids = {r: bundle[f"rank-{r}.json"]["pid"] for r in (0, 1)}
    assert re.fullmatch(
        rf"distrnn: worker rank 0 \(node {HOST}, pid {pids[0]}\) was killed by SIGABRT in (trainer\.py:\d+) "
        r"all_reduce #16 while rank 1 was in \1 all_reduce #16; their records first differ at #16: rank 0 called "
        r"all_reduce \[\[(\d+)\]\] at \1, rank 1 called all_reduce \[\[(\d+)\]\] at \1; "
        rf"evidence in {re.escape(str(out / 'hang'))}/; the other workers were stopped; the ranks called different "
        r"collectives, a bug in the code that called them, which a restart would meet again", line), line
    sizes = re.findall(r"all_reduce \[\[(\d+)\]\]", line)
    assert int(sizes[1]) == int(sizes[0]) + 1
    assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"]
    assert bundle["report.json"]["killed"] == {"rank": 0, "signal": "SIGABRT"} and bundle["report.json"]["line"] in line
    assert bundle["rank-0.json"]["fatal_stacks"].startswith("Fatal Python error: Aborted")
    assert "collective_log.py" in bundle["rank-0.json"]["fatal_stacks"]  # its main thread, in the recorded call
    assert bundle["rank-1.json"]["fatal_stacks"] is None  # stopped by torchrun's SIGTERM: no fatal signal
    assert [e["seq"] for e in bundle["rank-1.json"]["record"]["ring"]][-1] == 16
    assert elapsed < 60 + TIMEOUT_S + 20, f"{elapsed:.0f} s"


def test_a_rank_that_calls_a_collective_with_a_shorter_tensor_hangs_the_next_one_and_the_report_says_where(
        tmp_path, data_dir):
    """One element fewer on rank 1: gloo gives rank 1 a wrong sum without an error, so rank 1 goes on to its next
    all-reduce while rank 0 still waits for the rest of #16; the timeout's report says where they differ."""
    line, bundle, elapsed = hang(tmp_path, data_dir, "shape-mismatch=1:16:-1")
    pids = {r: bundle["report.json"]["ranks"][str(r)]["pid"] for r in (0, 1)}
    assert re.fullmatch(
        rf"distrnn\.train: error.*: rank 0 \(node {HOST}, pid {pids[0]}\) is in (trainer\.py:\d+) all_reduce #16 "
        r"while rank 1 waits in progress\.py:\d+ all_reduce #17; their records first differ at #16: rank 0 called "
        r"all_reduce \[\[(\d+)\]\] at \1, rank 1 called all_reduce \[\[(\d+)\]\] at \1; .*", line), line
    sizes = re.findall(r"all_reduce \[\[(\d+)\]\]", line)
    assert int(sizes[1]) == int(sizes[0]) - 1
    assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"]
    assert elapsed < 60 + TIMEOUT_S + 20, f"{elapsed:.0f} s"


def test_a_rank_busy_outside_any_collective_is_told_from_a_frozen_one(tmp_path, data_dir):
    """slow-rank with a 10-minute step: rank 1 computes (its heartbeat beats) while rank 0 waits in DDP's
    gradient all-reduce (through the rank timing's communication hook)."""
    line, bundle, _ = hang(tmp_path, data_dir, "slow-rank=1:600000")
    pid = bundle["report.json"]["ranks"]["1"]["pid"]
    assert re.fullmatch(
        rf"distrnn\.train: error: rank 1 \(node {HOST}, pid {pid}\) is busy outside any collective at "
        r"faults\.py:\d+ \(its heartbeat is alive\); its last collective was #6 all_gather_object at "
        r"rank_timing\.py:\d+ while rank 0 waits in rank_timing\.py:\d+ all_reduce #7; .*", line), line
    assert bundle["report.json"]["frozen"] == []
    assert "rank-0.json" in bundle  # rank 1 was busy: it was stopped by torchrun, with nothing of its own to add


ASKED = "distrnn: hang report (asked): "


def until_held(out: Path, proc, timeout_s: float = 120) -> None:
    """Wait (bounded) until the run's main process holds its folder: from then on it answers requests."""
    deadline = time.monotonic() + timeout_s
    while not (out / ".hold").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never took its folder"
        time.sleep(0.2)


def test_a_hung_run_asked_for_its_report_names_where_the_ranks_differ_long_before_its_timeout(tmp_path, data_dir):
    """The skipped collective of the timeout's test, with a 300 s timeout: `distrnn hang-report RUN` gives the
    same diagnosis at once (asked until the ranks are in the hang, an observable state), each rank writes its
    evidence, and the run is left as it was (still running)."""
    out = tmp_path / "run"
    run = [*RUN[:-2], "--set", "train.collective_timeout_s=300", "--data-dir", str(data_dir), "--output-dir", str(out)]
    proc = start_distrnn(*run, env={**NO_CHECK, "DISTRNN_FAULTS": "skip-collective=1:16"})
    try:
        until_held(out, proc)
        deadline, asked = time.monotonic() + 120, None
        while asked is None or "#16 while" not in asked.stdout:
            assert time.monotonic() < deadline, asked.stdout + asked.stderr
            asked = distrnn("hang-report", str(out), timeout=60)
            assert asked.returncode == 0, asked.stderr
        bundle = read_bundle(out)
        pids = {r: bundle["report.json"]["ranks"][str(r)]["pid"] for r in (0, 1)}
        assert re.fullmatch(
            rf"{re.escape(ASKED)}rank 0 \(node {HOST}, pid {pids[0]}\) is in trainer\.py:\d+ all_reduce #16 while "
            r"rank 1 waits in counting\.py:\d+ all_reduce #17; their records first differ at #16: rank 0 called "
            r"all_reduce \[\[\d+\]\] at trainer\.py:\d+, rank 1 called all_reduce \[\[\d+\]\] at progress\.py:\d+; "
            rf"evidence in {re.escape(str(out / 'hang'))}/", asked.stdout.strip()), asked.stdout
        assert bundle["report.json"]["asked"] is True and bundle["report.json"]["frozen"] == []
        assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"]
        for rank in (0, 1):
            own = bundle[f"rank-{rank}.json"]
            assert own["pid"] == pids[rank] and own["failed"] is None  # asked: no collective failed
            main = "".join(own["stacks"]["MainThread"])  # it waits in a recorded collective, at the site named
            assert "collective_log.py" in main and own["record"]["in"]["site"].split(":")[0] in main, main[-2000:]
        assert proc.poll() is None, "asking stopped the run"
    finally:
        for worker in psutil.Process(proc.pid).children():  # a skipped collective never ends on its own
            os.kill(worker.pid, signal.SIGKILL)
        code, stdout, _ = finish(proc, 60)
    assert asked.stdout.strip() in stdout  # rank 0 printed it in the run's own output too


def test_sigusr2_to_a_healthy_run_prints_where_each_rank_is_and_the_run_finishes(tmp_path, data_dir):
    """SIGUSR2 to `distrnn train` (2 processes, rank 1 500 ms slower a step): one line in the run's output, the
    evidence of both ranks, and a run that goes on to exit 0 with its exact 500 test samples."""
    out = tmp_path / "run"
    run = [*RUN, "--set", "data.train_samples=1280", "--data-dir", str(data_dir), "--output-dir", str(out)]
    proc = start_distrnn(*run, env={"DISTRNN_FAULTS": "slow-rank=1:500"})
    try:
        until_held(out, proc)
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not (out / "hang" / "report.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no report within 30 s"
            time.sleep(0.2)
    finally:
        code, stdout, stderr = finish(proc, 300)
    assert code == 0, stderr[-3000:]
    [line] = [line for line in stdout.splitlines() if line.startswith(ASKED)]
    bundle = read_bundle(out)
    pids = [bundle["report.json"]["ranks"][str(r)]["pid"] for r in (0, 1)]
    # Where a healthy run is depends on the moment (seen: rank 1 busy in its 500 ms step while rank 0 waits; both
    # busy; both in start-up's all_gather_object): every rank named is named with its own pid, none is frozen.
    named = re.findall(rf"rank (\d) \(node {HOST}, pid (\d+)\)", line)
    assert (named or "ranks 0,1 all wait in " in line) and " is frozen" not in line, line  # not "none frozen"
    assert all(int(pid) == pids[int(rank)] for rank, pid in named) and bundle["report.json"]["line"] in line, line
    assert line.endswith(f"; evidence in {out / 'hang'}/"), line
    assert sorted(bundle) == ["rank-0.json", "rank-1.json", "report.json"] and bundle["report.json"]["asked"]
    assert bundle["report.json"]["frozen"] == []
    assert [own["pid"] for own in (bundle["rank-0.json"], bundle["rank-1.json"])] == pids
    assert counts(stdout)[-1][1] == 500


def test_a_one_process_run_asked_for_its_report_says_where_it_is_and_finishes(tmp_path, data_dir):
    """`distrnn hang-report RUN` of a one-process run: its handler answers in the main thread; the run goes on."""
    out = tmp_path / "run"
    run = ["train", "--mode", "cpu", "--config", "smoke", "--set", "data.train_samples=3200", "--set",
           "data.test_samples=500", "--no-wandb", "--data-dir", str(data_dir), "--output-dir", str(out)]
    proc = start_distrnn(*run, env={"DISTRNN_FAULTS": "slow-rank=0:200"})
    try:
        until_held(out, proc)
        asked = distrnn("hang-report", str(out), timeout=60)
    finally:
        code, stdout, stderr = finish(proc, 300)
    assert asked.returncode == 0, asked.stderr
    pid = read_bundle(out)["report.json"]["ranks"]["0"]["pid"]
    assert re.fullmatch(rf"{re.escape(ASKED)}rank 0 \(node {HOST}, pid {pid}\) is at \w+\.py:\d+ \(one process: "
                        rf"no collective to wait in\); evidence in {re.escape(str(out / 'hang'))}/",
                        asked.stdout.strip()), asked.stdout
    assert code == 0, stderr[-3000:]
    assert asked.stdout.strip() in stdout
