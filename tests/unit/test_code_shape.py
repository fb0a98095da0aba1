"""The code stays readable: short functions, one module per concern, no file names spelled twice."""

from __future__ import annotations

import ast
import re

from tests.helpers import REPO

SOURCES = sorted((REPO / "distrnn").rglob("*.py"))


def functions():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def test_no_function_is_longer_than_50_lines():
    long = [f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for name, node in functions()
            if node.end_lineno - node.lineno + 1 > 50]
    assert not long, long


def test_no_module_is_longer_than_400_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in SOURCES if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def test_the_trainer_class_is_the_loop_and_at_most_250_lines():
    [trainer] = [n for n in ast.parse((REPO / "distrnn" / "trainer.py").read_text()).body
                 if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 250


def test_the_result_tools_live_in_their_own_subpackage():
    tools = {p.stem for p in (REPO / "distrnn" / "tools").glob("*.py")} - {"__init__"}
    assert tools == {"predict", "export", "report", "figures", "time_split", "kubernetes"}
    assert not any((REPO / "distrnn" / f"{name}.py").exists() for name in tools)


def test_one_function_flattens_a_config():
    """config.flatten; five copies once differed in how they treated lists and nesting."""
    flatteners = [f"{name}:{node.name}" for name, node in functions() if "flat" in node.name.lower()
                  and "cudnn" not in node.name]
    assert flatteners == ["config.py:flatten"], flatteners


def test_run_folder_file_names_are_spelled_only_in_run_folder():
    names = ["config.yaml", "metrics.jsonl", "model.pt", "summary.json", "meta.json", "model.safetensors"]
    for path in SOURCES:
        if path.name == "run_folder.py":
            continue
        for name in names:
            assert not re.search(rf'"{re.escape(name)}"', path.read_text()), f"{path.name} spells {name}"


def test_only_config_reads_the_data_dir_variable():
    readers = [p.name for p in SOURCES if "DISTRNN_DATA_DIR" in p.read_text() and '"DISTRNN_DATA_DIR"' in p.read_text()]
    assert readers == ["config.py"]
