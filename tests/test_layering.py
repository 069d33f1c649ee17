"""The package layout keeps its layers: no import circles, the model core knows no loop or method, methods know no
checkpoint files, and the public names import from where the README says.

Every `import` / `from ... import` in onestep's modules counts, also those inside functions (a lazy import is still a
dependency), resolved to the module it names.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "onestep"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # read once for all the checks below
def import_graph() -> dict[str, set[str]]:
    """{module: the onestep modules it imports}, read from the source files."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from onestep.eval import t2i` names a submodule; `from onestep.eval.fd import x` a module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_and_a_lazy_import():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # the distillation task imports the distillers inside a function: the graph must still see it
    assert "onestep.distillers" in import_graph()["onestep.tasks.distillation"]


def test_no_import_circles():
    assert import_cycles(import_graph()) == []


@pytest.mark.parametrize("lower, upper", [
    ("onestep.models", "onestep.training"),  # networks know no loop
    ("onestep.models", "onestep.distillers"),
    ("onestep.models", "onestep.runs"),
    ("onestep.models", "onestep.cli"),
    ("onestep.distillers", "onestep.training.checkpoints"),  # methods know no checkpoint files
    ("onestep.distillers", "onestep.runs"),
    ("onestep.distillers", "onestep.cli"),
    ("onestep.export", "onestep.training"),
    ("onestep.export", "onestep.distillers"),
    ("onestep.models", "onestep.tasks"),  # the task registry sits above the core, the methods and the loop ...
    ("onestep.distillers", "onestep.tasks"),
    ("onestep.training", "onestep.tasks"),
    ("onestep.tasks", "onestep.runs"),  # ... and below the composition root and the config loader that use it
    ("onestep.tasks", "onestep.config"),
    ("onestep.tasks", "onestep.cli"),
])
def test_layers_import_downwards_only(lower, upper):
    graph = import_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m == lower or m.startswith(lower + ".")
                   for t in targets if t == upper or t.startswith(upper + "."))
    assert wrong == []


@pytest.mark.parametrize("name", ["Teacher", "Trainer", "TrainerConfig", "build_distiller"])
def test_public_names(name):
    import onestep

    assert getattr(onestep, name).__name__ == name


@pytest.mark.parametrize("module, name", [
    ("onestep.pipelines", "OneStepPipeline"),
    ("onestep.pipelines", "MultiStudentPipeline"),
    ("onestep.pipelines", "ClassConditionalDiffusionPipeline"),
    ("onestep.models.teacher", "Teacher"),
    ("onestep.models.generator", "Generator"),
    ("onestep.export.pipeline", "export_pipeline"),
    ("onestep.export.stock", "export_stock_pipeline"),
    ("onestep.sampling.inference", "load_sampler"),
    ("onestep.sampling.teacher", "sample_teacher"),
])
def test_layout_modules(module, name):
    assert hasattr(importlib.import_module(module), name)


def test_every_package_is_listed_for_the_wheel():
    """A wheel holds only the packages pyproject.toml names: every folder of onestep/ with an __init__.py is one."""
    packages = re.search(r"^packages = \[(.*)\]$", (PACKAGE.parent / "pyproject.toml").read_text(), re.M).group(1)
    folders = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders - set(re.findall(r'"([\w.]+)"', packages)) == set()
