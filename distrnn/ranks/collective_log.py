"""Each rank's record of its recent collectives: what the hang report compares between ranks.

Every collective a rank calls through `torch.distributed` (distrnn's own sums and agreements, Accelerate's
gather/reduce/broadcast, DDP's gradient all-reduce through the CPU communication hook) is numbered and kept in a
ring of the last RING entries: sequence number, op, input shapes and dtypes, the distrnn line that asked for it,
start and end time. The heartbeat thread publishes it each second (collectives.Heartbeats), so that what a rank
was doing is still known when it is frozen.

Why by hand: torch's flight recorder (TORCH_FR_BUFFER_SIZE) records the same in C++, but reading it back costs
98 ms for 2,000 entries and 48 ms for 64 with their call sites (torch 2.14.1, 2-core Intel Xeon, AVX512), too
much to publish every second, and a frozen rank cannot be asked. It is off unless TORCH_FR_BUFFER_SIZE is set;
then the ranks that still answer add its dump to the hang's evidence (hang_report.write_own). This record costs
about 55 us per collective, and with the crash record (crash_record.py) 90 us (benchmarks/collective_record_cost.py,
docs/performance.md).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distrnn.ranks.crash_record import CrashRecord
from distrnn.testing import faults

RING = 64  # entries kept per rank: a few steps' worth (about 3 to 6 collectives per optimizer step)
# The collectives distrnn and the libraries it uses call (accelerate/utils/operations.py, DDP's default hooks),
# and where each one's input tensor(s) are in its arguments.
COLLECTIVES = {"all_reduce": 0, "broadcast": 0, "all_gather": 1, "all_gather_into_tensor": 1, "all_gather_object": 1,
               "broadcast_object_list": 0, "gather_object": 0, "barrier": None, "reduce": 0}
_PACKAGE = str(Path(__file__).resolve().parents[1])
_TORCH = str(Path(torch.__file__).parent)
_HELPERS = (str(Path(__file__).resolve()), str(Path(__file__).with_name("collectives.py")))
_KINDS: dict = {}  # code object -> _kind


def _kind(code) -> tuple[str, str]:
    """("distrnn" | "other" | "skip", file name) of a code object, cached: a stack is walked per collective."""
    if code not in _KINDS:
        path = code.co_filename
        kind = "skip" if path in _HELPERS or path.startswith(_TORCH) else "distrnn" if path.startswith(_PACKAGE) \
            else "other"
        _KINDS[code] = (kind, Path(path).name)
    return _KINDS[code]


def call_site(frame=None) -> str:
    """The innermost distrnn line of a stack, outside the collective helpers (`trainer.py:212`); else the
    innermost line outside them and torch (a script or test calling torch.distributed itself)."""
    frame = frame or sys._getframe(1)
    first = None
    while frame is not None:
        kind, name = _kind(frame.f_code)
        if kind == "distrnn":
            return f"{name}:{frame.f_lineno}"
        if kind == "other" and first is None:
            first = f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return first or "?"


def _describe(value: Any) -> tuple[list[list[int]], list[str]]:
    items = value if isinstance(value, (list, tuple)) else (value,)
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    return [list(t.shape) for t in tensors], [str(t.dtype).removeprefix("torch.") for t in tensors]


def _finished(entry: dict[str, Any], crash: CrashRecord | None, future: torch.futures.Future) -> None:
    """An asynchronous collective's end, if it succeeded; one that failed (a timeout) stays the one waited in."""
    try:
        future.value()
    except Exception:
        return
    entry["end"] = time.time()
    if crash is not None:
        crash.record(entry)


class CollectiveLog:
    """This rank's ring of recent collectives; `install` wraps torch.distributed's collectives to fill it."""

    def __init__(self, crash: CrashRecord | None = None):
        self.crash = crash  # the copy a rank killed by a signal leaves behind (crash_record.py), if its launcher asked
        self.ring: deque[dict[str, Any]] = deque(maxlen=RING)
        self.seq = 0
        # The thread that trains: the main thread under torchrun, the train function's thread under Ray Train.
        self.training_thread = threading.get_ident()
        self._originals: dict[str, Any] = {}

    def install(self) -> CollectiveLog:
        for name, position in COLLECTIVES.items():
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._recorded(name, position, self._originals[name]))
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _recorded(self, name: str, position: int | None, collective):
        @functools.wraps(collective)
        def recorded(*args, **kwargs):
            if kwargs.get("group") not in (None, dist.group.WORLD):  # side groups have sequences of their own
                return collective(*args, **kwargs)
            if faults.skip_collective(self.seq + 1, name, bool(kwargs.get("async_op"))):
                return None  # this rank goes on as if its code had not called it
            self.seq += 1
            args = faults.mismatch_shape(self.seq, name, bool(kwargs.get("async_op")), args)
            shapes, dtypes = _describe(args[position]) if position is not None and len(args) > position else ([], [])
            entry = {"seq": self.seq, "op": name, "shapes": shapes, "dtypes": dtypes, "site": call_site(),
                     "start": time.time(), "end": None}
            self.ring.append(entry)
            if self.crash is not None:
                self.crash.record(entry)
            result = collective(*args, **kwargs)
            if kwargs.get("async_op") and result is not None:  # DDP's gradient all-reduce: done when its future is
                result.get_future().add_done_callback(functools.partial(_finished, entry, self.crash))
            else:
                entry["end"] = time.time()
                if self.crash is not None:
                    self.crash.record(entry)
            return result

        return recorded

    def snapshot(self) -> dict[str, Any]:
        """What the heartbeat publishes: the ring, the oldest collective this rank has not seen finish (None when
        none: it waits in that one, or at the end of backward for DDP's), and the training thread's innermost distrnn
        line (where it is now)."""
        entries = list(self.ring)
        waiting = next((e for e in entries if e["end"] is None), None)
        frame = sys._current_frames().get(self.training_thread)
        return {"seq": self.seq, "in": waiting, "at": call_site(frame) if frame is not None else "?",
                "ring": entries, "time": time.time()}
