"""TensorBoard beside W&B (--log-with): what each tracker holds, and one failing never stops the other."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import BIN, WANDB_OFFLINE, distrnn

try:  # TensorBoard's own reader: what `tensorboard --logdir` shows is what these tests read
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    EventAccumulator = None


# Short runs: 32 steps of 64 images, a loss point every 5 steps, 2000 test images.
SHORT = ["--config", "smoke", "--set", "data.train_samples=2000", "--set", "data.test_samples=2000",
         "--set", "train.log_every=5"]
MISSING = "warning: TensorBoard is not installed; training continues without it"
# What Python raises on importing a package that is not installed at all (a stand-in's body, see shadow)
NOT_INSTALLED = 'raise ModuleNotFoundError("No module named \'{package}\'", name="{package}")\n'


@pytest.fixture(scope="module", autouse=True)
def tensorboard_installed() -> None:
    require(EventAccumulator is not None, "tensorboard is not installed; pip install tensorboard")


def train(out: Path, data_dir: Path, log_with: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = distrnn("train", "--mode", "cpu", *SHORT, "--log-with", log_with, "--data-dir", str(data_dir),
                     "--output-dir", str(out), env={**WANDB_OFFLINE, **(env or {})})  # W&B as a user has it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "metrics.jsonl").is_file()
    return result


def shadow(tmp_path: Path, body: str, *packages: str) -> dict[str, str]:
    """An env whose PYTHONPATH puts a stand-in for each of `packages` first: importing one runs `body`."""
    root = tmp_path / "shadow"
    for package in packages:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(body.format(package=package))
    return {"PYTHONPATH": str(root)}


def board(out: Path) -> EventAccumulator:
    """Every scalar and image event of the run (size_guidance 0: keep all, no sampling)."""
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), f"no event file in {out / 'tensorboard'}"
    return EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()


def assert_tensorboard_holds_the_run(out: Path) -> EventAccumulator:
    """Every metric of metrics.jsonl, at its step, and the final accuracy of summary.json."""
    events = board(out)
    summary = json.loads((out / "summary.json").read_text())
    assert events.Scalars("test/accuracy")[-1].value == pytest.approx(summary["test_accuracy"], rel=1e-6)
    assert len(events.Scalars("train/loss")) >= 5
    logged: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time"):
                logged.setdefault(key, []).append((record["step"], value))
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/seconds", "epoch", "test/accuracy",
            "test/correct", "test/seen"} <= set(logged)
    for key, points in logged.items():
        seen = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in seen] == [s for s, _ in points], key
        assert [v for _, v in seen] == pytest.approx([v for _, v in points], rel=1e-6), key
    return events


def assert_the_config_is_in_the_event_file(out: Path, events: EventAccumulator) -> None:
    """TensorBoard's hparams in the run's one event file: no sub-folder that TensorBoard would list as a run."""
    assert [p.is_file() for p in (out / "tensorboard").iterdir()] == [True]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def tensorboard_warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines()
            if re.search("warning", line, re.I) and re.search("tensorboard", line, re.I)]


def wandb_summary(out: Path) -> dict:
    [run] = sorted((out / "wandb").glob("offline-run-*"))
    inspected = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(run)],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    return json.loads(inspected.stdout)["summary"]


def test_wandb_and_tensorboard_together_hold_the_same_run(tmp_path, data_dir):
    out = tmp_path / "run"
    result = train(out, data_dir, "wandb,tensorboard")
    assert not tensorboard_warnings(result)
    events = assert_tensorboard_holds_the_run(out)
    confusion = events.Images("test/confusion")
    assert len(confusion) == 1 and confusion[0].width > 100 and confusion[0].encoded_image_string.startswith(b"\x89PNG")
    summary = json.loads((out / "summary.json").read_text())
    assert confusion[0].step == summary["steps"]
    # W&B got its own objects (chart, tables, image), and the same final accuracy
    values = wandb_summary(out)
    assert values["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "test/confusion_matrix_table" in values and values["test/confusion"]["_type"] == "image-file"


def test_tensorboard_alone_makes_no_wandb_run(tmp_path, data_dir):
    out = tmp_path / "run"
    train(out, data_dir, "tensorboard")
    assert not (out / "wandb").exists()
    assert_the_config_is_in_the_event_file(out, assert_tensorboard_holds_the_run(out))


def test_wandb_mode_disabled_starts_no_wandb_at_all(tmp_path, data_dir):
    """WANDB_MODE=disabled is --no-wandb: wandb is not even imported (a stand-in that raises on import shows it)."""
    env = {**shadow(tmp_path, 'raise RuntimeError("wandb was imported")\n', "wandb"), "WANDB_MODE": "disabled"}
    out = tmp_path / "run"
    result = train(out, data_dir, "wandb,tensorboard", env=env)
    assert "W&B" not in result.stdout and "wandb was imported" not in result.stdout + result.stderr
    assert not (out / "wandb").exists()
    assert_tensorboard_holds_the_run(out)


def test_no_trackers_still_writes_metrics_jsonl(tmp_path, data_dir):
    out = tmp_path / "run"
    train(out, data_dir, "none")
    assert not (out / "wandb").exists() and not (out / "tensorboard").exists()
    keys = {key for line in (out / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert {"train/loss", "test/accuracy"} <= keys


def test_missing_tensorboard_is_one_warning(tmp_path, data_dir):
    # accelerate falls back to tensorboardX: missing means both missing
    env = shadow(tmp_path, NOT_INSTALLED, "tensorboard", "tensorboardX")
    out = tmp_path / "run"
    result = train(out, data_dir, "tensorboard", env=env)
    assert tensorboard_warnings(result) == [MISSING + " (pip install tensorboard, or drop it from --log-with)"]
    assert not list(out.glob("tensorboard/**/events.out.tfevents.*"))
    assert (out / "summary.json").is_file() and (out / "metrics.jsonl").is_file()


def test_without_tensorboard_tensorboardx_holds_the_run_hparams_included(tmp_path, data_dir):
    """accelerate's fallback (tensorboardX comes with Ray Train): the same event file, from its own summaries."""
    require(subprocess.run([str(BIN / "python"), "-c", "import tensorboardX"]).returncode == 0,
            "tensorboardX is not installed: pip install 'distrnn[ray]'")
    env = shadow(tmp_path, NOT_INSTALLED, "tensorboard")
    out = tmp_path / "run"
    result = train(out, data_dir, "tensorboard", env=env)
    assert not tensorboard_warnings(result), result.stdout[-2000:]
    events = assert_tensorboard_holds_the_run(out)
    assert_the_config_is_in_the_event_file(out, events)


def test_broken_tensorboard_does_not_stop_wandb(tmp_path, data_dir):
    env = shadow(tmp_path, 'raise ImportError("tensorboard is broken here")\n', "tensorboard")
    out = tmp_path / "run"
    result = train(out, data_dir, "wandb,tensorboard", env=env)
    [warning] = tensorboard_warnings(result)
    assert warning.startswith("warning: TensorBoard could not start (ImportError: tensorboard is broken here)")
    assert wandb_summary(out)["test_accuracy"] == pytest.approx(json.loads((out / "summary.json").read_text())
                                                                ["test_accuracy"])


def test_failing_wandb_does_not_stop_tensorboard(tmp_path, data_dir):
    env = shadow(tmp_path, "def init(*args, **kwargs):\n    raise RuntimeError('W&B is down')\n", "wandb")
    out = tmp_path / "run"
    result = train(out, data_dir, "wandb,tensorboard", env=env)
    assert "training continues without W&B" in result.stdout
    assert not tensorboard_warnings(result)
    assert_tensorboard_holds_the_run(out)
    assert len(board(out).Images("test/confusion")) == 1
