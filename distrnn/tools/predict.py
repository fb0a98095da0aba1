"""`distrnn predict`: classify digit images with a saved model, one CPU process.

Inputs are image files (PNG, JPEG, ...; any size and mode), folders of them, and arrays of 28x28
images: MNIST's IDX format (unsigned bytes) or NPY (uint8 0-255, or float in [0, 1]). The kind of a
file is told by its first bytes, not its name, so a misnamed file gets the right reader or a clear
reason. Every input ends as training data does, uint8 / 255 (distrnn.data.mnist.Split.batch), so a model
sees exactly what it was trained on.

A bad input (missing, unreadable, not an image, wrong shape) costs one line on stderr and exit
status 1; the other inputs are still predicted, so one stray file in a folder loses no results.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from distrnn.data.mnist import read_idx
from distrnn.errors import CONTEXT_SETTINGS, DistrnnError, first_line
from distrnn.model import StackedRNN
from distrnn.run.model_files import load_model

SIDE = 28  # MNIST's image side: what every model here reads (28 steps of 28 pixels)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".pnm", ".ppm")
NPY_MAGIC, IDX_UBYTE_MAGIC, GZIP_MAGIC = b"\x93NUMPY", b"\x00\x00\x08", b"\x1f\x8b"
LIGHT = 127  # mean pixel (0-255) above which an image is a light background: MNIST digits are light on dark
CSV_HEADER = ("input", "prediction", "probability")


class BadInput(Exception):
    """One input that cannot be predicted; the message is the cause (the caller names the input)."""


@dataclass
class Inputs:
    """What could be read: one name per image, images as floats in [0, 1] (chunks, one per file)."""

    names: list[str] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)
    light: int = 0  # images that look like dark digits on a light background (before --invert)
    failed: int = 0

    def add(self, name: str, raw: torch.Tensor, invert: bool) -> None:
        """`raw`: one image (28, 28) named `name`, or an array (N, 28, 28) named name[i]."""
        self.names += [name] if raw.dim() == 2 else [f"{name}[{i}]" for i in range(len(raw))]
        raw = raw.reshape(-1, SIDE, SIDE)
        self.light += int(looks_light(raw).sum())
        self.chunks.append(scale(raw, invert))

    def images(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, SIDE, SIDE)


def looks_light(raw: torch.Tensor) -> torch.Tensor:
    """Per image: mean pixel above LIGHT on the 0-255 scale (scanned digits are usually black on white)."""
    means = raw.float().mean(dim=(-2, -1))
    return means > (LIGHT if raw.dtype == torch.uint8 else LIGHT / 255)


def scale(raw: torch.Tensor, invert: bool) -> torch.Tensor:
    """Exactly the training transform, uint8 / 255; inverting in uint8 first keeps an inverted image,
    inverted back, bit-identical to the original."""
    if raw.dtype == torch.uint8:
        return ((255 - raw) if invert else raw).float().div_(255)
    return (1 - raw) if invert else raw


# --- reading ---------------------------------------------------------------------------------

def expand(arg: str) -> list[tuple[str, Path]]:
    """An argument as (name, file) pairs: itself, or the image files in a folder, sorted by name."""
    path = Path(arg)
    if path.is_file():
        return [(arg, path)]
    if not path.exists():
        raise BadInput("no such file or folder")
    if not path.is_dir():
        raise BadInput("not a file or a folder")
    try:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise BadInput(e.strerror or first_line(e)) from None
    if not files:
        raise BadInput(f"the folder holds no image files ({', '.join(IMAGE_SUFFIXES[:3])}, ...)")
    return [(str(p), p) for p in files]


def read_file(path: Path) -> torch.Tensor:
    """One file as uint8 or float pixels, (28, 28) for an image, (N, 28, 28) for an array."""
    try:
        with path.open("rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise BadInput(e.strerror or first_line(e)) from None
    if head.startswith(NPY_MAGIC):
        return read_npy(path)
    if head.startswith(IDX_UBYTE_MAGIC):
        return read_idx_images(path)
    if head.startswith(GZIP_MAGIC):
        raise BadInput("it is gzip-compressed; gunzip it first")
    return read_image(path)


def check_shape(shape: tuple[int, ...]) -> None:
    if not (shape == (SIDE, SIDE) or (len(shape) == 3 and shape[1:] == (SIDE, SIDE))):
        raise BadInput(f"it holds an array of shape {' x '.join(map(str, shape)) or 'scalar'}; "
                       f"expected N x {SIDE} x {SIDE} or {SIDE} x {SIDE}")
    if shape[0] == 0:
        raise BadInput("it holds no images")


def read_idx_images(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes, its header checked first: read_idx trusts it."""
    with path.open("rb") as f:
        start = f.read(4)
        ndim = start[3] if len(start) == 4 else 0
        dims = f.read(4 * ndim)
    if len(start) < 4 or len(dims) < 4 * ndim:
        raise BadInput("it is an IDX file with a truncated header")
    shape = tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    check_shape(shape)
    expected, size = 4 + 4 * ndim + int(np.prod(shape)), path.stat().st_size
    if size != expected:
        raise BadInput(f"it is {size} bytes but its IDX header promises {' x '.join(map(str, shape))} "
                       f"bytes ({expected} in all): truncated or damaged")
    return read_idx(path)


