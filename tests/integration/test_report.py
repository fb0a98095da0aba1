"""`distrnn report` on two real smoke runs: what training wrote is what the report shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from distrnn.run.folder import RunFolder
from distrnn.tools import report
from tests.helpers import distrnn, run

CLI = ("from distrnn.errors import run_cli; from distrnn.tools.report import command; import sys; "
       "sys.exit(run_cli(command, prog='distrnn report'))")
LEARNING_RATES = ("0.001", "0.002")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir) -> list[Path]:
    """Two 2000-image smoke runs that differ in learning rate, with an evaluation every 15 steps too."""
    root = tmp_path_factory.mktemp("report")
    runs = []
    for lr in LEARNING_RATES:
        out = root / f"lr-{lr}"
        result = distrnn("train", "--mode", "cpu", "--config", "smoke", "--set", "data.train_samples=2000",
                         "--set", "train.log_every=5", "--set", "train.eval_every=15", "--lr", lr, "--no-wandb",
                         "--data-dir", str(data_dir), "--output-dir", str(out), timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs.append(out)
    return runs


def expected_row(folder: Path) -> list[str]:
    """The table row summary.json calls for, formatted here independently of report.py."""
    s = json.loads(RunFolder(folder).summary.read_text())
    best = max(s["history"], key=lambda h: (h["test_accuracy"], -h["step"]))
    return [folder.name, str(s["steps"]), f"{s['train_seconds']:.1f}", f"{s['samples_per_s']:.0f}",
            f"{s['test_accuracy']:.2f}% ({s['test_correct']} / {s['test_seen']})",
            f"{s['train_accuracy']:.2f}% ({s['train_correct']} / {s['train_seen']})",
            f"{best['test_accuracy']:.2f}% ({best['step']})"]


def test_report_on_two_real_runs(two_runs, tmp_path):
    png, markdown = tmp_path / "report.png", tmp_path / "report.md"
    result = run([sys.executable, "-c", CLI, *map(str, two_runs), "--output", str(png), "--markdown", str(markdown)])
    assert result.returncode == 0, result.stderr
    with Image.open(png) as image:
        assert (image.format, image.size) == ("PNG", report.PIXELS)
        image.verify()
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")][2:]
    assert [[c.strip() for c in row.strip("|").split("|")] for row in rows] == [expected_row(r) for r in two_runs]
    assert markdown.read_text() == result.stdout
    history = json.loads(RunFolder(two_runs[0]).summary.read_text())["history"]
    assert len(history) >= 3  # evaluations at steps 15, 30 and the epoch end: real curves, not points


def test_loss_against_time_only_where_training_logged_it(two_runs, tmp_path):
    """Holds before and after train/seconds is logged: with it, no warning; without, one per run."""
    result = run([sys.executable, "-c", CLI, *map(str, two_runs), "--output", str(tmp_path / "r.png")])
    assert result.returncode == 0, result.stderr
    runs = report.load_runs(tuple(map(str, two_runs)))
    assert all(len(r.loss) >= 5 for r in runs)  # a loss every 5 of ~31 steps
    untimed = [r.label for r in runs if not r.timed_loss]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(untimed) and all(label in w for label, w in zip(untimed, warnings)), result.stderr
    loss_step, loss_time, _, _ = report.draw(runs).axes[:4]
    assert (len(loss_step.get_lines()), len(loss_time.get_lines())) == (2, 2 - len(untimed))
