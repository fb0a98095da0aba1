"""The code stays readable: short functions, packages that import only downwards, no file names spelled twice."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from tests.helpers import REPO

PACKAGE = REPO / "distrnn"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# distrnn's packages (and top-level modules), lowest first. A module imports only from its own package and from
# lower layers: never upwards, never sideways into another package of its own layer (docs/architecture.md).
LAYERS = [
    {"__init__", "errors"},  # the version, the error types: imported by everyone
    {"testing"},  # fault injection (DISTRNN_FAULTS), called from every layer above
    {"config"},  # schema, values, the shared flags
    {"model", "ranks"},  # plain PyTorch; the rank logic (collectives, heartbeats, devices, stop requests)
    {"data", "run"},  # MNIST and the loaders; the run folder, its hold, integrity, checkpoints, model files
    {"evaluation"},  # exact counting, the evaluator, the figures
    {"worker"},  # one training process: its run, the Trainer and its parts
    {"launcher", "tools"},  # the launch side; the result tools
    {"cli", "train", "evaluate"},  # the entry points
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}
# The one import against the layers, by design: a fault that makes model.py choose as on a GPU patches it.
ALLOWED = {("testing", "model")}


def functions():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def package_of(path) -> str:
    """The package a module belongs to: `run` for distrnn/run/checkpoint.py, `cli` for distrnn/cli.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imports(path, top_level_only: bool = False):
    """(module imported, line) for each import in `path` that runs: at import time and, unless `top_level_only`,
    in functions too. Imports under `if TYPE_CHECKING:` (annotations only) are left out."""
    def walk(nodes, in_function):
        for node in nodes:
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                yield from walk(node.orelse, in_function)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, node.lineno
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"
                for alias in node.names:  # `from distrnn.run import checkpoint` imports distrnn.run.checkpoint
                    yield f"{node.module}.{alias.name}", node.lineno
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if inner and top_level_only:
                continue
            yield from walk(ast.iter_child_nodes(node), inner)

    yield from walk(ast.parse(path.read_text()).body, False)


def distrnn_packages(path, top_level_only: bool = False) -> dict[str, int]:
    """The distrnn packages and top-level modules that `path` imports, each with the line of one import."""
    found = {}
    for module, line in imports(path, top_level_only):
        parts = module.split(".")
        if parts[0] == "distrnn":
            name = parts[1] if len(parts) > 1 else "__init__"
            if name in LAYER:
                found.setdefault(name, line)
    return found


def in_package(name: str):
    return [p for p in SOURCES if package_of(p) == name]


def test_no_function_is_longer_than_50_lines():
    long = [f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for name, node in functions()
            if node.end_lineno - node.lineno + 1 > 50]
    assert not long, long


def test_every_package_and_module_has_a_layer():
    assert {package_of(p) for p in SOURCES} == set(LAYER)


def test_no_module_imports_upwards_or_sideways():
    """The run folder and evaluation never reach into the worker, the rank logic into anything above it, ..."""
    wrong = []
    for path in SOURCES:
        here = package_of(path)
        for name, line in distrnn_packages(path).items():
            if name != here and LAYER[name] >= LAYER[here] and (here, name) not in ALLOWED:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports distrnn.{name} ({here} is not above it)")
    assert not wrong, wrong


def test_the_rank_logic_imports_nothing_of_what_uses_it():
    above = {"worker", "run", "evaluation", "launcher", "data", "tools", "model"}
    wrong = [f"{p.relative_to(REPO)}: {name}" for p in in_package("ranks") for name in distrnn_packages(p)
             if name in above]
    assert not wrong, wrong


def test_run_and_evaluation_never_import_the_worker():
    wrong = [f"{p.relative_to(REPO)}:{line}" for p in in_package("run") + in_package("evaluation")
             for name, line in distrnn_packages(p).items() if name == "worker"]
    assert not wrong, wrong


