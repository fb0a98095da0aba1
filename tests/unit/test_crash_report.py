"""A worker killed by a fatal signal, from the records its launcher's workers leave (ranks/crash_record.py,
launcher/crash_report.py); real processes, gloo's abort: tests/integration/test_hangs.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from distrnn.launcher.crash_report import CrashRecords, describe, stack_site
from distrnn.ranks import crash_record
from distrnn.ranks.crash_record import SLOT, SLOTS, CrashRecord


def entry(seq, site="progress.py:96", shapes=((2,),), end=1.0, op="all_reduce"):
    return {"seq": seq, "op": op, "shapes": [list(s) for s in shapes], "dtypes": ["int64"], "site": site,
            "start": 0.0, "end": end}


def test_the_records_keep_the_last_slots_collectives_with_the_one_in_flight(tmp_path):
    record = CrashRecord(tmp_path, 1, tmp_path / "run" / "hang")
    try:
        for seq in range(1, 12):
            record.record(entry(seq, end=None))
            record.record(entry(seq) if seq < 11 else entry(seq, end=None))
        record.record(entry(12, op="all_gather_object", shapes=[(7, 7)] * 200, end=None))  # cut to fit its slot
    finally:
        record.close()
    [(rank, state)] = crash_record.read(tmp_path).items()
    assert rank == 1 and state["hang"] == str(tmp_path / "run" / "hang") and state["stacks"] == ""
    assert [e["seq"] for e in state["ring"]] == list(range(12 - SLOTS + 1, 13))
    assert [e["end"] for e in state["ring"]][-2:] == [None, None] and state["ring"][-1]["shapes"] == [[7, 7]] * 4
    assert (tmp_path / "rank-1.record").stat().st_size == SLOTS * SLOT


def test_a_slot_cut_by_the_death_is_left_out_and_a_worker_without_files_is_skipped(tmp_path):
    CrashRecord(tmp_path, 0, tmp_path / "hang").close()
    with open(tmp_path / "rank-0.record", "r+b") as f:
        f.write(b'{"seq": 8, "op": "all_re')
    (tmp_path / "rank-3.json").write_text(json.dumps({"rank": 3, "host": "n", "pid": 1, "hang": "x"}))  # no record
    assert {r: s["ring"] for r, s in crash_record.read(tmp_path).items()} == {0: []}


def test_faulthandler_writes_the_stacks_of_a_process_that_aborts(tmp_path):
    code = ("import os, sys; from pathlib import Path; from distrnn.ranks.crash_record import CrashRecord; "
            f"CrashRecord(Path({str(tmp_path)!r}), 0, Path('h')); os.abort()")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGABRT
    stacks = crash_record.read(tmp_path)[0]["stacks"]
    assert stacks.startswith("Fatal Python error: Aborted") and 'File "<string>", line 1 in <module>' in stacks


def test_a_rank_killed_in_a_collective_is_named_with_the_others_and_where_the_records_differ():
    ring = [entry(15)]
    ranks = {0: {"host": "n1", "pid": 10, "ring": [*ring, entry(16, "trainer.py:216", [(4,)], end=None)], "stacks": ""},
             1: {"host": "n1", "pid": 11, "ring": [*ring, entry(16, "trainer.py:216", [(5,)], end=None)], "stacks": ""},
             2: {"host": "n1", "pid": 12, "ring": [*ring, entry(16, "trainer.py:216", [(4,)])], "stacks": ""}}
    assert describe(ranks, 0, signal.SIGABRT) == (
        "worker rank 0 (node n1, pid 10) was killed by SIGABRT in trainer.py:216 all_reduce #16 while rank 1 was in "
        "trainer.py:216 all_reduce #16; rank 2 was outside any collective; their records first differ at #16: ranks "
        "0,2 called all_reduce [[4]] at trainer.py:216, rank 1 called all_reduce [[5]] at trainer.py:216")


STACKS = """Fatal Python error: Segmentation fault

Thread 0x00007f7ab17ae6c0 (most recent call first):
  File "/x/distrnn/ranks/collectives.py", line 319 in _beat
  File "/usr/lib/python3.11/threading.py", line 982 in run

Current thread 0x00007f7ab1 (most recent call first):
  File "/x/torch/nn/modules/rnn.py", line 700 in forward
  File "/x/distrnn/model.py", line 41 in forward
  File "/x/distrnn/worker/trainer.py", line 200 in _step
"""


def test_a_rank_killed_outside_any_collective_is_placed_by_its_stack():
    assert stack_site(STACKS) == "model.py:41" and stack_site("") == "?"
    ranks = {1: {"host": "n2", "pid": 7, "ring": [entry(4)], "stacks": STACKS}}
    assert describe(ranks, 1, signal.SIGSEGV) == (
        "worker rank 1 (node n2, pid 7) was killed by SIGSEGV at model.py:41, outside any collective (its last was #4 "
        "all_reduce at progress.py:96)")


def test_the_launcher_reports_fatal_signals_only_and_writes_a_bundle_that_parses(tmp_path):
    records = CrashRecords()
    try:
        hang = tmp_path / "run" / "hang"
        record = CrashRecord(records.folder, 0, hang)
        record.record(entry(3, end=None))
        record.close()
        assert records.report(0, -signal.SIGKILL) is None and records.report(5, -signal.SIGABRT) is None
        line = records.report(0, -signal.SIGABRT)
        assert line is not None and line.endswith(f"; evidence in {hang}/")
        bundle = {p.name: json.loads(p.read_text()) for p in hang.iterdir()}
        assert sorted(bundle) == ["rank-0.json", "report.json"]
        assert bundle["report.json"]["killed"] == {"rank": 0, "signal": "SIGABRT"}
        assert bundle["report.json"]["line"] in line and bundle["rank-0.json"]["record"]["ring"][0]["seq"] == 3
    finally:
        records.close()
    assert not records.folder.exists()
