"""Imports point one way: every tightfit module imports only its own layer or the layers below it, and no
chain of imports leads from a module back to itself.

The layers, lowest first (`LAYERS`):

0. foundations: ``_version``, ``_lazy``, ``errors``, ``sizes``, ``_tree`` (tensors in nested values, storage
   identity), ``_step`` (the batch and loss convention);
1. ``memory`` (the ruler) and ``convert`` (the registry behind ``convert_``: config type -> handler). The
   techniques register their handlers with ``convert``, so it sits below them; it loads the handler modules
   by name on first use, which is a look-up, not an import;
2. the techniques' self-contained parts: ``fewbit``, ``sketch`` and ``offload`` (they measure with
   ``memory`` and register with ``convert``), and remat's pure parts: ``remat.solvers`` (also free of
   torch), ``remat.options``, ``remat.config``;
3. ``remat``: capturing blocks, measuring them, executing plans, the recompute planner;
4. ``planner``: the one-budget planner across every technique (``tightfit.plan``);
5. what is built on the techniques: ``zoo`` (models for benchmarks and the CLI), ``nn`` and ``functional``
   (drop-in names resolved from fewbit and sketch), ``testing`` (helpers for tests and benchmarks);
6. the entry points: ``cli``, ``integrations`` (one-line entries in users' training loops), the
   ``tightfit`` package itself, ``__main__``.

So a technique package never imports the CLI, the zoo or ``tightfit.testing``, and the ruler never imports a
technique.

What counts as an import: every ``import`` and ``from ... import`` statement naming a tightfit module,
wherever it stands (module level, inside a function, under ``TYPE_CHECKING``). ``from pkg import name`` is
an import of ``pkg.name`` when that is a module, else of ``pkg``. Names that a package resolves on demand
from a table of strings (``tightfit._lazy``, ``convert``'s handler modules) are not import statements and
are not counted. Every import must respect the layers; the cycle check counts the imports that run
(``TYPE_CHECKING`` imports never do).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    (
        "tightfit._version",
        "tightfit._lazy",
        "tightfit.errors",
        "tightfit.sizes",
        "tightfit._tree",
        "tightfit._rng",
        "tightfit._step",
    ),
    ("tightfit.memory", "tightfit.convert"),
    (
        "tightfit.fewbit",
        "tightfit.sketch",
        "tightfit.offload",
        "tightfit.remat.solvers",
        "tightfit.remat.options",
        "tightfit.remat.config",
    ),
    ("tightfit.remat",),
    ("tightfit.planner",),
    ("tightfit.zoo", "tightfit.nn", "tightfit.functional", "tightfit.testing"),
    ("tightfit.cli", "tightfit.integrations", "tightfit", "tightfit.__main__"),
]
TORCH_FREE = "tightfit.remat.solvers"


@dataclass(frozen=True)
class Edge:
    """One import statement: `source` imports `target` at `where` (file:line); `kind` is "module",
    "function" or "type-checking"."""

    source: str
    target: str
    where: str
    kind: str

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.kind}, {self.where})"


# ------------------------------------------------------------------------------------------- the checker
def layer_of(module: str) -> int | None:
    """The layer of `module`: that of the longest entry of `LAYERS` equal to it or a package above it (the
    root package ``tightfit`` only by itself); None when no entry covers it."""
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for layer, names in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "tightfit" and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[0]):
                best = (len(name), layer)
    return None if best is None else best[1]


def _resolve(name: str, known: set[str]) -> str:
    """`name`, or the closest package above it that exists (an import of a name inside a module)."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, source: str, *, is_package: bool, known: set[str], path: str) -> list[Edge]:
    """Every import of a tightfit module in `source` (the text of `module`), with where and how it runs."""
    edges: list[Edge] = []

    def add(target: str, node: ast.stmt, kind: str) -> None:
        if target == "tightfit" or target.startswith("tightfit."):
            edges.append(Edge(module, _resolve(target, known), f"{path}:{node.lineno}", kind))

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, kind)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                package = f"{base}.{node.module}" if node.module else base
            else:
                package = node.module or ""
            for alias in node.names:
                submodule = f"{package}.{alias.name}"
                add(submodule if submodule in known else package, node, kind)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "type-checking")
            for child in node.orelse:
                visit(child, kind)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.iter_child_nodes(node):
                visit(child, "type-checking" if kind == "type-checking" else "function")
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, kind)

    visit(ast.parse(source, filename=path), "module")
    return list(dict.fromkeys(edges))  # one edge per imported module per statement


