"""Stop requests: SIGTERM or SIGUSR1 mean "checkpoint and exit with REQUEUE_EXIT_CODE".

Workers only set a flag in the handler; the training loop finishes its step, all ranks agree
through one reduction, and every rank saves the same step. The launcher process forwards the
signals to its workers, because torchrun's agent turns SIGTERM into an immediate shutdown and
does not forward SIGUSR1 at all.
"""

from __future__ import annotations

import signal

import psutil

from distrnn.errors import DistrnnError

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedOnRequest(DistrnnError):
    """Every rank saved the same checkpoint after a stop request and ends with REQUEUE_EXIT_CODE."""

    exit_code = REQUEUE_EXIT_CODE


class StopRequest:
    """Installed in each worker: remembers the first stop signal (the loop acts on it at its next check)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = self.signal or signal.Signals(signum)


def forward_to_children() -> None:
    """In the launcher: pass SIGTERM/SIGUSR1 on to the worker processes and keep waiting for them."""

    def forward(signum: int, frame: object) -> None:
        for child in psutil.Process().children():
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)


# For torchrun's --signals-to-handle: its default includes SIGTERM, on which the agent stops the
# workers at once; without it the handler above stays in charge.
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
