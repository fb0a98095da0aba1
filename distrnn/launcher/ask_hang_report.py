"""`distrnn hang-report RUN`: ask a live run where its ranks are, and print the hang report's one line.

The run's main process is found by its hold on the folder (RUN/.hold: host and pid) and sent
hang_request.ASK_SIGNAL; the ranks answer as described in distrnn/ranks/hang_request.py, and this command waits
for the report.json they write (newer than the request) and prints its line. The same as SIGUSR2 to the
`distrnn train` process, for a user who does not know its pid or is on another terminal.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from distrnn.errors import CONTEXT_SETTINGS, DistrnnError, host_name
from distrnn.ranks.hang_request import ANSWER_WAIT_S, ASK_SIGNAL, asked_line
from distrnn.run.folder import RunFolder
from distrnn.run.hold import FolderHold

POLL_S = 0.2


@click.command(name="hang-report", context_settings=CONTEXT_SETTINGS)
@click.argument("run", type=click.Path(path_type=Path))
def command(run: Path) -> None:
    """Ask a running `distrnn train` where each rank is (which collective, which line), without stopping it.

    RUN is the run's --output-dir. Prints the hang report's one line; every rank's evidence (its recent
    collectives, its Python stacks, environment and versions) goes to RUN/hang/ (docs/hangs.md). Run it on the
    machine of the run's main process (rank 0); elsewhere, send SIGUSR2 to `distrnn train` on that machine.
    """
    folder = RunFolder(str(run))
    if not folder.root.is_dir():
        raise DistrnnError(f"{run} is not a folder; pass the --output-dir of a running `distrnn train`")
    holder = FolderHold(folder.hold).read()
    if holder is None:
        raise DistrnnError(f"no run is training in {run} (it has no {folder.hold.name}); a finished or stopped run's "
                           f"last report, if it had one, is {folder.hang / 'report.json'}")
    if holder.host != host_name():
        raise DistrnnError(f"the run in {run} has its main process on node {holder.host} (pid {holder.pid}); run "
                           "this there, or send SIGUSR2 to `distrnn train` on that node")
    asked_at = time.time()
    try:
        os.kill(holder.pid, ASK_SIGNAL)
    except ProcessLookupError:
        raise DistrnnError(f"the run that holds {run} (pid {holder.pid}) is gone; nothing to report") from None
    line = _answer(folder.hang / "report.json", asked_at)
    if line is None:
        raise DistrnnError(f"no report from the run within {ANSWER_WAIT_S} s: it may be starting still (run this "
                           f"again), or its main process (pid {holder.pid}) is frozen: py-spy dump --pid {holder.pid}")
    click.echo(asked_line(line, folder.hang))


def _answer(path: Path, asked_at: float) -> str | None:
    """The line of a report written after `asked_at`, once one is (None after ANSWER_WAIT_S)."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    while time.monotonic() < deadline:
        try:
            report = json.loads(path.read_text())
            if report.get("asked") and report.get("time", 0) >= asked_at:
                return report["line"]
        except (OSError, ValueError):  # not written yet, or being written
            pass
        time.sleep(POLL_S)
    return None
