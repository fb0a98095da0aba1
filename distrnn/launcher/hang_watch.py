"""After a hang report, this machine's workers that cannot end themselves are ended by their launcher.

The rank that reports a hang (ranks/hang_report.py) stops a frozen rank only when the same launcher started it;
the other ranks waiting in a failed collective end once the report is written. A frozen rank alone on another
machine, or one busy in a long step, would keep its machine's launcher (a SLURM job step, a pod) running until
its scheduler killed it. So every launcher waits, in a thread, for the report's announcement in the store (the
reporter sets `hang/line`, then `hang/frozen`), SIGKILLs its own frozen workers at once and any other worker
still running GRACE_S later, and says why in one line (exit 3, as the reporter's).

Where the store is, and the run's keys in it, come from the workers' crash records (ranks/crash_record.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

import psutil

from distrnn.errors import host_name
from distrnn.ranks.crash_record import read

# A rank in the failed collective ends within moments of the announcement (collectives.Heartbeats.await_report
# returns then); a busy one would run on until its next collective, however long its step.
GRACE_S = 10
# Every call into the store is short, and close() joins the thread: a thread still inside a TCPStore call when
# the launcher exits makes the process abort ("terminate called without an active exception", exit -6: seen
# in 10 of 351 tests with 5 s waits). A short wait still returns the moment the key is set.
WAIT_S = 0.5
CONNECT_S = 1


class HangWatch(threading.Thread):
    """For one start of torchrun's agent: `stopped` ({pid: rank}) are the workers it ended, `line` the report's."""

    def __init__(self, records: Path):
        super().__init__(name="distrnn-hang-watch", daemon=True)
        self.records = records
        self.stopped: dict[int, int] = {}
        self.line = ""
        self.hang = ""
        self.done = threading.Event()  # this start ended: stop watching

    def run(self) -> None:
        workers = self._workers()
        if not workers:
            return
        store, prefix = self._store(next(iter(workers.values())))
        if store is None or not self._announced(store, prefix):
            return
        self.line = store.get(f"{prefix}/hang/line").decode()
        frozen = {who["pid"] for who in json.loads(store.get(f"{prefix}/hang/frozen"))
                  if who.get("host") == host_name()}
        self.hang = next(iter(workers.values()))["hang"]
        self._end_workers({pid: w["rank"] for pid, w in workers.items() if pid in frozen})
        if not self.done.wait(GRACE_S):
            self._end_workers({pid: w["rank"] for pid, w in workers.items()})

    def _workers(self) -> dict[int, dict]:
        """This start's workers' records ({pid: record}), once the first of them wrote its record."""
        while not self.done.is_set():
            children = {p.pid for p in psutil.Process().children()}
            found = {state["pid"]: state for state in read(self.records).values() if state["pid"] in children}
            if found:
                return found
            self.done.wait(0.5)
        return {}

    def _store(self, worker: dict):
        """A client of the run's store and the run's prefix in it; (None, '') without one (one process)."""
        where = worker.get("store") or {}
        if not where.get("address") or not where.get("port"):
            return None, ""
        import torch.distributed as dist  # the agent imported torch already; the planning side never does

        while not self.done.is_set():
            try:
                return dist.TCPStore(where["address"], int(where["port"]), is_master=False,
                                     timeout=timedelta(seconds=CONNECT_S)), where["prefix"]
            except Exception:  # not up yet, or gone with the start: tried again until this start ends
                self.done.wait(CONNECT_S)
        return None, ""

    def _announced(self, store, prefix: str) -> bool:
        """Wait until a report is announced (True), or this start ends or the store goes with it (False)."""
        while not self.done.is_set():
            try:
                store.wait([f"{prefix}/hang/frozen"], timedelta(seconds=WAIT_S))
                return True
            except Exception as e:
                if "timeout" not in str(e).lower():
                    return False
        return False

    def _end_workers(self, workers: dict[int, int]) -> None:
        for pid, rank in workers.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.ppid() == os.getpid():
                    self.stopped[pid] = rank  # first: the agent may see the exit before this thread runs again
                    process.send_signal(signal.SIGKILL)

    def describe(self, pid: int) -> str | None:
        """The line for a worker this watch ended, else None."""
        if pid not in self.stopped:
            return None
        return (f"worker rank {self.stopped[pid]} (node {host_name()}, pid {pid}) was stopped by its launcher after "
                f"the run's hang report: {self.line}; evidence in {self.hang}/ on the main machine")

    def close(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(timeout=2 * CONNECT_S + WAIT_S)

