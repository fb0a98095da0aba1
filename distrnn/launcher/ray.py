"""`distrnn train --launcher ray`: the same worker, started by Ray Train's TorchTrainer on a Ray cluster.

Ray sets up the process group and the environment Accelerate reads (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...); there is no torchrun inside. The run folder is Ray's run folder (its storage: a file
system every node shares, as for the other launchers). Each verified distrnn checkpoint is reported to Ray
where it lies (not copied: CheckpointUploadMode.NO_UPLOAD), so after a worker or a node is lost Ray restarts
the workers (FailureConfig max_failures) and they resume from the run folder's newest verified checkpoint:
Ray's latest registered one, or a newer one published but not yet registered by Ray when the failure came.
W&B and the exact counts come from the main worker only, as everywhere. A stop request (SIGTERM or SIGUSR1 to
the driver: a preemption notice) is passed to the workers through the run folder (distrnn.ranks.preemption):
they save a checkpoint at one agreed step and stop, the driver exits 75, and the same command resumes. A range of
workers (`--num-workers 2-4`) is Ray Train's elastic mode (Ray 2.60: ScalingConfig(num_workers=(min, max))):
distrnn resumes on the new number of workers with the global batch kept (distrnn.run.layout.resume_layout).

Imported only by `distrnn train --launcher ray`: a plain install imports nothing of Ray (pip install
'distrnn[ray]').
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import click

from distrnn.config.options import config_options, overrides_from
from distrnn.config.schema import load_config
from distrnn.errors import ConfigError, DistrnnError, PeerLost, exit_status, first_line, run_cli
from distrnn.ranks.devices import USE_CPU_VARIABLE
from distrnn.ranks.preemption import REQUEUE_EXIT_CODE, STOP_FILE, STOP_FILE_VARIABLE, STOP_SIGNALS, StoppedOnRequest
from distrnn.run.hold import RUN_ID_VARIABLE
from distrnn.testing import faults


def require_ray():
    try:
        import ray  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise DistrnnError("--launcher ray needs Ray Train: pip install 'distrnn[ray]'") from None


def worker_counts(text: str) -> int | tuple[int, int]:
    """--num-workers N or MIN-MAX."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    low, high = (int(match[1]), int(match[2]) if match[2] else None) if match else (0, None)
    if low < 1 or (high is not None and high < low):
        raise ConfigError(f"--num-workers {text}: give a number of workers (2) or a range (2-4)")
    return low if high is None else (low, high)


def torch_config(backend: str, timeout_s: int):
    """Ray's TorchConfig, plus: before Ray creates the gloo process group, each worker picks the interface
    that holds its node's address (gloo would advertise what the host name resolves to: loopback on
    Debian's default /etc/hosts, unreachable from the other nodes). Written by hand: Ray's TorchConfig
    takes one environment for every worker, and the interface differs from node to node."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            if backend == "gloo":
                worker_group.execute(_choose_gloo_interface)
            super().on_start(worker_group, backend_config)

    class Config(TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return Config(backend=backend, timeout_s=timeout_s)


def _choose_gloo_interface() -> None:
    import ray

    from distrnn.launcher.network import interface_with

    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        name = interface_with(ray.util.get_node_ip_address())
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def run_on_ray(worker_args: list[str], address: str | None, workers: int | tuple[int, int], max_failures: int,
               output_dir: str, use_cpu: bool, timeout_s: int) -> int:
    """Run the training on the Ray cluster at `address` (None: start a local one); the exit status."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    ray.init(address=address, logging_level="ERROR", log_to_driver=True, configure_logging=True)
    run_folder = Path(output_dir).resolve()
    stop = StopFile(run_folder / STOP_FILE)  # after ray.init, whose own SIGTERM handler ends the driver at once
    env = {**({USE_CPU_VARIABLE: "true"} if use_cpu else {}), **faults.for_workers(),
           STOP_FILE_VARIABLE: str(stop.path)}
    trainer = TorchTrainer(
        _train, train_loop_config={"args": worker_args, "env": {**env, RUN_ID_VARIABLE: f"ray-{os.getpid()}"}},
        torch_config=torch_config("gloo" if use_cpu else "nccl", timeout_s),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not use_cpu, resources_per_worker={"CPU": 1}),
        # num_to_keep None: distrnn's checkpoint.keep decides which stay (Ray would delete distrnn's folders)
        run_config=RunConfig(name=run_folder.name, storage_path=str(run_folder.parent), failure_config=FailureConfig(
            max_failures=max_failures), checkpoint_config=CheckpointConfig(num_to_keep=None)))
    try:
        trainer.fit()
    except TrainingFailedError as e:
        code, why = outcome(e)
        failed = DistrnnError(f"the Ray run failed after {max_failures} restart(s) (--max-failures): {why}")
        failed.exit_code = code
        raise failed from None
    stop.end_of_run()
    return 0


