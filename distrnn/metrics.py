"""Exact accuracy: each rank counts its own unpadded shard, one all-reduce sums the counts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from distrnn.distributed import dist_sum
from distrnn.loaders import Batch, eval_batches
from distrnn.mnist import Split


@dataclass(frozen=True)
class Accuracy:
    correct: int
    seen: int

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.seen

    def report(self) -> str:
        """The seed notebook's format, e.g. 'Got 9748 / 10000 with accuracy 97.48'."""
        return f"Got {self.correct} / {self.seen} with accuracy {self.percent:.2f}"


@torch.no_grad()
def count_correct(model: nn.Module, batches: Iterable[Batch],
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> tuple[int, int]:
    """(correct, seen) over `batches`; counted on the device, read once at the end."""
    was_training = model.training
    model.eval()
    correct, seen = None, 0
    for images, labels in batches:
        with autocast():
            hits = (model(images).argmax(dim=1) == labels).sum()
        correct = hits if correct is None else correct + hits
        seen += labels.numel()
    model.train(was_training)
    return (int(correct) if correct is not None else 0), seen


def exact_accuracy(accelerator: Accelerator, model: nn.Module, split: Split, batch_size: int) -> Accuracy:
    """Global (correct, seen) over `split`, identical whatever the number of processes."""
    net = accelerator.unwrap_model(model)  # plain module: no DDP collectives on uneven shards
    batches = eval_batches(split, batch_size, accelerator.process_index, accelerator.num_processes)
    correct, seen = count_correct(net, batches, accelerator.autocast)
    return Accuracy(*dist_sum(accelerator, correct, seen))
