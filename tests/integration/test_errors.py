"""Bad input and faults: each case shows the exact line the user sees (docs/errors.md, "Errors: what you see when")."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from distrnn.errors import DistrnnError
from distrnn.ranks import devices
from tests.helpers import (
    distrnn,
    header,
    one_line_error,
    replace,
    start_distrnn,
    wait_for_step,
)

TINY = ["--config", "smoke", "--set", "data.train_samples=640", "--set", "data.test_samples=500",
        "--no-wandb"]
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


error_line = one_line_error


# --- data ------------------------------------------------------------------------------------

def test_truncated_file_stops_training_with_one_line(raw_copy, tmp_path):
    replace(raw_copy, "t10k-labels-idx1-ubyte", header(2049, 10000) + bytes(5))
    line = error_line(distrnn("train", "--mode", "cpu", *TINY, "--data-dir", str(raw_copy.parent.parent),
                              "--output-dir", str(tmp_path / "run")))
    assert line == (f"distrnn.train: error: MNIST file {raw_copy}/t10k-labels-idx1-ubyte is 13 bytes but its header "
                    "promises 10000 labels: it is truncated or damaged; replace it")
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


@pytest.mark.parametrize("layout", ["missing folder", "empty folder"])
def test_missing_data_without_network_says_where_it_looked(tmp_path, layout):
    root = tmp_path / "nodata"
    if layout == "empty folder":
        (root / "MNIST" / "raw").mkdir(parents=True)
    line = error_line(distrnn("train", "--mode", "cpu", *TINY, "--data-dir", str(root),
                              "--output-dir", str(tmp_path / "run"), env=NO_NETWORK))
    assert line.startswith(f"distrnn.train: error: MNIST not found in {root}/MNIST/raw (4 of 4 IDX files "
                           "missing; download failed: ")
    assert line.endswith("); put them there or point --data-dir at a folder holding MNIST/raw")
    reason = line.split("download failed: ")[1].split("); put them")[0]
    assert "Connection refused" in reason or "Errno" in reason, reason  # the cause, not an empty "Error ...:"
    assert len(line) - len("distrnn.train: error: ") - len(str(root)) < 200


# --- output ----------------------------------------------------------------------------------

def test_unwritable_run_folder_is_refused_before_training(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = error_line(distrnn("train", "--mode", "cpu", *TINY, "--data-dir", str(data_dir),
                              "--output-dir", str(blocker / "run")))
    assert line == (f"distrnn.train: error: cannot write to run folder {blocker}/run (Not a directory); "
                    "pass a writable --output-dir")


def test_finished_run_with_another_config_is_refused(tmp_path, data_dir):
    out = tmp_path / "run"
    base = ["train", "--mode", "cpu", *TINY, "--data-dir", str(data_dir), "--output-dir", str(out)]
    assert distrnn(*base).returncode == 0
    line = error_line(distrnn(*base, "--seed", "1"))
    assert line == (f"distrnn.train: error: {out} holds a finished run with another config (train.seed: 0 -> 1); "
                    "pass another --output-dir, or --resume never to start over there")
    assert distrnn(*base, "--seed", "1", "--resume", "never").returncode == 0


# --- training --------------------------------------------------------------------------------

def test_nonfinite_loss_stops_every_rank_with_one_line(tmp_path, data_dir):
    """lr 1e30: the gradients overflow (or the loss turns nan) within a few steps; the update that would
    have carried it into the weights is skipped, and every rank stops at the next check."""
    out = tmp_path / "run"
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", *TINY, "--lr", "1e30",
                     "--set", "data.train_samples=4000",
                     "--data-dir", str(data_dir), "--output-dir", str(out))
    line = error_line(result)
    assert re.match(r"distrnn.train: error: the (training loss became nan|gradients became non-finite) at step \d+ "
                    r"\(epoch 1, batch \d+\); ", line), line
    assert line.endswith(f"model and batch saved in {out}/debug; lower --lr or set optim.grad_clip")
    [saved] = list((out / "debug").glob("nonfinite-step-*-rank-*.pt"))  # one rank's report, printed once
    import torch

    weights = torch.load(saved, weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())  # the non-finite update never reached them


# --- processes -------------------------------------------------------------------------------

def test_ctrl_c_stops_all_workers_and_returns(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = start_distrnn("train", "--mode", "cpu", "--num-processes", "2", "--config", "smoke",
                         "--set", "train.log_every=2", "--no-wandb", "--data-dir", str(data_dir),
                         "--output-dir", str(out))
    wait_for_step(proc, out, 4)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job
    start = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert time.monotonic() - start < 30
    assert not psutil.wait_procs(workers, timeout=10)[1], "workers left behind"


def test_rendezvous_port_in_use_is_one_line(tmp_path, data_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = error_line(distrnn("train", "--mode", "cpu", "--num-machines", "2", "--machine-rank", "0",
                                  "--main-process-ip", "127.0.0.1", "--main-process-port", str(port), *TINY,
                                  "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), timeout=120))
    assert line == (f"distrnn: error: rendezvous port {port} is taken by another process on this machine; pick "
                    "another --main-process-port")


def test_bf16_on_a_gpu_without_bf16_is_refused():
    with pytest.raises(DistrnnError, match="precision bf16 is not supported by this GPU"):
        devices.check_precision("bf16", on_cpu=False, gpu_bf16=False)
    devices.check_precision("bf16", on_cpu=True, gpu_bf16=False)  # bf16 works on CPU


# --- W&B -------------------------------------------------------------------------------------

def test_wandb_without_network_falls_back_to_offline(tmp_path, data_dir):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "5"}
    result = distrnn("train", "--mode", "cpu", "--config", "smoke", "--set", "data.train_samples=640",
                     "--set", "data.test_samples=500", "--wandb", "--data-dir", str(data_dir), "--output-dir", str(out),
                     env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "logging offline instead" in warnings[0]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


def test_wandb_without_api_key_logs_offline_with_one_notice(tmp_path, data_dir):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path)}  # no key, no ~/.netrc
    result = distrnn("train", "--mode", "cpu", *TINY[:-1], "--wandb", "--data-dir", str(data_dir),
                     "--output-dir", str(out), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wandb: no API key found, logging offline (run `wandb login` and set "
                               "WANDB_MODE=online to go online)") == 1
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1

