"""Resuming on another number of processes: the layout chosen, the refusals, the position converted."""

from __future__ import annotations

import pytest

from distrnn.config.schema import build_config
from distrnn.errors import DistrnnError
from distrnn.run import layout
from distrnn.run.layout import Layout

SAVED = Layout(processes=2, batch_size=64, accumulation=1)  # global batch 128


def meta(saved: Layout = SAVED, requested: tuple[int, int] | None = None) -> dict:
    return {"num_processes": saved.processes,
            "layout": {**saved.__dict__, **({"requested": list(requested)} if requested else {})}}


@pytest.mark.parametrize("processes, chosen, line", [
    (2, Layout(2, 64, 1), None),
    (1, Layout(1, 64, 2), "2 -> 1 processes; global batch 128 kept as 64 per process x 2 accumulation"),
    (4, Layout(4, 32, 1), "2 -> 4 processes; global batch 128 kept as 32 per process x 1 accumulation"),
    (8, Layout(8, 16, 1), "2 -> 8 processes; global batch 128 kept as 16 per process x 1 accumulation"),
])
def test_the_global_batch_is_kept_preferring_the_saved_batch_with_more_accumulation(processes, chosen, line):
    assert layout.resume_layout(meta(), build_config(), processes, "ckpt") == (chosen, line)


def test_a_split_the_user_chose_is_taken_when_it_keeps_the_global_batch():
    cfg = build_config(overrides=["train.batch_size=32", "train.grad_accum_steps=4"])
    assert layout.resume_layout(meta(), cfg, 1, "ckpt") == (
        Layout(1, 32, 4), "2 -> 1 processes; global batch 128 kept as 32 per process x 4 accumulation")


def test_the_runs_own_config_lets_distrnn_choose_after_an_earlier_move():
    """The checkpoint of a 1-process part trained 64 x 2; the config still says 64 x 1 (its first start)."""
    moved = meta(Layout(1, 64, 2), requested=(64, 1))
    assert layout.resume_layout(moved, build_config(), 4, "ckpt") == (
        Layout(4, 32, 1), "1 -> 4 processes; global batch 128 kept as 32 per process x 1 accumulation")


def test_a_global_batch_that_the_processes_cannot_share_is_refused_naming_counts_that_work():
    with pytest.raises(DistrnnError) as e:
        layout.resume_layout(meta(), build_config(), 3, "ckpt")
    assert str(e.value) == ("checkpoint ckpt has a global batch of 128, which 3 processes cannot share equally; "
                            "resume on 1, 2, 4, 8, 16, 32, 64 processes (the divisors of 128), or --resume never")


def test_another_global_batch_is_refused():
    with pytest.raises(DistrnnError, match=r"the global batch must stay 128: keep train.batch_size"):
        layout.resume_layout(meta(), build_config(overrides=["train.batch_size=32"]), 2, "ckpt")


def test_the_torchvision_loader_resumes_only_with_the_saved_layout():
    cfg = build_config(overrides=["data.loader=torchvision"])
    assert layout.resume_layout(meta(), cfg, 2, "ckpt") == (SAVED, None)
    with pytest.raises(DistrnnError, match=r"data.loader=torchvision resumes only with the same \(Accelerate's "
                                           r"DataLoader counts the batches to skip per rank"):
        layout.resume_layout(meta(), cfg, 1, "ckpt")


def test_the_position_is_counted_in_the_new_micro_batches():
    meta = {"position": {"epoch": 1, "step_in_epoch": 12, "global_step": 44}, "num_processes": 2,
            "layout": {"processes": 2, "batch_size": 64, "accumulation": 1}}
    assert layout.position_in(meta, Layout(1, 64, 2))["step_in_epoch"] == 24  # 12 steps of 2 micro-batches
    meta["layout"] = {"processes": 1, "batch_size": 64, "accumulation": 2}
    meta["position"]["step_in_epoch"] = 24
    assert layout.position_in(meta, Layout(4, 32, 1))["step_in_epoch"] == 12