def read_npy(path: Path) -> torch.Tensor:
    """An NPY array: uint8 as is; other integers if 0-255; floats if in [0, 1] (already scaled)."""
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle: an input file is not trusted code
    except Exception as e:  # a damaged or object array: numpy's reason, not a traceback
        raise BadInput(f"not a readable NPY file ({first_line(e, 120)})") from None
    check_shape(array.shape)
    kind = array.dtype.kind
    if kind not in "uif" or array.dtype == np.bool_:
        raise BadInput(f"it holds {array.dtype} values; expected uint8 0-255 or float in [0, 1]")
    low, high = (array.min().item(), array.max().item())
    if kind == "f":
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 1):
            raise BadInput(f"its {array.dtype} values range from {low:g} to {high:g}, not within [0, 1] "
                           "(divide 0-255 pixels by 255, or save them as uint8)")
        return torch.from_numpy(array.astype(np.float32))
    if low < 0 or high > 255:
        raise BadInput(f"its {array.dtype} values range from {low} to {high}, not within 0-255")
    return torch.from_numpy(array.astype(np.uint8))


def read_image(path: Path) -> torch.Tensor:
    """An image file of any size and mode as 28x28 grayscale uint8."""
    try:
        # Pillow's warnings (palette transparency, odd EXIF) do not change a 28x28 grayscale result and
        # would break the one line per input on stderr.
        with Image.open(path) as image, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gray = to_gray(ImageOps.exif_transpose(image))  # phone photos keep their rotation in EXIF
    except UnidentifiedImageError:
        raise BadInput("not an image, NPY or IDX file") from None
    except Exception as e:  # image decoders raise many types for damaged files; the reason is what matters
        raise BadInput(f"damaged image ({first_line(e, 120)})") from None
    if gray.size != (SIDE, SIDE):
        # Area averaging when shrinking: exact for whole-number factors (a 56x56 scan of a 28x28 digit)
        shrink = gray.width >= SIDE and gray.height >= SIDE
        gray = gray.resize((SIDE, SIDE), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(gray, dtype=np.uint8))


def to_gray(image: Image.Image) -> Image.Image:
    """Mode L. 16-bit grayscale is scaled, not clipped as Pillow's convert("L") would (all white)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image.convert("L")


def gather(args: tuple[str, ...], invert: bool, prog: str) -> Inputs:
    """Every readable image; one stderr line per input that is not."""
    inputs = Inputs()
    for arg in args:
        try:
            files = expand(arg)
        except BadInput as e:
            files = []
            inputs.failed += 1
            click.echo(f"{prog}: error: cannot read {arg}: {e}", err=True)
        for name, path in files:
            try:
                inputs.add(name, read_file(path), invert)
            except BadInput as e:
                inputs.failed += 1
                click.echo(f"{prog}: error: cannot read {name}: {e}", err=True)
    return inputs


# --- predicting and writing ------------------------------------------------------------------

def classify(model: StackedRNN, images: torch.Tensor, batch_size: int) -> tuple[list[int], list[float]]:
    """Digit (argmax of the logits, as evaluation counts it) and its softmax probability, per image."""
    digits, probabilities = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size]).float()
            digit = logits.argmax(dim=1)
            digits += digit.tolist()
            probabilities += logits.softmax(dim=1).gather(1, digit[:, None]).squeeze(1).tolist()
    return digits, probabilities


def write_csv(path: Path, rows: list[tuple[str, int, float]]) -> None:
    """Written beside the target, then renamed: an interrupted run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows((name, digit, f"{p:.4f}") for name, digit, p in rows)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DistrnnError(f"cannot write predictions to {path}: {e.strerror or first_line(e)}") from None


@click.command(name="predict", context_settings=CONTEXT_SETTINGS)
@click.option("--checkpoint", required=True,
              help="A run folder (holding model.pt), a model.pt file, or a checkpoints/step-* folder.")
@click.option("--invert", is_flag=True,
              help="Use 255 - pixel: for dark digits on a light background (MNIST's are light on dark).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a CSV (input,prediction,probability) instead of printing one line per input.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass.")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
def command(checkpoint: str, invert: bool, output: Path | None, batch_size: int, inputs: tuple[str, ...]) -> None:
    """Classify digit images: image files (any size, converted to 28x28 grayscale), folders of them,
    IDX files (MNIST's format) or NPY arrays (N x 28 x 28; uint8, or float in [0, 1])."""
    prog = click.get_current_context().command_path
    if output is not None and not output.parent.is_dir():  # fail before the work, not after it
        raise DistrnnError(f"cannot write predictions to {output}: folder {output.parent} does not exist")
    model, _ = load_model(checkpoint)  # a missing or torn checkpoint: load_model's one line
    read = gather(inputs, invert, prog)
    if read.light and not invert:
        click.echo(f"{prog}: hint: {read.light} of {len(read.names)} inputs look like dark digits on a light "
                   "background; pass --invert", err=True)
    if read.names:
        digits, probabilities = classify(model, read.images(), batch_size)
        rows = list(zip(read.names, digits, probabilities))
        if output is None:
            for name, digit, p in rows:
                click.echo(f"{name}\t{digit}\t{p:.4f}")
        else:
            write_csv(output, rows)
            failed = f"; {read.failed} input(s) could not be read" if read.failed else ""
            click.echo(f"wrote {len(rows)} predictions to {output}{failed}")
    if read.failed:
        # sys.exit, not ctx.exit: under run_cli (standalone_mode=False) Click turns ctx.exit(1) into a return value
        sys.exit(1)
