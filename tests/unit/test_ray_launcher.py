"""`distrnn train --launcher ray` without a Ray cluster: its CPU-or-GPU decision, how a failed Ray run is turned
into an exit code and one line. The real multi-node runs: tests/cluster/test_ray.py."""

from __future__ import annotations

import pytest

from distrnn.config.options import CONFIG_OPTIONS, overrides_from, to_args
from distrnn.config.schema import Config, build_config, load_config
from distrnn.errors import ConfigError, DistrnnError
from distrnn.launcher.ray import WorkerFailed, outcome, ray_worker, restart_args, worker_counts
from distrnn.run.folder import RunFolder
from distrnn.run.resume import find_resume
from tests.helpers import flip_byte
from tests.unit.test_integrity import published


@pytest.mark.parametrize("text, expected", [("1", 1), ("4", 4), ("2-4", (2, 4)), ("3-3", (3, 3))])
def test_worker_counts(text, expected):
    assert worker_counts(text) == expected


@pytest.mark.parametrize("text", ["0", "x", "4-2", "-2", "2-", "1.5", "0-2"])
def test_worker_counts_refused(text):
    with pytest.raises(ConfigError, match="give a number of workers"):
        worker_counts(text)


@pytest.fixture
def ray_started(monkeypatch):
    """cli.on_ray up to Ray: `use_cpu` of each run Ray would have been asked for; no GPU visible, none allocated."""
    from distrnn.launcher import ray
    from distrnn.ranks import devices

    started = []
    monkeypatch.setattr(ray, "require_ray", lambda: None)
    monkeypatch.setattr(ray, "run_on_ray", lambda args, address, workers, failures, output_dir, use_cpu, timeout_s:
                        started.append(use_cpu) or 0)
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    return started


def test_the_ray_path_refuses_gpus_allocated_but_unseen_as_torchrun_does(ray_started, monkeypatch):
    """--mode auto on Ray decides CPU or GPU as processes.py does (devices.runs_on_cpu): GPUs allocated to the job
    that this torch cannot see stop the run, where Ray once started CPU workers without a word."""
    from distrnn.cli import on_ray

    cfg = build_config()
    assert on_ray(cfg, "auto", None, "2", 0, []) == 0 and ray_started == [True]  # nothing allocated: the CPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DistrnnError, match=r"GPUs were allocated \(CUDA_VISIBLE_DEVICES=0,1\) but torch .* sees none"):
        on_ray(cfg, "auto", None, "2", 0, [])
    assert ray_started == [True]
    assert on_ray(cfg, "cpu", None, "2", 0, []) == 0 and ray_started == [True, True]  # --mode cpu never asks


def test_the_ray_path_asks_no_gpu_count_for_an_explicit_gpu_mode(ray_started, monkeypatch):
    """--mode gpu or ddp on Ray: GPU workers, whatever the driver's machine sees (the GPUs may be on other nodes)."""
    from distrnn.cli import on_ray
    from distrnn.ranks import devices

    monkeypatch.setattr(devices, "visible_gpus", lambda: pytest.fail("counted this machine's GPUs"))
    for mode in ("gpu", "ddp"):
        assert on_ray(build_config(), mode, None, "2", 0, []) == 0
    assert ray_started == [False, False]


class FakeWorkerGroupError(Exception):
    """The shape of Ray's WorkerGroupError: worker_failures maps each failed rank to what Ray got back."""

    def __init__(self, worker_failures):
        super().__init__("Training failed due to worker errors:\n...")
        self.worker_failures = worker_failures


def wrapped(error: BaseException) -> Exception:
    """As Ray hands a worker's exception to the controller: inside a RayTaskError, as its cause."""
    outer = Exception("ray::RayTrainWorker.run_train_fn() (pid=1, ip=10.0.0.1)")
    outer.__cause__ = error
    return outer


def test_a_lost_worker_is_the_cause_and_exits_as_a_killed_one():
    failures = {0: wrapped(WorkerFailed(4)), 1: Exception("A worker health check failed.\nWorker info: ...")}
    assert outcome(FakeWorkerGroupError(failures)) == (137, "worker rank 1 was lost (A worker health check failed.)")


def test_workers_that_exited_give_their_status():
    failures = {1: wrapped(WorkerFailed(2)), 0: wrapped(WorkerFailed(4))}
    assert outcome(FakeWorkerGroupError(failures)) == (4, "worker rank 0 exited with 4 (it lost contact with "
                                                          "another rank)")
    assert outcome(FakeWorkerGroupError({1: wrapped(WorkerFailed(2))})) == (2, "worker rank 1 exited with 2")


def test_a_controller_failure_is_one_line_and_exit_1():
    assert outcome(Exception("the controller failed\ndetails")) == (1, "the controller failed")


# --- what a restarted worker resumes from -------------------------------------------------------------

def worker_config(args: list[str]) -> Config:
    """The config a Ray worker trains with, parsed by the worker's own command (ray_worker) from `args`."""
    params = ray_worker.make_context("distrnn.train", list(args)).params
    return load_config(params.pop("config_file"), overrides_from(params))


def launcher_args(*given: str) -> list[str]:
    """What `distrnn train --launcher ray ...` forwards to its workers for the options and KEY=VALUE `given`."""
    return to_args(CONFIG_OPTIONS, ray_worker.make_context("distrnn train", list(given)).params)


def test_a_restart_keeps_the_positional_overrides(tmp_path):
    """Before: `--resume PATH` came after `-- train.epochs=1`, and the restarted worker stopped with
    "override '--resume' must look like key=value"."""
    run = RunFolder(tmp_path / "run")
    published(run, 20)
    args = launcher_args("--output-dir", str(run.root), "train.epochs=1")
    assert args[-2:] == ["--", "train.epochs=1"]
    cfg = worker_config(restart_args(args, str(run.checkpoint(20).path)))
    assert cfg.train.epochs == 1
    assert find_resume(run, cfg.checkpoint.resume)[0].path == run.checkpoint(20).path


@pytest.mark.parametrize("given", [(), ("--resume", "never"), ("checkpoint.resume=never",)])
def test_a_restart_resumes_from_the_newest_verified_checkpoint_not_rays_latest_registered_one(tmp_path, given):
    """Ray registered step 20; step 40 was published before the failure (not yet registered), step 60 was
    damaged since. Before: the restart resumed from step 20, Ray's, whatever the run folder held."""
    run = RunFolder(tmp_path / "run")
    for step in (20, 40, 60):
        published(run, step)
    flip_byte(run.checkpoint(60).path / "optimizer.bin")
    cfg = worker_config(restart_args(launcher_args("--output-dir", str(run.root), *given),
                                     str(run.checkpoint(20).path)))
    found, warnings = find_resume(run, cfg.checkpoint.resume)
    assert found.path == run.checkpoint(40).path
    assert any("is damaged" in warning for warning in warnings)


def test_a_first_start_resumes_as_the_user_asked(tmp_path):
    args = launcher_args("--output-dir", str(tmp_path / "run"), "--resume", "never", "train.epochs=1")
    assert restart_args(args, None) == args

