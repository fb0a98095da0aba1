"""`distrnn report` as a command (a real process) on run folders written by hand (tests/unit/test_report.py):
known numbers in, the same numbers out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from distrnn.run.folder import RunFolder
from distrnn.tools import report
from tests.helpers import one_line_error, run
from tests.unit import test_report as by_hand
from tests.unit.test_report import make_run, table_rows

two_runs, three_trials = by_hand.two_runs, by_hand.three_trials  # the unit tests' fixtures, here by name

CLI = ("from distrnn.errors import run_cli; from distrnn.tools.report import command; import sys; "
       "sys.exit(run_cli(command, prog='distrnn report'))")


def distrnn_report(*args: str | Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", CLI, *map(str, args)], timeout=120)


def test_writes_a_png_of_the_declared_size(two_runs, tmp_path):
    png = tmp_path / "out" / "report.png"
    result = distrnn_report(*two_runs, "--output", png)
    assert result.returncode == 0, result.stderr
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == report.PIXELS == (1200, 1200)
        image.verify()  # the whole file decodes, not only its header


def test_the_table_has_one_row_per_run_with_its_numbers(two_runs, tmp_path):
    markdown = tmp_path / "table.md"
    result = distrnn_report(*two_runs, "--output", tmp_path / "r.png", "--markdown", markdown)
    assert result.returncode == 0, result.stderr
    assert markdown.read_text() == result.stdout  # the file holds exactly what was printed
    rows = table_rows(result.stdout)
    assert rows == {
        "lr-0.001": ["60", "6.5", "591", "90.12% (9012 / 10000)", "91.25% (1825 / 2000)", "90.12% (60)"],
        # its best evaluation was not its last one
        "lr-0.002": ["60", "6.2", "614", "92.34% (9234 / 10000)", "91.25% (1825 / 2000)", "93.00% (30)"],
    }


def test_runs_with_the_same_folder_name_get_enough_of_their_path(tmp_path):
    history = [(60, 90.0, 6.0)]
    paths = [make_run(tmp_path / d / "exp" / "run", steps=60, lr=0.001, history=history) for d in ("a", "b")]
    paths.append(make_run(tmp_path / "c" / "other", steps=60, lr=0.001, history=history))
    result = distrnn_report(*paths, "--output", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    assert list(table_rows(result.stdout)) == ["a/exp/run", "b/exp/run", "other"]


def test_a_run_without_train_seconds_is_plotted_against_step_only(two_runs, tmp_path):
    old = make_run(tmp_path / "old", steps=60, lr=0.001, history=[(60, 90.0, 6.0)], seconds=False)
    result = distrnn_report(old, *two_runs, "--output", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "old" in warnings[0] and "train/seconds" in warnings[0], result.stderr
    runs = report.load_runs(tuple(map(str, [old, *two_runs])))
    loss_step, loss_time, _, _ = report.draw(runs).axes[:4]
    colours = [line.get_color() for line in loss_step.get_lines()]
    assert len(colours) == 3 and [line.get_color() for line in loss_time.get_lines()] == colours[1:]  # no time axis
    # invented for the first run, and the others keep their own colours


def test_a_missing_run_folder_is_one_line(two_runs, tmp_path):
    missing = tmp_path / "no-such-run"
    result = distrnn_report(two_runs[0], missing, "--output", tmp_path / "r.png")
    line = one_line_error(result)
    assert result.returncode == 1
    assert line.startswith("distrnn report: error:") and str(missing) in line and "does not exist" in line
    assert not (tmp_path / "r.png").exists()


def test_an_unfinished_run_is_refused_in_one_line(two_runs, tmp_path):
    unfinished = make_run(tmp_path / "run-c", steps=30, lr=0.001, history=[(30, 80.0, 3.0)], summary=False)
    result = distrnn_report(*two_runs, unfinished, "--output", tmp_path / "r.png")
    line = one_line_error(result)
    assert result.returncode == 1
    assert str(unfinished) in line and RunFolder(unfinished).summary.name in line and "is unfinished" in line
    assert not (tmp_path / "r.png").exists()  # nothing written for a partial comparison


def test_an_unreadable_metrics_file_is_one_line(two_runs, tmp_path):
    metrics = RunFolder(two_runs[1]).metrics
    metrics.write_text(metrics.read_text() + '{"step": 70, "train/lo\n')
    line = one_line_error(distrnn_report(*two_runs, "--output", tmp_path / "r.png"))
    assert str(metrics) in line and "line 9" in line
    metrics.unlink()
    line = one_line_error(distrnn_report(*two_runs, "--output", tmp_path / "r.png"))
    assert str(two_runs[1]) in line and metrics.name in line


def test_no_run_is_a_usage_error():
    result = distrnn_report()
    assert result.returncode == 2 and "Missing argument" in one_line_error(result)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, distrnn.tools.report; sys.exit('matplotlib' in sys.modules)"
    assert run([sys.executable, "-c", code]).returncode == 0


# --- runs with a validation holdout (data.val_samples): sweeps ---------------------------------------


def test_trials_are_ranked_by_best_validation_accuracy(three_trials, tmp_path):
    result = distrnn_report(*three_trials, "--output", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header == ("| run | best validation accuracy (step) | steps | training seconds | samples/s | "
                      "final test accuracy | train accuracy |")  # no test during training: no best-test column
    assert list(table_rows(result.stdout).items()) == [
        ("1", ["95.25% (30)", "60", "6.2", "614", "94.37% (9437 / 10000)", "91.25% (1825 / 2000)"]),
        ("2", ["91.75% (60)", "60", "6.5", "591", "91.02% (9102 / 10000)", "91.25% (1825 / 2000)"]),
        ("0", ["88.50% (60)", "60", "6.0", "640", "88.10% (8810 / 10000)", "91.25% (1825 / 2000)"]),
    ]


def test_runs_without_a_holdout_come_last_and_keep_the_best_test_column(three_trials, two_runs, tmp_path):
    result = distrnn_report(two_runs[0], *three_trials, two_runs[1], "--output", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == ["1", "2", "0", "lr-0.001", "lr-0.002"]  # unranked runs keep their order, after
    assert rows["lr-0.001"][0] == "no holdout" and rows["lr-0.001"][-1] == "90.12% (60)"
    assert rows["1"][0] == "95.25% (30)" and rows["1"][-1] == "none recorded"  # test only at the end


def test_a_damaged_best_validation_accuracy_is_one_line(three_trials, tmp_path):
    summary = RunFolder(three_trials[2]).summary
    summary.write_text(summary.read_text().replace('"best_val_step": 60', '"best_val_step": "60"'))
    line = one_line_error(distrnn_report(*three_trials, "--output", tmp_path / "r.png"))
    assert str(summary) in line and "best_val_step" in line
    assert not (tmp_path / "r.png").exists()
