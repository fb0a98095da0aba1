"""Several worker processes: torch's own launcher (torchrun's elastic agent), run in this process through
its public API (`torch.distributed.run`), as Lightning Fabric's launcher does.

In this process rather than as a subprocess, so that a failed worker ends with its own one-line error,
not with the launcher's traceback. The agent runs in a thread of its own, and this module keeps the main
thread, and so every signal: the agent's rendezvous waits in C++ (a TCPStore connect or accept), where a
Python signal handler on the main thread would not run until it returned (SIGTERM was swallowed for more
than 400 s while a machine waited for an absent main machine).

Signals: SIGTERM and SIGUSR1 (a user, `scancel`, SLURM before the time limit) are passed on to every
worker as a stop request (preemption.FORWARDED); before the workers exist they end the start-up at once.
SIGINT, SIGHUP and SIGQUIT end the workers, as torchrun's agent would. SIGUSR2 asks the workers for a hang
report (hang_request.py) and changes nothing else. Accelerate stays the library
inside each worker: the Accelerator reads torchrun's environment as under `accelerate launch`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

from distrnn.errors import DistrnnError, PeerLost, PeerUnresponsive, debug_enabled
from distrnn.launcher.crash_report import CrashRecords
from distrnn.launcher.hang_watch import HangWatch
from distrnn.ranks.hang_request import ASK_SIGNAL
from distrnn.ranks.preemption import FORWARDED, FORWARDED_VARIABLE, REQUEUE_EXIT_CODE, STOP_SIGNALS

ENDING_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
REPORT_SIGNAL = signal.SIGUSR2  # a user's: a hang report of the live run (the workers get ASK_SIGNAL)
KILL_AFTER_S = 20  # after SIGINT/SIGHUP/SIGQUIT: workers still running then are killed (a collective holds them)


class _StartupStopped(Exception):
    def __init__(self, sig: signal.Signals):
        super().__init__(sig.name)
        self.signal = sig


class _Agent(threading.Thread):
    """torch.distributed.run.run(args) in a thread; what it raised, if anything, is kept for the main thread.
    `args()` makes torchrun's command line (it may wait for the main machine, so it runs in the thread too)."""

    def __init__(self, args: Callable[[], list[str]]):
        super().__init__(name="torchrun-agent", daemon=True)
        self.args = args
        self.error: BaseException | None = None

    def run(self) -> None:
        import torch.distributed.run as torchrun

        from distrnn.testing import faults

        try:
            torchrun.run(torchrun.get_args_parser().parse_args(self.args()))
            faults.hold_launcher()
        except BaseException as e:  # handed to the main thread, which decides what it means
            self.error = e


def workers() -> list[psutil.Process]:
    """The worker processes torchrun's agent started (the children of this process)."""
    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def signal_workers(sig: signal.Signals, group: bool = False) -> None:
    for worker in workers():
        try:
            os.killpg(worker.pid, sig) if group else worker.send_signal(sig)
        except (OSError, psutil.Error):
            pass


