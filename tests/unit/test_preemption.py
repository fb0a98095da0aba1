"""A stop request read from the run folder: Ray's workers run their loop in a thread (no signal handler there),
so Ray's driver writes the signal's name to RUN/stop-request (distrnn/launcher/ray.py StopFile)."""

from __future__ import annotations

import signal
import threading

from distrnn.ranks.preemption import STOP_FILE_VARIABLE, StopRequest


def in_a_thread(make):
    made = []
    thread = threading.Thread(target=lambda: made.append(make()))
    thread.start()
    thread.join()
    return made[0]


def test_a_worker_in_a_thread_reads_the_drivers_stop_file_at_each_check(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop-request"
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(stop_file))
    request = in_a_thread(StopRequest)
    assert request.signal is None  # no file yet
    stop_file.write_text("")
    assert request.signal is None  # not a signal's name (yet)
    stop_file.write_text("SIGTERM\n")
    assert request.signal is signal.SIGTERM
    stop_file.unlink()
    assert request.signal is signal.SIGTERM  # remembered: the main worker removes the file once it stopped


def test_without_the_variable_no_file_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv(STOP_FILE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stop-request").write_text("SIGTERM")
    assert in_a_thread(StopRequest).signal is None
