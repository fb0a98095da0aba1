"""All rank logic in one place: the Accelerator, seeding, sharding, exact reductions, teardown."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

from distrnn.config import Config
from distrnn.errors import DistrnnError, first_line


def make_accelerator(cfg: Config, project_dir: str, log_with: str | None) -> Accelerator:
    """One Accelerator per process; the launcher (ACCELERATE_USE_CPU, torchrun env) picks the device."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.precision,
        log_with=log_with,
        project_dir=project_dir,
        # The schedule's total steps are computed from the prepared (per-rank) loader, so the
        # scheduler must step once per optimizer step, not once per process.
        step_scheduler_with_optimizer=False,
        # Seedable sampler: the shuffle is a function of (seed, epoch), identical on every rank,
        # so the shards are disjoint and change every epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        # If a rank dies or hangs, the others fail after this instead of waiting forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
    )
    if accelerator.device.type == "cpu":
        if cfg.train.precision == "fp16":
            # Measured: Accelerate silently trains in fp32 when asked for fp16 on a CPU.
            raise DistrnnError("precision fp16 needs a GPU; on CPU use --precision bf16 or --precision no")
        # Denormals slowed CPU training up to 50x here; flushing them costs no accuracy.
        torch.set_flush_denormal(True)
    elif cfg.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DistrnnError("precision bf16 is not supported by this GPU; use --precision fp16 or --precision no")
    set_seed(cfg.train.seed)
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


def dist_sum(accelerator: Accelerator, *counts: int) -> tuple[int, ...]:
    """Sum integer counts over all ranks exactly (int64, one all-reduce)."""
    local = torch.tensor(counts, dtype=torch.int64, device=accelerator.device)
    return tuple(int(v) for v in accelerator.reduce(local, reduction="sum").tolist())


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if it is true on any rank (one all-reduce)."""
    return dist_sum(accelerator, int(flag))[0] > 0


def main_then_agree(accelerator: Accelerator, check: Callable[[], None]) -> None:
    """Run `check` on the main process only; if it fails, every rank stops (none waits in a collective)."""
    error = None
    if accelerator.is_main_process:
        try:
            check()
        except DistrnnError as e:
            error = e
    if any_rank(accelerator, error is not None):
        raise error or DistrnnError("the main process stopped the run (its message says why)")


def dist_mean(accelerator: Accelerator, value: torch.Tensor) -> float:
    return float(accelerator.reduce(value.detach().float().reshape(1), reduction="mean").item())


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "NCCL")


def peer_failure(accelerator: Accelerator | None, error: BaseException) -> DistrnnError | None:
    """A collective that failed because another rank died or hung, as one line; else None."""
    if accelerator is None or accelerator.num_processes < 2 or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not any(marker in text for marker in _PEER_FAILURE):
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
