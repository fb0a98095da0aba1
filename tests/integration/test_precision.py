"""train.precision auto on the CPU that runs the tests: bf16 where torch reports native bf16, fp32 where bf16
would be emulated (the unit tests in tests/unit/test_devices.py fake the other kind of CPU)."""

from __future__ import annotations

import json

from distrnn.ranks import devices
from tests.helpers import counts, distrnn

# One epoch of the fast config (batch 512, onecycle) on 2048 images: 4 updates, seconds even with bf16 emulated.
SMALL = ["--mode", "cpu", "--config", "fast", "--epochs", "1", "--no-wandb", "--set", "data.train_samples=2048",
         "--set", "data.test_samples=1000"]


def test_auto_trains_and_evaluates_exactly_as_the_precision_it_names(tmp_path, data_dir):
    """The auto run's counts equal those of a run asked for the precision auto says it chose (another run, not
    the run's own record), and the start line, summary.json and `distrnn evaluate` agree with it."""
    choice = devices.choose_precision("auto", on_cpu=True)
    auto = distrnn("train", *SMALL, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "auto"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"precision {choice.describe()}, global batch" in auto.stdout
    assert "warning: precision bf16 is emulated" not in auto.stdout + auto.stderr  # auto chose: nothing to warn
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["precision"] == {"requested": "auto", "chosen": choice.chosen, "reason": choice.reason}

    named = distrnn("train", *SMALL, "--precision", choice.chosen, "--data-dir", str(data_dir),
                    "--output-dir", str(tmp_path / "named"))
    assert named.returncode == 0, named.stderr[-3000:]
    assert counts(auto.stdout) == counts(named.stdout) and counts(auto.stdout)

    evaluated = distrnn("evaluate", "--checkpoint", str(tmp_path / "auto"), "--mode", "cpu", "--data-dir",
                        str(data_dir), "--limit", "1000")  # the model's precision, auto, resolved here too
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert counts(evaluated.stdout)[-1] == (summary["test_correct"], 1000)


def test_explicit_bf16_runs_as_asked_and_warns_once_where_it_is_emulated(tmp_path, data_dir):
    result = distrnn("train", *SMALL, "--precision", "bf16", "--set", "data.train_samples=512", "--data-dir",
                     str(data_dir), "--output-dir", str(tmp_path / "bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["precision"]["chosen"] == "bf16"
    emulated = devices.cpu_bf16_native() is None
    warned = [line for line in result.stdout.splitlines() if line.startswith("warning: precision bf16 is emulated")]
    assert len(warned) == (1 if emulated else 0), result.stdout[-3000:]
    if emulated:
        assert warned[0].endswith("slower than fp32: use --precision auto or --precision no")
