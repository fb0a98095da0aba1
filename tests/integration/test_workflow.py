"""Many runs: a validation holdout and the best model, early stopping, positional overrides,
gradient accumulation (real processes, real MNIST)."""

from __future__ import annotations

import json
import math

import pytest

from distrnn.data.loaders import hold_out
from distrnn.data.mnist import load_split
from distrnn.evaluation.counting import exact_accuracy
from distrnn.run.model_files import load_model
from tests.helpers import counts, distrnn

SMOKE = ["--mode", "cpu", "--config", "smoke", "--no-wandb"]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("val") / "run"
    result = distrnn("train", *SMOKE, "--data-dir", str(data_dir), "--output-dir", str(run),
                     "data.val_samples=1000", "checkpoint.keep_best=true", "train.eval_every=40")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_a_validation_holdout_is_never_trained_on_and_test_is_evaluated_once(held_out_run, data_dir):
    run, result = held_out_run
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["train_seen"], summary["test_seen"]) == (9_000, 10_000)  # 10000 - 1000 held out
    assert all("val_accuracy" in h and "test_accuracy" not in h for h in summary["history"])
    records = metrics(run)
    assert len([r for r in records if "val/accuracy" in r]) == len(summary["history"]) >= 4
    [test] = [r for r in records if "test/accuracy" in r]  # once, at the end
    assert test["step"] == summary["steps"] and test["test/correct"] == summary["test_correct"]
    assert counts(result.stdout)[-1] == (summary["test_correct"], 10_000)


def test_the_best_model_by_validation_accuracy_is_kept_and_usable(held_out_run, data_dir):
    run, _ = held_out_run
    summary = json.loads((run / "summary.json").read_text())
    best = max(summary["history"], key=lambda h: (h["val_accuracy"], -h["step"]))
    assert (summary["best_val_accuracy"], summary["best_val_step"]) == (best["val_accuracy"], best["step"])
    model, cfg = load_model(run / "best")  # the folder evaluate, predict and export accept
    pool = load_split(data_dir, True).first(cfg.data.train_samples)
    _, held = hold_out(len(pool), cfg.data.val_samples, cfg.train.seed)
    from accelerate import Accelerator

    assert exact_accuracy(Accelerator(cpu=True), model, pool.take(held), 1000).percent == summary["best_val_accuracy"]
    result = distrnn("evaluate", "--checkpoint", str(run / "best"), "--mode", "cpu", "--data-dir", str(data_dir),
                     "--limit", "500")
    assert result.returncode == 0, result.stderr[-2000:]


def test_early_stopping_ends_training_and_a_resume_does_not_train_again(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ["train", *SMOKE, "--data-dir", str(data_dir), "--output-dir", str(run), "--epochs", "3",
            "data.train_samples=3000", "data.val_samples=500", "train.eval_every=5", "train.early_stop_patience=1"]
    result = distrnn(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["early_stopped"] and summary["steps"] < 3 * math.ceil(2500 / 64)
    assert f"early stop at step {summary['steps']}: no better validation accuracy in 1 evaluations" in result.stdout
    again = distrnn(*args)  # the same command: the run is finished and stays stopped
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"]


def test_positional_overrides_are_overrides(tmp_path, data_dir):
    run = tmp_path / "run"
    result = distrnn("train", *SMOKE, "--data-dir", str(data_dir), "--output-dir", str(run), "optim.lr=0.002",
                     "data.train_samples=640", "train.batch_size=32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 20
    assert "lr: 0.002" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("processes, accumulate", [(1, 4), (2, 2)])
def test_gradient_accumulation_keeps_the_global_batch(tmp_path, data_dir, processes, accumulate):
    """batch 32 x processes x accumulate = 128 images per optimizer step either way."""
    run = tmp_path / "run"
    result = distrnn("train", *SMOKE, "--num-processes", str(processes), "--data-dir", str(data_dir),
                     "--output-dir", str(run), "data.train_samples=2000", "train.batch_size=32",
                     f"train.grad_accum_steps={accumulate}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    batches = math.ceil(math.ceil(2000 / processes) / 32)  # per rank
    assert summary["global_batch"] == 128 and summary["steps"] == math.ceil(batches / accumulate)
    assert f"global batch 128 (32 per process x {processes} x {accumulate} accumulation)" in result.stdout
