"""MNIST's four IDX files: checked, read into tensors, downloaded when missing.

Read here with the standard library and torch rather than through torchvision: the memory data
path needs nothing else from torchvision, and importing it costs 1-3 s (torchvision.ops pulls in
the compile stack). The tensors are exactly torchvision's `MNIST(...).data` and `.targets`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from distrnn.errors import DistrnnError

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 dimensions / 1 dimension


def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser() / "MNIST" / "raw"


def split_files(raw: Path, train: bool) -> tuple[Path, Path]:
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
    """Refuse damaged IDX files with one line naming the file."""
    images, labels = split_files(raw, train)
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


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor of the shape its header gives."""
    data = path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def download(data_dir: str | Path, missing: list[str]) -> None:
    """torchvision's downloader (its mirrors and checksums) into a folder of this process's own, then each
    missing file renamed into MNIST/raw once all four pass check_files; one line if it cannot.

    Several processes may download at once (each node's local main process, on a file system they share):
    torchvision writes and extracts in place, so one process found another's file half written (or
    truncated it while the other read it). Here each downloads alone, and a rename, atomic on local
    disks, NFS and Lustre, puts a complete file in place; a file already there is not touched."""
    raw = raw_dir(data_dir)
    own = raw.parent / f".download-{socket.gethostname()}-{os.getpid()}"  # unique per process: the full host name
    try:
        _fetch(own, missing, raw)
        for train in (True, False):
            check_files(raw_dir(own), train)
        for name in missing:
            os.replace(raw_dir(own) / name, raw / name)
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _fetch(root: Path, missing: list[str], raw: Path) -> None:
    """All four files into root/MNIST/raw."""
    from torchvision import datasets

    printed = io.StringIO()
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(printed):  # torchvision prints each mirror it tries
            for train in (True, False):
                datasets.MNIST(str(root), train=train, download=True)
    except Exception as e:
        # The last mirror's error (e.g. "<urlopen error [Errno 111] Connection refused>") says why; the
        # first line ("Error downloading train-images-idx3-ubyte.gz:") does not.
        lines = [line.strip() for line in (printed.getvalue() + str(e)).splitlines() if line.strip()]
        reason = (lines[-1] if lines else type(e).__name__)[:80]
        raise DistrnnError(f"MNIST not found in {raw} ({len(missing)} of 4 IDX files missing; download failed: "
                           f"{reason}); put them there or point --data-dir at a folder holding MNIST/raw") from None


@dataclass
class Split:
    """One MNIST split as tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def first(self, n: int | None) -> Split:
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def take(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1]: uint8 / 255, exactly what ToTensor computes."""
        return self.images[index].float().div_(255), self.labels[index]


def ensure_downloaded(data_dir: str | Path) -> None:
    """Download the files that are missing, if any; reads nothing (call on one process per node)."""
    missing = [name for name in RAW_FILES if not (raw_dir(data_dir) / name).is_file()]
    if missing:
        download(data_dir, missing)


def load_split(data_dir: str | Path, train: bool) -> Split:
    """A checked split, downloaded first if files are missing (call on one process at a time)."""
    ensure_downloaded(data_dir)
    raw = raw_dir(data_dir)
    check_files(raw, train)
    images, labels = split_files(raw, train)
    return Split(read_idx(images), read_idx(labels).long())
