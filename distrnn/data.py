"""MNIST through torchvision: the training loader (sharded by Accelerate) and exact eval loaders."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset
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


def load_mnist(data_dir: str, train: bool, accelerator: Accelerator) -> Dataset:
    """The main process downloads if the files are missing; the others wait, then load."""
    root = Path(data_dir).expanduser()
    with accelerator.main_process_first():
        try:
            return datasets.MNIST(str(root), train=train, transform=transforms.ToTensor(), download=True)
        except (OSError, RuntimeError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistrnnError(_missing_message(root, f"download failed: {first_line}")) from None


def first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None else Subset(dataset, range(min(n, len(dataset))))


def train_loader(cfg: Config, dataset: Dataset) -> DataLoader:
    """Unsharded; accelerator.prepare shards it (same number of steps on every rank)."""
    return DataLoader(
        first(dataset, cfg.data.train_samples),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
    )


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0) -> DataLoader:
    """This rank's disjoint, unpadded shard, in order: counts summed over ranks are exact."""
    shard = Subset(dataset, shard_indices(len(dataset), rank, world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
