"""Fault injection for tests: the one switch, DISTRNN_FAULTS, read only here.

Comma-separated faults, set in the environment of the process (or of one node's launcher) that
should have them; unset in every real run:

    publish-delay=S     the main process waits S seconds between writing a checkpoint and renaming it
"""

from __future__ import annotations

import os
import time


def _active() -> dict[str, str]:
    faults = {}
    for item in os.environ.get("DISTRNN_FAULTS", "").split(","):
        name, _, value = item.strip().partition("=")
        if name:
            faults[name] = value
    return faults


def delay_publish() -> None:
    time.sleep(float(_active().get("publish-delay", "0") or 0))
