"""The benchmark's quick mode runs end to end (the full run is what the README quotes)."""

from __future__ import annotations

import pytest

import json

from tests.helpers import BIN, run

pytestmark = pytest.mark.slow


def test_quick_benchmark_writes_json_table_and_plot(tmp_path, data_dir):
    result = run([str(BIN / "python"), "-m", "benchmarks.bench", "--quick", "--no-ddp", "--out", str(tmp_path),
                  "--data-dir", str(data_dir)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["contestants"]) == {"seed loop", "distrnn default", "distrnn fast"}
    assert all(r["samples_per_s"] > 0 and r["history"] for r in results["contestants"].values())
    assert "| seed loop |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
