"""`distrnn export`: ONNX and TorchScript files that predict what the PyTorch model does, at any batch size,
checked here independently of the command's own parity check (real training, real MNIST, real processes)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from distrnn.data.mnist import load_split
from distrnn.errors import run_cli
from distrnn.run.model_files import load_model
from distrnn.tools import export
from tests.helpers import BIN, one_line_error, run, train_small_model

# The command on its own, so that its errors read `distrnn export: error: ...` (through the `distrnn` group
# they read `distrnn: error: ...`).
EXPORT = ("from distrnn.errors import run_cli; from distrnn.tools.export import command; import sys; "
          "sys.exit(run_cli(command, prog='distrnn export'))")
SUMMARY = (r"exported (?P<file>\S+) \((?P<format>\w+), dynamic batch\); parity on 1000 test images: "
           r"same prediction for all 1000, max \|logit difference\| (?P<gap>\S+)")


def distrnn_export(*args: str | Path, env: dict[str, str] | None = None):
    return run([str(BIN / "python"), "-c", EXPORT, *map(str, args)], env=env)


# Each model the shipped configs build: the default's (smoke's is the same model, trained on fewer images) and
# the fast one's, which normalises its input inside the model (an export that left it out predicted 361-482 of
# 1000 test images differently); 10000 images so that its predictions are not one constant digit, which would
# agree with any graph.
SHIPPED = {"default": 2000, "fast": 10000}


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory, data_dir) -> dict[str, Path]:
    return {}


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def trained(request, trained_models, tmp_path_factory, data_dir) -> Path:
    """A model trained with one shipped config (trained once per module)."""
    config = request.param
    if config not in trained_models:
        out = tmp_path_factory.mktemp(f"export-{config}") / "run"
        trained_models[config] = train_small_model(out, data_dir, config=config, samples=SHIPPED[config])
    return trained_models[config]


@pytest.fixture(scope="module")
def default_model(trained_models, tmp_path_factory, data_dir) -> Path:
    """The default config's model, for the tests of the command's errors."""
    if "default" not in trained_models:
        out = tmp_path_factory.mktemp("export-default") / "run"
        trained_models["default"] = train_small_model(out, data_dir, config="default", samples=SHIPPED["default"])
    return trained_models["default"]


@pytest.fixture(scope="module")
def test_images(data_dir) -> torch.Tensor:
    split = load_split(data_dir, train=False).first(1000)
    return split.images.float() / 255


@pytest.fixture(scope="module")
def expected(trained, test_images) -> torch.Tensor:
    """The PyTorch model's logits on the 1000 test images."""
    model, _ = load_model(trained)
    with torch.no_grad():
        return model.eval()(test_images)


def in_batches(run_batch, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([torch.as_tensor(run_batch(images[i : i + batch])) for i in range(0, len(images), batch)])


def assert_same_predictions(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape == (1000, 10)
    differ = (got.argmax(1) != expected.argmax(1)).nonzero().flatten().tolist()
    assert differ == [], f"{len(differ)} images predicted differently, e.g. {differ[:10]}"
    assert (got - expected).abs().max().item() < 1e-3


def assert_exported(result, output: Path, fmt: str) -> None:
    """Exit 0, exactly the summary line, nothing on stderr, and no file beside the one asked for."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.fullmatch(SUMMARY, result.stdout.strip())
    assert match, result.stdout
    assert (match["file"], match["format"]) == (str(output), fmt)
    assert 0 <= float(match["gap"]) < 1e-3
    assert result.stderr.strip() == ""
    assert list(output.parent.iterdir()) == [output]


def test_onnx_export_runs_in_onnxruntime_at_any_batch_size(trained, tmp_path, test_images, expected):
    import onnxruntime

    output = tmp_path / "out" / "model.onnx"
    assert_exported(distrnn_export("--checkpoint", trained, "--format", "onnx", "--output", output), output, "onnx")
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (images,), (logits,) = session.get_inputs(), session.get_outputs()
    # A symbolic dimension is a name (str); a fixed one an int.
    assert isinstance(images.shape[0], str) and images.shape[1:] == [28, 28] and images.type == "tensor(float)"
    assert isinstance(logits.shape[0], str) and logits.shape[1:] == [10]
    for batch in (250, 7):
        got = in_batches(lambda x: session.run(None, {images.name: x.numpy()})[0], test_images, batch)
        assert_same_predictions(got, expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_runs_after_torch_jit_load_at_any_batch_size(trained, data_dir, tmp_path, test_images,
                                                                        expected):
    output = tmp_path / "model.pt"
    result = distrnn_export("--checkpoint", trained, "--format", "torchscript", "--output", output,
                            "--data-dir", data_dir)
    assert_exported(result, output, "torchscript")
    loaded = torch.jit.load(str(output))
    assert isinstance(loaded, torch.jit.ScriptModule)
    for batch in (250, 7):
        with torch.no_grad():
            assert_same_predictions(in_batches(loaded, test_images, batch), expected)


def test_missing_checkpoint_is_load_models_one_line_error(tmp_path):
    result = distrnn_export("--checkpoint", tmp_path / "nope", "--format", "torchscript", "--output", tmp_path / "m.pt")
    line = one_line_error(result)
    assert result.returncode == 1
    assert line.startswith(f"distrnn export: error: no saved model at '{tmp_path / 'nope'}'"), line
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_onnxruntime_says_how_to_install_it(default_model, tmp_path):
    # An onnxruntime that fails to import, ahead of the real one on sys.path.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "onnxruntime.py").write_text("raise ImportError('hidden by test_export')\n")
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    output = tmp_path / "model.onnx"
    result = distrnn_export("--checkpoint", default_model, "--format", "onnx", "--output", output,
                            env={"PYTHONPATH": path})
    assert one_line_error(result) == ("distrnn export: error: --format onnx needs onnxruntime: "
                                      "pip install 'distrnn[export]'")
    assert result.returncode == 1
    assert not output.exists()


def test_parity_failure_exits_1_and_leaves_no_file(default_model, tmp_path, monkeypatch, capsys):
    """A runtime that swaps the first 3 predictions of every batch: the command counts each one."""
    real = export.RUNNERS["torchscript"]

    def broken(path: Path):
        run_batch = real(path)

        def swapped(images: torch.Tensor) -> torch.Tensor:
            logits = run_batch(images).clone()
            logits[:3] = logits[:3].flip(1)  # class k -> 9 - k: never the same argmax
            return logits
        return swapped

    monkeypatch.setitem(export.RUNNERS, "torchscript", broken)
    monkeypatch.delenv("DISTRNN_DEBUG", raising=False)
    output = tmp_path / "out" / "model.pt"
    code = run_cli(export.command, "distrnn export", ["--checkpoint", str(default_model), "--format", "torchscript",
                                                      "--output", str(output)])
    printed = capsys.readouterr()
    assert code == 1 and printed.out == ""
    differ = 3 * math.ceil(1000 / export.PARITY_BATCH)
    assert re.fullmatch(rf"distrnn export: error: parity check failed: {differ} of 1000 test images get a different "
                        r"prediction from the torchscript export than from the PyTorch model \(max \|logit "
                        r"difference\| \S+\); nothing written\n", printed.err), printed.err
    assert list(output.parent.iterdir()) == []
