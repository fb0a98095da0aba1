"""The README's results table is what `make results` rendered, not numbers typed in by hand."""

from __future__ import annotations

import json

from benchmarks import results_table
from tests.helpers import REPO


def test_the_readme_table_is_rendered_from_the_saved_runs():
    results = json.loads(results_table.RESULTS.read_text())
    readme = (REPO / "README.md").read_text()
    assert results_table.render(results) in readme
    assert set(results["runs"]) == set(results_table.RUNS)  # every run the command makes, and no other
    for name, r in results["runs"].items():
        assert r["args"] == results_table.RUNS[name] and r["test_seen"] == 10_000
