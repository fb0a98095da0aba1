"""A worker ends itself when the launcher that started it is gone (killed). torchrun starts each worker in a
session of its own, so nothing else stops it, and a worker left behind would train on with the others, or wait
in a process group that cannot form, and keep the run from ending. No torch here: the launcher imports the
variable's name.
"""

from __future__ import annotations

import os
import sys
import threading

from distrnn.errors import PeerLost

# Set by distrnn's launcher for the workers it starts: its own pid, the parent each worker must keep. Read from
# the environment, not from os.getppid() when the watch starts: a launcher killed while its workers were still
# importing torch (2-3 s) was already gone by then, and the watch took the process that adopted them for it.
LAUNCHER_PID_VARIABLE = "DISTRNN_LAUNCHER_PID"


class LauncherWatch:
    """Checks once a second, from a thread of its own, that this worker's parent is still its launcher."""

    SECONDS = 1.0

    def __init__(self, rank: str, launcher: int):
        self.rank, self.launcher = rank, launcher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distrnn-launcher-watch", daemon=True)
        self._thread.start()

    @staticmethod
    def start() -> LauncherWatch | None:
        """Under torchrun (its agent is the parent: distrnn's launcher, or a torchrun started by hand or by
        `accelerate launch`, whose pid is the parent's at this point); None for a process that runs the whole run
        itself. Started before the process group is made: a worker joining it when its launcher was killed, with
        the rendezvous store the launcher held, waited there for the whole collective timeout (45 s seen)."""
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return None
        launcher = int(os.environ.get(LAUNCHER_PID_VARIABLE) or os.getppid())
        return LauncherWatch(os.environ.get("RANK", "?"), launcher)

    def _watch(self) -> None:
        while True:
            if os.getppid() != self.launcher:
                print(f"distrnn.train: error on rank {self.rank}: its launcher (pid {self.launcher}) is gone; "
                      "stopping", file=sys.stderr, flush=True)
                os._exit(PeerLost.exit_code)
            if self._stop.wait(self.SECONDS):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.SECONDS)
