"""The import direction of DESIGN.md: specs <- ir <- passes; backends see ir; compiler sees all;
and no module imports another that (through any chain, imports inside functions included)
imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moleforge"

BANNED = {
    "specs": ("torch", "moleforge.ir", "moleforge.passes", "moleforge.backends", "moleforge.compiler"),
    "ir": ("moleforge.specs", "moleforge.passes", "moleforge.backends", "moleforge.compiler"),
    "passes": ("moleforge.specs", "moleforge.backends", "moleforge.compiler"),
    "backends": ("moleforge.specs", "moleforge.passes", "moleforge.compiler", "moleforge.integrations",
                 "moleforge.interop", "moleforge.report"),
    "integrations": ("moleforge.compiler", "moleforge.interop.checkpoint", "moleforge.interop.peft",
                     "moleforge.cli", "moleforge.demo"),
    "report": ("moleforge.compiler", "moleforge.integrations", "moleforge.interop", "moleforge.cli",
               "moleforge.demo"),
    "interop": ("moleforge.cli", "moleforge.demo"),
}
"""Per package, what it may not import (imports under ``if TYPE_CHECKING:`` are annotations only)."""


def _module(path: Path) -> str:
    parts = ("moleforge", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in SRC.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute names; ``from pkg import
    name`` counts as an import of ``pkg.name`` when that is a module of the package."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            out += subs if len(subs) == len(node.names) else [base, *subs]
    return out


@pytest.mark.parametrize("layer", sorted(BANNED))
def test_layer_imports_respect_the_design(layer):
    bad = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for mod in _imports(path):
            if any(mod == b or mod.startswith(b + ".") for b in BANNED[layer]):
                bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """No chain of imports leads back to where it started (the top-level ``moleforge`` package,
    which re-exports the public API, is left out: the command line and the demo import it)."""
    graph = nx.DiGraph()
    for mod, path in MODULES.items():
        for target in _imports(path):
            if target in MODULES and target not in (mod, "moleforge") and not mod.startswith(target + "."):
                graph.add_edge(mod, target)
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_package_import_is_light():
    import subprocess
    import sys
    code = "import sys, moleforge; print(any(m.startswith(('matplotlib', 'peft')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
