"""The shape of the house (README "Design"): imports in one direction, training code that
never loads a plotting library, and modules a reader can hold in their head.

The import graph is read with ``ast`` from the source, so it counts every import: at module
top, inside functions and under ``TYPE_CHECKING``.  Each check is also run on a small
fabricated package that breaks it, so that a check which could not fail would show here.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models")
# where a training run starts (first.py/second.py call utils.cli, which runs this, then draws figures)
TRAINING_ENTRY = "utils.run.pipeline"
# what training must never import: the figure and report modules and the libraries they use
PLOTTING_LIBRARIES = ("matplotlib", "seaborn", "skimage", "pandas")
PLOTTING_PREFIXES = ("utils.viz", "utils.plots", "utils.report")
MAX_LINES = 450


def module_files(root: Path, packages=PACKAGES) -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` names (resolving leading dots)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """Every module ``module`` imports anywhere in its source: the modules of this project
    (a ``from package import name`` counts ``package.name`` when that is a module) and
    the top-level names of other libraries."""
    is_package = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    out = set()
    for name in found:
        if name in known:
            out.add(name)
        elif name.split(".")[0] in PACKAGES:  # a name inside a module: the closest module holding it
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
        else:
            out.add(name.split(".")[0])
    out.discard(module)
    return out


def import_graph(root: Path, packages=PACKAGES) -> Dict[str, Set[str]]:
    files = module_files(root, packages)
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """Every name ``start`` imports directly or through the project's modules."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def plotting_imports(graph: Dict[str, Set[str]], entry: str) -> Set[str]:
    return {n for n in reachable(graph, entry) | {entry}
            if n in PLOTTING_LIBRARIES or n.startswith(PLOTTING_PREFIXES)}


def long_modules(root: Path, packages=PACKAGES, limit: int = MAX_LINES) -> Dict[str, int]:
    counts = {m: len(p.read_text().splitlines()) for m, p in module_files(root, packages).items()}
    return {m: n for m, n in counts.items() if n > limit}


# --- the checks on this project -------------------------------------------------------------

GRAPH = import_graph(ROOT)


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def test_training_never_imports_plotting():
    assert TRAINING_ENTRY in GRAPH, f"{TRAINING_ENTRY} moved: update TRAINING_ENTRY"
    # the entry reaches the whole training machinery (a guard against a graph that lost its edges)
    assert {"utils.engine.train", "utils.data.lt_data", "models.resnet"} <= reachable(GRAPH, TRAINING_ENTRY)
    assert plotting_imports(GRAPH, TRAINING_ENTRY) == set()


def test_models_know_nothing_of_the_config_or_the_data():
    for module, deps in GRAPH.items():  # the one list of names is the bottom layer: allowed
        if module.startswith("models"):
            assert not {d for d in deps if d.startswith("utils") and d != "utils.names"}, module


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_450_lines(package):
    assert long_modules(ROOT, (package,)) == {}


# --- each check fails on a package that breaks it ----------------------------------------

def _write(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_see_function_level_type_only_and_relative_imports(tmp_path):
    _write(tmp_path, {
        "utils/__init__.py": "",
        "utils/run/__init__.py": "",
        "utils/run/pipeline.py": "from utils.engine import train\n",
        "utils/engine/__init__.py": "",
        "utils/engine/train.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import loop\n",
        "utils/engine/loop.py": "def f():\n    from utils.run.pipeline import run\n    import pandas\n",
        "utils/viz/__init__.py": "",
        "utils/viz/figures.py": "import matplotlib.pyplot\n",
        "models/__init__.py": "",
        "models/head.py": "from utils.engine.loop import f\n" + "x = 1\n" * MAX_LINES,
    })
    graph = import_graph(tmp_path)
    assert graph["utils.engine.train"] == {"typing", "utils.engine.loop"}
    assert find_cycle(graph) == ["utils.engine.loop", "utils.run.pipeline", "utils.engine.train",
                                 "utils.engine.loop"]
    assert plotting_imports(graph, "utils.run.pipeline") == {"pandas"}
    assert plotting_imports(graph, "utils.viz.figures") == {"utils.viz.figures", "matplotlib"}
    assert long_modules(tmp_path) == {"models.head": MAX_LINES + 1}
    del graph["utils.engine.loop"]
    assert find_cycle(graph) is None
