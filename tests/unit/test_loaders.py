"""The in-memory loader's sharding and wrap-around, and the exact evaluation shards."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distrnn.data.loaders import MemoryLoader, eval_batches
from distrnn.data.mnist import Split


def numbered(n: int) -> Split:
    """Image i is filled with i % 256 and labelled i, so every batch says which samples it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).reshape(n, 1, 1).expand(n, 28, 28).contiguous()
    return Split(images, torch.arange(n))


def epoch_samples(n: int, batch: int, world: int, epoch: int, seed: int = 0) -> list[list[int]]:
    split = numbered(n)
    per_rank = []
    for rank in range(world):
        loader = MemoryLoader(split, batch, seed, rank, world)
        loader.set_epoch(epoch)
        per_rank.append([int(i) for _, labels in loader for i in labels])
    return per_rank


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), batch=st.integers(1, 64), world=st.integers(1, 5), epoch=st.integers(0, 3))
def test_ranks_cover_every_sample_in_whole_global_batches_with_the_least_wrap_around(n, batch, world, epoch):
    per_rank = epoch_samples(n, batch, world, epoch)
    steps = math.ceil(n / (batch * world))
    assert [len(samples) for samples in per_rank] == [steps * batch] * world  # equal steps, full batches
    assert steps == len(MemoryLoader(numbered(n), batch, 0, 0, world))
    seen = Counter(i for samples in per_rank for i in samples)
    assert set(seen) == set(range(n))  # every sample, every epoch
    assert sum(seen.values()) - n < batch * world  # only the last global batch wraps around


def step_samples(n: int, batch: int, world: int, accumulate: int, epoch: int) -> list[list[int]]:
    """The samples of each optimizer step, over every rank and accumulation step, sorted."""
    split, steps = numbered(n), None
    by_step: dict[int, list[int]] = {}
    for rank in range(world):
        loader = MemoryLoader(split, batch, 0, rank, world, accumulate)
        loader.set_epoch(epoch)
        steps = loader.steps
        for i, (_, labels) in enumerate(loader):
            by_step.setdefault(i // accumulate, []).extend(labels.tolist())
    return [sorted(by_step[s]) for s in range(steps)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), global_batch=st.sampled_from([8, 12, 16, 24, 48]), epoch=st.integers(0, 2),
       layouts=st.data())
def test_each_optimizer_step_trains_on_the_same_samples_whatever_the_layout_of_the_global_batch(n, global_batch,
                                                                                              epoch, layouts):
    """What makes a resume on another number of processes exact: step s covers the same samples for the
    same global batch, however it is split into processes x per-process batch x accumulation."""
    splits = [(w, b, global_batch // (w * b)) for w in range(1, 5) for b in range(1, global_batch + 1)
              if global_batch % (w * b) == 0]
    first, second = layouts.draw(st.sampled_from(splits)), layouts.draw(st.sampled_from(splits))
    assert step_samples(n, first[1], first[0], first[2], epoch) == step_samples(n, second[1], second[0], second[2],
                                                                               epoch)


def test_shuffle_depends_on_seed_and_epoch_only():
    a, b = epoch_samples(1000, 32, 2, epoch=1), epoch_samples(1000, 32, 2, epoch=1)
    assert a == b
    assert epoch_samples(1000, 32, 2, epoch=2) != a
    assert epoch_samples(1000, 32, 2, epoch=1, seed=1) != a
    assert a[0][:5] != sorted(a[0][:5]) or a[0] != sorted(a[0])  # shuffled, not in order


def test_skip_resumes_at_the_next_unseen_batch():
    loader = MemoryLoader(numbered(500), 16, 0, 1, 3)
    loader.set_epoch(4)
    full = [labels.tolist() for _, labels in loader.batches()]
    assert [labels.tolist() for _, labels in loader.batches(skip=5)] == full[5:]


def test_batches_are_uint8_over_255_like_to_tensor():
    split = numbered(300)
    images, labels = next(iter(MemoryLoader(split, 8, 0, 0, 1)))
    for image, label in zip(images, labels):
        assert image.dtype == torch.float32
        assert torch.equal(image, split.images[label].float() / 255)


@pytest.mark.parametrize("n, world, batch", [(1001, 1, 64), (1001, 2, 64), (1001, 3, 7), (5, 8, 2), (10_000, 3, 1000)])
def test_eval_shards_count_every_sample_exactly_once(n, world, batch):
    split = numbered(n)
    seen = Counter()
    for rank in range(world):
        for index, _, labels in eval_batches(split, batch, rank, world):
            assert len(labels) <= batch and torch.equal(index, labels)  # sample i is labelled i
            seen.update(labels.tolist())
    assert seen == Counter(range(n))


@pytest.mark.parametrize("n, batch, world, accumulate",
                         [(1000, 32, 1, 4), (1000, 32, 2, 3), (77, 8, 3, 2), (5, 4, 2, 3)])
def test_with_accumulation_every_optimizer_step_sees_a_full_global_batch(n, batch, world, accumulate):
    split = numbered(n)
    loaders = [MemoryLoader(split, batch, 0, rank, world, accumulate) for rank in range(world)]
    sizes = [[len(labels) for _, labels in loader] for loader in loaders]
    assert len({len(s) for s in sizes}) == 1 and len(sizes[0]) % accumulate == 0  # whole optimizer steps
    assert all(size == batch for s in sizes for size in s)  # full batches: accumulate x batch per step
    seen = {int(i) for loader in loaders for _, labels in loader for i in labels}
    assert seen == set(range(n))
    full = [labels.tolist() for _, labels in loaders[0].batches()]
    assert [labels.tolist() for _, labels in loaders[0].batches(skip=accumulate)] == full[accumulate:]  # resume


def test_the_validation_holdout_is_seeded_disjoint_and_never_trained_on():
    from distrnn.data.loaders import hold_out

    split = numbered(1000)
    keep, held = hold_out(len(split), 100, seed=0)
    train, val = split.take(keep), split.take(held)
    assert len(val) == 100 and len(train) == 900
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert set(train.labels.tolist()) | set(val.labels.tolist()) == set(range(1000))
    assert torch.equal(hold_out(1000, 100, seed=0)[1], held)  # the same holdout every start
    assert not torch.equal(hold_out(1000, 100, seed=1)[1], held)
    trained = {int(i) for _, labels in MemoryLoader(train, 64, 0, 0, 1) for i in labels}
    assert trained.isdisjoint(val.labels.tolist())
