"""The slow-rank rule on given figures: named after SLOW_INTERVALS intervals in a row, at most once a minute."""

from __future__ import annotations

from distrnn.worker import rank_timing
from distrnn.worker.rank_timing import SLOW_INTERVALS, RankTiming


class Timing(RankTiming):
    """RankTiming without an Accelerator: only the rule is exercised."""

    def __init__(self, ranks: int):
        self.slow_streak, self.warned_at, self.hosts = [0] * ranks, -float("inf"), [f"n{r}" for r in range(ranks)]


def warnings(intervals: list[list[float]], timing: Timing) -> list[str]:
    said: list[str] = []
    for compute in intervals:
        timing._warn_if_slow(compute, said.append)
    return said


def test_a_rank_slower_for_several_intervals_in_a_row_is_named_once():
    timing = Timing(3)
    said = warnings([[20, 41, 19]] * (SLOW_INTERVALS + 5), timing)
    assert said == ["warning: rank 1 (node n1) is 2.1x slower than the median rank: compute 41 ms vs 20 ms per step"]


def test_a_slow_interval_now_and_then_is_not_a_slow_rank():
    timing = Timing(2)
    said = warnings([[20, 41], [20, 21]] * 10 + [[20, 41]] * (SLOW_INTERVALS - 1), timing)
    assert said == []


def test_the_warning_comes_again_after_a_minute(monkeypatch):
    timing, clock = Timing(2), [1000.0]
    monkeypatch.setattr(rank_timing.time, "monotonic", lambda: clock[0])
    assert len(warnings([[50, 20]] * SLOW_INTERVALS, timing)) == 1
    clock[0] += 30
    assert warnings([[50, 20]], timing) == []
    clock[0] += rank_timing.WARN_EVERY_S
    assert len(warnings([[50, 20]], timing)) == 1
