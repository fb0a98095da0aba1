"""MNIST: loading the IDX files once, the two training data paths, and exact evaluation batches.

- `torchvision`: the seed's path, a DataLoader over torchvision's MNIST with PIL `ToTensor` per
  sample, sharded by `accelerator.prepare` (seeded shuffle per epoch, same steps on every rank).
- `memory`: the decoded uint8 tensors (47 MB for the training set) live on the device; each epoch
  is a seeded permutation, each rank a disjoint slice of it, batches are slices. Measured here: the
  PIL path costs about a quarter of the seed's training time.
Both feed the model identical float values (uint8 / 255, exactly what ToTensor computes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from distrnn.config import Config
from distrnn.distributed import shard_indices
from distrnn.errors import DistrnnError

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _missing_message(root: Path, reason: str) -> str:
    return (
        f"MNIST not found in {root / 'MNIST' / 'raw'} ({reason}); put the four IDX files "
        f"({', '.join(RAW_FILES)}) there, or point --data-dir / DISTRNN_DATA_DIR at a folder holding MNIST/raw"
    )


def load_mnist(data_dir: str, train: bool, accelerator: Accelerator) -> datasets.MNIST:
    """The main process downloads if the files are missing; the others wait, then load."""
    root = Path(data_dir).expanduser()
    with accelerator.main_process_first():
        try:
            return datasets.MNIST(str(root), train=train, transform=transforms.ToTensor(), download=True)
        except (OSError, RuntimeError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistrnnError(_missing_message(root, f"download failed: {first_line}")) from None


@dataclass
class Split:
    """One MNIST split as tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, dataset: datasets.MNIST, n: int | None = None) -> Split:
        n = len(dataset.data) if n is None else min(n, len(dataset.data))
        return cls(dataset.data[:n], dataset.targets[:n].long())

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(255), self.labels[index]


def eval_batches(split: Split, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's disjoint, unpadded shard, in order: counts summed over ranks are exact."""
    r = shard_indices(len(split), rank, world_size)
    index = torch.arange(r.start, r.stop, r.step, device=split.labels.device)
    for i in range(0, len(index), batch_size):
        yield split.batch(index[i : i + batch_size])


class MemoryLoader:
    """Seeded, sharded batches sliced from tensors on the device.

    Written by hand because no library loader keeps the data on the device; it mirrors what
    Accelerate's prepared loader guarantees: the shuffle depends only on (seed, epoch), ranks get
    disjoint slices, and every rank runs the same number of steps (the last round wraps around to
    the start of the permutation, as even_batches does).
    """

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int, world_size: int):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = math.ceil(len(split) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.split), generator=generator)
        order = torch.cat([order, order[: self.per_rank * self.world_size - len(order)]])
        mine = order[self.rank :: self.world_size].to(self.split.labels.device)
        for i in range(skip * self.batch_size, len(mine), self.batch_size):
            yield self.split.batch(mine[i : i + self.batch_size])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()


def train_loader(cfg: Config, dataset: datasets.MNIST, accelerator: Accelerator) -> DataLoader | MemoryLoader:
    """The training batches for this rank, per `data.loader`."""
    if cfg.data.loader == "memory":
        split = Split.of(dataset, cfg.data.train_samples).to(accelerator.device)
        return MemoryLoader(split, cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                            accelerator.num_processes)
    n = len(dataset) if cfg.data.train_samples is None else min(cfg.data.train_samples, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=cfg.train.batch_size, shuffle=True,
                        num_workers=cfg.data.num_workers)
    return accelerator.prepare(loader)  # shards it: same number of steps on every rank


def epoch_batches(accelerator: Accelerator, loader: DataLoader | MemoryLoader, epoch: int, skip: int):
    """The batches of `epoch`, starting after the first `skip` (a mid-epoch resume)."""
    loader.set_epoch(epoch)
    if isinstance(loader, MemoryLoader):
        return loader.batches(skip)
    return accelerator.skip_first_batches(loader, skip) if skip else loader
