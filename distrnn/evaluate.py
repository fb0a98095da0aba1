"""Exact accuracy: each rank counts its own unpadded shard, one all-reduce sums the counts.

Also the worker behind `distrnn evaluate` (`accelerate launch -m distrnn.evaluate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from accelerate import Accelerator
from torch import nn

from distrnn import data
from distrnn.config import Config, build_config
from distrnn.distributed import dist_sum, main_print, make_accelerator, teardown
from distrnn.errors import DistrnnError, run_cli
from distrnn.model import StackedRNN

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class Accuracy:
    correct: int
    seen: int

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.seen

    def report(self) -> str:
        """The seed notebook's format, e.g. 'Got 9748 / 10000 with accuracy 97.48'."""
        return f"Got {self.correct} / {self.seen} with accuracy {self.percent:.2f}"


@torch.no_grad()
def exact_accuracy(accelerator: Accelerator, model: nn.Module, split: data.Split, batch_size: int) -> Accuracy:
    """Global (correct, seen) over `split`, identical whatever the number of processes."""
    net = accelerator.unwrap_model(model)  # plain module: no DDP collectives on uneven shards
    was_training = net.training
    net.eval()
    correct = seen = 0
    for images, labels in data.eval_batches(split, batch_size, accelerator.process_index, accelerator.num_processes):
        with accelerator.autocast():
            predictions = net(images).argmax(dim=1)
        correct += int((predictions == labels).sum())
        seen += labels.numel()
    net.train(was_training)
    return Accuracy(*dist_sum(accelerator, correct, seen))


def save_model(accelerator: Accelerator, model: nn.Module, cfg: Config, path: Path) -> None:
    """Weights plus the resolved config, so evaluate can rebuild the model without flags."""
    state = accelerator.get_state_dict(model)
    accelerator.save({"model": state, "config": cfg.to_dict()}, path)


def load_model(checkpoint: str) -> tuple[StackedRNN, Config]:
    """A run folder (its model.pt), a model.pt file, or a checkpoints/step-* folder."""
    path = Path(checkpoint)
    if (path / "meta.json").is_file():
        return _load_training_checkpoint(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise DistrnnError(f"no saved model at '{checkpoint}'; pass a run folder holding {MODEL_FILE}, "
                           "the file itself, or a checkpoints/step-* folder")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, stored = saved["model"], saved["config"]
    except Exception as e:  # a torn or foreign file: say which, not a traceback
        raise DistrnnError(f"'{path}' is not a distrnn model file ({type(e).__name__}: {e})") from None
    return _rebuild(state, stored, path)


def _load_training_checkpoint(path: Path) -> tuple[StackedRNN, Config]:
    from safetensors.torch import load_file

    try:
        stored = json.loads((path / "meta.json").read_text())["config"]
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:
        raise DistrnnError(f"'{path}' is not a complete distrnn checkpoint ({type(e).__name__}: {e})") from None
    return _rebuild(state, stored, path)


def _rebuild(state: dict, stored: dict, path: Path) -> tuple[StackedRNN, Config]:
    """The model as the stored config describes it, whatever flags the caller passes."""
    cfg = build_config(stored, where=f"the config stored in '{path}'")
    model = StackedRNN(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistrnnError(f"weights in '{path}' do not fit the config stored with them ({e})") from None
    return model, cfg


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, help="A run folder (holding model.pt) or a model.pt file.")
@click.option("--data-dir", default=None, help="Folder holding MNIST/raw (default: the one stored with the model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Evaluation batch size per process.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of each split.")
def main(checkpoint: str, data_dir: str | None, batch_size: int | None, limit: int | None) -> None:
    """Print the exact train and test accuracy of a saved model, sharded across processes."""
    model, cfg = load_model(checkpoint)
    if data_dir is not None:
        cfg.data.dir = data_dir
    if batch_size is not None:
        cfg.train.eval_batch_size = batch_size
    accelerator = None
    try:
        # Evaluate in the precision the model was trained in (bf16 stays bf16; fp16 needs a GPU).
        accelerator = make_accelerator(cfg, project_dir=str(Path(checkpoint)), log_with=None)
        model = model.to(accelerator.device)
        say = main_print(accelerator)
        for train, label in [(True, "training"), (False, "test")]:
            split = data.Split.of(data.load_mnist(cfg.data.dir, train, accelerator), limit).to(accelerator.device)
            acc = exact_accuracy(accelerator, model, split, cfg.train.eval_batch_size)
            say(f"Accuracy on {label} data:")
            say(acc.report())
    finally:
        teardown(accelerator)


if __name__ == "__main__":
    run_cli(main, prog="distrnn.evaluate")
