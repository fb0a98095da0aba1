"""Which launch config and process count each --mode asks for, and the launch configs shipped."""

from __future__ import annotations

import pytest

from distrnn import launcher
from distrnn.errors import DistrnnError


@pytest.mark.parametrize(
    "mode, n, gpus, expected",
    [
        ("auto", None, 0, ("cpu", 1, "cpu.yaml")),
        ("auto", 2, 0, ("cpu", 2, "cpu_multi.yaml")),
        ("auto", None, 1, ("gpu", 1, "gpu.yaml")),
        ("auto", None, 4, ("ddp", 4, "ddp.yaml")),
        ("auto", 1, 4, ("gpu", 1, "gpu.yaml")),
        ("ddp", 2, 4, ("ddp", 2, "ddp.yaml")),
        ("cpu", 3, 8, ("cpu", 3, "cpu_multi.yaml")),
    ],
)
def test_mode_plans(mode, n, gpus, expected):
    p = launcher.plan(mode, n, gpus)
    assert (p.mode, p.num_processes, p.launch_config.name) == expected
    assert p.launch_config.is_file()


@pytest.mark.parametrize(
    "mode, n, gpus, message",
    [
        ("ddp", 5, 4, "--num-processes 5 is more than the 4 visible GPU(s)"),
        ("ddp", None, 1, "--mode ddp needs at least 2 GPUs"),
        ("gpu", 2, 2, "--mode gpu runs 1 process"),
    ],
)
def test_impossible_plans_are_refused(mode, n, gpus, message):
    with pytest.raises(DistrnnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        launcher.plan(mode, n, gpus)
