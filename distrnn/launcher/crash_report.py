"""A worker killed by a signal (gloo's abort on a collective called with another shape, a crash in C++): where it
died and where the other ranks were, in one line, from the records its launcher's workers leave behind
(ranks/crash_record.py), and the evidence in its run folder's hang/.

The launcher compares the ranks of its own machine: their records are files here. A rank on another machine is
named by its own machine's launcher if it was the one killed; otherwise it is left out of the comparison.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrnn.ranks.crash_record import CRASH_RECORDS_VARIABLE, FATAL_SIGNALS, read
from distrnn.ranks.hang_report import first_difference

if TYPE_CHECKING:
    from distrnn.launcher.hang_watch import HangWatch

_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def _call(entry: dict[str, Any]) -> str:
    return f"{entry['site']} {entry['op']} #{entry['seq']}"


def _in_flight(state: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in state["ring"] if e.get("end") is None), None)


def stack_site(stacks: str) -> str:
    """The innermost distrnn line of the main thread's stack in faulthandler's dump (the main thread is listed
    last), or '?' when the dump has none (no fatal signal, or only C++ frames)."""
    blocks = [b for b in re.split(r"\n(?=(?:Current thread|Thread) 0x)", stacks) if _FRAME.search(b)]
    if not blocks:
        return "?"
    frames = _FRAME.findall(blocks[-1])
    ours = [f for f in frames if "/distrnn/" in f[0] and not f[0].endswith(("collective_log.py", "collectives.py"))]
    path, line, _ = (ours or frames)[0]
    return f"{Path(path).name}:{line}"


def describe(ranks: dict[int, dict[str, Any]], killed: int, sig: signal.Signals) -> str:
    """The line: the killed rank, where it died (the collective it was in, else its stack's innermost distrnn
    line), where this machine's other ranks were, and where the ranks' records first differ if they do."""
    state = ranks[killed]
    line = f"worker rank {killed} (node {state['host']}, pid {state['pid']}) was killed by {sig.name}"
    died_in = _in_flight(state)
    if died_in is not None:
        line += f" in {_call(died_in)}"
    else:
        last = state["ring"][-1] if state["ring"] else None
        line += f" at {stack_site(state['stacks'])}, outside any collective" + (
            f" (its last was #{last['seq']} {last['op']} at {last['site']})" if last else "")
    places: dict[str, list[int]] = {}
    for rank, other in sorted(ranks.items()):
        if rank != killed:
            entry = _in_flight(other)
            places.setdefault(f"in {_call(entry)}" if entry else "outside any collective", []).append(rank)
    if places:
        line += " while " + "; ".join(f"{'rank' if len(rs) == 1 else 'ranks'} {','.join(map(str, rs))} "
                                      f"{'was' if len(rs) == 1 else 'were'} {where}" for where, rs in places.items())
    differ = first_difference({r: s for r, s in ranks.items() if s["ring"]})
    return line + (f"; {differ}" if differ else "")


def write_bundle(hang: Path, line: str, ranks: dict[int, dict[str, Any]], killed: int, sig: signal.Signals) -> None:
    """report.json (the line, every local rank's record) and rank-R.json per rank (its record and faulthandler's
    dump of its stacks, written only by the one a fatal signal killed)."""
    hang.mkdir(parents=True, exist_ok=True)
    for rank, state in ranks.items():
        (hang / f"rank-{rank}.json").write_text(json.dumps(
            {"rank": rank, "host": state["host"], "pid": state["pid"], "record": {"ring": state["ring"]},
             "fatal_stacks": state["stacks"] or None}, indent=1))
    report = {"line": line, "time": time.time(), "killed": {"rank": killed, "signal": sig.name},
              "ranks": {r: {k: s[k] for k in ("host", "pid", "ring")} for r, s in ranks.items()}}
    (hang / "report.json").write_text(json.dumps(report, indent=1))


class CrashRecords:
    """The folder this launcher's workers write their records in (CRASH_RECORDS_VARIABLE), removed by close()."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="distrnn-crash-records-"))
        self.watch: HangWatch | None = None  # the current start's (agent._run_once)

    def env(self) -> dict[str, str]:
        return {CRASH_RECORDS_VARIABLE: str(self.folder)}

    def report(self, killed: int, exit_code: int) -> str | None:
        """For a worker that a fatal signal killed (exit code -SIG): the line, with the bundle written; None for
        any other failure, or when the killed rank left no record (it died starting, or is on another machine)."""
        if -exit_code not in [int(s) for s in FATAL_SIGNALS]:
            return None
        ranks = read(self.folder)
        if killed not in ranks:
            return None
        sig = signal.Signals(-exit_code)
        line = describe(ranks, killed, sig)
        hang = Path(ranks[killed]["hang"])
        try:
            write_bundle(hang, line, ranks, killed, sig)
        except OSError as e:
            return f"{line}; its evidence could not be written to {hang} ({e.strerror})"
        return f"{line}; evidence in {hang}/"

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
