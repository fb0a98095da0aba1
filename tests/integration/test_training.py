"""End to end with real processes: a 2-process smoke run, its W&B run, and exact evaluation."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml

from distrnn.run.model_files import load_model
from tests.helpers import BIN, counts, distrnn, run


def test_two_process_smoke_run_learns_and_writes_the_run_folder(smoke_run):
    out, result = smoke_run
    for name in ["config.yaml", "metrics.jsonl", "model.pt", "summary.json"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert (summary["train_seen"], summary["test_seen"]) == (10_000, 10_000)
    assert summary["test_accuracy"] > 85.0  # chance is 10%
    # printed once, by the main process only, in the seed's format
    assert counts(result.stdout) == [(summary["train_correct"], 10_000), (summary["test_correct"], 10_000)]
    assert result.stdout.count("Accuracy on test data:") == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["train_samples"] == 10_000 and saved["train"]["output_dir"] == str(out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in line for line in lines) and any("test/accuracy" in line for line in lines)


def test_wandb_offline_run_holds_config_and_final_accuracy(smoke_run):
    out, _ = smoke_run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    inspected = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(runs[0])],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    run = json.loads(inspected.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert run["config"]["model"]["hidden_size"] == 256
    assert run["config"]["data"]["train_samples"] == 10_000
    values = run["summary"]
    assert values["test_correct"] == summary["test_correct"] and values["test_seen"] == 10_000
    assert values["test_accuracy"] == pytest.approx(summary["test_accuracy"])


def idx_split(data_dir, train: bool, limit: int | None = None) -> torch.utils.data.TensorDataset:
    """The IDX files read here with numpy (16- and 8-byte headers), scaled as torchvision's ToTensor does
    (uint8 / 255), not through distrnn's reader (tests/unit/test_mnist.py compares that one with
    torchvision's) nor a PIL image per sample (measured: 1.06 s against 0.25 s for the 10,000 test images on
    this project's 2-core Intel Xeon, AVX512). The same tensors: compared with ToTensor's when written."""
    raw = data_dir / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images = np.frombuffer((raw / f"{prefix}-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
    labels = np.frombuffer((raw / f"{prefix}-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    x = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy())[:limit].float().div(255)
    return torch.utils.data.TensorDataset(x, torch.from_numpy(labels.astype(np.int64))[:limit])


def single_process_counts(model, dataset) -> tuple[int, int]:
    """The seed notebook's check_accuracy, one process, no Accelerate: the ground truth."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=1000)
    correct = seen = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            seen += y.numel()
    return correct, seen


