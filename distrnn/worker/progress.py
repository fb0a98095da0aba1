"""Training time, throughput and the running accuracy on the training batches: what the progress lines,
metrics.jsonl and `summary.json` say about speed.

Training time leaves evaluations and checkpoints out (they pause the clocks), so samples/s and the
time-to-accuracy curves measure training alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from tqdm import tqdm

from distrnn.ranks.collectives import dist_mean, dist_sum
from distrnn.worker.rank_timing import RankTiming


class Clock:
    """Seconds while running; `paused()` leaves a stretch out."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self._since = seconds, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def now(self) -> float:
        """Seconds so far, including the stretch in progress."""
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


class Progress:
    """The run's training time (carried over a resume), this epoch's time and batches, and the running
    accuracy of the batches as they were trained (no extra pass; counted on the device).

    Collectives: `epoch_accuracy` (one all-reduce), `interval` (one all-reduce and one gather), and the
    timing's `per_rank` (a gather); nothing else here talks to other ranks.
    """

    def __init__(self, accelerator: Accelerator, samples_per_batch: int, train_seconds: float):
        self.accelerator = accelerator
        self.timing = RankTiming(accelerator)  # where each rank's time goes
        self.samples_per_batch = samples_per_batch  # all ranks, one accumulation step
        self.run_clock, self.epoch_clock = Clock(train_seconds), Clock()
        self.first_batch = 0  # of the epoch in progress: where this start picked it up
        self.correct = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        self.seen = 0

    def start_epoch(self, first_batch: int) -> None:
        self.epoch_clock = Clock()
        self.first_batch = first_batch
        self.correct.zero_()
        self.seen = 0
        self.run_clock.start()
        self.epoch_clock.start()

    def bar(self, batches, epoch: int, epochs: int, skip: int, total: int) -> tqdm:
        """A live bar in a terminal; in a log file (SLURM, CI) a plain line every log_every steps instead."""
        self.timing.restart()
        return tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", initial=skip, total=total, dynamic_ncols=True,
                    leave=False, disable=not (self.accelerator.is_main_process and sys.stderr.isatty()))

    def interval(self, loss: torch.Tensor, batch_in_epoch: int, say) -> dict[str, float]:
        """Collective. The logging interval's metrics: mean loss over the ranks, samples/s, training time, and
        where each rank's time went (rank_timing)."""
        return {"train/loss": dist_mean(self.accelerator, loss), "train/samples_per_s": self.throughput(batch_in_epoch),
                "train/seconds": self.run_clock.now(), **self.timing.report(say)}

    def stop_epoch(self) -> None:
        self.run_clock.stop()
        self.epoch_clock.stop()

    def count(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """On the device: no host sync per step."""
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.seen += labels.numel()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluations and checkpoints are not training time."""
        with self.run_clock.paused(), self.epoch_clock.paused():
            yield

    def throughput(self, batch_in_epoch: int) -> float:
        """Training samples/s over this epoch so far (all ranks)."""
        with self.epoch_clock.paused():
            return (batch_in_epoch - self.first_batch) * self.samples_per_batch / max(self.epoch_clock.seconds, 1e-9)

    def epoch_accuracy(self) -> float:
        """Running accuracy (%) over every rank's batches of this epoch."""
        correct, seen = dist_sum(self.accelerator, self.correct, self.seen)
        return 100.0 * correct / max(seen, 1)

    @property
    def train_seconds(self) -> float:
        return self.run_clock.seconds
