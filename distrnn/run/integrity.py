"""Files that can be trusted: written durably, each one's size and checksum recorded, verified before use,
and set aside (never deleted) when damaged. Used for checkpoints (the record is in their meta.json) and for
the final model files (RUN/manifest.json, and best/manifest.json).

Durable: a rename can reach the disk before the data of the files it names (a node crash left a newest
checkpoint whose model.safetensors was empty, its name in place). So every file, then its folder, are
fsynced before a checkpoint is published by its rename, and the parent folder after it.

Checksum: XXH3-64 (xxhash). Measured on this machine (AMD EPYC, 2 cores) on the
reference model's 3.3 MB checkpoint, in memory: XXH3-64 0.07 ms, CRC-32C 0.13 ms, zlib's CRC-32 0.72 ms,
SHA-256 1.87 ms, against ~10 ms for the save itself without fsyncs (benchmarks/checkpoint_cost.py): only
the first two stay under the 5% allowed. A 64-bit hash misses a random change with odds of 2^-64; it is not
a defence against someone who wants to forge a file, which is not the risk here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

from distrnn.testing import faults

DAMAGED_PREFIX = ".damaged-"  # what set_aside puts before a damaged file's or folder's name (folder.py lists them)
CHUNK = 1 << 20  # read in 1 MiB pieces (faster here than one read or an mmap: 0.2 ms for a 3.3 MB checkpoint)


class Damaged(Exception):
    """A file is missing, unreadable, or not what was recorded when it was written (the message says which)."""


def checksum(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return f"xxh3_64:{digest.hexdigest()}"


def describe(path: Path) -> dict[str, Any]:
    """{"size", "checksum"} of one file, as verify compares them."""
    return {"size": path.stat().st_size, "checksum": checksum(path)}


def record(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: describe(file)} of every file under `folder` but `leave_out`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in leave_out)
    return {str(p.relative_to(folder)): describe(p) for p in files}


def verify(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raise Damaged naming the first file that is missing, unreadable or unlike its record."""
    for name, expected in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != expected["size"]:
                raise Damaged(f"{name} is {size} bytes, {expected['size']} when it was written")
            if checksum(path) != expected["checksum"]:
                raise Damaged(f"{name} does not match its checksum (changed after it was written)")
        except FileNotFoundError:
            raise Damaged(f"{name} is missing") from None
        except OSError as e:
            raise Damaged(f"{name} cannot be read ({e.strerror or e})") from None


def damage(folder: Path, record_file: Path) -> str | None:
    """What is wrong with `folder`, whose files `record_file` (JSON, "files": record(...)) describes; None when
    every file is as recorded. A record without "files" is wrong too: distrnn writes them with every checkpoint,
    so such a file was edited (or is older than the checksums), and passing it would verify nothing."""
    try:
        files = json.loads(record_file.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as e:
        return f"{record_file.name} cannot be read ({getattr(e, 'strerror', None) or e})"
    if files is None:
        return f"{record_file.name} records no file sizes and checksums, which distrnn writes with every checkpoint"
    try:
        verify(folder, files)
    except Damaged as e:
        return str(e)
    return None


def fsync_file(path: Path) -> None:
    faults.slow_open()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: Path) -> None:
    """The folder's entries (names, renames) onto the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then every folder, deepest first, `folder` last."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in paths:
        if path.is_file():
            fsync_file(path)
    for path in paths:
        if path.is_dir():
            fsync_folder(path)
    fsync_folder(folder)


def umask() -> int:
    """This process's umask, read without setting it (os.umask can only swap it, and a thread creating a file
    in between, W&B's, would get the wrong mode): Linux's /proc/self/status; elsewhere 022, the usual one."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0o022
    found = [line.split()[1] for line in status.splitlines() if line.startswith("Umask:")]
    return int(found[0], 8) if found else 0o022


def give_ordinary_mode(path: Path) -> None:
    """The mode open() gives a new file (0644 under umask 022). safetensors writes through a temporary file,
    created 0600, and renames it: readable by its owner alone, a teammate could not evaluate it."""
    os.chmod(path, 0o666 & ~umask())


def set_aside(path: Path) -> Path:
    """Rename `path` to .damaged-<name> beside it (never deleted: a person may want to look at it)."""
    target = path.with_name(f"{DAMAGED_PREFIX}{path.name}")
    n = 2
    while target.exists():
        target, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}"), n + 1
    os.replace(path, target)
    fsync_folder(path.parent)
    return target
