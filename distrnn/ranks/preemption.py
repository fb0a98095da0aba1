"""Stop requests: SIGTERM or SIGUSR1 mean "checkpoint and exit with REQUEUE_EXIT_CODE".

Workers only set a flag in the handler; the training loop finishes its step, all ranks agree
through one reduction, and every rank saves the same step.

In a multi-process run the launcher receives the user's or SLURM's signal (distrnn.launcher.agent: its main
thread, while torchrun's agent runs in another) and passes it on to its workers as FORWARDED[signal], telling
them so (FORWARDED_VARIABLE). A SIGTERM that reaches such a worker directly is then torchrun's agent ending it
because another worker failed: it keeps its default action, so that a worker blocked in a collective ends at
once instead of trying to save a checkpoint with a rank that is gone.

Under Ray no worker can have a handler: Ray Train runs each worker's loop in a thread, and the signal reaches
Ray's driver, on another node. The driver (distrnn.launcher.ray) writes the signal's name into a file of the
run folder, which every node shares, and the workers read it at each check (STOP_FILE_VARIABLE).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from distrnn.errors import DistrnnError

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FORWARDED = {signal.SIGTERM: signal.SIGUSR2, signal.SIGUSR1: signal.SIGUSR1}  # launcher -> its workers
FORWARDED_VARIABLE = "DISTRNN_STOPS_FORWARDED"  # "1": set by the launcher for the workers it starts
STOP_FILE_VARIABLE = "DISTRNN_STOP_FILE"  # set by Ray's launcher: the file its driver writes a stop signal's name in
STOP_FILE = "stop-request"  # in the run folder


class StoppedOnRequest(DistrnnError):
    """Every rank saved the same checkpoint after a stop request and ends with REQUEUE_EXIT_CODE: said once,
    by rank 0 (a 2-node job's log had it from each node)."""

    exit_code = REQUEUE_EXIT_CODE
    shared = True


class StopRequest:
    """Installed in each worker: remembers the first stop signal, by the name the user sent (the loop acts
    on it at its next check)."""

    def __init__(self) -> None:
        self._signal: signal.Signals | None = None
        self._file = Path(os.environ[STOP_FILE_VARIABLE]) if os.environ.get(STOP_FILE_VARIABLE) else None
        forwarded = os.environ.get(FORWARDED_VARIABLE) == "1"
        self._meaning = {sent: original for original, sent in FORWARDED.items()} if forwarded else {
            sig: sig for sig in STOP_SIGNALS}
        if threading.current_thread() is not threading.main_thread():
            return  # Ray Train runs each worker's loop in a thread: its driver writes the request to _file
        for sig in self._meaning:
            signal.signal(sig, self._handle)

    @property
    def signal(self) -> signal.Signals | None:
        """The first stop signal: this process's own, or the one Ray's driver wrote to the stop file (read at
        each check, a few microseconds while it is absent)."""
        if self._signal is None and self._file is not None:
            try:
                name = self._file.read_text().strip()
            except FileNotFoundError:
                return None
            self._signal = signal.Signals.__members__.get(name)  # None while the driver's write is incomplete
        return self._signal

    @signal.setter
    def signal(self, value: signal.Signals | None) -> None:
        self._signal = value

    def _handle(self, signum: int, frame: object) -> None:
        self._signal = self._signal or self._meaning[signal.Signals(signum)]
