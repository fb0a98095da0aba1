"""The benchmark's quick mode runs end to end (the full run is what docs/performance.md quotes)."""

from __future__ import annotations

import json

from distrnn.ranks import devices
from tests.helpers import BIN, run


def test_quick_benchmark_writes_json_table_and_plot(tmp_path, data_dir):
    result = run([str(BIN / "python"), "-m", "benchmarks.bench", "--quick", "--no-ddp", "--out", str(tmp_path),
                  "--data-dir", str(data_dir)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    native_bf16 = devices.cpu_bf16_native() is not None  # there the fast config also runs in fp32, side by side
    assert set(results["contestants"]) == {"seed loop", "distrnn default", "distrnn fast", "distrnn fast, curve",
                                           *(["distrnn fast, fp32"] if native_bf16 else [])}
    assert all(r["samples_per_s"] > 0 and r["history"] for r in results["contestants"].values())
    assert all(r["wall_seconds"] > r["train_seconds"] > 0 for r in results["contestants"].values())
    assert results["contestants"]["distrnn fast"]["eval_seconds"] > 0
    fixed = results["fixed"]
    assert fixed["run_64_seconds"] > fixed["import_seconds"] > 0  # a run imports torch and accelerate too
    assert (results["bare"]["default"]["batch_size"], results["bare"]["default"]["precision"]) == (64, "no")
    assert (results["bare"]["fast"]["batch_size"], results["bare"]["fast"]["precision"]) == (
        512, "bf16" if native_bf16 else "no")
    assert results["machine"]["cpu_capability"] == devices.cpu_capability()
    assert results["machine"]["cpu_bf16"] == (devices.cpu_bf16_native() or "emulated")
    assert all(b["samples_per_s"] > 0 for b in results["bare"].values())
    assert [t["status"] for t in results["targets"]].count("-") == 0  # every target is judged
    assert all(t["status"] in ("met", "missed", "-") for t in results["targets"])
    table = (tmp_path / "results.md").read_text()
    assert f"({devices.cpu_capability()}, bf16: " in table.splitlines()[0]  # the CPU beside every number
    assert "| seed loop |" in table and "| fast config whole command / seed notebook whole run |" in table
    assert (tmp_path / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
