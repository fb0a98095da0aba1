"""Which launch config and process count each --mode asks for, and the launch configs shipped."""

from __future__ import annotations

import pytest

from distrnn.errors import DistrnnError
from distrnn.launcher import agent, processes
from tests.helpers import REPO


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
    p = processes.plan_this_machine(mode, n, gpus)
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
        processes.plan_this_machine(mode, n, gpus)


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
    extra = (["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
             if name == "multinode.yaml" else [])
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
            processes.plan_this_machine("auto", None, gpus)
    else:
        processes.plan_this_machine("auto", None, gpus)
    processes.plan_this_machine("cpu", None, gpus)  # --mode cpu never asks


def test_torchruns_own_parser_reads_the_launch_as_planned(monkeypatch):
    """The launcher hands torchrun a complete command line (its public parser); stray PET_* variables, which set
    torchrun's defaults, change nothing."""
    import torch.distributed.run as torchrun

    monkeypatch.setenv("PET_NNODES", "7")
    monkeypatch.setenv("PET_MAX_RESTARTS", "9")
    p = processes.on_machines(processes.plan_this_machine("cpu", 2, gpus=0), 3, 1, "10.0.0.1", 29611)
    args = torchrun.get_args_parser().parse_args(processes.torchrun_args(p, "distrnn.train", ["--config", "smoke"], 45))
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr, args.master_port) == (
        "3", "2", 1, "10.0.0.1", 29611)
    assert (args.rdzv_backend, args.rdzv_conf, args.max_restarts) == ("static", "timeout=45", 0)
    assert args.signals_to_handle == "SIGINT,SIGHUP,SIGQUIT"  # SIGTERM and SIGUSR1 are the launcher's (agent.py)
    assert (args.module, args.training_script, args.training_script_args) == (True, "distrnn.train",
                                                                              ["--config", "smoke"])


def test_no_module_of_distrnn_uses_accelerates_launcher():
    """distrnn launches through torchrun's public API: accelerate's launcher internals pinned it to one release."""
    users = [p.name for p in (REPO / "distrnn").rglob("*.py") if "accelerate.commands" in p.read_text()]
    assert users == []
    assert "<1.16" not in (REPO / "pyproject.toml").read_text()


def test_a_rank_killed_by_a_signal_is_named_even_when_another_failed_in_the_same_second(capsys):
    """torchrun orders failures by whole-second timestamps: a killed rank 1 and rank 0's "lost contact"
    error, seen in the same poll, tie, and its "first failure" is then rank 0 (the CI run of 24f3ef4)."""
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    failures = {0: ProcessFailure(0, 101, 1, "/nonexistent"), 1: ProcessFailure(1, 102, -9, "/nonexistent")}
    failures[0].timestamp = failures[1].timestamp  # the tie, made certain
    assert agent.failed_workers_exit(ChildFailedError("distrnn.train", failures)) == 128 + 9
    assert "worker rank 1 was killed by SIGKILL" in capsys.readouterr().err


def test_a_worker_that_raised_keeps_its_exit_code_and_prints_nothing_more(capsys):
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    failures = {1: ProcessFailure(1, 102, 1, "/nonexistent")}
    assert agent.failed_workers_exit(ChildFailedError("distrnn.train", failures)) == 1
    assert capsys.readouterr().err == ""


def test_a_rank_that_another_rank_named_unresponsive_is_not_reported_as_killed_too(capsys):
    """The rank that saw the timeout named the frozen rank and stopped it (SIGKILL): one line, its own."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from distrnn.errors import PeerUnresponsive

    failures = {0: ProcessFailure(0, 101, PeerUnresponsive.exit_code, "/nonexistent"),
                1: ProcessFailure(1, 102, -9, "/nonexistent")}
    assert agent.failed_workers_exit(ChildFailedError("distrnn.train", failures)) == PeerUnresponsive.exit_code
    assert capsys.readouterr().err == ""


def test_gloo_uses_the_interface_that_routes_to_the_main_machine_unless_told(monkeypatch):
    from distrnn.launcher import network

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert network.gloo_interface("127.0.0.1") == ("lo", "127.0.0.1", False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert network.gloo_interface("10.99.0.1") == ("lo", "127.0.0.1", True)  # the user's choice wins, unchecked


def test_a_main_machine_address_that_does_not_resolve_is_one_line(monkeypatch):
    from distrnn.launcher import network

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    with pytest.raises(DistrnnError, match=r"^--main-process-ip no-such-host\.invalid does not resolve"):
        network.gloo_interface("no-such-host.invalid")


def test_a_rank_torchrun_ended_with_sigterm_after_another_failed_is_not_named_as_the_cause(capsys):
    """Another rank raised (and printed its own error); the agent then ended rank 0 with SIGTERM."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {0: ProcessFailure(0, 101, -15, "/nonexistent"), 1: ProcessFailure(1, 102, 1, "/nonexistent")}
    assert agent.failed_workers_exit(ChildFailedError("distrnn.train", failures)) == 1
    assert capsys.readouterr().err == ""