class _Signals:
    """The main thread's signal handlers while the agent thread runs."""

    def __init__(self) -> None:
        self.ending: signal.Signals | None = None  # SIGINT, SIGHUP or SIGQUIT, once received
        self.ending_since = 0.0
        self.workers_seen = False  # this start's workers existed: without them now, they have ended
        self.late_stop: signal.Signals | None = None  # a stop request that came after the workers ended
        self._previous: dict[signal.Signals, object] = {}

    def handle(self, signum: int, frame: object) -> None:
        sig = signal.Signals(signum)
        if sig == REPORT_SIGNAL:
            if workers():
                signal_workers(ASK_SIGNAL)
            else:
                print(f"distrnn: {sig.name} asks for a hang report, but no worker is running now; nothing to report",
                      file=sys.stderr, flush=True)
            return
        if sig in STOP_SIGNALS:
            if workers():
                signal_workers(FORWARDED[sig])
            elif self.workers_seen:  # in torchrun's exit barrier or its clean-up: the agent's outcome decides
                self.late_stop = self.late_stop or sig
                print(f"distrnn: {sig.name} came after the workers ended; waiting for their outcome (a finished "
                      "run exits 0)", file=sys.stderr, flush=True)
            else:
                raise _StartupStopped(sig)
            return
        self.ending, self.ending_since = self.ending or sig, self.ending_since or time.monotonic()
        if not workers():
            raise _StartupStopped(sig)
        signal_workers(sig, group=True)  # each worker leads its own session (torchrun starts them so)

    @contextmanager
    def installed(self) -> Iterator[None]:
        for sig in (*STOP_SIGNALS, *ENDING_SIGNALS, REPORT_SIGNAL):
            self._previous[sig] = signal.signal(sig, self.handle)
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while the agent starts workers (they inherit a copy of it)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_agent(args: Callable[[], list[str]], env: dict[str, str], describe_rendezvous, max_restarts: int = 0) -> int:
    """Run torchrun's agent with `args()` (its command line, made anew for each start) and the workers' extra
    `env`; the workers' exit status. `describe_rendezvous(error)`: the one line for a rendezvous that failed.

    With `max_restarts`, workers that fail for a reason that may not repeat (a worker killed by a signal,
    one that stopped responding, a lost peer) are started again, up to that many times, each printing one
    line; they resume from the newest checkpoint that verifies. Errors that would repeat (a bad config,
    damaged data: exit 1 or 2) end the run at once.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not debug_enabled():
        _quiet_torchrun_agent()
    records = CrashRecords()
    try:
        for restart in range(max_restarts + 1):
            error, ending, late_stop = _run_once(args, {**env, **records.env()}, records)
            if ending:
                return 128 + int(ending)
            if late_stop and isinstance(error, ChildFailedError) and retryable(error):
                print(f"distrnn: stopped by {late_stop.name} after {describe_failure(error, records)}, instead of "
                      "restarting; run the same command again to resume from the newest checkpoint that verifies",
                      file=sys.stderr, flush=True)
                return REQUEUE_EXIT_CODE
            if restart < max_restarts and isinstance(error, ChildFailedError) and retryable(error):
                print(f"distrnn: restart {restart + 1} of {max_restarts} after {describe_failure(error, records)}; "
                      "resuming from the newest checkpoint that verifies", file=sys.stderr, flush=True)
                continue
            return _outcome(error, describe_rendezvous, records)
    finally:
        records.close()
    raise AssertionError("unreachable")


def _run_once(args: Callable[[], list[str]], env: dict[str, str], records: CrashRecords
              ) -> tuple[BaseException | None, signal.Signals | None, signal.Signals | None]:
    """One start of torchrun's agent: what it raised, the ending signal if one came (SIGINT, ...), and a stop
    request that came after the workers ended (they finished, or failed: no restart then). A hang watch
    (hang_watch.py) ends workers that a hang report left running; `records.watch` is this start's."""
    agent, signals = _Agent(args), _Signals()
    records.watch = HangWatch(records.folder)
    with environment({**env, FORWARDED_VARIABLE: "1"}), signals.installed():
        try:
            agent.start()
            records.watch.start()
            while agent.is_alive():
                agent.join(0.2)
                signals.workers_seen = signals.workers_seen or bool(workers())
                if signals.ending and time.monotonic() - signals.ending_since > KILL_AFTER_S:
                    signal_workers(signal.SIGKILL, group=True)
        except _StartupStopped as e:
            _abandon_startup(e.signal)
        finally:
            records.watch.close()
    return agent.error, signals.ending, signals.late_stop


def _abandon_startup(sig: signal.Signals) -> None:
    """A signal before the workers exist: nothing was trained, nothing is lost. The agent thread may be
    blocked in a C++ wait; the process ends without waiting for it."""
    code = REQUEUE_EXIT_CODE if sig in STOP_SIGNALS else 128 + int(sig)
    print(f"distrnn: stopped by {sig.name} while starting (waiting for the other machines or starting the "
          "workers); nothing was trained yet: run the same command again", file=sys.stderr, flush=True)
    time.sleep(0.5)  # a worker the agent was starting at that very moment is ended too
    signal_workers(signal.SIGKILL, group=True)
    sys.stdout.flush()
    os._exit(code)


