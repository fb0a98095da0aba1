"""MNIST downloaded by several processes at once into one data folder (several nodes' local main processes on
a shared file system), from a fake source: torchvision's downloader pointed at a local HTTP mirror."""

from __future__ import annotations

import functools
import gzip
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from distrnn.data import mnist
from tests.helpers import process_env

# One process's load: torchvision's MNIST pointed at the fake mirror; with a pause folder, the extraction of
# t10k-labels (the last file) waits, once it has opened its output, until PAUSE/go exists (a slow disk).
LOADER = """
import os, sys, time
from torchvision import datasets
from torchvision.datasets import utils
from distrnn.data import mnist
data, mirror, md5s, pause = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
datasets.MNIST.mirrors = [mirror]
datasets.MNIST.resources = [(f"{name}.gz", md5) for name, md5 in zip(mnist.RAW_FILES, md5s)]
opener = utils._COMPRESSED_FILE_OPENERS[".gz"]

class SlowRead:
    def __init__(self, path, mode):
        self.inner = opener(path, mode)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.inner.close()
    def read(self):
        open(os.path.join(pause, "paused"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(pause, "go")) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.inner.read()

if pause != "-":
    utils._COMPRESSED_FILE_OPENERS[".gz"] = lambda path, mode: (
        SlowRead if str(path).endswith("t10k-labels-idx1-ubyte.gz") else opener)(path, mode)
train, test = mnist.load_split(data, True), mnist.load_split(data, False)
print("loaded", len(train), len(test), flush=True)
"""


def fake_mnist(folder: Path) -> dict[str, bytes]:
    """Small valid IDX files (12 train, 7 test images), gzipped into `folder` as a mirror serves them."""
    folder.mkdir()
    files = {}
    for prefix, n in (("train", 12), ("t10k", 7)):
        files[f"{prefix}-images-idx3-ubyte"] = b"".join(
            v.to_bytes(4, "big") for v in (mnist.IMAGES_MAGIC, n, 28, 28)) + bytes(range(256)) * 3 * n + bytes(16 * n)
        files[f"{prefix}-labels-idx1-ubyte"] = b"".join(
            v.to_bytes(4, "big") for v in (mnist.LABELS_MAGIC, n)) + bytes(i % 10 for i in range(n))
    for name, content in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(content))
    return files


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path) -> Iterator[tuple[Path, str, dict[str, bytes]]]:
    """The fake MNIST's folder, the URL serving it, and the uncompressed files."""
    folder = tmp_path / "mirror"
    files = fake_mnist(folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/", files
    server.shutdown()
    thread.join(timeout=10)


def loader(data: Path, mirror: tuple[Path, str, dict[str, bytes]], pause: Path | None) -> subprocess.Popen:
    folder, url, _ = mirror
    md5s = ",".join(hashlib.md5((folder / f"{name}.gz").read_bytes()).hexdigest() for name in mnist.RAW_FILES)
    return subprocess.Popen([sys.executable, "-c", LOADER, str(data), url, md5s,
                             str(pause) if pause else "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=process_env(None))


def test_processes_downloading_at_once_each_see_complete_verified_files(tmp_path, mirror):
    """One process is slow writing the last file when another loads. Before: both extracted into MNIST/raw
    itself, and the second found all four files there, one of them still empty: "MNIST file
    .../t10k-labels-idx1-ubyte is truncated (0 bytes, shorter than its header)"."""
    files, data, pause = mirror[2], tmp_path / "data", tmp_path / "pause"
    pause.mkdir()
    slow = loader(data, mirror, pause)
    try:
        deadline = time.monotonic() + 120
        while not (pause / "paused").exists():
            assert slow.poll() is None, slow.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the slow download did not reach its last file"
            time.sleep(0.02)
        quick = loader(data, mirror, None)
        out, err = quick.communicate(timeout=120)
        assert (quick.returncode, out.strip()) == (0, "loaded 12 7"), err[-3000:]
    finally:
        (pause / "go").touch()
        out, err = slow.communicate(timeout=120)
    assert (slow.returncode, out.strip()) == (0, "loaded 12 7"), err[-3000:]
    raw = mnist.raw_dir(data)
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == files  # nothing else left there
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]  # no download folder left behind
