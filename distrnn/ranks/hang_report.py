"""When a collective times out: who, where and why in one line, and the evidence in the run folder's hang/.

Each rank's heartbeat publishes its collective log's snapshot to torchrun's store every second (collectives.
Heartbeats), so the rank that reports reads every rank's last known state there, a frozen one's included. The
line says which ranks are frozen or unreachable (their heartbeat stopped), busy outside any collective (heartbeat
alive, in no collective), or waiting in another collective than the rest, with sequence numbers and call sites;
and, when the ranks' records disagree before that (a rank that skipped a collective or called it with another
shape), where they first differed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from distrnn import __version__

PY_SPY_TIMEOUT_S = 10  # a dump of a stopped process took about 1 s here


def _who(rank: int, state: dict) -> str:
    return f"rank {rank} (node {state.get('host', '?')}, pid {state.get('pid', '?')})"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, sorted(ranks)))


def _collective(entry: dict) -> str:
    return f"{entry['site']} {entry['op']} #{entry['seq']}"


def _last(state: dict, others: list[dict] = ()) -> str:
    """A rank's last collective: its own record's, or a later one that the other ranks finished (a collective
    finishes only once every rank is in it): a frozen rank's record is up to a heartbeat (1 s) old."""
    finished = [e for other in others for e in other.get("ring") or [] if isinstance(e.get("end"), float)]
    own = (state.get("ring") or [None])[-1]
    last = max([e for e in [own, *finished] if e], key=lambda e: e["seq"], default=None)
    if last is None:
        return "it had called no collective"
    return f"its last collective was #{last['seq']} {last['op']} at {last['site']}"


def first_difference(states: dict[int, dict]) -> str | None:
    """Where the ranks' records first disagree (op, call site or shapes at one sequence number), if they do."""
    rings = {r: {e["seq"]: e for e in s.get("ring") or []} for r, s in states.items()}
    common = set.intersection(*(set(ring) for ring in rings.values())) if rings else set()
    for seq in sorted(common):
        calls = {r: (ring[seq]["op"], ring[seq]["site"], ring[seq]["shapes"]) for r, ring in rings.items()}
        if len(set(map(str, calls.values()))) > 1:
            groups: dict[str, list[int]] = {}
            for r, (op, site, shapes) in sorted(calls.items()):
                groups.setdefault(f"{op} {shapes} at {site}", []).append(r)
            return f"their records first differ at #{seq}: " + ", ".join(
                f"{_ranks(rs)} called {call}" for call, rs in groups.items())
    return None


def diagnose(states: dict[int, dict], silent: set[int], now: float, asked: bool = False) -> str:
    """The one line's diagnosis, from every rank's published state ({rank: snapshot + host + pid}). `asked`: of a
    live run (hang_request.py), where all ranks in one collective is what a healthy run shows too."""
    elsewhere, waiting = [], {}
    for rank, state in sorted(states.items()):
        if rank in silent:
            elsewhere.append(f"{_who(rank, state)} is frozen or unreachable (no heartbeat for "
                             f"{max(0.0, now - state.get('time', now)):.0f} s, the last from {state.get('at', '?')}); "
                             f"{_last(state, [states[r] for r in states if r not in silent])}")
        elif state.get("in") is None:
            elsewhere.append(f"{_who(rank, state)} is busy outside any collective at {state.get('at', '?')} (its "
                             f"heartbeat is alive); {_last(state)}")
        else:
            waiting.setdefault(_collective(state["in"]), []).append(rank)
    groups = sorted(waiting.items(), key=lambda item: (len(item[1]), item[1]))
    if not elsewhere and len(groups) > 1:  # every rank waits, in different collectives: the fewest are the odd ones
        (call, ranks), groups = groups[0], groups[1:]
        elsewhere.append(f"{', '.join(_who(r, states[r]) for r in ranks)} {'is' if len(ranks) == 1 else 'are'} in "
                         f"{call}")
    if elsewhere:
        line = "; ".join(elsewhere) + ("" if not groups else " while " + "; ".join(
            f"{_ranks(rs)} {'waits' if len(rs) == 1 else 'wait'} in {call}" for call, rs in groups))
    elif groups:
        line = f"{_ranks(groups[0][1])} all wait in {groups[0][0]}, none frozen or elsewhere" + (
            "" if asked else ": the network between their machines may be cut")
    else:
        line = "no rank's state could be read"
    differ = first_difference({r: s for r, s in states.items() if s.get("ring")})
    return line + (f"; {differ}" if differ else "")


def read_states(store, prefix: str, world: int) -> dict[int, dict]:
    """Every rank's last published snapshot, with its host and pid; {} for a rank that never published."""
    states = {}
    for rank in range(world):
        try:
            state = json.loads(store.get(f"{prefix}/state/{rank}")) if store.check([f"{prefix}/state/{rank}"]) else {}
            state.update(json.loads(store.get(f"{prefix}/who/{rank}")))
        except Exception:  # the store went with the main machine: say what is known
            state = {}
        states[rank] = state
    return states


def py_spy_dump(pid: int) -> str | None:
    """A frozen process's Python stack from outside (py-spy reads its memory; it need not run), if py-spy is
    installed; None if not."""
    if shutil.which("py-spy") is None:
        return None
    try:
        result = subprocess.run(["py-spy", "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                                text=True, timeout=PY_SPY_TIMEOUT_S)
        return result.stdout + result.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py-spy dump failed: {e}"


def write_report(folder: Path, line: str, states: dict[int, dict], silent: set[int], local_dumps: dict[int, str],
                 asked: bool = False):
    """report.json (the line, every rank's published state) and a py-spy dump per frozen rank of this machine.
    `asked`: a report asked of a live run (hang_request.py), not one made because a collective timed out."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank, dump in local_dumps.items():
        (folder / f"rank-{rank}.py-spy.txt").write_text(dump)
    report = {"line": line, "time": time.time(), "asked": asked, "frozen": sorted(silent), "ranks": states}
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))


def _flight_recorder() -> Any:
    """torch's flight recorder of this process as JSON, when TORCH_FR_BUFFER_SIZE turned it on (None if not; its
    error if it cannot say)."""
    if int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0) <= 0:
        return None
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json  # private: torch has no public reader yet

        return json.loads(_dump_fr_trace_json(True, False))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def write_own(folder: Path, rank: int, snapshot: dict, error: BaseException | None) -> None:
    """rank-R.json from a rank that still answers: its record, the traceback of the collective that failed (where
    it waited; None when the report was asked of a live run), every thread's Python stack now, torch's flight
    recorder, its environment and versions."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {t.ident: t.name for t in threading.enumerate()}
    stacks = {names.get(ident, str(ident)): traceback.format_stack(frame)
              for ident, frame in sys._current_frames().items()}
    environment = {k: v for k, v in os.environ.items()
                   if k.startswith(("DISTRNN_", "TORCH", "NCCL_", "GLOO_", "MASTER_", "SLURM_", "CUDA_"))
                   or k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "OMP_NUM_THREADS", "HOSTNAME")}
    import torch  # here: the launcher compares records with first_difference and does not import torch

    versions = {"distrnn": __version__, "torch": torch.__version__, "python": platform.python_version(),
                "platform": platform.platform()}
    own = {"rank": rank, "pid": os.getpid(), "record": snapshot,
           "failed": traceback.format_exception(error) if error else None, "stacks": stacks,
           "environment": environment, "versions": versions, "flight_recorder": _flight_recorder()}
    (folder / f"rank-{rank}.json").write_text(json.dumps(own, indent=1, default=str))
