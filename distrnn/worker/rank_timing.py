"""Where each rank's time goes, and the rank that holds the others back.

DDP's gradient all-reduce makes every rank wait for the slowest, so a slow rank's time hides in everybody's
backward pass. Each rank therefore splits its own training time per step into waiting for data, forward +
backward compute, the gradient all-reduce (timed by a DDP communication hook: from the bucket's launch to
its completion, which includes waiting for the other ranks) and the optimizer step. Every train.log_every
steps one gather brings every rank's figures to the main process, which logs min / median / max over the
ranks and the slowest rank, and warns (at most once a minute) when one rank's compute stays more than
SLOW_MARGIN times the median of the others' for SLOW_INTERVALS intervals in a row.

CPU: perf_counter at the phase boundaries (CPU kernels run synchronously). CUDA: events recorded on the
stream and read at the logging interval only (no host sync per step); the all-reduce is not separated
there (its completion cannot be timed from the host without a sync) and is part of compute.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from distrnn.errors import host_name
from distrnn.run.folder import TIME_PHASES, time_phase_key

SLOW_MARGIN = 1.5  # compute this many times the others' median ...
SLOW_INTERVALS = 3  # ... for this many logging intervals in a row: one rank holds the others back
WARN_EVERY_S = 60


class RankTiming:
    """This rank's time per phase (`mark` at each boundary), reported at the logging interval.

    Collectives: `report` and `per_rank` gather from every rank (all ranks call them, at the same steps).
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.cuda = accelerator.device.type == "cuda"
        self.host = host_name()
        self.hosts = gather_object([self.host]) if accelerator.num_processes > 1 else [self.host]
        self.interval = dict.fromkeys(TIME_PHASES, 0.0)  # seconds since the last report
        self.total = dict.fromkeys(TIME_PHASES, 0.0)  # seconds over this start
        self.steps = self.total_steps = 0
        self.events: list[tuple[str, Any, Any]] = []  # CUDA: (phase, start event, end event), read at report
        self.last = self._now()
        self.slow_streak = [0] * accelerator.num_processes
        self.warned_at = -float("inf")

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        """Time from here on (after an evaluation, a checkpoint or the start of an epoch: not data waiting)."""
        self.last = self._now()

    def mark(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self.events.append((phase, self.last, now))
        else:
            self.interval[phase] += now - self.last
        self.last = now

    def count_update(self) -> None:
        """One optimizer update ended (the interval's figures are per update, not per micro-batch)."""
        self.steps += 1

    def attach(self, model) -> None:
        """Time DDP's gradient all-reduce (a communication hook on the prepared model; CPU only, see above)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not self.cuda:
            model.register_comm_hook(None, self.allreduce_hook)

    def allreduce_hook(self, state, bucket):
        """DDP communication hook, registered on CPU only (attach): the default all-reduce, timed (the time moves
        from compute to allreduce)."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        start = time.perf_counter()
        future = default_hooks.allreduce_hook(state, bucket)

        def done(fut):
            seconds = time.perf_counter() - start
            self.interval["allreduce"] += seconds
            self.interval["compute"] -= seconds  # it ran inside backward, which `mark("compute")` ends
            return fut.value()

        return future.then(done)

    def _collect(self) -> dict[str, float]:
        """This interval's milliseconds per step per phase (reads the CUDA events: one wait, here only)."""
        if self.events:
            self.events[-1][2].synchronize()
            for phase, start, end in self.events:
                self.interval[phase] += start.elapsed_time(end) / 1000
            self.events = []
        mine = {phase: 1000 * seconds / max(self.steps, 1) for phase, seconds in self.interval.items()}
        for phase, seconds in self.interval.items():
            self.total[phase] += seconds
        self.total_steps += self.steps
        self.interval, self.steps = dict.fromkeys(TIME_PHASES, 0.0), 0
        if self.cuda:
            mine["allreduce"] = float("nan")
        return mine

    def report(self, say) -> dict[str, Any]:
        """Collective. The metrics of every rank's split (main process; {} elsewhere), and the slow-rank warning."""
        mine = self._collect()
        everyone = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        if not self.accelerator.is_main_process:
            return {}
        metrics: dict[str, Any] = {}
        for phase in TIME_PHASES:
            values = [rank[phase] for rank in everyone]
            if any(v != v for v in values):  # NaN: not measured here (the all-reduce on a GPU)
                continue
            metrics.update({f"time/{phase}_ms/min": min(values), f"time/{phase}_ms/median": statistics.median(values),
                            f"time/{phase}_ms/max": max(values)})
        compute = [rank["compute"] for rank in everyone]
        metrics["time/slowest_rank"] = max(range(len(compute)), key=compute.__getitem__)
        self._warn_if_slow(compute, say)
        return metrics

    def _warn_if_slow(self, compute: list[float], say) -> None:
        if len(compute) < 2:
            return
        for rank, value in enumerate(compute):
            others = statistics.median(compute[:rank] + compute[rank + 1:])
            self.slow_streak[rank] = self.slow_streak[rank] + 1 if value > SLOW_MARGIN * others else 0
        slow = max(range(len(compute)), key=lambda r: (self.slow_streak[r], compute[r]))
        if self.slow_streak[slow] >= SLOW_INTERVALS and time.monotonic() - self.warned_at >= WARN_EVERY_S:
            others = statistics.median(compute[:slow] + compute[slow + 1:])
            say(f"warning: rank {slow} (node {self.hosts[slow]}) is {compute[slow] / others:.1f}x slower than the "
                f"median rank: compute {compute[slow]:.0f} ms vs {others:.0f} ms per step")
            self.warned_at = time.monotonic()

    def per_rank(self, samples_per_step: int) -> list[dict[str, Any]]:
        """Collective. Every rank's totals since this start, its peak memory and samples/s (summary.json)."""
        import resource

        self._collect()
        steps, seconds = max(self.total_steps, 1), sum(v for k, v in self.total.items() if k != "data")
        mine = {"host": self.host, "steps": self.total_steps,
                **{time_phase_key(phase): 1000 * s / steps for phase, s in self.total.items()},
                "samples_per_s": self.total_steps * samples_per_step / max(seconds + self.total["data"], 1e-9),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None}
        if self.cuda:
            mine[time_phase_key("allreduce")] = None
        everyone = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        return [{"rank": rank, **figures} for rank, figures in enumerate(everyone)]