def upward(edges: list[Edge]) -> list[Edge]:
    """The edges whose target sits in a higher layer than their source."""
    found = []
    for e in edges:
        source, target = layer_of(e.source), layer_of(e.target)
        if source is not None and target is not None and target > source:
            found.append(e)
    return found


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The import cycles among the edges that run (not ``TYPE_CHECKING``): for each strongly connected set
    of modules, the edges inside it (Tarjan's algorithm)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if e.kind != "type-checking" and e.source != e.target:
            graph.setdefault(e.source, []).append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            if e.target not in index:
                connect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in list(graph):
        if v not in index:
            connect(v)
    return [
        sorted((e for v in c for e in graph.get(v, []) if e.target in c), key=str)
        for c in sorted(components, key=sorted)
    ]


# ------------------------------------------------------------------------------------------- the tree
def _modules() -> dict[str, Path]:
    """Module name -> file, for every module under src/tightfit."""
    found = {}
    for path in sorted((SRC / "tightfit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _all_edges() -> list[Edge]:
    modules = _modules()
    known = set(modules)
    edges = []
    for name, path in modules.items():
        edges += imports_of(
            name,
            path.read_text(),
            is_package=path.name == "__init__.py",
            known=known,
            path=str(path.relative_to(SRC)),
        )
    return edges


def _imports_torch(path: Path) -> list[int]:
    """Lines of `path` that import torch (anywhere in the file)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        if any(n == "torch" or n.startswith("torch.") for n in names):
            lines.append(node.lineno)
    return lines


def _listing(edges: list[Edge]) -> str:
    return "\n  " + "\n  ".join(str(e) for e in edges)


# ------------------------------------------------------------------------------------------- self-checks
KNOWN = {"tightfit", "tightfit.memory", "tightfit.memory.live", "tightfit.remat", "tightfit.remat.auto"}
KNOWN |= {"tightfit.cli", "tightfit.zoo", "tightfit.sizes"}


def test_the_checker_finds_imports_wherever_they_stand() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import tightfit.zoo as zoo\n"
        "from . import live\n"
        "from ..sizes import parse_size\n"
        "if TYPE_CHECKING:\n"
        "    from tightfit.cli import main\n"
        "def f():\n"
        "    from tightfit.remat import auto, Planner\n"
        "    import numpy\n"
    )
    edges = imports_of("tightfit.memory", source, is_package=True, known=KNOWN, path="fake.py")
    found = {(e.target, e.kind, e.where) for e in edges}
    assert found == {
        ("tightfit.zoo", "module", "fake.py:2"),
        ("tightfit.memory.live", "module", "fake.py:3"),
        ("tightfit.sizes", "module", "fake.py:4"),
        ("tightfit.cli", "type-checking", "fake.py:6"),
        ("tightfit.remat.auto", "function", "fake.py:8"),
        ("tightfit.remat", "function", "fake.py:8"),
    }


def test_the_checker_reports_an_upward_import() -> None:
    down = Edge("tightfit.remat.auto", "tightfit.memory.live", "auto.py:1", "module")
    up = Edge("tightfit.memory.live", "tightfit.remat.auto", "live.py:9", "function")
    solvers_up = Edge("tightfit.remat.solvers.dag", "tightfit.remat.auto", "dag.py:3", "type-checking")
    root_up = Edge("tightfit.fewbit.ops", "tightfit", "ops.py:2", "module")
    assert upward([down, up, solvers_up, root_up]) == [up, solvers_up, root_up]
    assert layer_of("tightfit.remat.solvers.dag") == 2 and layer_of("tightfit.remat.plan") == 3
    assert layer_of("tightfit") == len(LAYERS) - 1 and layer_of("tightfit.nonexistent") is None


def test_the_checker_reports_a_cycle_but_not_through_type_checking() -> None:
    a_b = Edge("tightfit.a", "tightfit.b", "a.py:1", "module")
    b_c = Edge("tightfit.b", "tightfit.c", "b.py:1", "function")
    c_a = Edge("tightfit.c", "tightfit.a", "c.py:5", "function")
    c_b_typing = Edge("tightfit.c", "tightfit.b", "c.py:2", "type-checking")
    assert cycles([a_b, b_c, c_a, c_b_typing]) == [[a_b, b_c, c_a]]
    assert cycles([a_b, b_c, c_b_typing]) == []


# ------------------------------------------------------------------------------------------- the rules
def test_every_module_has_a_layer_and_every_layer_entry_exists() -> None:
    modules = _modules()
    missing = sorted(m for m in modules if layer_of(m) is None)
    assert not missing, f"modules in no layer (add them to LAYERS in {__file__}): {missing}"
    stale = sorted(name for names in LAYERS for name in names if name not in modules)
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_point_down_the_layers() -> None:
    bad = upward(_all_edges())
    assert not bad, "imports pointing up the layers (see this file's docstring):" + _listing(bad)


def test_no_import_cycles() -> None:
    found = cycles(_all_edges())
    assert not found, "import cycles:" + "".join(_listing(c) for c in found)


def test_solvers_import_no_torch() -> None:
    """Nothing under remat/solvers imports torch, nor does any tightfit module they import (at run time)."""
    modules = _modules()
    edges = [e for e in _all_edges() if e.kind != "type-checking"]
    reach = {m for m in modules if m == TORCH_FREE or m.startswith(TORCH_FREE + ".")}
    frontier = list(reach)
    while frontier:
        source = frontier.pop()
        for e in edges:
            if e.source == source and e.target not in reach:
                reach.add(e.target)
                frontier.append(e.target)
    bad = [f"{modules[m].relative_to(SRC)}:{n}" for m in sorted(reach) for n in _imports_torch(modules[m])]
    assert not bad, f"{TORCH_FREE} must run without torch; torch is imported at: {bad}"


def test_importing_the_solvers_loads_no_torch() -> None:
    code = (
        "import sys, tightfit.remat.solvers\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
