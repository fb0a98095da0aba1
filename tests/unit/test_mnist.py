"""MNIST's files: damaged IDX files are named in one line; the reader equals torchvision's."""

from __future__ import annotations

import pytest
import torch

from distrnn.data import mnist
from distrnn.errors import DistrnnError
from tests.helpers import header, replace


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("train-images-idx3-ubyte", header(2051, 60000, 28, 28) + bytes(1000),
         "train-images-idx3-ubyte is 1016 bytes but its header promises 60000 images (47040016 bytes): "
         "it is truncated or damaged; replace it"),
        ("train-images-idx3-ubyte", b"\x1f\x8b\x08\x00" + bytes(100),
         "train-images-idx3-ubyte has magic number 529205248, not 2051: it is not an uncompressed IDX image file"),
        ("train-labels-idx1-ubyte", header(2049, 59999) + bytes(59999),
         "MNIST files disagree: train-images-idx3-ubyte has 60000 images but train-labels-idx1-ubyte has 59999 labels"),
        ("train-labels-idx1-ubyte", header(2049, 60000) + bytes(59999) + b"\x0c",
         "train-labels-idx1-ubyte has a label 12 (labels must be 0-9); replace it"),
        ("train-labels-idx1-ubyte", header(2049, 60000) + bytes(10),
         "train-labels-idx1-ubyte is 18 bytes but its header promises 60000 labels"),
        ("train-images-idx3-ubyte", b"\x00\x00",
         "train-images-idx3-ubyte is truncated (2 bytes, shorter than its header)"),
    ],
    ids=["truncated", "gzip-not-gunzipped", "count-mismatch", "label-out-of-range", "labels-truncated", "empty-file"],
)
def test_damaged_idx_files_are_named(raw_copy, name, content, expected):
    replace(raw_copy, name, content)
    with pytest.raises(DistrnnError) as e:
        mnist.check_files(raw_copy, train=True)
    assert expected in str(e.value)


def test_real_files_pass_the_checks(data_dir):
    for train in (True, False):
        mnist.check_files(data_dir / "MNIST" / "raw", train)




def test_reader_equals_torchvision(data_dir):
    from torchvision import datasets

    for train in (True, False):
        ours = mnist.load_split(data_dir, train)
        theirs = datasets.MNIST(str(data_dir), train=train, download=False)
        assert torch.equal(ours.images, theirs.data) and torch.equal(ours.labels, theirs.targets)
        assert ours.images.dtype == torch.uint8 and ours.labels.dtype == torch.int64