def test_tools_and_evaluation_never_import_the_launch_side():
    wrong = [f"{p.relative_to(REPO)}:{line}" for p in in_package("tools") + in_package("evaluation")
             for name, line in distrnn_packages(p).items() if name == "launcher"]
    assert not wrong, wrong


def test_the_model_imports_only_the_config():
    assert set(distrnn_packages(PACKAGE / "model.py")) <= {"config"}


def test_the_launch_side_imports_no_torch_when_imported():
    """`distrnn train` plans and starts workers without torch: no launcher module imports torch, accelerate or
    the worker at import time, directly (ast) or through what it imports (a fresh interpreter)."""
    heavy = ("torch", "torchvision", "accelerate", "distrnn.worker", "distrnn.data", "distrnn.ranks.collectives")
    direct = [f"{p.relative_to(REPO)}:{line} imports {module}" for p in in_package("launcher")
              for module, line in imports(p, top_level_only=True) if module.startswith(heavy)]
    assert not direct, direct
    modules = ", ".join("distrnn.launcher." + p.stem for p in in_package("launcher") if p.stem != "__init__")
    code = (f"import sys, {modules}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'accelerate')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout[:500]


def test_every_package_is_packaged():
    listed = re.search(r"^packages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M | re.S).group(1)
    packages = re.findall(r'"([\w.]+)"', listed)
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= set(packages), found - set(packages)


def test_the_trainer_class_is_the_loop_and_at_most_250_lines():
    [trainer] = [n for n in ast.parse((PACKAGE / "worker" / "trainer.py").read_text()).body
                 if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 250


def test_the_result_tools_live_in_their_own_subpackage():
    tools = {p.stem for p in (PACKAGE / "tools").glob("*.py")} - {"__init__"}
    assert tools == {"predict", "export", "report", "time_split"}
    assert not any((PACKAGE / f"{name}.py").exists() for name in tools)


def test_one_function_flattens_a_config():
    """config.schema.flatten; five copies once differed in how they treated lists and nesting."""
    flatteners = [f"{name}:{node.name}" for name, node in functions() if "flat" in node.name.lower()
                  and "cudnn" not in node.name]
    assert flatteners == ["schema.py:flatten"], flatteners


def test_run_folder_file_names_are_spelled_only_in_run_folder():
    names = ["config.yaml", "metrics.jsonl", "model.pt", "summary.json", "meta.json", "model.safetensors"]
    for path in SOURCES:
        if path == PACKAGE / "run" / "folder.py":
            continue
        for name in names:
            assert not re.search(rf'"{re.escape(name)}"', path.read_text()), f"{path.name} spells {name}"


def test_only_config_reads_the_data_dir_variable():
    readers = [p.relative_to(PACKAGE).as_posix() for p in SOURCES
               if "DISTRNN_DATA_DIR" in p.read_text() and '"DISTRNN_DATA_DIR"' in p.read_text()]
    assert readers == ["config/schema.py"]


def test_the_trainer_is_built_from_one_final_config():
    """Where the run starts (and so its config) is decided before the Trainer exists: the Trainer and its
    Checkpointer take the decided config and keep no altered copy; no component reaches into another's
    wrapped internals (Accelerate's optimizer and scheduler wrappers, the rank timing's counters)."""
    trainer = (PACKAGE / "worker" / "trainer.py").read_text()
    checkpoint = (PACKAGE / "run" / "checkpoint.py").read_text()
    assert "decide_resume(" in trainer and "resume_point" not in trainer + checkpoint
    assert len(re.findall(r"self\.cfg\b[\w., ]* = ", trainer + checkpoint)) == 2  # once each, from start.cfg
    reaching = re.compile(r"\.(scheduler\.scheduler|optimizer\.optimizer)\b|timing\.steps\b")
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in SOURCES
                 for n, line in enumerate(path.read_text().splitlines(), 1) if reaching.search(line)]
    assert offenders == []