class StopFile:
    """The driver's side of a stop request: SIGTERM or SIGUSR1 (a preemption notice, `scancel`) writes the
    signal's name to RUN/stop-request, which each worker reads at its next check (preemption.StopRequest). The
    main worker removes the file once every rank saved and stopped (`_train`). Ray's own handler would end the
    driver and with it the workers: everything since the last periodic checkpoint would be trained again."""

    def __init__(self, path: Path):
        self.path = path
        self.signal: signal.Signals | None = None
        path.unlink(missing_ok=True)  # a request an earlier start of this run already answered, or never read
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            return
        self.signal = signal.Signals(signum)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(self.signal.name)
        partial.replace(self.path)  # whole or absent: a worker never reads half a name
        click.echo(f"distrnn: {self.signal.name}: the Ray workers save a checkpoint at their next check and stop",
                   err=True)

    def end_of_run(self) -> None:
        """After the workers ended without a failure: stopped on the request (exit 75), or finished first."""
        if self.signal is None:
            return
        if self.path.exists():  # the run finished before a check read the request
            self.path.unlink()
            return
        raise StoppedOnRequest(f"stopped by {self.signal.name}: the Ray workers saved a checkpoint in "
                               f"{self.path.parent}/checkpoints; run the same command again to resume")


def outcome(error: BaseException) -> tuple[int, str]:
    """(exit code, why) for Ray's TrainingFailedError, as agent.cause does for torchrun's: a worker Ray lost
    (its node or process gone: no exit status) is the cause, exit 137 as for a killed torchrun worker; else
    the first worker's own status, whose one line it printed itself."""
    failures = getattr(error, "worker_failures", None) or {}
    exits = {rank: e for rank, e in failures.items() if _worker_failed(e) is not None}
    lost = sorted(set(failures) - set(exits))
    if lost:
        return 128 + signal.SIGKILL, f"worker rank {lost[0]} was lost ({first_line(failures[lost[0]])})"
    if exits:
        rank = min(exits)
        code = _worker_failed(exits[rank]).code
        return code, f"worker rank {rank} exited with {code}" + (
            " (it lost contact with another rank)" if code == PeerLost.exit_code else "")
    return 1, first_line(error)


def _worker_failed(error: BaseException) -> WorkerFailed | None:
    """Ray hands a worker's exception back wrapped (RayTaskError, as cause or argument)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, WorkerFailed):
            return error
        nested = [a for a in getattr(error, "args", ()) if isinstance(a, BaseException)]
        error, seen = error.__cause__ or (nested[0] if nested else None), seen + 1
    return None


class WorkerFailed(Exception):
    """A worker ended with a non-zero status (its one-line error already printed): Ray counts a failure."""

    def __init__(self, code: int):
        super().__init__(f"the distrnn worker exited with {code}")
        self.code = code

    def __reduce__(self):
        return WorkerFailed, (self.code,)


@config_options
@click.command()
def ray_worker(config_file: str | None, **params: Any) -> None:
    """distrnn.train's entry point, with every published checkpoint reported to Ray."""
    from distrnn.worker.training import run_training  # the worker side: torch, on Ray's workers only

    run_training(load_config(config_file, overrides_from(params)), on_checkpoint=_report)


def _train(config: dict[str, Any]) -> None:
    """Each Ray worker: the worker's own entry point, resuming on a restart (restart_args)."""
    import ray.train

    os.environ.update(config["env"])
    checkpoint = ray.train.get_checkpoint()
    args = restart_args(config["args"], checkpoint.path if checkpoint is not None else None)
    code = exit_status(run_cli(ray_worker, prog="distrnn.train", args=args))
    if code == REQUEUE_EXIT_CODE:  # stopped on the driver's request after a checkpoint: not a failure to restart
        if ray.train.get_context().get_world_rank() == 0:
            Path(os.environ[STOP_FILE_VARIABLE]).unlink(missing_ok=True)  # answered (StopFile.end_of_run)
        return
    if code:
        raise WorkerFailed(code)


def restart_args(args: list[str], ray_checkpoint: str | None) -> list[str]:
    """A worker's arguments: the launcher's, and on a restart (Ray has registered a checkpoint) a resume
    from the run folder holding it, that is from its newest checkpoint that verifies, chosen by the main
    process: Ray's latest registered one, or a newer one published before the failure but not yet
    registered (Ray's may also have been rotated out by checkpoint.keep). Given as the last KEY=VALUE,
    after the launcher's own (`-- KEY=VALUE ...`, where an option would be read as an override) and
    winning over a --resume of the first start."""
    if ray_checkpoint is None:
        return list(args)
    run_folder = Path(ray_checkpoint).parents[1]  # RUN/checkpoints/step-N: reported in place (NO_UPLOAD)
    return [*args, *([] if "--" in args else ["--"]), f"checkpoint.resume={run_folder}"]


def _report(path: Path, step: int) -> None:
    """Every rank (Ray's report is a barrier); the checkpoint from rank 0, in place in the run folder."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    rank = ray.train.get_context().get_world_rank()
    ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(path)) if rank == 0 else None,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
