"""The run-folder hold against a second real process (the rest: tests/unit/test_integrity.py)."""

from __future__ import annotations

import subprocess
import sys

from distrnn.run.hold import FolderHold

# --- the hold ---------------------------------------------------------------------------------------

def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / "run" / ".hold"
    first = FolderHold(path)
    assert first.take() == []
    holder = first.read()
    other = subprocess.run([sys.executable, "-c",
                            "from pathlib import Path; from distrnn.run.hold import FolderHold;"
                            f"FolderHold(Path({str(path)!r})).take()"], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0
    assert f"DistrnnError: {path.parent} is in use by another run ({holder.describe()}); pass another --output-dir" \
           in other.stderr
    first.release()
    assert not path.exists()
