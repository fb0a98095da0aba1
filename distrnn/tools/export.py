"""`distrnn export`: a trained model as ONNX or TorchScript, checked against PyTorch on real MNIST.

The exported graph takes images (batch, 28, 28) float32 in [0, 1] and returns logits (batch, 10),
with a dynamic batch dimension. Nothing is reported as exported until the file, loaded back by its
own runtime (onnxruntime, torch.jit.load), predicts the same digit as the PyTorch model for each of
1000 real test images, run at batch sizes other than the one used to export.

Exporters (observed with torch 2.14.1, onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0, on CPU; every
route below matched PyTorch's predictions for rnn, gru and lstm cells and both heads, except as noted):
- ONNX: the dynamo-based exporter (torch.onnx.export(dynamo=True), the default) exports nn.RNN
  without trouble here: it unrolls the 28 steps into MatMul/Add/Tanh ops (opset 20), keeps the batch
  dimension symbolic from `dynamic_shapes`, and matches PyTorch to ~1e-5 at batches 250 and 7. It is
  slow (8-14 s on 2 busy cores). The legacy TorchScript-based exporter (dynamo=False) also works and
  is fast (0.2-2 s, native ONNX RNN ops), but warns that it is deprecated ("The feature will be
  removed") and that RNN_TANH exported at a batch size other than 1 "can cause an error" at another
  batch size. We use dynamo: the supported path, with no such caveat.
- TorchScript: torch.jit.script of the model itself (its forward skips the autocast lookup when
  scripted: TorchScript's is_autocast_enabled takes no device argument); torch.jit.trace would work
  but warns that nn.RNN's shape checks are frozen into the trace. Scripting keeps control flow and
  shapes symbolic by construction and takes 0.2-1 s. Both jit entry points warn that TorchScript is
  deprecated; they still work.
Both formats export `StackedRNN.forward` itself (no copy of it), so whatever the model does to its
input (model.normalize_input) is in the exported graph; the parity check compares with that forward.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import torch
from torch import nn

from distrnn.data.mnist import load_split
from distrnn.errors import CONTEXT_SETTINGS, DistrnnError, first_line
from distrnn.model import StackedRNN
from distrnn.run.model_files import load_model

FORMATS = ("onnx", "torchscript")
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # export (onnx + onnxscript), then the parity check
PARITY_IMAGES = 1000
EXPORT_BATCH = 16  # the example batch the exporters see; a batch of 1 would let dynamo specialise to 1
PARITY_BATCH = 300  # not EXPORT_BATCH, and 1000 images run as 300, 300, 300, 100: two more sizes

Runner = Callable[[torch.Tensor], torch.Tensor]


def require_onnx() -> None:
    """Fail before the slow work if the optional ONNX packages are missing (or broken)."""
    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DistrnnError(f"--format onnx needs {' and '.join(missing)}: pip install 'distrnn[export]'")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters print progress to stdout and deprecation notes to stderr; the command prints one
    line. A real failure still raises."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    # external_data=False: one self-contained file (the weights are ~1 MB, far from protobuf's 2 GB).
    torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                      input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"images": {0: torch.export.Dim("batch")}})


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.jit.script(module).save(str(path))


def onnx_runner(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0])


def torchscript_runner(path: Path) -> Runner:
    loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda images: loaded(images)


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}
RUNNERS = {"onnx": onnx_runner, "torchscript": torchscript_runner}


def exported_logits(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The written file, loaded back by its own runtime, on `images` in batches of PARITY_BATCH."""
    with quiet():
        run = RUNNERS[fmt](path)
    with torch.no_grad():
        return torch.cat([run(images[i : i + PARITY_BATCH]) for i in range(0, len(images), PARITY_BATCH)])


def write(fmt: str, model: StackedRNN, images: torch.Tensor, path: Path) -> None:
    try:
        with quiet(), torch.no_grad():
            EXPORTERS[fmt](model.eval(), images[:EXPORT_BATCH], path)
    except Exception as e:  # an exporter's failure: one line saying which, not its traceback
        raise DistrnnError(f"{fmt} export failed ({type(e).__name__}: {first_line(e)})") from None


def check_parity(fmt: str, model: StackedRNN, images: torch.Tensor, path: Path) -> str:
    """The summary of a passed check; DistrnnError if any prediction differs."""
    with torch.no_grad():
        expected = model(images)
    try:
        got = exported_logits(fmt, path, images)
    except Exception as e:
        raise DistrnnError(f"the exported {fmt} file does not run ({type(e).__name__}: {first_line(e)})") from None
    n = len(images)
    differ = int((got.argmax(1) != expected.argmax(1)).sum())
    gap = f"max |logit difference| {(got - expected).abs().max().item():.1e}"
    if differ:
        raise DistrnnError(f"parity check failed: {differ} of {n} test images get a different prediction from "
                           f"the {fmt} export than from the PyTorch model ({gap}); nothing written")
    return f"parity on {n} test images: same prediction for all {n}, {gap}"


@click.command(name="export", context_settings=CONTEXT_SETTINGS)
@click.option("--checkpoint", required=True, help="A run folder, its model.pt, or a checkpoints/step-* folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="onnx (needs pip install 'distrnn[export]') or torchscript.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The file to write.")
@click.option("--data-dir", default=None, help="Folder holding MNIST/raw, for the parity check [default: the "
              "data dir stored with the model].")
def command(checkpoint: str, fmt: str, output: Path, data_dir: str | None) -> None:
    """Export a trained model (input (batch, 28, 28) in [0, 1], output (batch, 10) logits), after
    checking that it predicts what the PyTorch model does on 1000 real test images."""
    if fmt == "onnx":
        require_onnx()
    model, cfg = load_model(checkpoint)
    model.eval()
    split = load_split(data_dir or cfg.data.dir, train=False).first(PARITY_IMAGES)
    images, _ = split.batch(torch.arange(len(split)))
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed only once parity holds: a failed export leaves no file
    # (and an older file at --output untouched).
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        write(fmt, model, images, partial)
        summary = check_parity(fmt, model, images, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    click.echo(f"exported {output} ({fmt}, dynamic batch); {summary}")
