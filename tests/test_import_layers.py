"""Every import arrow inside diffaccel points down the layer order (issue 8, "Done when").

The package is read with :mod:`ast` (nothing is imported): each module's ``diffaccel.*`` imports, at module level
and inside functions, ``import x`` and ``from x import y`` (absolute or relative) and ``importlib.import_module``
with a literal name, are mapped to the layer of the imported module. A module may import its own layer and the
layers below it; an arrow to a layer above fails, and so does an import cycle between modules (whatever their
layers), except the plugin cycles of the two registries listed in ``ALLOWED_BACK_EDGES``. A module that no rule of
``LAYER_OF`` places fails too, so a new top-level module must be given a layer here.

The layer order is written once, in ``LAYERS``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


LAYERS = ("app", "pipelines", "methods", "functional", "sparse", "kernels", "base")
"""Top to bottom. ``app``: what a person runs (the top-level package with ``apply``, the CLI, ``run``, benchmarks,
evaluation, the demo). ``pipelines``: adapters, processor, hooks, guidance, model weights. ``methods``: one module
per paper. ``functional``: the NATTEN-style functions. ``sparse``: plans, permutations, LSE merging. ``kernels``:
Triton kernels and their references. ``base``: token layout, run context, errors, warnings."""

LAYER_OF = {
    "": "app",  # diffaccel/__init__.py: apply/remove and the public names of every layer
    "cli": "app",
    "run": "app",
    "multigpu": "app",
    "bench": "app",
    "calibrate": "app",
    "eval": "app",
    "demo": "app",
    "pipelines": "pipelines",
    "methods": "methods",
    "functional": "functional",
    "sparse": "sparse",
    "kernels": "kernels",
    "layout": "base",
    "context": "base",
    "errors": "base",
    "warn": "base",
}
"""First name under ``diffaccel`` -> layer (a module or a subpackage with everything in it)."""

ALLOWED_BACK_EDGES = {
    # The adapter registry loads the built-in adapters lazily (plugin registration), and they import the registry.
    ("diffaccel.pipelines.adapters.base", "diffaccel.pipelines.adapters.builtin"),
    # The same for methods: list_methods() imports diffaccel.methods so every built-in method registers itself.
    ("diffaccel.methods.base", "diffaccel.methods"),
    # The denoiser-wrapper registry loads the built-in guidance installer (SoftPAG) at lookup time.
    ("diffaccel.pipelines.model_setup", "diffaccel.pipelines.guidance"),
}
"""Registry -> plugin package imports, made inside a function at lookup time; left out of the cycle check."""

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "diffaccel"


@dataclass(frozen=True)
class Arrow:
    source: str  # importing module
    target: str  # imported module
    path: str  # file of the importing module, relative to the package's parent
    line: int
    implicit: bool = False  # the package ``__init__`` Python runs before a submodule of it (cycles only)

    def __str__(self) -> str:
        how = ", runs the package __init__" if self.implicit else ""
        return f"{self.source} -> {self.target} ({self.path}:{self.line}{how})"


# ----------------------------------------------------------------------------------------------- the walker


def package_modules(root: Path) -> dict[str, Path]:
    """``dotted name -> file`` for every ``.py`` file under the package directory ``root``."""
    package = root.name
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` denotes: itself, or its longest prefix that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a package module anywhere in ``path``."""
    package = module.split(".")[0]
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def add(name: str | None, line: int) -> None:
        if name and (name == package or name.startswith(package + ".")):
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.append((target, line))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                # ``from pkg.sub import name``: a submodule when ``pkg.sub.name`` is one, else a name in ``pkg.sub``
                submodule = f"{origin}.{alias.name}"
                add(submodule if submodule in modules else origin, node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    add(node.args[0].value, node.lineno)
    return found


def import_graph(root: Path) -> list[Arrow]:
    """Every import arrow between package modules, one per (source, target, line).

    Importing ``pkg.a.b`` first runs ``pkg/a/__init__.py``: that arrow is added as ``implicit`` (it closes cycles,
    such as ``functional -> methods._locality`` running ``methods/__init__`` which imports every method), except
    for the root package (run by every import) and for packages the importing module is itself inside (already
    running).
    """
    modules = package_modules(root)
    arrows: dict[tuple[str, str, int], Arrow] = {}
    for module, path in modules.items():
        rel = str(path.relative_to(root.parent))
        for target, line in imports_of(module, path, modules):
            arrows.setdefault((module, target, line), Arrow(module, target, rel, line))
            parts = target.split(".")
            for depth in range(2, len(parts)):
                parent = ".".join(parts[:depth])
                inside = module == parent or module.startswith(parent + ".")
                if parent in modules and not inside:
                    arrows.setdefault((module, parent, line), Arrow(module, parent, rel, line, implicit=True))
    return list(arrows.values())


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1] if len(parts) > 1 else "")


