"""The import arrows of the sparse layer, the functional API and the methods point down (static, from the AST).

pipelines -> methods -> functional -> sparse -> kernels -> layout/context/errors/warn. (The whole package's layer
test covers every module; this one pins the three layers this refactor created or moved.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "diffaccel"
BASE = {"diffaccel.layout", "diffaccel.context", "diffaccel.errors", "diffaccel.warn"}
ALLOWED = {
    "sparse": BASE | {"diffaccel.kernels", "diffaccel.sparse"},
    "functional": BASE | {"diffaccel.kernels", "diffaccel.sparse", "diffaccel.functional"},
    "methods": BASE | {"diffaccel.kernels", "diffaccel.sparse", "diffaccel.functional", "diffaccel.methods"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "diffaccel" or n.startswith("diffaccel.")}


def _files(layer: str) -> list[Path]:
    return [ROOT / "functional.py"] if layer == "functional" else sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_downward(layer):
    bad = []
    for path in _files(layer):
        if layer == "methods" and path.name == "softpag.py":
            continue  # SoftPAG is reworked with the guidance code (adapter slice)
        for name in _imports(path):
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_tome_lives_with_the_methods():
    assert (ROOT / "methods" / "_tome.py").exists() and not (ROOT / "pipelines" / "tome.py").exists()
