"""The run's pictures: the confusion matrix as a labelled heatmap, and a grid of the most confident mistakes.

Drawn with Pillow, not matplotlib: both are grids of cells, digits and short labels, Pillow already
comes with torchvision, and it imports in milliseconds where matplotlib.pyplot took 0.64 s here,
paid at the end of every run. (`distrnn report`'s curves need axes and legends: matplotlib there.)
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from distrnn.evaluation.counting import Evaluation, Mistake
from distrnn.run.folder import RunFolder

CELL, MARGIN = 44, 70  # confusion matrix: pixels per cell, room for the axis labels
SCALE, TITLE = 4, 18  # mistakes: 28x28 digits drawn 112x112, with a line of text above each


def write_results(folder: RunFolder, test: Evaluation, mistakes: list[tuple[object, Mistake]]) -> None:
    """confusion.csv, confusion.png and errors.png in the run folder (the main process, after training)."""
    with folder.confusion_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *range(len(test.confusion))])
        writer.writerows([digit, *row] for digit, row in enumerate(test.confusion))
    confusion_png([list(row) for row in test.confusion], folder.confusion_png,
                  f"test set: {test.correct} / {test.seen} correct ({test.percent:.2f}%)")
    mistakes_png([pixels for pixels, _ in mistakes], [m.label for _, m in mistakes],
                 [m.prediction for _, m in mistakes], [m.probability for _, m in mistakes], folder.errors_png)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font, fill) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = box[0] + (box[2] - box[0] - (right - left)) / 2 - left
    y = box[1] + (box[3] - box[1] - (bottom - top)) / 2 - top
    draw.text((x, y), text, font=font, fill=fill)


def confusion_png(confusion: list[list[int]], path: Path, title: str) -> None:
    """Rows: true digit, columns: prediction; each cell shaded by its share of the row, with its count."""
    n = len(confusion)
    size = MARGIN + n * CELL + 10
    image = Image.new("RGB", (size, size + 24), "white")
    draw, small, label = ImageDraw.Draw(image), _font(13), _font(15)
    _centered(draw, (0, 0, size, 26), title, label, "black")
    top = 24
    for true, row in enumerate(confusion):
        total = max(sum(row), 1)
        for pred, count in enumerate(row):
            share = count / total
            shade = tuple(int(255 - share * (255 - c)) for c in (31, 89, 160))  # white to dark blue
            x, y = MARGIN + pred * CELL, top + MARGIN - 30 + true * CELL
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=shade, outline=(220, 220, 220))
            _centered(draw, (x, y, x + CELL, y + CELL), str(count), small, "white" if share > 0.5 else "black")
        _centered(draw, (MARGIN - 24, top + MARGIN - 30 + true * CELL, MARGIN, top + MARGIN - 30 + (true + 1) * CELL),
                  str(true), label, "black")
    for pred in range(n):
        _centered(draw, (MARGIN + pred * CELL, top + MARGIN - 52, MARGIN + (pred + 1) * CELL, top + MARGIN - 32),
                  str(pred), label, "black")
    _centered(draw, (MARGIN, top, size, top + 18), "predicted", label, "black")
    draw.text((4, top + MARGIN + n * CELL // 2 - 60), "true", font=label, fill="black")
    image.save(path)


def mistakes_png(images: list, labels: list[int], predictions: list[int], probabilities: list[float],
                 path: Path, columns: int = 5) -> None:
    """A grid of (28x28 uint8) images, each titled 'true T, pred P (p)'."""
    side, gap = 28 * SCALE, 16
    rows = max(1, -(-len(images) // columns))
    image = Image.new("RGB", (columns * (side + gap) + gap, rows * (side + TITLE + 10) + 8), "white")
    draw, font = ImageDraw.Draw(image), _font(13)
    for i, (pixels, true, pred, prob) in enumerate(zip(images, labels, predictions, probabilities)):
        x, y = gap + (i % columns) * (side + gap), 8 + (i // columns) * (side + TITLE + 10)
        _centered(draw, (x, y, x + side, y + TITLE), f"true {true}, pred {pred} ({prob:.2f})", font, "black")
        digit = Image.fromarray(pixels, mode="L").resize((side, side), Image.NEAREST)
        image.paste(digit.convert("RGB"), (x, y + TITLE + 2))
    if not images:
        _centered(draw, (0, 0, image.width, image.height), "no mistakes", font, "black")
    image.save(path)
