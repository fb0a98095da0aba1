"""`distrnn report` on run folders written by hand: known numbers in, the same numbers out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrnn.run.folder import RunFolder
from distrnn.tools import report


def make_run(root: Path, *, steps: int, lr: float, history: list[tuple[int, float, float]], seconds: bool = True,
             summary: bool = True, holdout: bool = False, test: float | None = None) -> Path:
    """A run folder as `distrnn train` leaves it: loss every 10 steps, one test line per evaluation.
    `history` is (step, test accuracy, training seconds) for each evaluation; with `holdout` (data.val_samples)
    those are validation accuracies, summary.json gets the best of them, and `test` is the final test accuracy."""
    folder = RunFolder(root)
    folder.root.mkdir(parents=True)
    split = "val" if holdout else "test"
    lines = [{"step": s, "time": 1e9 + s, "train/loss": 2.3 / (1 + s * lr), "train/lr": lr, "epoch": 1,
              **({"train/seconds": s * 0.1} if seconds else {})} for s in range(10, steps + 1, 10)]
    lines += [{"step": s, "time": 1e9 + s, f"{split}/accuracy": a, f"{split}/correct": round(a * 100),
               f"{split}/seen": 10000} for s, a, _ in history]
    folder.metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary:
        last = history[-1]
        test = last[1] if test is None else test
        best = max(history, key=lambda h: (h[1], -h[0]))
        folder.summary.write_text(json.dumps({
            "train_accuracy": 91.25, "train_correct": 1825, "train_seen": 2000, "test_accuracy": test,
            "test_correct": round(test * 100), "test_seen": 10000, "train_seconds": last[2], "steps": steps,
            "samples_per_s": steps * 64 / last[2], "num_processes": 1,
            "best_val_accuracy": best[1] if holdout else None, "best_val_step": best[0] if holdout else None,
            "history": [{"epoch": 1, "step": s, f"{split}_accuracy": a, "train_seconds": t} for s, a, t in history]}))
    return folder.root


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    slow = make_run(tmp_path / "lr-0.001", steps=60, lr=0.001, history=[(30, 85.5, 3.0), (60, 90.12, 6.5)])
    fast = make_run(tmp_path / "lr-0.002", steps=60, lr=0.002, history=[(30, 93.0, 2.9), (60, 92.34, 6.25)])
    return slow, fast


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Run label -> its cells, from the table's data rows (after the header and the --- row)."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def test_the_legend_names_each_run_by_its_folder(two_runs):
    figure = report.draw(report.load_runs(tuple(map(str, two_runs))))
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["lr-0.001", "lr-0.002"]
    colours = [tuple(line.get_color() for line in ax.get_lines()) for ax in figure.axes[:4]]
    assert all(c == colours[0] and len(set(c)) == 2 for c in colours), colours  # one colour per run, in every panel
    assert tuple(handle.get_color() for handle in legend.legend_handles) == colours[0]


def test_the_panels_plot_the_logged_values(two_runs):
    runs = report.load_runs(tuple(map(str, two_runs)))
    loss_step, loss_time, acc_step, acc_time = report.draw(runs).axes[:4]
    assert list(loss_step.get_lines()[0].get_xdata()) == [10, 20, 30, 40, 50, 60]
    assert list(loss_time.get_lines()[0].get_xdata()) == pytest.approx([1, 2, 3, 4, 5, 6])  # train/seconds
    assert list(acc_step.get_lines()[1].get_ydata()) == [93.0, 92.34]
    assert list(acc_time.get_lines()[1].get_xdata()) == [2.9, 6.25]  # history's train_seconds


    # invented for the first run, and the others keep their own colours


def test_a_resumed_run_keeps_the_latest_attempt_at_each_step():
    points = [report.LossPoint(s, float(s), None) for s in (10, 20, 30, 20, 30, 40)]
    kept = report.latest_attempt(points)
    assert [p.step for p in kept] == [10, 20, 30, 40] and kept[1] is points[3]


# --- runs with a validation holdout (data.val_samples): sweeps ---------------------------------------

@pytest.fixture
def three_trials(tmp_path) -> list[Path]:
    """Three trials of a sweep, given in task order; their best validation accuracies rank them 1, 2, 0."""
    return [make_run(tmp_path / "sweep" / str(task), steps=60, lr=lr, history=history, holdout=True, test=test)
            for task, lr, history, test in [
                (0, 0.001, [(30, 80.0, 3.0), (60, 88.5, 6.0)], 88.1),
                (1, 0.002, [(30, 95.25, 2.9), (60, 94.0, 6.25)], 94.37),  # its best was not its last
                (2, 0.004, [(30, 90.0, 3.1), (60, 91.75, 6.5)], 91.02)]]


def test_equal_validation_accuracies_keep_the_order_given(tmp_path):
    paths = [make_run(tmp_path / name, steps=60, lr=0.001, history=[(60, 90.0, 6.0)], holdout=True)
             for name in ("b", "a", "c")]
    paths.append(make_run(tmp_path / "d", steps=60, lr=0.001, history=[(60, 90.5, 6.0)], holdout=True))
    assert [run.label for run in report.ranked(report.load_runs(tuple(map(str, paths))))] == ["d", "b", "a", "c"]


def test_a_null_best_validation_accuracy_is_a_run_without_a_holdout(two_runs, tmp_path):
    """What `distrnn train` writes with data.val_samples=0: the table is the plain one, in the order given."""
    runs = report.load_runs(tuple(map(str, two_runs)))
    assert all(run.summary["best_val_accuracy"] is None for run in runs)
    assert report.ranked(runs) == runs and "validation" not in report.markdown_table(runs)


def test_the_accuracy_panels_show_validation_accuracy_of_runs_with_a_holdout(three_trials, two_runs):
    runs = report.ranked(report.load_runs(tuple(map(str, three_trials))))
    _, _, acc_step, acc_time = report.draw(runs).axes[:4]
    assert acc_step.get_title() == "validation accuracy against step"
    assert acc_time.get_ylabel() == "validation accuracy (%)"
    assert list(acc_step.get_lines()[0].get_ydata()) == [95.25, 94.0]  # trial 1, first in the ranking
    assert list(acc_time.get_lines()[0].get_xdata()) == [2.9, 6.25]
    mixed = report.load_runs(tuple(map(str, [*three_trials, two_runs[0]])))
    _, _, acc_step, _ = report.draw(mixed).axes[:4]
    assert acc_step.get_title() == "validation or test accuracy against step"
    assert [t.get_text() for t in acc_step.texts] == ["test accuracy (no validation holdout): lr-0.001"]
    assert list(acc_step.get_lines()[3].get_ydata()) == [85.5, 90.12]  # its test accuracy during training


def test_the_bottom_panel_shows_where_each_runs_time_went(tmp_path):
    """One stacked bar per run from summary.json's per-rank split (the mean over its ranks), phases in order;
    a run written before distrnn kept the split is named in the panel."""
    timed = make_run(tmp_path / "timed", steps=60, lr=0.001, history=[(60, 90.0, 6.0)])
    summary = json.loads((timed / "summary.json").read_text())
    summary["ranks"] = [{"rank": r, "data_ms_per_step": 1.0, "compute_ms_per_step": 40.0 + 20 * r,
                         "allreduce_ms_per_step": 10.0, "optimizer_ms_per_step": 2.0} for r in (0, 1)]
    (timed / "summary.json").write_text(json.dumps(summary))
    old = make_run(tmp_path / "old", steps=60, lr=0.001, history=[(60, 90.0, 6.0)])
    runs = report.load_runs((str(timed), str(old)))
    panel = report.draw(runs).axes[4]
    widths = [patch.get_width() for patch in panel.patches]
    assert widths == [1.0, 50.0, 10.0, 2.0]  # data, compute (mean of 40 and 60), all-reduce, optimizer
    assert [t.get_text() for t in panel.get_yticklabels()] == ["timed"]
    assert any("no time split recorded" in t.get_text() and "old" in t.get_text() for t in panel.texts)
