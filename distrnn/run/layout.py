"""A run's layout (processes x per-process batch x accumulation), and a resume on another number of
processes: the global batch kept, the position converted, every sample seen exactly once.

Exact because the in-memory loader's optimizer step s covers the same samples for the same global batch
G = per-process batch x processes x accumulation, whatever the three are (loaders.MemoryLoader). So a
checkpoint records its layout (meta.json "layout") and where training stands in global terms (epoch and
optimizer steps into it, `epoch_samples` = steps x G), and a resume on M processes trains with the same G:
the saved per-process batch and more accumulation when M x batch divides G, else the largest per-process
batch that does. Optimizer, scheduler and grad-scaler states carry over (every rank holds the same ones);
the per-rank RNG states are derived from (seed, step, rank) for every rank, since the saved ones cannot be
shared out (accelerate would skip the missing files of new ranks and ignore those of ranks that are gone).
Not exact: the weights bit for bit (the reduction order changes with the number of processes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distrnn.config.schema import Config
from distrnn.errors import DistrnnError


@dataclass(frozen=True)
class Layout:
    processes: int
    batch_size: int  # per process, per accumulation step
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.batch_size * self.accumulation

    def describe(self) -> str:
        return f"{self.batch_size} per process x {self.processes} x {self.accumulation} accumulation"

    @classmethod
    def configured(cls, cfg: Config, processes: int) -> Layout:
        """The layout `cfg` asks for on `processes` processes."""
        return cls(processes, cfg.train.batch_size, cfg.train.grad_accum_steps)

    @classmethod
    def saved_in(cls, meta: dict[str, Any]) -> Layout:
        """The layout a checkpoint was saved with (from its config, for checkpoints older than "layout")."""
        if "layout" in meta:
            return cls(meta["layout"]["processes"], meta["layout"]["batch_size"], meta["layout"]["accumulation"])
        return cls(meta["num_processes"], meta["config"]["train"]["batch_size"],
                   meta["config"]["train"]["grad_accum_steps"])

    def record(self, steps_in_epoch: int, requested: tuple[int, int]) -> dict[str, Any]:
        """meta.json's "layout": this layout, the samples of the epoch its steps consumed, and the per-process
        batch and accumulation the run's config asked for when it first started (`requested`)."""
        return {**dataclasses.asdict(self), "global_batch": self.global_batch,
                "epoch_samples": steps_in_epoch * self.global_batch, "requested": list(requested)}


def first_requested(meta: dict[str, Any] | None, cfg: Config) -> tuple[int, int]:
    """(per-process batch, accumulation) the run's config asked for at its first start."""
    if meta is not None and "requested" in meta.get("layout", {}):
        return tuple(meta["layout"]["requested"])
    if meta is not None:
        before = Layout.saved_in(meta)
        return before.batch_size, before.accumulation
    return cfg.train.batch_size, cfg.train.grad_accum_steps


def resume_layout(meta: dict[str, Any], cfg: Config, processes: int, where: object) -> tuple[Layout, str | None]:
    """The layout this run trains with, and the line saying how it differs from the checkpoint's (None if not).
    The run's own config (as first started, or as the checkpoint trained) lets distrnn choose; another one
    must keep the global batch itself."""
    before, asked = Layout.saved_in(meta), Layout.configured(cfg, processes)
    total = before.global_batch
    if asked == before:
        return asked, None
    if asked.global_batch == total:
        chosen = asked  # the user chose another split of the same global batch
    elif (asked.batch_size, asked.accumulation) not in {(before.batch_size, before.accumulation),
                                                        first_requested(meta, cfg)}:
        raise DistrnnError(f"checkpoint {where} trained with a global batch of {total} ({before.describe()}) and this "
                           f"run asks for {asked.global_batch} ({asked.describe()}); the global batch must stay "
                           f"{total}: keep train.batch_size and train.grad_accum_steps, or --resume never")
    else:
        chosen = _split(total, processes, before.batch_size, where)
    if cfg.data.loader != "memory":
        raise DistrnnError(f"checkpoint {where} was saved with {before.describe()} and this run has "
                           f"{asked.describe()}: data.loader={cfg.data.loader} resumes only with the same "
                           "(Accelerate's DataLoader counts the batches to skip per rank and pads an epoch's last "
                           "batches by the number of processes: another layout would repeat or skip samples); use "
                           f"--num-processes {before.processes} with the same batch, or data.loader=memory")
    moved = f"{before.processes} -> {processes} processes; " if processes != before.processes else ""
    return chosen, (f"{moved}global batch {total} kept as {chosen.batch_size} per process x {chosen.accumulation} "
                    "accumulation")


def _split(total: int, processes: int, preferred_batch: int, where: object) -> Layout:
    if total % processes:
        counts = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0 and n <= 64)
        raise DistrnnError(f"checkpoint {where} has a global batch of {total}, which {processes} processes cannot "
                           f"share equally; resume on {counts} processes (the divisors of {total}), or --resume never")
    per = total // processes
    batch = max(b for b in range(1, min(per, preferred_batch) + 1) if per % b == 0)
    return Layout(processes, batch, per // batch)


def config_with(cfg: Config, layout: Layout) -> Config:
    """`cfg` training with `layout` (the resolved config that config.yaml, W&B and the model file keep)."""
    train = dataclasses.replace(cfg.train, batch_size=layout.batch_size, grad_accum_steps=layout.accumulation)
    return dataclasses.replace(cfg, train=train)


def position_in(meta: dict[str, Any], now: Layout) -> dict[str, Any]:
    """The saved position with its batches into the epoch counted in `now`'s micro-batches. Checkpoints are
    saved at whole optimizer steps, so the saved count is a multiple of the saved accumulation."""
    saved_position, before = dict(meta["position"]), Layout.saved_in(meta)
    saved_position["step_in_epoch"] = saved_position["step_in_epoch"] // before.accumulation * now.accumulation
    return saved_position


def resumed_rng_seed(seed: int, global_step: int, rank: int) -> int:
    """Every rank's RNG seed after a resume on another number of processes: a function of where it stands."""
    return (seed * 1_000_003 + global_step * 7919 + rank) % 2**32
