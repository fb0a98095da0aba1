"""benchmarks/faults.py's parts that start nothing: the seeded schedule and the sample ledger's verdict. The
campaign itself runs in tests/cluster/test_fault_campaign.py."""

from __future__ import annotations

import json

from benchmarks.faults import KINDS, exactness, kept_steps, schedule


def test_the_same_seed_gives_the_same_faults_and_every_kind_comes_once_before_any_twice():
    first, again, other = schedule(7, 60, 12, 2), schedule(7, 60, 12, 2), schedule(8, 60, 12, 2)
    assert first == again != other
    assert sorted(f.kind for f in first[: len(KINDS)]) == sorted(KINDS)
    assert {f.machine for f in first} == {0, 1}
    gaps = [f.after_s for f in schedule(3, 60, 2000, 2)]
    assert 55 < sum(gaps) / len(gaps) < 65  # exponential, mean 60 s


def write_ledger(folder, rank: int, records: list[tuple[int, int, list[int]]], torn: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"epoch": e, "step": s, "micro_batches": [batch]}) for e, s, batch in records]
    (folder / f"rank-{rank}.jsonl").write_text("\n".join(lines) + "\n" + ('{"epoch": 0, "st' if torn else ""))


def test_a_step_redone_after_a_restart_replaces_the_lost_attempts_record(tmp_path):
    clean, run = tmp_path / "clean", tmp_path / "run"
    for rank in (0, 1):
        write_ledger(clean, rank, [(0, 1, [rank, 2 + rank]), (0, 2, [4 + rank, 6 + rank])])
    # the run trained step 2 with other samples (a lost attempt: torn last line), then redid it after a resume
    write_ledger(run, 0, [(0, 1, [0, 2]), (0, 2, [9, 9]), (0, 2, [4, 6])], torn=True)
    write_ledger(run, 1, [(0, 1, [1, 3]), (0, 2, [5, 7])])
    assert kept_steps(run) == {1: (0, [0, 1, 2, 3]), 2: (0, [4, 5, 6, 7])}
    assert exactness(run, clean) == {"steps": 2, "steps_clean": 2, "samples_lost": 0, "samples_duplicated": 0,
                                     "steps_unlike_clean": 0, "clean_repeats": 0}


def test_samples_lost_or_used_more_often_than_in_the_uninterrupted_run_are_counted(tmp_path):
    clean, run = tmp_path / "clean", tmp_path / "run"
    # the uninterrupted run fills its last batch up with sample 0 (2 processes); the run skips 2 and repeats 1
    write_ledger(clean, 0, [(0, 1, [0, 1]), (0, 2, [2, 3, 0])])
    write_ledger(run, 0, [(0, 1, [0, 1]), (0, 2, [1, 3, 0])])
    assert exactness(run, clean) == {"steps": 2, "steps_clean": 2, "samples_lost": 1, "samples_duplicated": 1,
                                     "steps_unlike_clean": 1, "clean_repeats": 1}
