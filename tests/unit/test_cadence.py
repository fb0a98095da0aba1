"""checkpoint.every_steps: fixed, or auto (Young/Daly from the measured save cost and the expected time between
failures). One process here (from_main returns its own value); the 2-process agreement is
tests/integration/test_saves.py's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from distrnn.run.cadence import PRIOR_MTBF_S, PROBE_STEPS, Cadence, expected_mtbf_s, young_daly_interval_s

ONE_PROCESS = SimpleNamespace(num_processes=1)


def test_young_daly_interval_is_the_square_root_of_twice_save_cost_times_mtbf():
    assert young_daly_interval_s(0.5, 3600) == pytest.approx(60.0)  # sqrt(2 x 0.5 x 3600)
    assert young_daly_interval_s(2.0, 100) == pytest.approx(20.0)


def test_the_expected_time_between_failures_is_the_config_value_or_this_runs_history():
    assert expected_mtbf_s(60.0, train_seconds=10_000, interruptions=50) == 60.0
    assert expected_mtbf_s(None, train_seconds=0, interruptions=0) == PRIOR_MTBF_S
    # 4 interruptions in 400 s of training: (400 + 3600) / 5 = 800 s, moving from the prior towards 100 s
    assert expected_mtbf_s(None, train_seconds=400, interruptions=4) == pytest.approx(800.0)


def test_a_fixed_cadence_saves_every_n_steps_and_null_never():
    fixed, never = Cadence(5, None), Cadence(None, None)
    fixed.start(0), never.start(0)
    assert [s for s in range(1, 21) if fixed.due(s)] == [5, 10, 15, 20]
    assert not any(never.due(s) for s in range(1, 100))
    assert fixed.saved(ONE_PROCESS, 5, 0.3, 0.01, 10.0, 0) is None  # nothing measured, nothing said


def test_auto_probes_then_saves_at_the_young_daly_interval_in_steps():
    cadence = Cadence("auto", 50.0)
    cadence.start(40)  # a resumed run probes from where it resumed
    assert [s for s in range(41, 80) if cadence.due(s)][0] == 40 + PROBE_STEPS
    line = cadence.saved(ONE_PROCESS, 60, save_s=0.25, step_s=0.02, train_seconds=5.0, interruptions=0)
    interval_s = math.sqrt(2 * 0.25 * 50)  # 5 s
    assert cadence.interval_steps == round(interval_s / 0.02) == 250
    assert not cadence.due(309) and cadence.due(310)
    assert line == ("checkpoint every 250 steps (5.0 s): a save costs 0.25 s, a step 20.0 ms, failures expected "
                    "every 50 s")
    cadence.saved(ONE_PROCESS, 310, save_s=0.25, step_s=10.0, train_seconds=9.0, interruptions=0)
    assert cadence.interval_steps == 1  # never less than a step


def test_auto_after_an_epoch_end_save_without_steps_since_the_last_keeps_its_plan():
    cadence = Cadence("auto", None)
    cadence.start(0)
    assert cadence.saved(ONE_PROCESS, 0, save_s=0.2, step_s=None, train_seconds=0.0, interruptions=0) is None
    assert cadence.next_step == PROBE_STEPS
