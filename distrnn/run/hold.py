"""One run owns a run folder: RUN/.hold, taken by the run's main process before it writes there and removed
when the run ends. Two `distrnn train` into one folder (a double `sbatch`, a second terminal) otherwise
both ran to the end, each pruning the other's checkpoints and appending to the same metrics.jsonl.

The hold file is created with O_CREAT | O_EXCL, which is atomic on local file systems, on NFS v3 and v4 and
on Lustre; flock() is not a choice there: NFS emulates it with POSIX locks through lockd (absent on many
clusters), Lustre only with its `flock` mount option, and a lock says nothing about who holds it. The file
says who: host, pid, SLURM job id and restart count, since when, and when it was last refreshed (every
REFRESH_S, by a thread of the holder). A hold is stale, and taken over with a warning, when its process is
gone (same host), its SLURM job is not running any more, or it was not refreshed for STALE_AFTER_S (unless
its SLURM job is suspended). Taking over is done under a short lock (RUN/.hold.takeover, O_EXCL too) with
the hold read again, so that of two runs that judged one hold stale only the first takes it; refreshes
take the same lock. A requeued SLURM job (same job id, higher restart count) takes over its own hold
silently; two runs in one allocation do not. The holder's thread reads the hold back every CHECK_S: a run
whose hold another run took stops at its next check without writing more. Every rank and node of a run
share the main process's hold. Reading a held folder (`distrnn evaluate`, `report`) needs no hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from distrnn.errors import DistrnnError, Quiet, host_name
from distrnn.testing import faults

RUN_ID_VARIABLE = "DISTRNN_RUN_ID"  # set by distrnn's launchers for their workers
REFRESH_S = 30
CHECK_S = 5  # how often the holder reads its hold back: a run whose hold was taken stops within ~5 s and a step
STALE_AFTER_S = 600  # 20 refreshes missed: a holder refreshes from its own thread, also while it saves or evaluates
TAKEOVER_S = 30  # how long the short lock around a takeover or a refresh is honoured (each holds it for milliseconds)
LOCK_WAIT_S = 10  # how long a run waits for that lock before judging the hold again


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
        return Holder(host_name(), os.getpid(), now, now, job,
                      int(os.environ.get("SLURM_RESTART_COUNT", "0")), os.environ.get(RUN_ID_VARIABLE))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job} (restart {self.slurm_restart})" if self.slurm_job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}{job}, since {since}"

    def same_holder(self, other: Holder) -> bool:
        return (self.host, self.pid, self.started) == (other.host, other.pid, other.started)

    def is_earlier_self_of(self, me: Holder) -> bool:
        """This hold is `me`'s own run from before: a restart of the same `distrnn train` (its run id), or the
        same SLURM job before its requeue (SLURM_RESTART_COUNT counts requeues). Two runs in one allocation
        (two `srun` in one `salloc`) share the job id and its restart count: they are two runs."""
        return bool(self.run_id and self.run_id == me.run_id) or bool(
            self.slurm_job and self.slurm_job == me.slurm_job and self.slurm_restart < me.slurm_restart)

    def why_stale(self) -> str | None:
        """Why this hold's run is over, or None while it may be running."""
        if self.host == Holder.me().host:
            try:
                if psutil.Process(self.pid).create_time() > self.started + 1:
                    return f"its process {self.pid} is gone (the pid was reused)"
            except psutil.NoSuchProcess:
                return f"its process {self.pid} is gone"
        state = slurm_state(self.slurm_job) if self.slurm_job else None
        if state is not None and state not in LIVE_JOB_STATES:
            return f"SLURM job {self.slurm_job} is {state.lower() or 'no longer known'}"
        if state == "SUSPENDED":  # its processes are stopped, refreshing too, and go on when SLURM resumes it
            return None
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
    """The main process's hold on a run folder; `take` is idempotent and `release` safe to call always.
    `lost` says, once the holder's thread found another run holding the folder, what happened to the hold."""

    def __init__(self, path: Path):
        self.path = path
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def take(self) -> list[str]:
        """Hold the folder or raise DistrnnError naming the live holder; warnings to print."""
        if self.holder is not None:
            return []
        me = Holder.me()
        for _ in range(3):
            if self._create(me):
                return self._held(me, [])
            text = self._read_text()
            other = _parse(text)
            if other is not None and other.is_earlier_self_of(me):
                if self._take_over(me, text):
                    return self._held(me, [])
                continue
            why = "it cannot be read" if other is None else other.why_stale()
            if why is None:
                raise DistrnnError(f"{self.path.parent} is in use by another run ({other.describe()}); pass another "
                                   f"--output-dir (if that run is gone, remove {self.path.name}: docs/checkpoints.md, "
                                   "Checkpoint integrity)")
            faults.pause_before_takeover()
            if self._take_over(me, text):
                return self._held(me, [f"took over the stale hold on {self.path.parent} "
                                       f"({other.describe() if other else 'unreadable'}): {why}"])
        raise DistrnnError(f"could not take the hold on {self.path.parent}: another run keeps taking it; pass "
                           "another --output-dir")

    def read(self) -> Holder | None:
        return _parse(self._read_text())

    def stop_if_lost(self, ranks_that_lost_it: int, step: int) -> None:
        """Every rank stops once any rank found the hold lost (the trainer's agreed check): the holder's rank
        says why, the others stop quietly. Nothing more is written, not even a checkpoint: the folder is the
        other run's now, and a checkpoint newer than its own would be the one it resumes from."""
        if not ranks_that_lost_it:
            return
        if self.lost is None:
            raise Quiet()
        raise DistrnnError(f"{self.path.parent} {self.lost}; stopped at step {step} without saving (it is that "
                            "run's folder now); pass another --output-dir to train elsewhere")

    def _held(self, me: Holder, warnings: list[str]) -> list[str]:
        self.holder = me
        self._watcher = threading.Thread(target=self._watch, name="distrnn-hold", daemon=True)
        self._watcher.start()
        return warnings

    def _read_text(self) -> str | None:
        """The hold file's text: None when there is none, "" when it cannot be read."""
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return ""

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

    def _take_over(self, me: Holder, judged: str | None) -> bool:
        """Replace the hold judged stale (its text `judged`) with ours, under the lock and only if it is still
        that hold: of two runs that judged it, the second finds the first's hold there and judges again."""
        with self._locked() as locked:
            if not locked or self._read_text() != judged:
                return False
            self.path.unlink(missing_ok=True)
            return self._create(me)

    @contextlib.contextmanager
    def _locked(self):
        """Yields whether this process holds the short lock that takeovers and refreshes take (O_EXCL, as the
        hold itself); one older than TAKEOVER_S was left by a process that died holding it."""
        lock = self.path.with_name(self.path.name + ".takeover")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - lock.stat().st_mtime > TAKEOVER_S:
                        lock.unlink(missing_ok=True)
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.05)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)

    def _watch(self) -> None:
        """The holder's thread: reads the hold back every CHECK_S and refreshes it every REFRESH_S, until it
        finds another run's hold there (or none): then `lost` says so, and the training loop stops."""
        refreshed = time.monotonic()
        while not self._stop.wait(CHECK_S):
            self.lost = self._lost()
            if self.lost is not None:
                return
            if time.monotonic() - refreshed >= REFRESH_S and self._refresh():
                refreshed = time.monotonic()

    def _lost(self) -> str | None:
        current = self._read_text()
        if current is None:
            return f"lost its hold ({self.path.name} was removed)"
        other = _parse(current)
        if other is None or other.same_holder(self.holder):
            return None  # ours, or unreadable for now (another run's being written, a file server's hiccup)
        return f"was taken over by another run ({other.describe()})"

    def _refresh(self) -> bool:
        """Rewrite the hold with a new refresh time, under the lock: a takeover cannot come between reading
        it back and replacing it (the file replaced would be the new holder's)."""
        fresh = Holder(**{**asdict(self.holder), "refreshed": time.time()})
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(asdict(fresh)))
            with self._locked() as locked:
                if locked and (current := self.read()) is not None and current.same_holder(self.holder):
                    os.replace(tmp, self.path)
                    return True
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        if self.holder is None:
            return
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        current = self.read()
        if current is not None and current.same_holder(self.holder):
            self.path.unlink(missing_ok=True)
        self.holder = None


def _parse(text: str | None) -> Holder | None:
    try:
        return Holder(**json.loads(text)) if text is not None else None
    except (ValueError, TypeError):
        return None
