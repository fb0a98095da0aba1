"""`make gpu-check` on a machine without a GPU: the CPU-runnable checks pass, the GPU-only ones are
reported as skipped, never as passed."""

from __future__ import annotations

import json

import pytest

from distrnn.ranks.devices import visible_gpus
from tests.helpers import BIN, run


@pytest.mark.skipif(visible_gpus() > 0, reason="checks how a machine without a GPU reports GPU-only checks")
def test_gpu_check_runs_what_a_cpu_can_and_skips_the_rest(tmp_path, data_dir):
    result = run([str(BIN / "python"), "-m", "benchmarks.gpu_check", "--data-dir", str(data_dir),
                  "--out", str(tmp_path)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-none.json").read_text())
    status = {name: r["status"] for name, r in report["checks"].items()}
    gpu_only = [name for name in status if "GPU" in name or "dtype probe" in name or "fp16" in name]
    assert gpu_only and all(status[name] == "skipped" for name in gpu_only), status
    ran = [name for name in status if name not in gpu_only]
    assert len(ran) >= 5 and all(status[name] == "passed" for name in ran), status
    resume = report["checks"]["checkpoint, SIGUSR1 mid-epoch, deterministic resume: the same final counts"]["details"]
    assert resume["counts (train, test)"] == resume["uninterrupted"]
    assert "| skipped |" in (tmp_path / "gpu-none.md").read_text()