def upward_arrows(arrows: list[Arrow]) -> list[str]:
    """Arrows from a layer to a layer above it."""
    out = []
    for a in arrows:
        src, dst = layer_of(a.source), layer_of(a.target)
        if src is None or dst is None or a.implicit:
            continue
        if LAYERS.index(dst) < LAYERS.index(src):
            out.append(f"upward {src} -> {dst}: {a}")
    return out


def unplaced_modules(root: Path) -> list[str]:
    return [f"no layer for module {m}: add it to LAYER_OF" for m in package_modules(root) if layer_of(m) is None]


def import_cycles(arrows: list[Arrow], allowed: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Strongly connected groups of two or more modules (Tarjan), each with the arrows that close it."""
    graph: dict[str, set[str]] = {}
    for a in arrows:
        if (a.source, a.target) not in allowed:
            graph.setdefault(a.source, set()).add(a.target)
            graph.setdefault(a.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in sorted(groups):
        members = set(group)
        inner = sorted(str(a) for a in arrows if a.source in members and a.target in members
                       and (a.source, a.target) not in allowed)
        layers = sorted({layer_of(m) or "?" for m in group}, key=lambda x: LAYERS.index(x) if x in LAYERS else 99)
        out.append(f"cycle across {'/'.join(layers)}: {' <-> '.join(group)}\n      " + "\n      ".join(inner))
    return out


def violations(root: Path, allowed: set[tuple[str, str]] = frozenset()) -> list[str]:
    arrows = import_graph(root)
    return unplaced_modules(root) + upward_arrows(arrows) + import_cycles(arrows, allowed)


# ----------------------------------------------------------------------------------------------- the package



def test_every_import_points_down_the_layers():
    found = violations(PACKAGE_ROOT, ALLOWED_BACK_EDGES)
    assert not found, f"{len(found)} layer violation(s):\n  " + "\n  ".join(found)


def test_the_walker_sees_the_package():
    """Guards the test above against passing on an empty walk: known downward arrows are found."""
    arrows = {(a.source, a.target) for a in import_graph(PACKAGE_ROOT)}
    assert len(package_modules(PACKAGE_ROOT)) >= 40
    assert ("diffaccel.methods.base", "diffaccel.layout") in arrows
    assert ("diffaccel.pipelines.adapters.base", "diffaccel.pipelines.adapters.builtin") in arrows  # in a function
    assert not unplaced_modules(PACKAGE_ROOT)
    for edge in ALLOWED_BACK_EDGES:
        assert edge in arrows, f"allowed back edge {edge} no longer exists: remove it from ALLOWED_BACK_EDGES"


# ----------------------------------------------------------------------------------------------- self-test


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "diffaccel"


def test_walker_on_a_synthetic_package(tmp_path):
    pkg = write(tmp_path, {
        "diffaccel/__init__.py": "from diffaccel.methods.m import f\n",
        "diffaccel/layout.py": "X = 1\n",
        "diffaccel/kernels/__init__.py": "from .k import kern\n",
        "diffaccel/kernels/k.py": "import diffaccel.layout\n\ndef kern():\n    return diffaccel.layout.X\n",
        "diffaccel/methods/__init__.py": "",
        "diffaccel/methods/m.py": (
            "from diffaccel.kernels import kern  # down: fine\n"
            "from .. import layout  # down, relative: fine\n\n"
            "def f():\n"
            "    from diffaccel.pipelines.p import g  # up, inside a function\n"
            "    return g\n"
        ),
        "diffaccel/methods/n.py": "import importlib\nP = importlib.import_module('diffaccel.pipelines.p')\n",
        "diffaccel/pipelines/__init__.py": "",
        "diffaccel/pipelines/p.py": "from diffaccel.methods import m\n\ndef g():\n    return m\n",
    })
    arrows = import_graph(pkg)
    edges = {(a.source, a.target) for a in arrows}
    assert ("diffaccel.kernels", "diffaccel.kernels.k") in edges  # relative from-import of a submodule
    assert ("diffaccel.methods.m", "diffaccel.layout") in edges  # ``from .. import layout``
    assert ("diffaccel.kernels.k", "diffaccel.layout") in edges
    up = upward_arrows(arrows)
    assert len(up) == 2, up
    assert any("diffaccel.methods.m -> diffaccel.pipelines.p (diffaccel/methods/m.py:5)" in u for u in up)
    assert any("diffaccel.methods.n -> diffaccel.pipelines.p" in u for u in up)  # import_module literal
    assert not any("kernels" in u.split(":")[1] and "-> diffaccel.kernels" in u for u in up)  # down is fine
    cycles = import_cycles(arrows)
    assert len(cycles) == 1 and "diffaccel.methods.m <-> diffaccel.pipelines.p" in cycles[0], cycles
    assert import_cycles(arrows, {("diffaccel.pipelines.p", "diffaccel.methods.m")}) == []
    assert violations(pkg) == up + cycles


def test_walker_reports_unplaced_modules_and_same_layer_cycles(tmp_path):
    pkg = write(tmp_path, {
        "diffaccel/__init__.py": "",
        "diffaccel/stray.py": "",
        "diffaccel/pipelines/__init__.py": "",
        "diffaccel/pipelines/hooks.py": "def a():\n    from diffaccel.pipelines import guidance\n",
        "diffaccel/pipelines/guidance.py": "from diffaccel.pipelines.hooks import a\n",
    })
    found = violations(pkg)
    assert found[0] == "no layer for module diffaccel.stray: add it to LAYER_OF"
    assert len(found) == 2 and "cycle across pipelines" in found[1], found
    assert "diffaccel.pipelines.guidance <-> diffaccel.pipelines.hooks" in found[1]


def test_walker_closes_cycles_through_package_inits(tmp_path):
    """A downward arrow (method -> functional) is a cycle when functional imports a module of the methods
    package, whose ``__init__`` imports that method (today's gna <-> functional, dodged with a lazy import)."""
    pkg = write(tmp_path, {
        "diffaccel/__init__.py": "",
        "diffaccel/functional.py": "from diffaccel.methods.base import check\n",
        "diffaccel/methods/__init__.py": "from diffaccel.methods.gna import G\n",
        "diffaccel/methods/base.py": "def check():\n    pass\n",
        "diffaccel/methods/gna.py": (
            "from diffaccel.methods.base import check  # inside its own package: no implicit arrow\n\n"
            "class G:\n    def f(self):\n        from diffaccel import functional\n        return functional\n"
        ),
    })
    arrows = import_graph(pkg)
    implicit = {(a.source, a.target) for a in arrows if a.implicit}
    assert implicit == {("diffaccel.functional", "diffaccel.methods")}
    found = violations(pkg)
    assert len(found) == 2, found
    assert found[0].startswith("upward functional -> methods: diffaccel.functional -> diffaccel.methods.base")
    assert "cycle across methods/functional: diffaccel.functional <-> diffaccel.methods <-> diffaccel.methods.gna" \
        in found[1]
    assert "diffaccel.methods.gna -> diffaccel.functional (diffaccel/methods/gna.py:5)" in found[1]