def _outcome(error: BaseException | None, describe_rendezvous, records: CrashRecords | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if error is None:
        return 0
    if isinstance(error, DistrnnError):  # waiting for the main machine (network.wait_for_main)
        raise error
    if isinstance(error, ChildFailedError):
        return failed_workers_exit(error, records)
    line = describe_rendezvous(error)
    if line is None:
        raise error
    raise DistrnnError(line) from None


def cause(error) -> tuple[int, int]:
    """(rank, exit code) of the failure that ended torchrun's ChildFailedError: the others follow from it.

    A killed rank is the cause: the others' errors ("lost contact with another rank") follow from it.
    torchrun's get_first_failure() orders by whole-second timestamps, so when the agent sees both in one
    poll they tie and it answers the lowest rank; a signal's victim is looked for first instead. SIGTERM is
    how torchrun's agent stops the other workers after a failure (stop requests reach them as other
    signals, preemption.FORWARDED): a rank it ended is not the cause when another rank failed.
    """
    failures = {rank: f for rank, f in error.failures.items() if f.exitcode != -signal.SIGTERM} or error.failures
    unresponsive = [rank for rank, f in failures.items() if f.exitcode == PeerUnresponsive.exit_code]
    if unresponsive:
        return unresponsive[0], PeerUnresponsive.exit_code
    killed = sorted(rank for rank, failure in failures.items() if failure.exitcode < 0)
    rank = killed[0] if killed else min(failures, key=lambda r: (failures[r].timestamp, r))
    return rank, failures[rank].exitcode


def retryable(error) -> bool:
    """A failure that starting again may not meet: a signal, an unresponsive or a lost peer (not exit 1 or 2)."""
    _, code = cause(error)
    return code < 0 or code in (PeerUnresponsive.exit_code, PeerLost.exit_code)


def describe_failure(error, records: CrashRecords | None = None) -> str:
    """What ended the workers; for a rank a fatal signal killed, where it and the other ranks were (crash_report)."""
    rank, code = cause(error)
    if code < 0:
        crash = records.report(rank, code) if records is not None else None
        return crash or f"worker rank {rank} was killed by {signal.Signals(-code).name}"
    if code == PeerUnresponsive.exit_code:
        return "a rank stopped responding"
    return f"worker rank {rank} exited with {code}" + (" (it lost contact with another rank)"
                                                       if code == PeerLost.exit_code else "")


def failed_workers_exit(error, records: CrashRecords | None = None) -> int:
    """The exit code for torchrun's ChildFailedError, naming a rank a signal killed (it could not say it), and
    for a fatal signal where it died (crash_report).

    A rank that another rank named as unresponsive was named by that rank, and stopped by it: no second line.
    """
    rank, code = cause(error)
    stopped = records.watch.describe(error.failures[rank].pid) if records is not None and records.watch else None
    if stopped:  # after the run's hang report: its exit code, as the reporter's
        print(f"distrnn: {stopped}", file=sys.stderr)
        return PeerUnresponsive.exit_code
    if code < 0:
        line = describe_failure(error, records)
        advice = ("the ranks called different collectives, a bug in the code that called them, which a restart "
                  "would meet again" if "records first differ" in line
                  else "run the same command again to resume from the last checkpoint")
        print(f"distrnn: {line}; the other workers were stopped; {advice}", file=sys.stderr)
        return 128 - code
    return code


def _quiet_torchrun_agent() -> None:
    """torchrun's agent logs each worker's exit as warnings and a multi-line error report; the
    workers' own one-line errors (and failed_workers_exit's, for a worker a signal killed) already say what
    happened."""
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def free_port() -> int:
    """A port free on this machine now, for a one-machine rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
