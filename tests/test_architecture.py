"""The layering ``docs/architecture.md`` draws holds in the source: nothing below ``commands/`` imports a command,
no command builds another command's argv, no module grows past ~400 lines, no module or package imports one that
imports it back (lazily or not), no function in ``commands/`` runs past 40 lines of code, and private attributes of
other libraries' objects are touched only in ``medtransfer/upstream.py``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medtransfer"
MODULES = sorted(PACKAGE.rglob("*.py"))
#: Layers below the commands: none of them may import ``medtransfer.commands``.
LOWER = ("data", "models", "decisions", "metrics", "callbacks", "tracking", "explain")
#: Names of other libraries' objects as our code holds them; ``<name>._attr`` on them is private access.
FOREIGN = (
    r"(trainer|logger|strategy|trial|study|storage|loop|epoch_loop|fit_loop|client|run|parser|scheduler|optimizer)"
)
#: Public-looking names that are internals all the same: state only torch's scheduler constructors set, and MLflow's
#: undocumented system-metrics sampler.
INTERNALS = r"\b(?:scheduler\.(?:base_lrs|lr_lambdas|min_lrs)|SystemMetricsMonitor)\b"


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:  # ``from a import b``: the module a, or a.b if b is one
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


@pytest.mark.parametrize("path", [m for m in MODULES if m.parent.name in LOWER], ids=_relative)
def test_no_lower_layer_imports_a_command(path):
    assert not [name for name in _imports(path) if name.startswith("medtransfer.commands")]


#: The two owners of ``fit``'s command line: the LightningCLI and the typed function over it.
FIT_OWNERS = ("fit.py", "run_fit.py")


@pytest.mark.parametrize(
    "path", [m for m in MODULES if m.parent.name == "commands" and m.name not in FIT_OWNERS], ids=_relative
)
def test_no_command_builds_another_commands_argv(path):
    text = path.read_text()
    assert not re.search(r"\[\s*\"(fit|test|validate)\"\s*,\s*\"--", text), "a fit argv list"
    assert "--print_config" not in text


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_no_module_is_over_about_400_lines(path):
    assert len(path.read_text().splitlines()) <= 420


@pytest.mark.parametrize("path", [m for m in MODULES if m.name != "upstream.py"], ids=_relative)
def test_private_attributes_of_other_libraries_are_touched_only_in_upstream(path):
    text = path.read_text()
    private = re.findall(rf"\b{FOREIGN}\._[a-z]\w*\b", text) + re.findall(INTERNALS, text)
    assert not private, f"use a medtransfer.upstream helper instead of {private}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Every module of the package, by dotted name, and the package modules each one imports (lazily too).
NAMES = {_module_name(path): path for path in MODULES}
GRAPH = {
    name: {target for target in _imports(path) if target in NAMES and target != name} for name, path in NAMES.items()
}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each a list of names: the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package(name: str) -> str:
    """``medtransfer.data.sources.csv_table`` -> ``data``; a top-level module is its own package."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_circle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        packages.setdefault(_package(name), set()).update(_package(t) for t in targets if _package(t) != _package(name))
    assert _cycles(packages) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of ``node``'s body that hold code: not blank, not only a comment, not the docstring (the signature,
    a command's list of options, is not counted either)."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    if not body:
        return 0
    return sum(
        1
        for number in range(body[0].lineno, node.end_lineno + 1)
        if lines[number - 1].strip() and not lines[number - 1].strip().startswith("#")
    )


@pytest.mark.parametrize("path", [m for m in MODULES if m.parent.name == "commands"], ids=_relative)
def test_no_function_in_a_command_runs_past_40_lines_of_code(path):
    """A command is a face over named helpers: each step has a name, and the command reads as their sequence."""
    lines = path.read_text().splitlines()
    functions = [
        n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    assert {f.name: _code_lines(f, lines) for f in functions if _code_lines(f, lines) > 40} == {}
