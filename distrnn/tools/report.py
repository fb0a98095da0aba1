"""`distrnn report RUN [RUN ...]`: compare finished runs in one PNG and one Markdown table.

Reads only what a run folder already holds (metrics.jsonl, summary.json), so it works offline and
without W&B. Four panels: training loss against step and against training time, accuracy during training
against step and against training time; one colour per run in every panel, named by its folder.

Where the numbers come from, and why:
- loss: the train/loss lines of metrics.jsonl. Their "time" field is wall clock (evaluations,
  checkpoints and any gap before a resume included), so loss is put against training time only where
  the line carries train/seconds; a run without it is drawn against step alone, and we say so.
- accuracy during training: summary.json's "history", which the trainer keeps in its checkpoints, so a
  resumed run has each evaluation once and with its training time (metrics.jsonl would repeat the redone
  ones). A run with a validation holdout (data.val_samples) evaluates validation during training and test
  once at the end: its curves are validation accuracy, and the panels say so.
- sweeps: when runs have a best validation accuracy (summary.json's best_val_accuracy, best_val_step), the
  table gains that column and lists the runs best first, so `distrnn report runs/SWEEP/*` ranks the trials.
  Choosing by validation, not test, accuracy keeps the test set out of the choice.

matplotlib is imported inside the command: importing this module (as the `distrnn` entry point does) stays cheap.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from distrnn.errors import CONTEXT_SETTINGS, DistrnnError, first_line
from distrnn.run.folder import RunFolder
from distrnn.tools.time_split import draw_time_split

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_INCHES, DPI = (12.0, 12.0), 100
PIXELS = (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))  # (width, height) of the PNG
TIME_METRIC = "train/seconds"
# What the table needs from summary.json; a summary without one of them is refused by name.
SUMMARY_KEYS = ("steps", "train_seconds", "samples_per_s", "test_accuracy", "test_correct", "test_seen")
# Null in runs with train.eval_train_set: false (all three), numbers otherwise.
TRAIN_SET_KEYS = ("train_accuracy", "train_correct", "train_seen")
# Only in runs with a validation holdout (data.val_samples); null or absent otherwise.
VAL_ACCURACY, VAL_STEP = "best_val_accuracy", "best_val_step"
MIXED_ACCURACY = "validation or test accuracy"  # the accuracy panels' name when only some runs have a holdout


@dataclass
class LossPoint:
    step: int
    loss: float
    seconds: float | None  # training time so far; None in metrics written before train/seconds existed


@dataclass
class Run:
    folder: RunFolder
    summary: dict[str, Any]
    loss: list[LossPoint]
    label: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def timed_loss(self) -> list[LossPoint]:
        return [p for p in self.loss if p.seconds is not None]


# --- reading a run folder ---------------------------------------------------------------------------

def read_run(path: str | Path) -> Run:
    """One run folder, or a DistrnnError naming the folder and what is missing or unreadable."""
    folder = RunFolder(path)
    if not folder.root.is_dir():
        what = "is not a folder" if folder.root.exists() else "does not exist"
        raise DistrnnError(f"run folder {folder.root} {what}; pass the --output-dir of a `distrnn train` run")
    if not folder.is_finished():
        raise DistrnnError(f"run folder {folder.root} has no {folder.summary.name}: the run is unfinished or "
                           "failed; report it once `distrnn train` has finished it")
    summary = read_summary(folder)
    history = summary.get("history")
    return Run(folder, summary, read_loss(folder), history=history if isinstance(history, list) else [])


def read_summary(folder: RunFolder) -> dict[str, Any]:
    try:
        summary = json.loads(folder.summary.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DistrnnError(f"{folder.summary} is unreadable ({first_line(e, 100)})") from None
    if not isinstance(summary, dict):
        raise DistrnnError(f"{folder.summary} is not a distrnn summary (not a JSON object)")
    train_set_skipped = all(key in summary and summary[key] is None for key in TRAIN_SET_KEYS)
    required = SUMMARY_KEYS if train_set_skipped else SUMMARY_KEYS + TRAIN_SET_KEYS
    missing = [key for key in required if not _is_number(summary.get(key))]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DistrnnError(f"{folder.summary} lacks numbers for {listed}; was it written by `distrnn train`?")
    if summary.get(VAL_ACCURACY) is not None and not (_is_number(summary[VAL_ACCURACY])
                                                      and isinstance(summary.get(VAL_STEP), int)):
        raise DistrnnError(f"{folder.summary} has a {VAL_ACCURACY} without a number for it and an integer "
                           f"{VAL_STEP}; was it written by `distrnn train`?")
    return summary


def read_metrics(folder: RunFolder) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl, in file order. A damaged line is refused, not skipped: a silently
    shortened curve would be compared as if it were whole."""
    try:
        lines = folder.metrics.read_text().splitlines()
    except FileNotFoundError:
        raise DistrnnError(f"run folder {folder.root} has no {folder.metrics.name}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DistrnnError(f"{folder.metrics} is unreadable ({first_line(e, 100)})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DistrnnError(f"{folder.metrics} is unreadable: line {number} is not a JSON object with a step")
        records.append(record)
    return records


def read_loss(folder: RunFolder) -> list[LossPoint]:
    points = [LossPoint(r["step"], float(r["train/loss"]), _seconds(r))
              for r in read_metrics(folder) if _is_number(r.get("train/loss"))]
    return latest_attempt(points)


def _seconds(record: dict[str, Any]) -> float | None:
    value = record.get(TIME_METRIC)
    return float(value) if _is_number(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def latest_attempt(points: list[LossPoint]) -> list[LossPoint]:
    """A resumed run appends to metrics.jsonl and logs again the steps after its checkpoint: a step at or
    below the last one kept starts a new attempt, which replaces what the interrupted one logged from there."""
    kept: list[LossPoint] = []
    for point in points:
        while kept and kept[-1].step >= point.step:
            kept.pop()
        kept.append(point)
    return kept


# --- naming, the table --------------------------------------------------------------------------------

def run_labels(paths: list[str | Path]) -> list[str]:
    """Each run's folder name; runs whose names collide get more of their path, until they differ."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = [str(Path(*p[-d:])) for p, d in zip(parts, depth)]
        clashes = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


def evaluations(run: Run, key: str = "test_accuracy") -> list[dict[str, Any]]:
    """The evaluations of summary.json's history that have a step and an accuracy under `key`."""
    return [h for h in run.history if isinstance(h, dict) and _is_number(h.get(key)) and isinstance(h.get("step"), int)]


def accuracy_key(run: Run) -> str:
    """What a run evaluated during training: validation when it held a validation set out (test comes
    once, at the end, then), else test."""
    return "val_accuracy" if evaluations(run, "val_accuracy") else "test_accuracy"


def best_test(run: Run) -> dict[str, Any] | None:
    """The highest test accuracy during training; the earliest step on a tie."""
    scored = evaluations(run)
    return max(scored, key=lambda h: (h["test_accuracy"], -h["step"])) if scored else None


def best_val(run: Run) -> tuple[float, int] | None:
    """summary.json's best validation accuracy and its step; None for a run without a holdout."""
    accuracy = run.summary.get(VAL_ACCURACY)
    return (float(accuracy), run.summary[VAL_STEP]) if accuracy is not None else None


def ranked(runs: list[Run]) -> list[Run]:
    """Best validation accuracy first when any run has one (runs without one last); else as given.
    Ties keep the order given."""
    if not any(best_val(run) for run in runs):
        return list(runs)
    return sorted(runs, key=lambda run: -best_val(run)[0] if best_val(run) else math.inf)


def row_cells(run: Run) -> list[str]:
    s = run.summary
    return [run.label.replace("|", "\\|"), str(s["steps"]), f"{s['train_seconds']:.1f}", f"{s['samples_per_s']:.0f}",
            f"{s['test_accuracy']:.2f}% ({s['test_correct']} / {s['test_seen']})",
            "not evaluated" if s["train_accuracy"] is None  # train.eval_train_set: false
            else f"{s['train_accuracy']:.2f}% ({s['train_correct']} / {s['train_seen']})"]


def markdown_table(runs: list[Run]) -> str:
    """One row per run, ranked (see `ranked`). Runs with a validation holdout add its column, second so the
    ranking shows; the best test accuracy during training is left out when every run has a holdout, since
    none of them evaluated test before the end."""
    runs = ranked(runs)
    with_val = [best_val(run) is not None for run in runs]
    show_val, show_best_test = any(with_val), not all(with_val)
    headers = ["run", *["best validation accuracy (step)"] * show_val, "steps", "training seconds", "samples/s",
               "final test accuracy", "train accuracy", *["best test accuracy during training (step)"] * show_best_test]
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    for run in runs:
        cells = row_cells(run)
        if show_val:
            best = best_val(run)
            cells.insert(1, f"{best[0]:.2f}% ({best[1]})" if best else "no holdout")
        if show_best_test:
            best_t = best_test(run)
            cells.append(f"{best_t['test_accuracy']:.2f}% ({best_t['step']})" if best_t else "none recorded")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- the figure ---------------------------------------------------------------------------------------

def draw(runs: list[Run]) -> Figure:
    """Four panels of curves, one colour per run (C0, C1, ... cycling after ten runs), one legend for all, and
    below them where each run's training time went (a stacked bar per run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    # No pyplot: no global figure state, no GUI backend, the same PNG on any machine.
    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplot_mosaic([["loss_step", "loss_time"], ["acc_step", "acc_time"], ["time", "time"]])
    loss_step, loss_time, acc_step, acc_time = (panels[k] for k in ("loss_step", "loss_time", "acc_step", "acc_time"))
    draw_time_split(panels["time"], runs)
    for i, run in enumerate(runs):
        style = {"color": f"C{i % 10}", "label": run.label}
        _plot(loss_step, [p.step for p in run.loss], [p.loss for p in run.loss], style)
        _plot(loss_time, [p.seconds for p in run.timed_loss], [p.loss for p in run.timed_loss], style)
        key = accuracy_key(run)
        history = evaluations(run, key)
        _plot(acc_step, [h["step"] for h in history], [h[key] for h in history], style, "o")
        timed = [h for h in history if _is_number(h.get("train_seconds"))]
        _plot(acc_time, [h["train_seconds"] for h in timed], [h[key] for h in timed], style, "o")
    _label(loss_step, "training loss against step", "step", "training loss", log=True)
    _label(loss_time, "training loss against training time", "training time (s)", "training loss", log=True)
    accuracy = accuracy_name(runs)
    _label(acc_step, f"{accuracy} against step", "step", f"{accuracy} (%)")
    _label(acc_time, f"{accuracy} against training time", "training time (s)", f"{accuracy} (%)")
    _note_untimed(loss_time, [run.label for run in runs if run.loss and not run.timed_loss])
    if accuracy == MIXED_ACCURACY:  # the PNG alone says which curves are test accuracy
        _note(acc_step, f"test accuracy (no validation holdout): "
                        f"{', '.join(run.label for run in runs if accuracy_key(run) == 'test_accuracy')}")
    # Built from handles, not from one panel: a run with no loss points is still named.
    fig.legend(handles=[Line2D([], [], color=f"C{i % 10}", label=run.label) for i, run in enumerate(runs)],
               loc="outside upper center", ncols=min(len(runs), 4))
    return fig


def _plot(ax: Axes, xs: list, ys: list, style: dict[str, Any], marker: str | None = None) -> None:
    if xs:  # a lone point needs a marker to be seen at all
        ax.plot(xs, ys, marker=marker or ("o" if len(xs) == 1 else None), markersize=4, **style)


def _label(ax: Axes, title: str, xlabel: str, ylabel: str, log: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log and ax.has_data() and all(min(line.get_ydata(), default=1) > 0 for line in ax.get_lines()):
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")  # loss falls over orders of magnitude
        # 0.2, not 2 x 10^-1; between powers of ten only 2 and 5 are labelled, so labels never overlap
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else ""))
    ax.grid(True, alpha=0.3)


def accuracy_name(runs: list[Run]) -> str:
    """What the accuracy panels show: validation accuracy when every run held a validation set out."""
    keys = {accuracy_key(run) for run in runs}
    return {frozenset({"val_accuracy"}): "validation accuracy",
            frozenset({"test_accuracy"}): "test accuracy"}.get(frozenset(keys), MIXED_ACCURACY)


def _note_untimed(ax: Axes, labels: list[str]) -> None:
    """Said in the panel too, so the PNG alone does not suggest those runs are missing by accident."""
    if labels:
        _note(ax, f"against step only (no {TIME_METRIC} logged): {', '.join(labels)}")


def _note(ax: Axes, text: str) -> None:
    ax.text(0.01, 0.01, text[:150], transform=ax.transAxes, fontsize=8, color="0.35", va="bottom")


# --- the command --------------------------------------------------------------------------------------

def load_runs(paths: tuple[str, ...]) -> list[Run]:
    """Every run, labelled, or the first problem; nothing is written unless all of them can be read."""
    unique: dict[Path, str] = {}
    for path in paths:  # the same folder given twice is drawn once (its label could never differ)
        unique.setdefault(Path(path).resolve(), path)
    runs = [read_run(path) for path in unique.values()]
    for run, label in zip(runs, run_labels(list(unique.values()))):
        run.label = label
    return runs


def warn_untimed(runs: list[Run]) -> None:
    for run in runs:
        if not run.loss:
            click.echo(f"warning: {run.label}: no train/loss in {run.folder.metrics.name}; its loss panels are empty",
                       err=True)
        elif not run.timed_loss:
            click.echo(f"warning: {run.label}: {run.folder.metrics.name} has no {TIME_METRIC} (written before distrnn "
                       "logged training time); its training loss is plotted against step only", err=True)
        elif len(run.timed_loss) < len(run.loss):
            click.echo(f"warning: {run.label}: {len(run.loss) - len(run.timed_loss)} of {len(run.loss)} loss points "
                       f"have no {TIME_METRIC}; only the others are plotted against training time", err=True)


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise DistrnnError(f"cannot write {path} ({e.strerror or e}); pass another path") from None


@click.command(name="report", context_settings=CONTEXT_SETTINGS)
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.png"),
              show_default=True, help="The PNG to write (overwritten if it exists).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the Markdown table to this file.")
def command(runs: tuple[str, ...], output: Path, markdown: Path | None) -> None:
    """Compare finished runs: one PNG and a Markdown table.

    RUN is a run folder (the --output-dir of `distrnn train`). The PNG has four panels, training loss
    and accuracy during training (validation accuracy for runs with data.val_samples, else test) against
    step and against training time, one colour per run; the table of final numbers goes to stdout.
    Runs with a validation holdout are ranked by their best validation accuracy, best first, so
    `distrnn report runs/SWEEP/*` ranks a sweep's trials. An unfinished run (no summary.json) is refused,
    not skipped: the table needs its final numbers, and a comparison that silently lost a run would
    mislead. Works offline, without W&B.
    """
    loaded = ranked(load_runs(runs))  # the legend in the table's order
    try:
        figure = draw(loaded)
    except ImportError as e:  # matplotlib is a dev extra, not a training dependency
        raise DistrnnError(f"`distrnn report` needs matplotlib ({first_line(e, 80)}); pip install matplotlib") from None
    table = markdown_table(loaded)
    write_file(output, lambda p: figure.savefig(p, format="png", dpi=DPI))
    if markdown is not None:
        write_file(markdown, lambda p: p.write_text(table))
    warn_untimed(loaded)  # after the writes: a failed write stays the one line printed
    click.echo(table, nl=False)
    click.echo(f"wrote {output}" + (f" and {markdown}" if markdown else ""), err=True)
