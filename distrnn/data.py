"""MNIST: loading the IDX files once, the two training data paths, and exact evaluation batches.

- `torchvision`: the seed's path, a DataLoader over torchvision's MNIST with PIL `ToTensor` per
  sample, sharded by `accelerator.prepare` (seeded shuffle per epoch, same steps on every rank).
- `memory`: the decoded uint8 tensors (47 MB for the training set) live on the device; each epoch
  is a seeded permutation, each rank a disjoint slice of it, batches are slices. Measured here: the
  PIL path costs about a quarter of the seed's training time.
Both feed the model identical float values (uint8 / 255, exactly what ToTensor computes).
"""

from __future__ import annotations

import contextlib
import io
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
from distrnn.errors import DistrnnError, first_line

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 dimensions / 1 dimension


def _split_files(raw: Path, train: bool) -> tuple[Path, Path]:
    prefix = "train" if train else "t10k"
    return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"


def _header(path: Path, size: int) -> list[int]:
    with path.open("rb") as f:
        header = f.read(size)
    if len(header) < size:
        raise DistrnnError(f"MNIST file {path} is truncated ({len(header)} bytes, shorter than its header); "
                           "replace it with a complete copy")
    return [int.from_bytes(header[i : i + 4], "big") for i in range(0, size, 4)]


def check_files(raw: Path, train: bool) -> None:
    """Refuse damaged IDX files with one line naming the file, before torchvision trips over them."""
    images, labels = _split_files(raw, train)
    magic, n_images, rows, cols = _header(images, 16)
    if magic != IMAGES_MAGIC:
        raise DistrnnError(f"MNIST file {images} has magic number {magic}, not {IMAGES_MAGIC}: it is not an "
                           "uncompressed IDX image file (gunzip it, or replace it)")
    if (rows, cols) != (28, 28):
        raise DistrnnError(f"MNIST file {images} holds {rows}x{cols} images, not 28x28; replace it")
    expected = 16 + n_images * rows * cols
    if images.stat().st_size != expected:
        raise DistrnnError(f"MNIST file {images} is {images.stat().st_size} bytes but its header promises "
                           f"{n_images} images ({expected} bytes): it is truncated or damaged; replace it")
    magic, n_labels = _header(labels, 8)
    if magic != LABELS_MAGIC:
        raise DistrnnError(f"MNIST file {labels} has magic number {magic}, not {LABELS_MAGIC}: it is not an "
                           "uncompressed IDX label file (gunzip it, or replace it)")
    values = labels.read_bytes()[8:]
    if len(values) != n_labels:
        raise DistrnnError(f"MNIST file {labels} is {8 + len(values)} bytes but its header promises {n_labels} "
                           "labels: it is truncated or damaged; replace it")
    if n_labels != n_images:
        raise DistrnnError(f"MNIST files disagree: {images.name} has {n_images} images but {labels.name} has "
                           f"{n_labels} labels; replace them with a matching pair")
    if n_images == 0:
        raise DistrnnError(f"MNIST file {images} holds no images; replace it")
    if max(values) > 9:
        raise DistrnnError(f"MNIST file {labels} has a label {max(values)} (labels must be 0-9); replace it")


def load_mnist(data_dir: str, train: bool, accelerator: Accelerator) -> datasets.MNIST:
    """The main process downloads if files are missing; the others wait, then load."""
    root = Path(data_dir).expanduser()
    raw = root / "MNIST" / "raw"
    with accelerator.main_process_first():
        missing = [name for name in RAW_FILES if not (raw / name).is_file()]
        if missing:
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):  # torchvision prints each mirror it tries
                    datasets.MNIST(str(root), train=train, download=True)
            except Exception as e:
                # The last mirror's error (e.g. "Name or service not known") says more than the exception.
                lines = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
                reason = lines[-1] if lines else first_line(e)
                raise DistrnnError(
                    f"MNIST not found in {raw} (missing {', '.join(missing)}; download failed: {reason}); "
                    f"put the four uncompressed IDX files ({', '.join(RAW_FILES)}) there, or point --data-dir "
                    "or DISTRNN_DATA_DIR at a folder holding MNIST/raw"
                ) from None
        check_files(raw, train)
        return datasets.MNIST(str(root), train=train, transform=transforms.ToTensor(), download=False)


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
