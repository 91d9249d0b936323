"""The layering of the library, read from its imports (``ast``, nothing is imported):

- **stages** read the command-line flags: :mod:`amoeba.args` (the one parser), :mod:`amoeba.pipeline` (the stage
  order) and the stage entries in ``amoeba/stages/``;
- **components** are every other module: they take typed values, never the flags.

Arrows point down only: a component imports no stage (nor ``amoeba.args``); a stage entry imports no other
stage entry (only the pipeline runs them, in order); and there is no import circle, counting the imports inside
functions too. An import inside a function never names this project's modules (that is how circles hide) and
says why it is deferred (a heavy or optional dependency) in a comment on its line or the line above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "amoeba"
FLAGS = "amoeba.args"
PIPELINE = "amoeba.pipeline"
STAGE_PACKAGE = "amoeba.stages"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_stage(module: str) -> bool:
    """True for the modules that read flags: the parser, the pipeline and the stage entries."""
    return module in (FLAGS, PIPELINE) or module == STAGE_PACKAGE or module.startswith(STAGE_PACKAGE + ".")


def _target(module: str, node: ast.AST) -> list[str]:
    """The project modules an import statement in ``module`` names (``from amoeba import x`` names ``amoeba.x``
    when that is a module, else the package)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        out = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [name for name in out if name == "amoeba" or name.startswith("amoeba.")]


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) of every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, child.lineno, in_function) for name in _target(module, child))
            visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {m: {name for name, _, _ in _imports(m) if name in MODULES and name != m} for m in MODULES}


def test_the_library_has_stages_and_components():
    stages = [m for m in MODULES if is_stage(m)]
    assert {FLAGS, PIPELINE, "amoeba.stages.calibration", "amoeba.stages.finetuning", "amoeba.stages.evaluation",
            "amoeba.stages.deployment"} <= set(stages)
    assert len(MODULES) - len(stages) >= 20  # the components


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not is_stage(m)))
def test_a_component_imports_no_stage(module):
    bad = sorted(name for name in GRAPH[module] if is_stage(name))
    assert not bad, f"{module} is a component: it takes typed values and imports no stage, but imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if is_stage(m) and m not in (FLAGS, PIPELINE)))
def test_a_stage_imports_no_other_stage(module):
    bad = sorted(name for name in GRAPH[module] if is_stage(name) and name not in (FLAGS, STAGE_PACKAGE))
    assert not bad, f"{module} is a stage entry: only the pipeline runs stages, but it imports {bad}"


def test_flags_are_read_by_stages_only():
    readers = sorted(m for m, deps in GRAPH.items() if FLAGS in deps)
    assert readers and all(is_stage(m) for m in readers), readers


def _cycle(graph: dict[str, set[str]]):
    """One import circle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_there_is_no_import_circle():
    circle = _cycle(GRAPH)
    assert circle is None, " -> ".join(circle)


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_functions_are_deferred_dependencies_with_a_reason(module):
    lines = MODULES[module].read_text(encoding="utf-8").splitlines()
    internal = sorted(line for name, line, inside in _imports(module) if inside)
    assert not internal, f"{module}: project modules imported inside functions (lines {internal}); import them " \
                         "at the top (an import inside a function hides a circle)"
    tree = ast.parse("\n".join(lines))
    silent = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                here, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                if "#" not in here and "#" not in above:
                    silent.append(inner.lineno)
    assert not silent, f"{module}: imports inside functions without a comment saying why they are deferred " \
                       f"(lines {sorted(set(silent))})"
