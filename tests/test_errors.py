"""Bad input and faults: each case shows the exact line the user sees (README "What you see when")."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distrnn import data, launcher
from distrnn.config import all_keys, build_config
from distrnn.errors import ConfigError, DistrnnError
from tests.conftest import IN_CI, distrnn, start_distrnn, wait_for_step

TINY = ["--config", "configs/smoke.yaml", "--set", "data.train_samples=640", "--set", "data.test_samples=500",
        "--no-wandb"]
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line on stderr; fails if there is more, or a traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line.strip() for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("wandb:")]
    assert len(lines) == 1, lines
    return lines[0]


# --- data ------------------------------------------------------------------------------------

@pytest.fixture
def raw_copy(tmp_path, data_dir) -> Path:
    """A data folder whose files link to the real MNIST, so one file can be damaged cheaply."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.RAW_FILES:
        (raw / name).symlink_to(data_dir / "MNIST" / "raw" / name)
    return raw


def replace(raw: Path, name: str, content: bytes) -> None:
    (raw / name).unlink()
    (raw / name).write_bytes(content)


def header(magic: int, *dims: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in (magic, *dims))


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("train-images-idx3-ubyte", header(2051, 60000, 28, 28) + bytes(1000),
         "train-images-idx3-ubyte is 1016 bytes but its header promises 60000 images (47040016 bytes): "
         "it is truncated or damaged; replace it"),
        ("train-images-idx3-ubyte", b"\x1f\x8b\x08\x00" + bytes(100),
         "train-images-idx3-ubyte has magic number 529205248, not 2051: it is not an uncompressed IDX image file"),
        ("train-labels-idx1-ubyte", header(2049, 59999) + bytes(59999),
         "MNIST files disagree: train-images-idx3-ubyte has 60000 images but train-labels-idx1-ubyte has 59999 labels"),
        ("train-labels-idx1-ubyte", header(2049, 60000) + bytes(59999) + b"\x0c",
         "train-labels-idx1-ubyte has a label 12 (labels must be 0-9); replace it"),
        ("train-labels-idx1-ubyte", header(2049, 60000) + bytes(10),
         "train-labels-idx1-ubyte is 18 bytes but its header promises 60000 labels"),
        ("train-images-idx3-ubyte", b"\x00\x00",
         "train-images-idx3-ubyte is truncated (2 bytes, shorter than its header)"),
    ],
    ids=["truncated", "gzip-not-gunzipped", "count-mismatch", "label-out-of-range", "labels-truncated", "empty-file"],
)
def test_damaged_idx_files_are_named(raw_copy, name, content, expected):
    replace(raw_copy, name, content)
    with pytest.raises(DistrnnError) as e:
        data.check_files(raw_copy, train=True)
    assert expected in str(e.value)


def test_real_files_pass_the_checks(data_dir):
    for train in (True, False):
        data.check_files(data_dir / "MNIST" / "raw", train)


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
    assert line.startswith(f"distrnn.train: error: MNIST not found in {root}/MNIST/raw (missing "
                           "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                           "t10k-labels-idx1-ubyte; download failed: ")
    assert line.endswith("); put the four uncompressed IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                         "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) there, or point --data-dir or "
                         "DISTRNN_DATA_DIR at a folder holding MNIST/raw")


# --- output ----------------------------------------------------------------------------------

