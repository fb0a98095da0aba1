"""`distrnn predict` on real files: the model's own predictions, whatever form the images take.

One small model is trained once for the module; the reference is that model run in this process on
the first 200 real MNIST test images, so every check compares with real values, not a mock.
"""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distrnn.data.mnist import IMAGES_MAGIC, Split, load_split
from distrnn.run.model_files import load_model
from tests.helpers import BIN, one_line_error, run, train_small_model

N = 200
PROG = "distrnn predict"
# `distrnn predict` as the CLI group will run it, without editing cli.py
WRAPPER = ("from distrnn.errors import run_cli; from distrnn.tools.predict import command; import sys; "
           f"sys.exit(run_cli(command, prog='{PROG}'))")
HINT = f"{PROG}: hint: {N} of {N} inputs look like dark digits on a light background; pass --invert"


def predict(*args: str | Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "python"), "-c", WRAPPER, *map(str, args)], timeout=600)


def rows(stdout: str) -> list[tuple[str, int, float]]:
    """Every `NAME<TAB>DIGIT<TAB>PROBABILITY` line; fails on any other line."""
    out = []
    for line in stdout.splitlines():
        assert re.fullmatch(r"[^\t]+\t\d\t[01]\.\d{4}", line), line
        name, digit, probability = line.split("\t")
        out.append((name, int(digit), float(probability)))
    return out


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, data_dir) -> Path:
    return train_small_model(tmp_path_factory.mktemp("predict") / "run", data_dir)


@pytest.fixture(scope="module")
def test_images(data_dir) -> Split:
    return load_split(data_dir, train=False).first(N)


@pytest.fixture(scope="module")
def reference(model_run, test_images) -> tuple[list[int], list[float]]:
    """What the model itself says on the images, scaled as in training: digits and their probabilities."""
    model, _ = load_model(model_run)
    model.eval()
    with torch.no_grad():
        logits = model(test_images.images.float() / 255)
    digits = logits.argmax(dim=1)
    assert len(set(digits.tolist())) >= 5, "a degenerate model would make these checks weak"
    return digits.tolist(), logits.softmax(dim=1).gather(1, digits[:, None]).squeeze(1).tolist()


def save_pngs(folder: Path, images: np.ndarray, transform=lambda image: image, suffix: str = ".png") -> list[Path]:
    folder.mkdir()
    paths = [folder / f"{i:03d}{suffix}" for i in range(len(images))]
    for path, pixels in zip(paths, images):
        transform(Image.fromarray(pixels)).save(path)
    return paths


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, test_images) -> list[Path]:
    """The images as 28x28 grayscale PNGs, as MNIST stores them (light digits on black)."""
    return save_pngs(tmp_path_factory.mktemp("pngs") / "digits", test_images.images.numpy())


def assert_matches(result: subprocess.CompletedProcess, names: list[str], reference) -> None:
    """Exit 0, the inputs in order, each the model's own digit and probability (4 decimals)."""
    assert result.returncode == 0, result.stderr[-3000:]
    got = rows(result.stdout)
    assert [name for name, _, _ in got] == names
    assert [digit for _, digit, _ in got] == reference[0]
    assert [p for _, _, p in got] == pytest.approx(reference[1], abs=6e-5)


def test_png_files_give_the_models_own_predictions(model_run, pngs, test_images, reference):
    result = predict("--checkpoint", model_run, *pngs)
    assert_matches(result, [str(p) for p in pngs], reference)
    assert stderr_lines(result) == []  # MNIST-like images: no --invert hint
    digits = torch.tensor([digit for _, digit, _ in rows(result.stdout)])
    correct = int((digits == test_images.labels).sum())
    assert correct == sum(d == label for d, label in zip(reference[0], test_images.labels.tolist()))
    assert correct > N // 2, f"{correct} / {N}: the model should beat chance by far"


