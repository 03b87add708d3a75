"""The layering ``docs/architecture.md`` draws holds in the source: nothing below ``commands/`` imports a command,
no command builds another command's argv, no module grows past ~400 lines, and private attributes of other
libraries' objects are touched only in ``medtransfer/upstream.py``."""

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
    found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
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
