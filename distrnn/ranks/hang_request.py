"""A hang report asked of a live run: SIGUSR2 to `distrnn train`, or `distrnn hang-report RUN`.

The same report as a collective timeout's (hang_report.py: one line, the evidence in RUN/hang/), made while the
run goes on: to see where a run that looks stuck is before train.collective_timeout_s (300 s by default) ends
it, or where the ranks of a healthy run are.

How a request travels. The launcher passes SIGUSR2 on to its workers as ASK_SIGNAL (between the launcher and its
workers SIGUSR2 already means "stop": preemption.FORWARDED); `distrnn hang-report RUN` sends ASK_SIGNAL to the
run's main process (RUN/.hold says which). A worker's main thread may be blocked in a collective, where a Python
signal handler does not run until the collective returns, so in a multi-process run the handler does nothing:
the signal's number reaches the heartbeat thread through signal.set_wakeup_fd (written by the C-level handler
at once), and that thread counts the request in torchrun's store, where every rank's heartbeat sees it within a
second (collectives.Heartbeats). Every rank then writes its own evidence and rank 0 writes the report and prints
the line. One process never waits in a collective: its handler answers itself, in the main thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from pathlib import Path

from distrnn.errors import host_name
from distrnn.ranks.preemption import FORWARDED_VARIABLE

# Ignored by default: a worker that has no handler yet (still importing) is not ended by it, as it would be by
# SIGUSR1 or SIGUSR2 (taken: stop requests) or a real-time signal.
ASK_SIGNAL = signal.SIGURG
# What `distrnn hang-report` waits for the report: the request reaches every rank within a heartbeat (1 s), then
# the 3 s check for frozen ranks, a py-spy dump of a frozen one (at most hang_report.PY_SPY_TIMEOUT_S) and files.
ANSWER_WAIT_S = 30
PREFIX = "distrnn: hang report (asked):"


def store_prefix() -> str:
    """Where this start's heartbeats, report requests and hang reports keep their keys in the store (torchrun's,
    or Ray Train's process group's): read by the workers (collectives.Heartbeats) and, through each worker's
    crash record, by its launcher (launcher/hang_watch.py)."""
    return (f"distrnn/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def asked_line(line: str, folder: Path) -> str:
    """What an asked report prints: by rank 0 in the run's output, and by `distrnn hang-report`."""
    return f"{PREFIX} {line}; evidence in {folder}{os.sep}"


def announce(line: str, folder: Path) -> None:
    print(asked_line(line, folder), flush=True)


class ReportRequests:
    """Installed first in each worker (worker/training.py): the signals that ask for a report, and, in a
    multi-process run, the pipe on which the heartbeat thread learns of them (`asked`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.one_process = int(os.environ.get("WORLD_SIZE", "1")) < 2
        # SIGUSR2 asks too, unless distrnn's launcher forwards stop requests with it (it then sends ASK_SIGNAL)
        self.signals = {ASK_SIGNAL} | (set() if os.environ.get(FORWARDED_VARIABLE) == "1" else {signal.SIGUSR2})
        self._read = self._write = None
        self._previous_wakeup: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # Ray Train runs each worker's loop in a thread: signals are Ray's there
        for sig in self.signals:
            signal.signal(sig, self._handle)
        if not self.one_process:
            self._read, self._write = os.pipe()
            os.set_blocking(self._write, False)  # set_wakeup_fd's requirement: a full pipe drops, never blocks
            self._previous_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def _handle(self, signum: int, frame) -> None:
        if self.one_process:
            self._answer_alone(frame)

    def _answer_alone(self, frame) -> None:
        from distrnn.ranks import hang_report  # here: the launcher imports this module, and must not import torch
        from distrnn.ranks.collective_log import call_site

        site = call_site(frame) if frame is not None else "?"
        state = {"host": host_name(), "pid": os.getpid(), "at": site, "in": None, "ring": []}
        line = (f"rank 0 (node {state['host']}, pid {state['pid']}) is at {site} (one process: no collective to "
                "wait in)")
        with contextlib.suppress(OSError):
            hang_report.write_own(self.folder, 0, state, None)
            hang_report.write_report(self.folder, line, {0: state}, set(), {}, asked=True)
            announce(line, self.folder)

    def asked(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a signal; True if one of them asked for a report (the wakeup pipe carries
        every handled signal's number: the stop requests' too)."""
        if self._read is None:
            threading.Event().wait(timeout_s)
            return False
        try:
            ready, _, _ = select.select([self._read], [], [], timeout_s)
            numbers = os.read(self._read, 512) if ready else b""
        except (OSError, ValueError, TypeError):  # closed by `close` meanwhile
            return False
        return any(number in numbers for number in map(int, self.signals))

    def wake(self) -> None:
        """End a wait in `asked` now (the heartbeats are closing), with a byte that is no signal's number."""
        with contextlib.suppress(OSError, TypeError):
            os.write(self._write, b"\0")

    def close(self) -> None:
        if self._read is None:
            return
        with contextlib.suppress(ValueError):  # not the main thread
            signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read = self._write = None