def test_inverted_larger_rgb_images_need_invert_and_say_so_once(model_run, test_images, reference, tmp_path):
    inverted = save_pngs(tmp_path / "scans", 255 - test_images.images.numpy(),
                         lambda image: image.resize((56, 56), Image.Resampling.NEAREST).convert("RGB"))
    assert Image.open(inverted[0]).mode == "RGB" and Image.open(inverted[0]).size == (56, 56)
    assert_matches(predict("--checkpoint", model_run, "--invert", *inverted), [str(p) for p in inverted], reference)

    plain = predict("--checkpoint", model_run, *inverted)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert stderr_lines(plain) == [HINT]
    assert [digit for _, digit, _ in rows(plain.stdout)] != reference[0]  # --invert is what made them right


def test_idx_npy_folder_and_csv(model_run, pngs, test_images, reference, tmp_path):
    images = test_images.images.numpy()
    idx = tmp_path / "digits-idx3-ubyte"
    idx.write_bytes(b"".join(n.to_bytes(4, "big") for n in (IMAGES_MAGIC, N, 28, 28)) + images.tobytes())
    npy, floats = tmp_path / "digits.npy", tmp_path / "floats.npy"
    np.save(npy, images)
    np.save(floats, images.astype(np.float32) / np.float32(255))
    for path in (idx, npy, floats):
        assert_matches(predict("--checkpoint", model_run, path), [f"{path}[{i}]" for i in range(N)], reference)

    folder = pngs[0].parent
    assert_matches(predict("--checkpoint", model_run, folder), [str(p) for p in pngs], reference)

    out = tmp_path / "predictions.csv"
    result = predict("--checkpoint", model_run, "--output", out, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {N} predictions to {out}"
    with out.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["input", "prediction", "probability"]
    assert len(table) == N + 1
    assert [row[0] for row in table[1:]] == [str(p) for p in pngs]
    assert [int(row[1]) for row in table[1:]] == reference[0]
    assert [float(row[2]) for row in table[1:]] == pytest.approx(reference[1], abs=6e-5)


def test_bad_inputs_get_one_line_each_and_the_rest_are_predicted(model_run, pngs, reference, tmp_path):
    text = tmp_path / "x.png"
    text.write_text("not a picture\n")
    missing = tmp_path / "missing.png"
    wrong_shape = tmp_path / "wrong.npy"
    np.save(wrong_shape, np.zeros((3, 5), dtype=np.uint8))
    result = predict("--checkpoint", model_run, pngs[0], text, missing, wrong_shape, pngs[1])

    assert result.returncode == 1
    got = rows(result.stdout)
    assert [(name, digit) for name, digit, _ in got] == [(str(p), reference[0][i]) for i, p in enumerate(pngs[:2])]
    lines = stderr_lines(result)
    assert lines == [f"{PROG}: error: cannot read {text}: not an image, NPY or IDX file",
                     f"{PROG}: error: cannot read {missing}: no such file or folder",
                     f"{PROG}: error: cannot read {wrong_shape}: it holds an array of shape 3 x 5; "
                     "expected N x 28 x 28 or 28 x 28"]
    assert all(len(line) - len(str(tmp_path)) < 200 for line in lines)


def test_nothing_readable_exits_1_after_the_per_input_lines(model_run, tmp_path):
    result = predict("--checkpoint", model_run, tmp_path / "a.png", tmp_path)  # missing; a folder without images
    assert result.returncode == 1
    assert result.stdout == ""
    assert stderr_lines(result) == [f"{PROG}: error: cannot read {tmp_path / 'a.png'}: no such file or folder",
                                    f"{PROG}: error: cannot read {tmp_path}: the folder holds no image files "
                                    "(.png, .jpg, .jpeg, ...)"]


def test_missing_checkpoint_is_load_models_one_line(pngs, tmp_path):
    line = one_line_error(predict("--checkpoint", tmp_path / "no-run", pngs[0]))
    assert line == (f"{PROG}: error: no saved model at '{tmp_path / 'no-run'}'; pass a run folder holding model.pt, "
                    "the file itself, or a checkpoints/step-* folder")
