"""What a rank that a signal kills leaves behind: its last collectives and its Python stacks, for its launcher.

A rank that gloo aborts (a collective called with another shape: "Received data size doesn't match expected
size", then SIGABRT), or that crashes in C++ (SIGSEGV, SIGBUS), runs no Python after the signal: it can neither
publish its state nor write the hang report, and its last heartbeat (up to a second old) predates the collective
it died in. So each worker of a launcher writes, while it runs:

- `rank-R.record`: its last SLOTS collectives, each written as it starts and again as it ends, into a file mapped
  in memory (mmap): a store to memory, no system call, and the kernel keeps what was stored when the process dies;
- `rank-R.stacks`: faulthandler's dump of every thread's Python stack, written by its C-level handler on the
  fatal signal;
- `rank-R.json`: who it is (rank, node, pid), its run folder's hang/ and where the store is, written once.

The launcher (launcher/crash_report.py) reads them when torchrun's agent says a worker was killed by one of
FATAL_SIGNALS, in a folder of its own that it names in CRASH_RECORDS_VARIABLE and removes at the end.
"""

from __future__ import annotations

import faulthandler
import json
import mmap
import os
import signal
from pathlib import Path
from typing import Any

from distrnn.errors import host_name
from distrnn.ranks.hang_request import store_prefix

CRASH_RECORDS_VARIABLE = "DISTRNN_CRASH_RECORDS"  # set by the launcher for its workers: the folder to write in
FATAL_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)  # faulthandler's
SLOTS = 8  # collectives kept: enough for the records of the ranks to be compared at the one they died in
SLOT = 1024  # bytes per collective: an entry's JSON is about 200 (all_gather_object's shapes are cut to fit)


def _encoded(entry: dict[str, Any]) -> bytes:
    data = json.dumps(entry).encode()
    if len(data) >= SLOT:  # a gather of many tensors: its first shapes say enough
        data = json.dumps({**entry, "shapes": entry["shapes"][:4], "dtypes": entry["dtypes"][:4]}).encode()[:SLOT - 1]
    return data.ljust(SLOT)


class CrashRecord:
    """This worker's files in the launcher's folder; `record(entry)` at each collective's start and end."""

    def __init__(self, folder: Path, rank: int, hang: Path):
        self.rank = rank
        store = {"address": os.environ.get("MASTER_ADDR"), "port": os.environ.get("MASTER_PORT"),
                 "prefix": store_prefix()}  # where the run's hang report is announced (launcher/hang_watch.py)
        (folder / f"rank-{rank}.json").write_text(json.dumps(
            {"rank": rank, "host": host_name(), "pid": os.getpid(), "hang": str(hang), "store": store}))
        with open(folder / f"rank-{rank}.record", "w+b") as f:
            f.truncate(SLOTS * SLOT)
            self._map = mmap.mmap(f.fileno(), SLOTS * SLOT)
        self._stacks = open(folder / f"rank-{rank}.stacks", "w")  # noqa: SIM115  (faulthandler writes it at death)
        self._faulthandler_was = faulthandler.is_enabled()
        faulthandler.enable(self._stacks, all_threads=True)

    @staticmethod
    def start(hang: Path) -> CrashRecord | None:
        """This worker's record when its launcher asked for one (distrnn's launcher; not Ray's workers)."""
        folder = os.environ.get(CRASH_RECORDS_VARIABLE)
        if not folder or not Path(folder).is_dir():
            return None
        return CrashRecord(Path(folder), int(os.environ.get("RANK", "0")), hang)

    def record(self, entry: dict[str, Any]) -> None:
        offset = entry["seq"] % SLOTS * SLOT
        self._map[offset:offset + SLOT] = _encoded(entry)

    def close(self) -> None:
        if self._faulthandler_was:
            faulthandler.enable(all_threads=True)  # back to stderr, as PYTHONFAULTHANDLER or -X faulthandler had it
        else:
            faulthandler.disable()
        self._stacks.close()
        self._map.close()


def read(folder: Path) -> dict[int, dict[str, Any]]:
    """Every worker's files in `folder`: {rank: who + "ring" (its recorded collectives, oldest first) + "stacks"
    (faulthandler's dump: '' unless a fatal signal wrote it)}."""
    ranks = {}
    for who_file in folder.glob("rank-*.json"):
        try:
            who = json.loads(who_file.read_text())
            raw = (folder / f"rank-{who['rank']}.record").read_bytes()
            stacks = (folder / f"rank-{who['rank']}.stacks").read_text(errors="replace")
        except (OSError, ValueError, KeyError):
            continue  # a worker that died while writing its first file: nothing of it to show
        entries = []
        for offset in range(0, len(raw), SLOT):
            text = raw[offset:offset + SLOT].strip(b" \0")
            try:
                entries.append(json.loads(text)) if text else None
            except ValueError:  # a slot being rewritten when the process died
                continue
        ranks[who["rank"]] = {**who, "ring": sorted(entries, key=lambda e: e["seq"]), "stacks": stacks}
    return ranks
