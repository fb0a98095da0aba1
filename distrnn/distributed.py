"""All rank logic in one place: the Accelerator, exact reductions, agreement, teardown."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn, TypeVar

import click
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)

from distrnn.devices import check_precision, set_numerics
from distrnn.errors import DistrnnError, Quiet, first_line, run_cli

T = TypeVar("T")


def make_accelerator(precision: str, seed: int, collective_timeout_s: int, project_dir: str,
                     tf32: bool = False, deterministic: bool = False) -> Accelerator:
    """One Accelerator per process; the launcher (ACCELERATE_USE_CPU, torchrun env) picks the device."""
    # NCCL: when a collective fails or outlives the timeout (a rank died or hangs), abort the
    # communicator and end this process (1), instead of ending it with the communicator alive (3,
    # torch's default); the launcher then reports the rank. Gloo raises instead (peer_failure).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    set_numerics(tf32, deterministic)
    accelerator = Accelerator(
        mixed_precision=precision,
        project_dir=project_dir,
        # The schedule's total steps are computed from the per-rank loader, so the
        # scheduler must step once per optimizer step, not once per process.
        step_scheduler_with_optimizer=False,
        # Seedable sampler: the shuffle is a function of (seed, epoch), identical on every rank,
        # so the shards are disjoint and change every epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        # If a rank dies or hangs, the others fail after this instead of waiting forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))],
    )
    check_precision(precision, on_cpu=accelerator.device.type == "cpu")
    if accelerator.device.type == "cpu":
        # Denormals slowed CPU training up to 50x here; flushing them costs no accuracy.
        torch.set_flush_denormal(True)
    set_seed(seed)
    return accelerator


def main_print(accelerator: Accelerator) -> Callable[..., None]:
    """`print` on the global main process only (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        return lambda *args: print(*args, flush=True)
    return lambda *args: None


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Rank r takes samples r, r+W, r+2W, ...: disjoint, covering all n, no padding.

    Written by hand because a prepared loader pads the last batches (even_batches=True: 10112
    counted instead of 10000 on 2 ranks), and even_batches=False crashed per-batch gathers.
    """
    return range(rank, n, world_size)


def dist_sum(accelerator: Accelerator, *counts: int | torch.Tensor) -> tuple[int, ...]:
    """Sum integer counts (Python ints or tensors on the device) over all ranks exactly: int64, one
    all-reduce, one read on the host."""
    local = torch.stack([torch.as_tensor(c, device=accelerator.device).to(torch.int64).reshape(()) for c in counts])
    return tuple(int(v) for v in accelerator.reduce(local, reduction="sum").tolist())


def dist_mean(accelerator: Accelerator, value: torch.Tensor) -> float:
    return float(accelerator.reduce(value.detach().float().reshape(1), reduction="mean").item())


def from_main(accelerator: Accelerator, value: T) -> T:
    """The main process's `value` on every rank (one broadcast): ranks never decide alone what
    they read from a shared file system, where attribute caches can differ between nodes."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def agree(accelerator: Accelerator, action: Callable[[], T], here: bool = True) -> T | None:
    """Run `action` where `here` is true (every rank by default); if it failed anywhere, every rank stops.

    Each distinct error is raised, and so printed, by the lowest rank that had it; the others raise
    Quiet. Any exception counts, not only DistrnnError: a rank must never wait in a collective for
    one that has already left (that cost collective_timeout_s, 300 s, and hid the real cause).
    """
    error: BaseException | None = None
    result = None
    if here:
        try:
            result = action()
        except Exception as e:
            error = e
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return result
    mine = None if error is None else (f"{type(error).__name__}: {error}", getattr(error, "exit_code", 1))
    outcomes = gather_object([mine])
    failed = [outcome for outcome in outcomes if outcome is not None]
    if not failed:
        return result
    if error is not None and outcomes.index(mine) == accelerator.process_index:
        raise error
    raise Quiet(failed[0][1])


# Gloo reports a dead or hung peer as a plain RuntimeError with one of these texts.
_GLOO_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out")


def peer_failure(accelerator: Accelerator | None, error: BaseException) -> DistrnnError | None:
    """A collective that failed because another rank died or hung, as one line; else None.

    By type first (NCCL and the rendezvous store raise DistBackendError / DistNetworkError /
    DistStoreError), then by gloo's texts. An NCCL error that is not about a peer (a version
    mismatch, invalid usage) is not a lost rank and keeps its own message.
    """
    if accelerator is None or accelerator.num_processes < 2 or not isinstance(error, RuntimeError):
        return None
    lost_peer = isinstance(error, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)) or any(
        marker in str(error) for marker in _GLOO_PEER_FAILURE)
    if not lost_peer:
        return None
    return DistrnnError(f"rank {accelerator.process_index} lost contact with another rank ({first_line(error)}); "
                        "stopping")


def teardown(accelerator: Accelerator | None) -> None:
    """Finish trackers and the process group; without this 5 of 12 2-process runs died with SIGABRT."""
    try:
        if accelerator is not None:
            accelerator.end_training()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_worker(command: click.Command, prog: str) -> NoReturn:
    """A worker's entry point: `run_cli`, then, in a multi-process run, leave without the
    interpreter's finalization.

    Measured here: 4 of 60 two-process runs that had finished, torn down the process group and run
    every atexit handler still died with SIGABRT ("terminate called without an active exception")
    while the interpreter finalized, a native thread outliving the process group; 0 of 80 with
    os._exit after flushing what Python would have flushed.
    """
    code = run_cli(command, prog)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        sys.exit(code)
    if "wandb" in sys.modules:  # its service process is stopped by an atexit handler otherwise
        sys.modules["wandb"].teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
