"""The import direction of DESIGN.md: specs <- ir <- passes; backends see ir; compiler sees all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moleforge"

BANNED = {
    "specs": ("torch", "moleforge.ir", "moleforge.passes", "moleforge.backends", "moleforge.compiler"),
    "ir": ("moleforge.specs", "moleforge.passes", "moleforge.backends", "moleforge.compiler"),
    "passes": ("moleforge.specs", "moleforge.backends", "moleforge.compiler"),
    "backends": ("moleforge.specs", "moleforge.passes", "moleforge.compiler"),
}


def _imports(path: Path, package: str) -> list[str]:
    tree = ast.parse(path.read_text())
    rel_pkg = "moleforge." + ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel_pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else rel_pkg
                out.append(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.append(node.module)
    return out


@pytest.mark.parametrize("layer", sorted(BANNED))
def test_layer_imports_respect_the_design(layer):
    bad = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for mod in _imports(path, layer):
            if any(mod == b or mod.startswith(b + ".") for b in BANNED[layer]):
                bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_package_import_is_light():
    import subprocess
    import sys
    code = "import sys, moleforge; print(any(m.startswith(('matplotlib', 'peft')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
