"""Exact evaluation: each rank counts its own unpadded shard into a confusion matrix, one all-reduce
sums it. Accuracy is its trace and the samples seen its sum, whatever the number of processes.

The most confident mistakes are chosen the same way: each rank keeps its own top N (on the device,
no host sync per batch) and only those N per rank are gathered, never the data set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from distrnn.data.loaders import eval_batches
from distrnn.data.mnist import Split


@dataclass(frozen=True)
class Evaluation:
    confusion: tuple[tuple[int, ...], ...]  # [true digit][predicted digit], summed over every rank

    @property
    def correct(self) -> int:
        return sum(self.confusion[i][i] for i in range(len(self.confusion)))

    @property
    def seen(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.seen

    def report(self) -> str:
        """The seed notebook's format, e.g. 'Got 9748 / 10000 with accuracy 97.48'."""
        return f"Got {self.correct} / {self.seen} with accuracy {self.percent:.2f}"

    def per_class(self) -> list[dict[str, float | int]]:
        """Per digit: how many there were, how many were recognised (recall), and how many predictions
        of that digit were right (precision), in percent."""
        rows = []
        for digit, row in enumerate(self.confusion):
            predicted = sum(r[digit] for r in self.confusion)
            rows.append({"digit": digit, "support": sum(row), "correct": row[digit],
                         "recall": 100.0 * row[digit] / max(sum(row), 1),
                         "precision": 100.0 * row[digit] / max(predicted, 1)})
        return rows


@dataclass(frozen=True)
class Mistake:
    index: int  # in the evaluated split
    label: int
    prediction: int
    probability: float  # of the (wrong) prediction


class _Counter:
    """Running counts on the device: the confusion matrix and this rank's top-N wrong predictions."""

    def __init__(self, classes: int, keep: int, device: torch.device):
        # float64 one-hot products: exact (counts < 2**53) and deterministic on a GPU, where bincount
        # and index_add_ are not (train.deterministic would refuse them).
        self.confusion = torch.zeros(classes, classes, dtype=torch.float64, device=device)
        self.classes, self.keep = classes, keep
        self.scores = torch.empty(0, device=device)
        self.indices = self.predictions = torch.empty(0, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        probabilities, predictions = F.softmax(logits.float(), dim=1).max(dim=1)
        self.confusion += F.one_hot(labels, self.classes).double().T @ F.one_hot(predictions, self.classes).double()
        if self.keep:
            wrong = torch.where(predictions != labels, probabilities, -1.0)  # right answers can never be chosen
            scores = torch.cat([self.scores, wrong])
            best = torch.topk(scores, min(self.keep, len(scores))).indices
            self.scores = scores[best]
            self.indices, self.predictions = torch.cat([self.indices, index])[best], torch.cat([self.predictions,
                                                                                               predictions])[best]


@torch.no_grad()
def _count(accelerator: Accelerator, model: nn.Module, split: Split, batch_size: int, keep: int) -> _Counter:
    net = accelerator.unwrap_model(model)  # plain module: no DDP collectives on uneven shards
    was_training = net.training
    net.eval()
    counter = _Counter(10, keep, accelerator.device)
    autocast: Callable[[], contextlib.AbstractContextManager] = accelerator.autocast
    for index, images, labels in eval_batches(split, batch_size, accelerator.process_index, accelerator.num_processes):
        with autocast():
            logits = net(images)
        counter.add(logits, labels, index)
    net.train(was_training)
    return counter


def exact_accuracy(accelerator: Accelerator, model: nn.Module, split: Split, batch_size: int) -> Evaluation:
    """The confusion matrix over `split`, identical whatever the number of processes (one all-reduce)."""
    counter = _count(accelerator, model, split, batch_size, keep=0)
    return _sum(accelerator, counter)


def evaluate_with_mistakes(accelerator: Accelerator, model: nn.Module, split: Split, batch_size: int,
                           keep: int) -> tuple[Evaluation, list[Mistake]]:
    """The evaluation and the `keep` most confident mistakes over all ranks (a gather of `keep` per rank)."""
    counter = _count(accelerator, model, split, batch_size, keep)
    evaluation = _sum(accelerator, counter)
    pad = keep - len(counter.scores)  # every rank gathers the same shape
    scores = torch.cat([counter.scores, counter.scores.new_full((pad,), -1.0)])
    indices = torch.cat([counter.indices, counter.indices.new_zeros(pad)])
    predictions = torch.cat([counter.predictions, counter.predictions.new_zeros(pad)])
    scores, indices, predictions = (accelerator.gather(t).tolist() for t in (scores, indices, predictions))
    found = sorted((s, i, p) for s, i, p in zip(scores, indices, predictions) if s >= 0)[::-1][:keep]
    labels = split.labels.tolist()
    return evaluation, [Mistake(i, labels[i], p, s) for s, i, p in found]


def _sum(accelerator: Accelerator, counter: _Counter) -> Evaluation:
    total = accelerator.reduce(counter.confusion.round().to(torch.int64), reduction="sum").tolist()
    return Evaluation(tuple(tuple(row) for row in total))