def test_unwritable_run_folder_is_refused_before_training(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = error_line(distrnn("train", "--mode", "cpu", *TINY, "--data-dir", str(data_dir),
                              "--output-dir", str(blocker / "run")))
    assert line == (f"distrnn.train: error: cannot write to run folder {blocker}/run (Not a directory); "
                    "pass a writable --output-dir")


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 24 MB (the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        message = f"cannot mount a tmpfs to test a full disk: {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))


def test_full_disk_is_refused_before_training(small_disk, data_dir):
    fill(small_disk, 2 * 2**20)
    line = error_line(distrnn("train", "--mode", "cpu", *TINY, "--data-dir", str(data_dir),
                              "--output-dir", str(small_disk / "run")))
    assert line.startswith("distrnn.train: error: only ")
    assert line.endswith(f"MB free for run folder {small_disk}/run, about 16.9 MB needed for checkpoints; "
                         "free some space or pass another --output-dir")


def test_a_failed_save_keeps_the_previous_checkpoint(small_disk, data_dir):
    out = small_disk / "run"
    args = ["train", "--mode", "cpu", "--config", "configs/smoke.yaml", "--set", "data.train_samples=4000",
            "--set", "data.test_samples=500", "--set", "checkpoint.every_steps=25", "--set", "checkpoint.keep=1",
            "--set", "train.log_every=2", "--no-wandb", "--data-dir", str(data_dir), "--output-dir", str(out)]
    proc = start_distrnn(*args)
    wait_for_step(proc, out, 26)  # the checkpoint of step 25 is complete; the next is 24 steps (~1 s) away
    fill(small_disk, 2**20)  # less than one more checkpoint needs
    _, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(args, proc.returncode, "", stderr)
    line = error_line(result)
    assert line.startswith("distrnn.train: error: only ") and "needed for checkpoints" in line
    kept = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert kept.name == "step-00000025" and (kept / "model.safetensors").is_file()

    (small_disk / "filler").unlink()
    resumed = distrnn(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {kept}" in resumed.stdout


def test_finished_run_with_another_config_is_refused(tmp_path, data_dir):
    out = tmp_path / "run"
    base = ["train", "--mode", "cpu", *TINY, "--data-dir", str(data_dir), "--output-dir", str(out)]
    assert distrnn(*base).returncode == 0
    line = error_line(distrnn(*base, "--epochs", "2"))
    assert line == (f"distrnn.train: error: {out} holds a finished run with another config (train.epochs: 1 -> 2); "
                    f"pass another --output-dir, --resume never to start over there, or --resume {out} to continue "
                    "that run")
    assert distrnn(*base, "--epochs", "2", "--resume", str(out)).returncode == 0


# --- training --------------------------------------------------------------------------------

def test_nonfinite_loss_stops_every_rank_with_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    result = distrnn("train", "--mode", "cpu", "--num-processes", "2", *TINY, "--lr", "1e30",
                     "--set", "data.train_samples=4000",
                     "--data-dir", str(data_dir), "--output-dir", str(out))
    line = error_line(result)
    assert line.startswith("distrnn.train: error: the training loss became nan at step ")
    assert line.endswith(f"model and batch saved in {out}/debug; lower --lr or set optim.grad_clip")
    assert list((out / "debug").glob("nonfinite-step-*-rank-*.pt"))


# --- processes -------------------------------------------------------------------------------

def test_ctrl_c_stops_all_workers_and_returns(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = start_distrnn("train", "--mode", "cpu", "--num-processes", "2", "--config", "configs/smoke.yaml",
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
    assert line.startswith(f"distrnn: error: Tried to launch distributed communication on port `{port}`, but another "
                           "process is utilizing it.")
    assert line.endswith("(pick another --main-process-port)")


@pytest.mark.skipif(launcher.visible_gpus() > 0, reason="checks the no-GPU messages")
def test_more_processes_than_gpus_is_refused():
    with pytest.raises(DistrnnError, match=r"--num-processes 3 is more than the 2 visible GPU\(s\); use at most 2"):
        launcher.plan("ddp", 3, gpus=2)


def test_bf16_on_a_gpu_without_bf16_is_refused():
    with pytest.raises(DistrnnError, match="precision bf16 is not supported by this GPU"):
        launcher.check_precision(launcher.plan("gpu", None, gpus=1), "bf16", gpu_bf16=False)
    launcher.check_precision(launcher.plan("cpu", None, gpus=0), "bf16", gpu_bf16=False)  # bf16 works on CPU


# --- W&B -------------------------------------------------------------------------------------

def test_wandb_without_network_falls_back_to_offline(tmp_path, data_dir):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "15"}
    result = distrnn("train", "--mode", "cpu", "--config", "configs/smoke.yaml", "--set", "data.train_samples=640",
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


# --- the config loader, property-based ---------------------------------------------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.sampled_from(["rnn", "gru", "lstm", "bf16", "fp16", "memory", "auto", "1e-3"]),
                   st.lists(st.text(max_size=4), max_size=3))
KEYS = st.one_of(st.sampled_from(all_keys()), st.text(min_size=1, max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_config_loader_accepts_or_rejects_cleanly(flat):
    nested: dict = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})
        if isinstance(nested[section], dict):
            nested[section][name or key] = value
    try:
        cfg = build_config(nested)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert cfg.train.batch_size > 0 and cfg.model.cell in ("rnn", "gru", "lstm")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEYS, st.text(max_size=10)), max_size=5))
def test_override_parser_accepts_or_rejects_cleanly(pairs):
    try:
        build_config(overrides=[f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
