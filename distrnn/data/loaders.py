"""Batches: the two training data paths, and the exact (unpadded) evaluation shards.

- `memory` (default): the decoded uint8 tensors (47 MB for the training set) live on the device;
  each epoch is a seeded permutation, each rank a disjoint slice of it, batches are slices.
  Measured here: the PIL path costs about a quarter of the seed's training time.
- `torchvision`: the seed's path, a DataLoader over torchvision's MNIST with PIL `ToTensor` per
  sample, sharded by `accelerator.prepare` (seeded shuffle per epoch, same steps on every rank).
Both feed the model identical float values (uint8 / 255, exactly what ToTensor computes) in the
same order for one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from distrnn.config.schema import Config
from distrnn.data.mnist import Split, ensure_downloaded, load_split
from distrnn.ranks.collectives import agree, shard_indices
from distrnn.testing import faults

Batch = tuple[torch.Tensor, torch.Tensor]


def eval_batches(split: Split, batch_size: int, rank: int,
                 world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, images, labels) of this rank's disjoint, unpadded shard, in order: counts summed over
    ranks are exact."""
    r = shard_indices(len(split), rank, world_size)
    index = torch.arange(len(r), device=split.labels.device) * r.step + r.start  # empty when rank >= len(split)
    for i in range(0, len(index), batch_size):
        yield index[i : i + batch_size], *split.batch(index[i : i + batch_size])


def hold_out(size: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices into a pool of `size`: n drawn with `seed`, never trained on; both
    in the pool's order, the same on every rank and at every start."""
    held = torch.zeros(size, dtype=torch.bool)
    held[torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


class MemoryLoader:
    """Seeded, sharded batches sliced from tensors on the device.

    Written by hand because no library loader keeps the data on the device; it keeps what Accelerate's
    prepared loader guarantees (the shuffle depends only on (seed, epoch), ranks get disjoint slices, every
    rank runs the same number of steps, the end wraps around to the start of the permutation as
    even_batches does) and one thing no loader does: with the global batch G = batch_size x processes x
    accumulate held fixed, optimizer step s of an epoch trains on the same G samples whatever the number of
    processes and the split of G into per-process batch and accumulation. Step s is positions
    [s*G, (s+1)*G) of the epoch's permutation, extended by wrapping around to whole global batches (fewer
    than G repeats an epoch); micro-batch i of rank r is the chunk i*processes + r of it. That is what
    makes a resume on another number of processes exact (distrnn.run.layout.resume_layout).
    """

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int, world_size: int, accumulate: int = 1):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate
        self.epoch = 0
        self.global_batch = batch_size * world_size * accumulate
        self.steps = math.ceil(len(split) / self.global_batch)  # optimizer steps an epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches an epoch on this rank (accumulation steps included)."""
        return self.steps * self.accumulate

    def order(self) -> torch.Tensor:
        """The epoch's training order over all ranks: a seeded permutation, wrapped to whole global batches."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.split), generator=generator)
        total = self.steps * self.global_batch  # repeated, not sliced: there may be fewer samples than G
        return order.repeat(math.ceil(total / len(order)))[:total]

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        order = self.order().to(self.split.labels.device)
        for i in range(skip, len(self)):
            start = (i * self.world_size + self.rank) * self.batch_size
            index = order[start : start + self.batch_size]
            faults.record_micro_batch(index)
            yield self.split.batch(index)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


def torchvision_loader(data_dir: str, indices: list[int], batch_size: int, num_workers: int):
    """The seed's DataLoader (PIL + ToTensor per sample) over `indices` of the training set, still to be
    prepared (sharded) by Accelerate."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(data_dir, train=True, transform=transforms.ToTensor(), download=False)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=True, num_workers=num_workers)


@dataclass(frozen=True)
class RunData:
    """What a run reads: the training images (on the host), their indices into the training file (the
    torchvision loader reads the file itself), the validation holdout and the test split (on the device)."""

    train: Split
    train_indices: torch.Tensor
    val: Split | None
    test: Split


def load_run_data(accelerator: Accelerator, cfg: Config) -> RunData:
    """Collective. One process per node downloads missing files; then every rank reads and checks its own
    copy (node-local disks can differ), and identical errors are printed once."""
    data, device = cfg.data, accelerator.device
    agree(accelerator, lambda: ensure_downloaded(data.dir), here=accelerator.is_local_main_process)
    train_set, test_set = agree(accelerator, lambda: (load_split(data.dir, True), load_split(data.dir, False)))
    pool = train_set.first(data.train_samples)
    train_indices, held = hold_out(len(pool), data.val_samples, cfg.train.seed)
    val = pool.take(held).to(device) if data.val_samples else None
    return RunData(pool.take(train_indices), train_indices, val, test_set.first(data.test_samples).to(device))


def make_train_loader(accelerator: Accelerator, cfg: Config, data: RunData):
    """This rank's training batches: a MemoryLoader, or the torchvision DataLoader prepared (sharded) by
    Accelerate. Both have len() (batches an epoch) and set_epoch()."""
    if cfg.data.loader == "memory":
        return MemoryLoader(data.train.to(accelerator.device), cfg.train.batch_size, cfg.train.seed,
                            accelerator.process_index, accelerator.num_processes, cfg.train.grad_accum_steps)
    return accelerator.prepare(torchvision_loader(cfg.data.dir, data.train_indices.tolist(), cfg.train.batch_size,
                                                  cfg.data.num_workers))


def epoch_batches(accelerator: Accelerator, loader, epoch: int, skip: int):
    """This rank's batches of `epoch` from batch `skip` on (a mid-epoch resume continues at the next unseen one)."""
    loader.set_epoch(epoch)  # the shuffle is a function of (seed, epoch)
    if isinstance(loader, MemoryLoader):
        return loader.batches(skip)
    return accelerator.skip_first_batches(loader, skip) if skip else loader
