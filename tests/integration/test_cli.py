"""Every bad value gets one readable line on stderr, a non-zero exit, and no traceback (real processes)."""

from __future__ import annotations

import json

import pytest

from distrnn.launcher import processes
from tests.helpers import BIN, distrnn, one_line_error, run


def expect_one_line(result, expected: str, code: int | None = None) -> None:
    line = one_line_error(result)
    if code is not None:
        assert result.returncode == code
    assert expected in line, line


@pytest.mark.parametrize(
    "args, expected, code",
    [
        (["train", "--epochs", "0"], "config key 'train.epochs' must be > 0, got 0", 2),
        (["train", "--batch-size", "-4"], "config key 'train.batch_size' must be > 0, got -4", 2),
        (["train", "--lr", "abc"], "Invalid value for '--lr': 'abc' is not a valid float", 2),
        (["train", "--precision", "fp8"], "Invalid value for '--precision': 'fp8' is not one of 'auto', 'no', "
         "'fp16', 'bf16'", 2),
        (["train", "--mode", "tpu"], "Invalid value for '--mode': 'tpu' is not one of 'auto', 'cpu', 'gpu', 'ddp'", 2),
        (["train", "--set", "model.hiden_size=3"], "did you mean 'model.hidden_size'?", 2),
        (["train", "model.hiden_size=3"], "did you mean 'model.hidden_size'?", 2),  # positional, as sweeps pass them
        (["train", "epochs"], "override 'epochs' must look like key=value, for example model.hidden_size=128", 2),
        (["train", "--log-with", "wandb,mlflow"], "--log-with wandb,mlflow: unknown tracker 'mlflow'; use any of "
         "wandb, tensorboard, or none", 2),
        (["train", "data.val_samples=60000"], "config key 'data.val_samples' must be 0..59999", 2),
        (["train", "train.early_stop_patience=3"], "train.early_stop_patience needs a validation holdout: set "
         "data.val_samples", 2),
        (["train", "--set", "model.cell=cnn"], "config key 'model.cell' must be one of rnn, gru, lstm, got 'cnn'", 2),
        (["train", "--set", "model.head=first"], "config key 'model.head' must be one of all-steps, last-step", 2),
        (["train", "--config", "configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist; check the "
         "path, or name a shipped config (default, fast, smoke)", 2),
        (["train", "--mode", "cpu", "--precision", "fp16"], "precision fp16 needs a GPU; on CPU use --precision "
         "bf16", 1),
        (["train", "--mode", "cpu", "--num-processes", "0"], "--num-processes must be >= 1, got 0", 1),
        (["train", "--bogus"], "No such option '--bogus'. (see distrnn train --help)", 2),
        (["evaluate", "--checkpoint", "/nonexistent/run"], "no saved model at '/nonexistent/run'; pass a run folder "
         "holding model.pt, the file itself", 1),
    ],
)
def test_bad_cli_input_is_one_line(args, expected, code):
    expect_one_line(distrnn(*args, timeout=120), expected, code)


@pytest.mark.skipif(processes.visible_gpus() > 0, reason="checks the no-GPU message")
@pytest.mark.parametrize("mode", ["gpu", "ddp"])
def test_gpu_modes_without_a_gpu_are_one_line(mode):
    expect_one_line(distrnn("train", "--mode", mode, timeout=120), f"--mode {mode} needs a GPU but none is visible", 1)


def test_fp16_on_cpu_is_refused_by_the_worker_too(tmp_path):
    """`accelerate launch -m distrnn.train` bypasses the distrnn CLI; the worker must refuse fp16 itself."""
    result = run([str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu.yaml", "-m", "distrnn.train",
                  "--precision", "fp16", "--output-dir", str(tmp_path / "run")], timeout=120)
    assert result.returncode != 0
    # The worker's own line; what accelerate's launcher prints after it is accelerate's.
    assert "distrnn.train: error: precision fp16 needs a GPU; on CPU use --precision bf16" in result.stderr


def test_help_explains_every_option():
    for args in (["--help"], ["train", "--help"], ["evaluate", "--help"]):
        result = distrnn(*args, timeout=60)
        assert result.returncode == 0
    worker = run([str(BIN / "python"), "-m", "distrnn.train", "--help"], timeout=60)
    assert worker.returncode == 0
    for flag in ["--config", "--set", "--data-dir", "--output-dir", "--wandb / --no-wandb", "--seed", "--precision",
                 "--epochs", "--batch-size", "--lr"]:
        assert flag in worker.stdout


def test_env_reports_versions_and_launch_config():
    result = distrnn("env", timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ["torch", "accelerate", "wandb", "gpus", "auto mode", "distributed_type", "precision    auto -> "]:
        assert word in result.stdout
    import torch

    from distrnn.ranks import devices  # the CPU line names torch's capability and whether bf16 is native here
    native = devices.cpu_bf16_native()
    assert f", {torch.backends.cpu.get_cpu_capability()}, bf16: {native or 'emulated'}" in result.stdout


def test_faults_left_in_the_environment_are_never_silent(tmp_path, data_dir):
    """DISTRNN_FAULTS left in a shell: each process of a run says so, summary.json and distrnn env record it, and
    the benchmarks and the results table refuse to measure with it."""
    faults = {"DISTRNN_FAULTS": "slow-rank=7:1"}  # rank 7 does not exist: nothing else changes
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke", "--epochs", "1",
                     "--no-wandb", "--set", "data.train_samples=256", "--set", "data.test_samples=500", "--set",
                     "train.eval_train_set=false", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"),
                     env=faults, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    said = sorted(line for line in result.stdout.splitlines() if line.startswith("warning: DISTRNN_FAULTS="))
    assert said == [f"warning: DISTRNN_FAULTS=slow-rank=7:1 is set on rank {r}: test faults are injected into this "
                    "run; unset it for a real run" for r in (0, 1)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["faults"] == "slow-rank=7:1"
    assert "faults       slow-rank=7:1" in distrnn("env", env=faults, timeout=120).stdout
    for program in ("benchmarks.bench", "benchmarks.results_table"):  # (checkpoint_cost, timing_cost: the same call)
        refused = run([str(BIN / "python"), "-m", program], env=faults, timeout=120)
        assert refused.returncode == 1
        assert refused.stderr.strip() == (f"{program}: DISTRNN_FAULTS=slow-rank=7:1 is set and would inject test "
                                          "faults into what is measured; unset it (env -u DISTRNN_FAULTS ...) and "
                                          "run again")
