"""The hang report's one line, from the states ranks publish (real processes: tests/integration/test_hangs.py)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict

import torch
import torch.distributed as dist

from distrnn.errors import host_name, run_cli
from distrnn.launcher import ask_hang_report
from distrnn.ranks import hang_report
from distrnn.ranks.collective_log import CollectiveLog
from distrnn.run.hold import Holder


def entry(seq, op="all_reduce", site="progress.py:96", shapes=((2,),), end=1.0):
    return {"seq": seq, "op": op, "shapes": [list(s) for s in shapes], "dtypes": ["int64"], "site": site,
            "start": 0.0, "end": end}


def state(host, pid, ring, waiting=None, at="trainer.py:200", time=100.0):
    return {"host": host, "pid": pid, "ring": ring, "in": waiting, "at": at, "time": time, "seq": ring[-1]["seq"]}


def test_a_frozen_rank_is_named_with_where_it_was_and_its_last_collective():
    ring = [entry(1), entry(2, site="trainer.py:150")]
    waiting = entry(3, site="rank_timing.py:87", end=None)
    states = {0: state("n1", 10, [*ring, waiting], waiting), 1: state("n2", 11, ring, at="trainer.py:120", time=80.0)}
    assert hang_report.diagnose(states, {1}, now=101.0) == (
        "rank 1 (node n2, pid 11) is frozen or unreachable (no heartbeat for 21 s, the last from trainer.py:120); "
        "its last collective was #2 all_reduce at trainer.py:150 while rank 0 waits in rank_timing.py:87 all_reduce "
        "#3")


def test_a_frozen_rank_s_last_collective_is_the_last_one_the_others_finished_when_its_record_is_older():
    """Its record is from its last heartbeat (up to 1 s old); a collective that the others finished had it too."""
    later = [entry(1), entry(2), entry(3, site="rank_timing.py:87")]
    waiting = entry(4, site="rank_timing.py:87", end=None)
    states = {0: state("n1", 10, [*later, waiting], waiting), 1: state("n2", 11, [entry(1)], time=99.0)}
    assert "its last collective was #3 all_reduce at rank_timing.py:87 while rank 0 waits in rank_timing.py:87 " \
           "all_reduce #4" in hang_report.diagnose(states, {1}, now=100.0)


def test_a_rank_in_another_collective_is_the_odd_one_out_and_where_records_first_differ_is_said():
    common = [entry(1), entry(2)]
    states = {r: state(f"n{r}", r, [*common, entry(3, site="nonfinite.py:70", end=None)],
                       entry(3, site="nonfinite.py:70", end=None)) for r in (0, 2)}
    states[1] = state("n1", 1, [*common, entry(3, site="trainer.py:212", shapes=((3,),), end=None)],
                      entry(3, site="trainer.py:212", shapes=((3,),), end=None))
    assert hang_report.diagnose(states, set(), now=100.0) == (
        "rank 1 (node n1, pid 1) is in trainer.py:212 all_reduce #3 while ranks 0,2 wait in nonfinite.py:70 "
        "all_reduce #3; their records first differ at #3: ranks 0,2 called all_reduce [[2]] at nonfinite.py:70, "
        "rank 1 called all_reduce [[3]] at trainer.py:212")


def test_a_busy_rank_and_ranks_all_in_one_collective_are_told_apart():
    ring = [entry(1)]
    waiting = entry(2, end=None)
    busy = {0: state("n", 1, [*ring, waiting], waiting), 1: state("n", 2, ring, at="faults.py:101")}
    assert hang_report.diagnose(busy, set(), now=100.0) == (
        "rank 1 (node n, pid 2) is busy outside any collective at faults.py:101 (its heartbeat is alive); its last "
        "collective was #1 all_reduce at progress.py:96 while rank 0 waits in progress.py:96 all_reduce #2")
    cut = {r: state("n", r, [*ring, waiting], waiting) for r in (0, 1)}
    assert hang_report.diagnose(cut, set(), now=100.0) == (
        "ranks 0,1 all wait in progress.py:96 all_reduce #2, none frozen or elsewhere: the network between their "
        "machines may be cut")
    # asked of a live run, all ranks in one collective is also what a healthy run shows
    assert hang_report.diagnose(cut, set(), now=100.0, asked=True) == (
        "ranks 0,1 all wait in progress.py:96 all_reduce #2, none frozen or elsewhere")


def ask(run, capsys) -> tuple[int, str]:
    code = run_cli(ask_hang_report.command, "distrnn hang-report", [str(run)])
    return code, capsys.readouterr().err


def test_asking_a_folder_no_run_holds_is_one_line_and_exit_1(tmp_path, capsys):
    assert ask(tmp_path / "absent", capsys) == (
        1, f"distrnn hang-report: error: {tmp_path / 'absent'} is not a folder; pass the --output-dir of a running "
           "`distrnn train`\n")
    assert ask(tmp_path, capsys) == (
        1, f"distrnn hang-report: error: no run is training in {tmp_path} (it has no .hold); a finished or stopped "
           f"run's last report, if it had one, is {tmp_path / 'hang' / 'report.json'}\n")


def test_asking_a_run_held_elsewhere_or_by_a_process_that_is_gone_is_one_line_and_exit_1(tmp_path, capsys):
    def hold(host: str, pid: int) -> None:
        (tmp_path / ".hold").write_text(json.dumps(asdict(Holder(host, pid, 0.0, 0.0))))

    hold("n7", 4242)
    assert ask(tmp_path, capsys) == (
        1, f"distrnn hang-report: error: the run in {tmp_path} has its main process on node n7 (pid 4242); run this "
           "there, or send SIGUSR2 to `distrnn train` on that node\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    hold(host_name(), gone.pid)
    assert ask(tmp_path, capsys) == (
        1, f"distrnn hang-report: error: the run that holds {tmp_path} (pid {gone.pid}) is gone; nothing to report\n")


def test_the_log_numbers_collectives_and_names_the_distrnn_line_that_called_them(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    original = dist.all_reduce
    log = CollectiveLog().install()
    try:
        dist.all_reduce(torch.zeros(3, dtype=torch.int64))
        dist.broadcast(torch.zeros(2), 0)
        dist.all_reduce(torch.zeros(1), async_op=True).wait()
        snapshot = log.snapshot()
    finally:
        log.uninstall()
        dist.destroy_process_group()
    assert [(e["seq"], e["op"], e["shapes"], e["dtypes"]) for e in snapshot["ring"]] == [
        (1, "all_reduce", [[3]], ["int64"]), (2, "broadcast", [[2]], ["float32"]), (3, "all_reduce", [[1]],
                                                                                  ["float32"])]
    assert snapshot["in"] is None and all(e["end"] >= e["start"] for e in snapshot["ring"])
    sites = [e["site"] for e in snapshot["ring"]]
    assert all(site.startswith("test_hang_report.py:") for site in sites) and len(set(sites)) == 3, sites
    assert dist.all_reduce is original  # uninstalled
