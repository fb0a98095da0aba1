"""One run owns a run folder: RUN/.hold, taken by the run's main process before it writes there and removed
when the run ends. Two `distrnn train` into one folder (a double `sbatch`, a second terminal) otherwise
both ran to the end, each pruning the other's checkpoints and appending to the same metrics.jsonl.

The hold file is created with O_CREAT | O_EXCL, which is atomic on local file systems, on NFS v3 and v4 and
on Lustre; flock() is not a choice there: NFS emulates it with POSIX locks through lockd (absent on many
clusters), Lustre only with its `flock` mount option, and a lock says nothing about who holds it. The file
says who: host, pid, SLURM job id and restart count, since when, and when it was last refreshed (every
REFRESH_S, by a thread of the holder). A hold is stale, and taken over with a warning, when its process is
gone (same host), its SLURM job is not running any more, or it was not refreshed for STALE_AFTER_S. A
requeued SLURM job (same job id) takes over its own hold silently; every rank and node of a run share
the main process's hold. Reading a held folder (`distrnn evaluate`, `report`) needs no hold.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from distrnn import faults
from distrnn.errors import DistrnnError

RUN_ID_VARIABLE = "DISTRNN_RUN_ID"  # set by distrnn's launchers for their workers
REFRESH_S = 30
STALE_AFTER_S = 600  # 20 refreshes missed: a holder refreshes from its own thread, also while it saves or evaluates
TAKEOVER_S = 30  # how long the short lock that makes taking over a stale hold one process's job is honoured


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    refreshed: float
    slurm_job: str | None = None
    slurm_restart: int = 0
    run_id: str | None = None  # one `distrnn train` (its launcher's DISTRNN_RUN_ID): its restarts share the hold

    @staticmethod
    def me() -> Holder:
        now = time.time()
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and (
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}") or os.environ.get(
            "SLURM_JOB_ID")
        return Holder(socket.gethostname().split(".")[0], os.getpid(), now, now, job,
                      int(os.environ.get("SLURM_RESTART_COUNT", "0")), os.environ.get(RUN_ID_VARIABLE))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job} (restart {self.slurm_restart})" if self.slurm_job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}{job}, since {since}"

    def why_stale(self) -> str | None:
        """Why this hold's run is over, or None while it may be running."""
        if self.host == Holder.me().host:
            try:
                if psutil.Process(self.pid).create_time() > self.started + 1:
                    return f"its process {self.pid} is gone (the pid was reused)"
            except psutil.NoSuchProcess:
                return f"its process {self.pid} is gone"
        if self.slurm_job and (state := slurm_state(self.slurm_job)) is not None and state not in LIVE_JOB_STATES:
            return f"SLURM job {self.slurm_job} is {state.lower() or 'no longer known'}"
        idle = time.time() - self.refreshed
        if idle > STALE_AFTER_S:
            return f"it was not refreshed for {idle:.0f} s"
        return None


LIVE_JOB_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING"}


def slurm_state(job: str) -> str | None:
    """The job's state as squeue says it ("" when squeue no longer knows it), None without SLURM."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "" if "Invalid job id" in result.stderr else None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""


class FolderHold:
    """The main process's hold on a run folder; `take` is idempotent and `release` safe to call always."""

    def __init__(self, path: Path):
        self.path = path
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def take(self) -> list[str]:
        """Hold the folder or raise DistrnnError naming the live holder; warnings to print."""
        if self.holder is not None:
            return []
        me, warnings = Holder.me(), []
        for _ in range(3):
            if self._create(me):
                self.holder = me
                self._refresher = threading.Thread(target=self._refresh, name="distrnn-hold", daemon=True)
                self._refresher.start()
                return warnings
            other = self.read()
            if other is not None and ((other.slurm_job and other.slurm_job == me.slurm_job)
                                      or (other.run_id and other.run_id == me.run_id)):
                self._take_over()  # this job before its requeue, or this run before a restart: the same run
                continue
            why = "it cannot be read" if other is None else other.why_stale()
            if why is None:
                raise DistrnnError(f"{self.path.parent} is in use by another run ({other.describe()}); pass another "
                                   f"--output-dir (if that run is gone, remove {self.path.name}: README, Checkpoint "
                                   "integrity)")
            faults.pause_before_takeover()
            if self._take_over():
                warnings.append(f"took over the stale hold on {self.path.parent} "
                                f"({other.describe() if other else 'unreadable'}): {why}")
        raise DistrnnError(f"could not take the hold on {self.path.parent}: another run keeps taking it; pass "
                           "another --output-dir")

    def read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _create(self, me: Holder) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise DistrnnError(f"cannot write to run folder {self.path.parent} ({e.strerror}); pass a writable "
                               "--output-dir") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(me)))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self) -> bool:
        """Remove the hold found, inside a short lock so that two runs taking over one hold do it in turn."""
        lock = self.path.with_name(self.path.name + ".takeover")
        try:
            if time.time() - lock.stat().st_mtime > TAKEOVER_S:
                lock.unlink(missing_ok=True)  # left by a process that died taking over
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            time.sleep(1)
            return False
        try:
            self.path.unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
        return True

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            current = self.read()
            if current is None or (current.host, current.pid, current.started) != (
                    self.holder.host, self.holder.pid, self.holder.started):
                return  # taken over (this run was thought gone): not ours to refresh
            fresh = Holder(**{**asdict(self.holder), "refreshed": time.time()})
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(asdict(fresh)))
                os.replace(tmp, self.path)
            except OSError:
                return

    def release(self) -> None:
        if self.holder is None:
            return
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        current = self.read()
        if current is not None and (current.host, current.pid) == (self.holder.host, self.holder.pid):
            self.path.unlink(missing_ok=True)
        self.holder = None
