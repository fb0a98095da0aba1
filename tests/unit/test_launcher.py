"""Which launch config and process count each --mode asks for, and the launch configs shipped."""

from __future__ import annotations

import pytest

from distrnn import processes
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
    p = processes.plan(mode, n, gpus)
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
        processes.plan(mode, n, gpus)


@pytest.mark.parametrize("name", ["cpu.yaml", "cpu_multi.yaml", "gpu.yaml", "ddp.yaml", "multinode.yaml"])
def test_every_launch_config_keeps_the_callers_cuda_visible_devices(name, monkeypatch):
    """The environment accelerate's launcher builds for the workers, from each shipped launch config."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import (
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what the user, or SLURM's cgroup, chose
    extra = ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"] if name == "multinode.yaml" else []
    args = launch_command_parser().parse_args(["--config_file", str(processes.launch_config(name)), *extra,
                                               "-m", "distrnn.train"])
    args, *_ = _validate_launch_command(args)
    if args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    assert env.get("CUDA_VISIBLE_DEVICES", "3") == "3"


@pytest.mark.parametrize("env, gpus, refused", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 0, True),  # allocated, but this torch sees none
    ({"SLURM_JOB_GPUS": "2"}, 0, True),
    ({"SLURM_GPUS_ON_NODE": "4"}, 0, True),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0, False),  # the caller hid every GPU on purpose
    ({"CUDA_VISIBLE_DEVICES": "-1"}, 0, False),
    ({"SLURM_GPUS_ON_NODE": "0"}, 0, False),
    ({}, 0, False),
    ({"CUDA_VISIBLE_DEVICES": "0"}, 1, False),
])
def test_auto_mode_refuses_to_fall_back_to_cpu_when_gpus_were_allocated(env, gpus, refused, monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if refused:
        with pytest.raises(DistrnnError, match=r"GPUs were allocated \(.*\) but torch .* sees none \(driver: .*\); "
                                               r"install a torch built for this driver and GPU, or use --mode cpu"):
            processes.plan("auto", None, gpus)
    else:
        processes.plan("auto", None, gpus)
    processes.plan("cpu", None, gpus)  # --mode cpu never asks


def test_the_accelerate_internals_the_launcher_relies_on_still_work():
    """distrnn's launcher passes --signals-to-handle to torchrun through accelerate's private
    _filter_args (torchrun's agent would otherwise kill the workers at once on SIGTERM)."""
    import accelerate
    import torch.distributed.run as torchrun

    from distrnn.preemption import AGENT_SIGNALS

    hint = (f"accelerate {accelerate.__version__} changed an internal distrnn/processes.py relies on; use the tested "
            "accelerate 1.15.x (pyproject.toml) or adapt the launcher")
    try:
        from accelerate.commands.launch import _filter_args, launch_command_parser

        plan = processes.plan("cpu", 2, gpus=0)
        args = launch_command_parser().parse_args(processes.accelerate_args(plan, "distrnn.train", ["--config", "smoke"]))
        args.signals_to_handle = AGENT_SIGNALS
        args.training_script = "distrnn.train"
        args.training_script_args = args.training_script_args
        passed = _filter_args(args, torchrun.get_args_parser(), ["--training_script", args.training_script,
                                                                 "--training_script_args", args.training_script_args])
    except Exception as e:
        pytest.fail(f"{hint} ({type(e).__name__}: {e})")
    assert getattr(passed, "signals_to_handle", None) == AGENT_SIGNALS, hint
    assert args.config_file == str(processes.launch_config("cpu_multi.yaml")) and args.num_processes == 2, hint


def test_a_rank_killed_by_a_signal_is_named_even_when_another_failed_in_the_same_second(capsys):
    """torchrun orders failures by whole-second timestamps: a killed rank 1 and rank 0's "lost contact"
    error, seen in the same poll, tie, and its "first failure" is then rank 0 (the CI run of 24f3ef4)."""
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    failures = {0: ProcessFailure(0, 101, 1, "/nonexistent"), 1: ProcessFailure(1, 102, -9, "/nonexistent")}
    failures[0].timestamp = failures[1].timestamp  # the tie, made certain
    assert processes.failed_workers_exit(ChildFailedError("distrnn.train", failures)) == 128 + 9
    assert "worker rank 1 was killed by SIGKILL" in capsys.readouterr().err


def test_a_worker_that_raised_keeps_its_exit_code_and_prints_nothing_more(capsys):
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    failures = {1: ProcessFailure(1, 102, 1, "/nonexistent")}
    assert processes.failed_workers_exit(ChildFailedError("distrnn.train", failures)) == 1
    assert capsys.readouterr().err == ""
