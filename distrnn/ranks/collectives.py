"""The ranks' shared building blocks: the Accelerator, sharding, exact reductions, agreement, heartbeats, what
a failed collective means, teardown, and a worker's entry point (run_worker). Not all rank logic: modules
above run collectives of their own with these or with accelerate's (worker/progress.py's metrics,
worker/rank_timing.py's time split, evaluation/counting.py's exact counts, run/checkpoint.py's resume)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

import click
import psutil
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)

from distrnn.errors import DistrnnError, PeerLost, PeerUnresponsive, Quiet, first_line, host_name, run_cli
from distrnn.ranks import hang_report
from distrnn.ranks.collective_log import CollectiveLog
from distrnn.ranks.devices import (
    check_precision,
    choose_precision,
    emulated_bf16_warning,
    set_numerics,
    will_run_on_cpu,
)
from distrnn.ranks.hang_request import ReportRequests, announce, store_prefix
from distrnn.testing import faults

T = TypeVar("T")


def make_accelerator(precision: str, seed: int, collective_timeout_s: int, project_dir: str,
                     tf32: bool = False, deterministic: bool = False) -> Accelerator:
    """One Accelerator per process; the launcher (ACCELERATE_USE_CPU, torchrun env) picks the device, and
    `precision` auto becomes what that device runs natively (devices.choose_precision)."""
    # NCCL: when a collective fails or outlives the timeout (a rank died or hangs), abort the
    # communicator and end this process (1), instead of ending it with the communicator alive (3,
    # torch's default); the launcher then reports the rank. Gloo raises instead (peer_failure).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    set_numerics(tf32, deterministic)
    choice = choose_precision(precision, on_cpu=will_run_on_cpu())
    try:
        accelerator = _accelerator(choice.chosen, seed, collective_timeout_s, project_dir)
    except RuntimeError as e:  # joining the process group: the main machine or a peer is gone or unreachable
        if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not _is_collective_failure(e):
            raise
        where_ = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistrnnError(f"rank {os.environ.get('RANK')} could not join the process group of the main machine at "
                           f"{where_} ({first_line(e)}); check that every machine runs and can reach it") from None
    check_precision(choice.chosen, on_cpu=accelerator.device.type == "cpu")
    warning = emulated_bf16_warning(choice)
    if warning and accelerator.is_main_process:
        print(warning, flush=True)
    if accelerator.device.type == "cpu":
        # Denormals slowed CPU training up to 50x here; flushing them costs no accuracy.
        torch.set_flush_denormal(True)
    set_seed(seed)
    return accelerator


def _accelerator(precision: str, seed: int, collective_timeout_s: int, project_dir: str) -> Accelerator:
    init_scale = faults.grad_scaler_init_scale()
    scaler = [GradScalerKwargs(init_scale=init_scale)] if init_scale else []
    return Accelerator(
        mixed_precision=precision,
        project_dir=project_dir,
        # The schedule's total steps are computed from the per-rank loader, so the
        # scheduler must step once per optimizer step, not once per process.
        step_scheduler_with_optimizer=False,
        # Seedable sampler: the shuffle is a function of (seed, epoch), identical on every rank,
        # so the shards are disjoint and change every epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        # If a rank dies or hangs, the others fail after this instead of waiting forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s)), *scaler],
    )


def main_print(accelerator: Accelerator) -> Callable[..., None]:
    """`print` on the global main process only (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        return lambda *args: print(*args, flush=True)
    return lambda *args: None


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Rank r takes samples r, r+W, r+2W, ...: disjoint, covering all n, no padding.

    Written by hand because a prepared loader pads the last batches (even_batches=True: 10112
    counted instead of 10000 on 2 ranks), and even_batches=False crashed per-batch gathers.
    """
    return range(rank, n, world_size)


def dist_sum(accelerator: Accelerator, *counts: int | torch.Tensor) -> tuple[int, ...]:
    """Sum integer counts (Python ints or tensors on the device) over all ranks exactly: int64, one
    all-reduce, one read on the host."""
    local = torch.stack([torch.as_tensor(c, device=accelerator.device).to(torch.int64).reshape(()) for c in counts])
    return tuple(int(v) for v in accelerator.reduce(local, reduction="sum").tolist())


def dist_mean(accelerator: Accelerator, value: torch.Tensor) -> float:
    return float(accelerator.reduce(value.detach().float().reshape(1), reduction="mean").item())


def from_main(accelerator: Accelerator, value: T) -> T:
    """The main process's `value` on every rank (one broadcast): ranks never decide alone what
    they read from a shared file system, where attribute caches can differ between nodes."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def agree(accelerator: Accelerator, action: Callable[[], T], here: bool = True) -> T | None:
    """Run `action` where `here` is true (every rank by default); if it failed anywhere, every rank stops.

    Each distinct error is raised, and so printed, by the lowest rank that had it; the others raise
    Quiet. Any exception counts, not only DistrnnError: a rank must never wait in a collective for
    one that has already left (that cost collective_timeout_s, 300 s, and hid the real cause).
    """
    error: BaseException | None = None
    result = None
    if here:
        try:
            result = action()
        except Exception as e:
            error = e
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return result
    mine = None if error is None else (f"{type(error).__name__}: {error}", getattr(error, "exit_code", 1))
    outcomes = gather_object([mine])
    failed = [outcome for outcome in outcomes if outcome is not None]
    if not failed:
        return result
    if error is not None and outcomes.index(mine) == accelerator.process_index:
        raise error
    raise Quiet(failed[0][1])


# What a failed collective says, from torch's, gloo's and NCCL's sources (torch 2.14, NCCL 2.30). Texts,
# not types: gloo raises plain RuntimeErrors, and NCCL raises DistBackendError for everything, a dead peer
# as much as a full /dev/shm or mismatched versions.
_TIMED_OUT = (
    "Timed out waiting",  # gloo: "Timed out waiting 20000ms for recv operation to complete"
    "Application timeout caused pair closure",  # gloo: the other pairs of a timed-out collective
    "Read timeout", "Write timeout", "Connect timeout",  # gloo pair.cc
    "Watchdog caught collective operation timeout",  # NCCL's watchdog
    "wait timeout after",  # the c10d store: a key another rank never set
    "timed out in blocking wait", "NCCL operation timed out",
)
_PEER_GONE = (
    "Connection closed by peer", "Connection reset by peer", "Socket closed", "Socket unexpectedly closed",  # gloo
    "remote process exited or there was a network error", "ncclRemoteError",  # NCCL: ncclRemoteError
    "Connection closed by remote peer", "exceeded error retry count",  # NCCL's last-error lines for a peer
    "Failed to recv, got 0 bytes", "Failed to send, sent 0 bytes", "Broken pipe",  # the c10d store's server is gone
)


def _is_collective_failure(error: BaseException) -> bool:
    markers = (*_TIMED_OUT, *_PEER_GONE, "Gloo connectFullMesh failed", "timed out connecting")
    return isinstance(error, dist.DistError) or any(m in str(error) for m in markers)


def peer_failure(accelerator: Accelerator | None, error: BaseException, heartbeats: Heartbeats | None = None,
                 collective_timeout_s: int = 0, hang_folder: Path | None = None) -> DistrnnError | None:
    """A failed collective as one line, by what its error says; None for anything else (a bug keeps its
    traceback).

    - a timeout: the hang report (hang_report.py) in one line, its evidence in `hang_folder` (PeerUnresponsive);
    - a peer gone (connection closed or reset, ncclRemoteError): "lost contact with another rank";
    - any other torch.distributed error (an NCCL system or usage error): its own text, not a lost peer.
    """
    if accelerator is None or accelerator.num_processes < 2 or not isinstance(error, RuntimeError):
        return None
    text, rank = str(error), accelerator.process_index
    if any(marker in text for marker in _TIMED_OUT):
        return _unresponsive(accelerator, error, heartbeats, collective_timeout_s, hang_folder)
    if any(marker in text for marker in _PEER_GONE):
        if heartbeats is not None and heartbeats.hang_claimed(HANG_CLAIM_WAIT_S):  # it closed on a timed-out rank
            return _unresponsive(accelerator, error, heartbeats, collective_timeout_s, hang_folder)
        return PeerLost(f"rank {rank} lost contact with another rank ({first_line(error)}); stopping")
    if isinstance(error, dist.DistError):
        last = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((after for before, after in zip(last, last[1:]) if before == "Last error:"), None)
        return DistrnnError(f"rank {rank}: {type(error).__name__} (not a lost peer): {first_line(error)}"
                            + (f"; last error: {detail[:200]}" if detail else ""))
    return None


# A rank whose collective timed out closes its connections: the other ranks then see "connection closed" at
# once, and would end the job (torchrun stops every worker when one ends) before the report is written. They
# wait this long for a claim in the store (the timed-out rank makes it right after its timeout), then for the
# report: its 3 s heartbeat check, a py-spy dump (at most hang_report.PY_SPY_TIMEOUT_S) and the files.
HANG_CLAIM_WAIT_S = 2
HANG_REPORT_WAIT_S = 20
# A store operation on the failure path takes milliseconds when the main machine answers. When this machine's
# network is cut, TCPStore's own timeout does not end it (a compare_set was seen blocked for more than 10
# minutes): each one runs under `bounded`.
STORE_WAIT_S = 5


def bounded(call: Callable[[], T], wait_s: float) -> T:
    """call() in a daemon thread, waited for `wait_s`: its result or its exception, else TimeoutError (the thread
    is left blocked; it ends with the process)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=run, name="distrnn-store-call", daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive():
        raise TimeoutError(f"the store did not answer within {wait_s} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _unresponsive(accelerator: Accelerator, error: BaseException, heartbeats: Heartbeats | None,
                  timeout_s: int, hang_folder: Path | None) -> DistrnnError:
    """A collective waited `timeout_s` (or closed on a rank whose collective did): the first rank here claims
    the report, compares every rank's published state (hang_report.diagnose), writes the evidence to
    `hang_folder` and prints one line; every other rank adds its own evidence and waits for the report. A
    frozen rank is stopped by a rank of its machine (it would hold its node until torchrun's 30 s shutdown
    grace and then be killed)."""
    if heartbeats is None:
        return PeerUnresponsive(f"rank {accelerator.process_index}: no answer from another rank within "
                                f"train.collective_timeout_s={timeout_s} s ({first_line(error)}); stopping")
    rank, reporter = accelerator.process_index, heartbeats.claim_report()
    if hang_folder is not None:
        with contextlib.suppress(OSError):
            hang_report.write_own(hang_folder, rank, heartbeats.log.snapshot(), error)
    if reporter is None:  # this rank knows only itself: the report (report.json) is the main machine's to write
        return PeerUnresponsive(
            f"rank {rank} (node {host_name()}, pid {os.getpid()}) cannot reach the store on the main machine at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: this machine's network or the main "
            f"machine is down ({first_line(error)}); its own evidence is in {hang_folder}{os.sep}rank-{rank}.json")
    if not reporter:
        for who in heartbeats.await_report(HANG_REPORT_WAIT_S):
            heartbeats.stop_if_local(who)
        return Quiet(PeerUnresponsive.exit_code)
    line, states, silent = heartbeats.compare()
    evidence = ""
    if hang_folder is not None and heartbeats.write_report(hang_folder, line, states, silent):
        evidence = f"; evidence in {hang_folder}{os.sep}"
    heartbeats.report_done([states[r] for r in silent], line)
    stopped = [r for r in silent if heartbeats.stop_if_local(states[r])]
    again = "; run the same command again to resume from the last checkpoint" if silent else ""
    return PeerUnresponsive(f"{line}; no collective finished within train.collective_timeout_s={timeout_s} s and "
                            f"the run was stopped{' (the frozen rank too)' if stopped else ''}{evidence}{again}")


class Heartbeats:
    """Every rank counts up its own key in torchrun's store (on the main machine) once a second, from a thread
    of its own: it keeps counting while the main thread waits in a collective, and stops when the process
    is frozen (SIGSTOP, a debugger, a machine that stopped scheduling it) or gone. When a collective times
    out, the ranks whose count did not move are the ones that stopped responding. Counts, not clock times:
    machines' clocks differ.
    """

    SECONDS = 1.0
    SILENT_AFTER = 3  # beats missed in a row

    def __init__(self, accelerator: Accelerator, log: CollectiveLog, requests: ReportRequests):
        self.rank, self.world, self.log = accelerator.process_index, accelerator.num_processes, log
        self.requests, self._answering = requests, threading.Thread()
        self.prefix = store_prefix()
        self.store, self.beat_store = self._client(), self._client()
        self.store.set(f"{self.prefix}/who/{self.rank}",
                       json.dumps({"host": host_name(), "pid": os.getpid()}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="distrnn-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def start(accelerator: Accelerator, log: CollectiveLog | None, requests: ReportRequests) -> Heartbeats | None:
        """Where a store listens at MASTER_ADDR:MASTER_PORT: torchrun's (in the launcher of the main machine), or
        under Ray Train the process group's own (in rank 0's process: when rank 0 is frozen, so is the store, and
        the others name it unreachable); None for one process."""
        if accelerator.num_processes < 2 or not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ) or log is None:
            return None
        return Heartbeats(accelerator, log, requests)

    @staticmethod
    def _client() -> dist.TCPStore:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=30))

    def _beat(self) -> None:
        """Count, publish this rank's collective log (what the hang report reads, a frozen rank's too), and pass
        on and answer requests for a report (hang_request.py)."""
        answered = 0
        while True:
            asked = self.requests.asked(self.SECONDS)
            if self._stop.is_set():
                return
            try:
                if asked:
                    self.beat_store.add(f"{self.prefix}/asked", 1)
                self.beat_store.set(f"{self.prefix}/state/{self.rank}", json.dumps(self.log.snapshot()))
                self.beat_store.add(f"{self.prefix}/beats/{self.rank}", 1)
                requests = self.beat_store.add(f"{self.prefix}/asked", 0)
            except Exception:  # the store is gone with the main machine's launcher (launcher_watch ends this one)
                continue
            if requests > answered:
                answered = requests  # requests that come while one is answered are that one: each rank that got the
                if not self._answering.is_alive():  # signal counts it, and every node's launcher passes it on
                    self._answering = threading.Thread(target=self._answer, name="distrnn-hang-report", daemon=True)
                    self._answering.start()

    def _answer(self) -> None:
        """A report asked of the live run: every rank's own evidence; rank 0 compares and prints the line. In a
        thread of its own: the 3 s check for frozen ranks would stop this rank's own beats."""
        folder = self.requests.folder
        with contextlib.suppress(OSError):
            hang_report.write_own(folder, self.rank, self.log.snapshot(), None)
        if self.rank != 0:
            return
        line, states, silent = self.compare(asked=True)
        if self.write_report(folder, line, states, silent, asked=True):
            announce(line, folder)

    def compare(self, asked: bool = False) -> tuple[str, dict[int, dict], set[int]]:
        """The report's line, from every rank's published state and the silent ranks. The states are read first,
        as of the timeout or the request (a live run moves on during the 3 s the silence check takes)."""
        states = self.states()
        silent = self.silent()
        return hang_report.diagnose(states, silent, time.time(), asked=asked), states, silent

    @staticmethod
    def write_report(folder: Path, line: str, states: dict[int, dict], silent: set[int], asked: bool = False) -> bool:
        """report.json, and a py-spy dump of each silent rank of this machine; False if it could not be written."""
        dumps = {r: dump for r in silent if states[r].get("host") == host_name()
                 and (dump := hang_report.py_spy_dump(states[r]["pid"])) is not None}
        try:
            hang_report.write_report(folder, line, states, silent, dumps, asked=asked)
            return True
        except OSError:
            return False

    def silent(self) -> set[int]:
        """The other ranks whose count did not move for SILENT_AFTER beats (hang_report.read_states says who)."""
        try:
            keys = [f"{self.prefix}/beats/{r}" for r in range(self.world)]
            before = bounded(lambda: [self.store.add(k, 0) for k in keys], STORE_WAIT_S)
            time.sleep(self.SILENT_AFTER * self.SECONDS)
            after = bounded(lambda: [self.store.add(k, 0) for k in keys], STORE_WAIT_S)
            return {r for r in range(self.world) if r != self.rank and after[r] == before[r]}
        except Exception:  # the store is unreachable too: nothing can be said about who
            return set()

    def states(self) -> dict[int, dict]:
        """Every rank's last published state (hang_report.read_states); {} for each when the store does not answer."""
        try:
            return bounded(lambda: hang_report.read_states(self.store, self.prefix, self.world), STORE_WAIT_S)
        except TimeoutError:
            return {rank: {} for rank in range(self.world)}

    def claim_report(self) -> bool | None:
        """True for the first rank to claim this hang's report (a compare-and-set in the store); None when the
        store cannot be reached (the main machine, or this machine's network, is down)."""
        try:
            mine = str(self.rank)
            claimed = bounded(lambda: self.store.compare_set(f"{self.prefix}/hang/reporter", "", mine), STORE_WAIT_S)
            return claimed.decode() == mine
        except Exception:
            return None

    def hang_claimed(self, wait_s: float) -> bool:
        try:
            bounded(lambda: self.store.wait([f"{self.prefix}/hang/reporter"], timedelta(seconds=wait_s)), wait_s + 1)
            return True
        except Exception:  # not within wait_s, or the store is gone: a peer that really left
            return False

    def await_report(self, wait_s: float) -> list[dict]:
        """The frozen ranks ({"host", "pid"}) the reporter found, once it wrote the report; [] after wait_s."""
        try:
            bounded(lambda: self.store.wait([f"{self.prefix}/hang/frozen"], timedelta(seconds=wait_s)), wait_s + 1)
            return json.loads(bounded(lambda: self.store.get(f"{self.prefix}/hang/frozen"), STORE_WAIT_S))
        except Exception:
            return []

    def report_done(self, frozen: list[dict], line: str) -> None:
        """The report is written: its line for every machine's launcher (launcher/hang_watch.py), then the frozen
        ranks, which the other ranks and those launchers wait for."""
        with contextlib.suppress(Exception):
            bounded(lambda: self.store.set(f"{self.prefix}/hang/line", line), STORE_WAIT_S)
            bounded(lambda: self.store.set(f"{self.prefix}/hang/frozen", json.dumps(frozen)), STORE_WAIT_S)

    def stop_if_local(self, who: dict) -> bool:
        """SIGKILL a silent rank of this machine: one started by the same launcher as this process; True if so."""
        if who.get("host") != host_name() or "pid" not in who:
            return False
        try:
            process = psutil.Process(who["pid"])
            if process.ppid() == os.getppid():
                process.send_signal(signal.SIGKILL)
                return True
        except psutil.Error:
            pass
        return False

    def close(self) -> None:
        self._stop.set()
        self.requests.wake()
        self._thread.join(timeout=2 * self.SECONDS)


def teardown(accelerator: Accelerator | None) -> None:
    """Finish trackers and the process group; without this 5 of 12 2-process runs died with SIGABRT."""
    try:
        if accelerator is not None:
            accelerator.end_training()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_worker(command: click.Command, prog: str) -> NoReturn:
    """A worker's entry point: `run_cli`, then, in a multi-process run, leave without the
    interpreter's finalization.

    Measured here: 4 of 60 two-process runs that had finished, torn down the process group and run
    every atexit handler still died with SIGABRT ("terminate called without an active exception")
    while the interpreter finalized, a native thread outliving the process group; 0 of 80 with
    os._exit after flushing what Python would have flushed.
    """
    code = run_cli(command, prog)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        sys.exit(code)
    if "wandb" in sys.modules:  # its service process is stopped by an atexit handler otherwise
        sys.modules["wandb"].teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
