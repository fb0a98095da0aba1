"""Evaluations of the model being trained: during training (the validation holdout when there is one,
else test, as the seed does), the final test with its most confident mistakes, and the training set.

The counting itself is distrnn.evaluation.counting (exact: unpadded shards, one all-reduce); this module decides
what is evaluated when, keeps the results, and names their metrics once.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any, Protocol

from accelerate import Accelerator
from torch import nn

from distrnn.data.mnist import Split
from distrnn.evaluation.counting import Evaluation, Mistake, evaluate_with_mistakes, exact_accuracy


class Pausable(Protocol):
    """The worker's progress clock (distrnn.worker.progress.Progress), seen from here: evaluation time is paused
    out of the training throughput. A protocol, so that evaluation never imports the worker above it."""

    def paused(self) -> AbstractContextManager[None]: ...


MISTAKES = 25  # the most confident mistakes of the final test evaluation kept for errors.png and W&B (a 5x5 grid)


def logged_accuracy(name: str, evaluation: Evaluation) -> dict[str, Any]:
    """The logged form of an evaluation of split `name` (val, test, train)."""
    return {f"{name}/accuracy": evaluation.percent, f"{name}/correct": evaluation.correct,
            f"{name}/seen": evaluation.seen}


def best_validation(history: list[dict[str, Any]]) -> tuple[float, int] | None:
    """(accuracy, step) of the best validation in `history` (the earliest of equals)."""
    scores = [(h["val_accuracy"], -h["step"]) for h in history if "val_accuracy" in h]
    return (max(scores)[0], -max(scores)[1]) if scores else None


def patience_exhausted(history: list[dict[str, Any]], patience: int | None) -> bool:
    """`patience` validations in a row, after the best, were not better."""
    best = best_validation(history)
    if patience is None or best is None:
        return False
    return sum(1 for h in history if "val_accuracy" in h and h["step"] > best[1]) >= patience


class Evaluator:
    """Collectives: `during_training`, `final_test` and `training_set` are collective (every rank calls
    them: exact_accuracy's all-reduce, and the gather of each rank's top mistakes); the rest are local.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, batch_size: int, val_set: Split | None,
                 test_set: Split, progress: Pausable):
        self.accelerator, self.model, self.batch_size = accelerator, model, batch_size
        self.val_set, self.test_set, self.progress = val_set, test_set, progress
        self.last_test: Evaluation | None = None  # the test evaluation after the last epoch, if training made one
        self.mistakes: list[Mistake] = []  # of the final test evaluation
        self.seconds = 0.0  # spent evaluating since this start (the benchmark weighs it against training)

    @property
    def name(self) -> str:
        """What training is evaluated on: the validation holdout when there is one, else test (the seed's way)."""
        return "val" if self.val_set is not None else "test"

    def during_training(self, last: bool) -> Evaluation:
        """The evaluation after an epoch or every train.eval_every steps; the one after the last epoch, on
        test (no holdout), is the final test and keeps the mistakes."""
        if self.val_set is not None:
            return self._count(self.val_set)
        evaluation = self._count(self.test_set, mistakes=last)
        if last:
            self.last_test = evaluation
        return evaluation

    def final_test(self) -> Evaluation:
        """The final test evaluation: the one made after the last epoch, else (a holdout, or a finished run
        resumed) made now, with the mistakes."""
        if self.last_test is None:
            self.last_test = self._count(self.test_set, mistakes=True)
        return self.last_test

    def training_set(self, split: Split) -> Evaluation:
        return self._count(split.to(self.accelerator.device))

    def mistake_pictures(self) -> list[tuple[Any, Mistake]]:
        """(28x28 uint8 pixels, mistake) for errors.png and the trackers."""
        return [(self.test_set.images[m.index].cpu().numpy(), m) for m in self.mistakes]

    def _count(self, split: Split, mistakes: bool = False) -> Evaluation:
        start = time.perf_counter()
        with self.progress.paused():
            if mistakes:
                evaluation, self.mistakes = evaluate_with_mistakes(self.accelerator, self.model, split,
                                                                   self.batch_size, MISTAKES)
            else:
                evaluation = exact_accuracy(self.accelerator, self.model, split, self.batch_size)
        self.seconds += time.perf_counter() - start
        return evaluation


def summary_counts(train: Evaluation | None, test: Evaluation) -> dict[str, Any]:
    """The counts of summary.json; train_* are null when train.eval_train_set is off."""
    counts = (train.percent, train.correct, train.seen) if train is not None else (None,) * 3
    return {**dict(zip(("train_accuracy", "train_correct", "train_seen"), counts)),
            "test_accuracy": test.percent, "test_correct": test.correct, "test_seen": test.seen,
            "test_per_class": test.per_class(), "test_confusion": [list(row) for row in test.confusion]}


def validation_summary(history: list[dict[str, Any]], ended_early: bool, best_folder: Any | None) -> dict[str, Any]:
    """summary.json's validation part: the best accuracy and its step, whether early stopping ended the run, and
    the best model's folder (checkpoint.keep_best)."""
    best = best_validation(history)
    return {"best_val_accuracy": best[0] if best else None, "best_val_step": best[1] if best else None,
            "early_stopped": ended_early, "best_model": str(best_folder) if best and best_folder else None}