def test_evaluation_of_all_70000_images_on_3_processes_is_exact(smoke_run, data_dir):
    """Both splits whole, on 3 processes: 60000 shards evenly, 10000 does not (3334, 3333, 3333). Other
    numbers of processes and uneven batches: the subset test below, on 1001 images."""
    out, _ = smoke_run
    model, _ = load_model(str(out))
    truth = [single_process_counts(model, idx_split(data_dir, train)) for train in (True, False)]
    result = distrnn("evaluate", "--checkpoint", str(out), "--mode", "cpu", "--num-processes", "3",
                     "--data-dir", str(data_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = counts(result.stdout)
    assert [seen for _, seen in got] == [60_000, 10_000]
    assert got == truth


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_evaluation_is_exact_on_an_uneven_subset(smoke_run, data_dir, processes):
    """1001 images: not divisible by 2, 3 or the batch size 64, so shards and last batches differ."""
    out, _ = smoke_run
    model, _ = load_model(str(out))
    truth = [single_process_counts(model, idx_split(data_dir, train, 1001)) for train in (True, False)]
    result = distrnn("evaluate", "--checkpoint", str(out), "--mode", "cpu", "--num-processes", str(processes),
                     "--data-dir", str(data_dir), "--limit", "1001", "--batch-size", "64", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert counts(result.stdout) == truth
    assert [seen for _, seen in truth] == [1001, 1001]


def test_an_fp16_model_is_evaluated_in_fp32_on_a_cpu(smoke_run, data_dir, tmp_path):
    """A model trained in fp16 on a GPU, evaluated where there is none."""
    out, _ = smoke_run
    saved = torch.load(out / "model.pt", weights_only=True)
    saved["config"]["train"]["precision"] = "fp16"
    torch.save(saved, tmp_path / "model.pt")
    args = ["evaluate", "--mode", "cpu", "--data-dir", str(data_dir), "--limit", "1000"]
    fp16 = distrnn(*args, "--checkpoint", str(tmp_path / "model.pt"))
    assert fp16.returncode == 0, fp16.stderr[-3000:]
    assert "note: the model was trained in fp16, which needs a GPU; evaluating in fp32" in fp16.stdout
    assert counts(fp16.stdout) == counts(distrnn(*args, "--checkpoint", str(out)).stdout)
    refused = distrnn(*args, "--checkpoint", str(tmp_path / "model.pt"), "--precision", "fp16")
    assert refused.returncode == 1
    assert "precision fp16 needs a GPU; on CPU use --precision bf16 or --precision no" in refused.stderr


def test_the_run_folder_holds_the_exact_confusion_matrix_and_its_pictures(smoke_run):
    out, _ = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    confusion = summary["test_confusion"]
    assert sum(confusion[i][i] for i in range(10)) == summary["test_correct"]  # trace = correct
    assert sum(map(sum, confusion)) == summary["test_seen"] == 10_000  # sum = seen, no padding
    per_class = summary["test_per_class"]
    assert [c["support"] for c in per_class] == [sum(row) for row in confusion]
    assert [c["correct"] for c in per_class] == [confusion[d][d] for d in range(10)]
    with (out / "confusion.csv").open() as f:
        rows = list(csv.reader(f))
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == confusion
    from PIL import Image

    assert Image.open(out / "confusion.png").size == (520, 544)
    assert 10_000 - summary["test_correct"] >= 25  # a smoke model: a full 5 x 5 grid of mistakes
    assert Image.open(out / "errors.png").size == (5 * 128 + 16, 5 * 140 + 8)


def test_model_safetensors_holds_the_weights_and_config_without_pickle(smoke_run, data_dir):
    out, _ = smoke_run
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["distrnn_config"])
        weights = {name: f.get_tensor(name) for name in f.keys()}
    pickled = torch.load(out / "model.pt", weights_only=True)
    assert config == pickled["config"]
    assert weights.keys() == pickled["model"].keys()
    assert all(torch.equal(weights[name], pickled["model"][name]) for name in weights)
    args = ["evaluate", "--mode", "cpu", "--data-dir", str(data_dir), "--limit", "2000"]
    assert counts(distrnn(*args, "--checkpoint", str(out / "model.safetensors")).stdout) == \
        counts(distrnn(*args, "--checkpoint", str(out)).stdout)


def test_wandb_holds_the_confusion_matrix_and_the_mistakes(smoke_run):
    out, _ = smoke_run
    [run] = sorted((out / "wandb").glob("offline-run-*"))
    inspected = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(run)],
                               capture_output=True, text=True, timeout=120)
    summary, confusion = json.loads(inspected.stdout)["summary"], json.loads((out / "summary.json").read_text())
    chart = json.loads((run / "files" / summary["test/confusion_matrix_table"]["path"]).read_text())
    assert chart["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert {(int(a), int(p)): n for a, p, n in chart["data"]} == {
        (a, p): n for a, row in enumerate(confusion["test_confusion"]) for p, n in enumerate(row)}
    mistakes = json.loads((run / "files" / summary["test/mistakes"]["path"]).read_text())
    assert mistakes["columns"] == ["image", "true", "predicted", "probability"]
    assert len(mistakes["data"]) == min(25, 10_000 - confusion["test_correct"])
    assert all(t != p and 0 < prob <= 1 for _, t, p, prob in mistakes["data"])
    assert summary["test/confusion"]["_type"] == "image-file"


def test_label_smoothing_reaches_the_loss_and_the_training_set_evaluation_can_be_left_out(tmp_path, data_dir):
    def run(name: str, *extra: str) -> tuple[subprocess.CompletedProcess, float, dict]:
        out = tmp_path / name
        result = distrnn("train", "--mode", "cpu", "--config", "smoke", "--no-wandb", "--resume", "never",
                         "--data-dir", str(data_dir), "--output-dir", str(out), "data.train_samples=128",
                         "data.test_samples=500", "train.log_every=1", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return result, next(m["train/loss"] for m in losses if "train/loss" in m), json.loads(
            (out / "summary.json").read_text())

    plain, plain_loss, plain_summary = run("plain")
    smoothed, smoothed_loss, summary = run("smoothed", "optim.label_smoothing=0.1", "train.eval_train_set=false")
    # The first step's loss: same weights and batch, so only the smoothing can change it (upwards).
    assert smoothed_loss > plain_loss + 1e-3
    assert counts(plain.stdout) == [(plain_summary["train_correct"], 128), (plain_summary["test_correct"], 500)]
    assert counts(smoothed.stdout) == [(summary["test_correct"], 500)]  # only the test line
    assert "Accuracy on training data" not in smoothed.stdout
    assert (summary["train_accuracy"], summary["train_correct"], summary["train_seen"]) == (None, None, None)
    assert summary["eval_seconds"] > 0 and summary["test_seen"] == 500
    report = distrnn("report", str(tmp_path / "plain"), str(tmp_path / "smoothed"), "--output",
                     str(tmp_path / "report.png"), "--markdown", str(tmp_path / "report.md"))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "not evaluated" in (tmp_path / "report.md").read_text()


def test_accelerate_launch_with_the_shipped_multi_process_config_trains_and_counts_exactly(tmp_path, data_dir):
    """distrnn's own launcher is torchrun's; `accelerate launch` with launch/*.yaml keeps working beside it."""
    out = tmp_path / "run"
    result = run([str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_multi.yaml", "--num_processes",
                  "2", "-m", "distrnn.train", "--config", "smoke", "--set", "data.train_samples=640", "--no-wandb",
                  "--data-dir", str(data_dir), "--output-dir", str(out)],
                 env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and (summary["train_seen"], summary["test_seen"]) == (640, 10_000)
