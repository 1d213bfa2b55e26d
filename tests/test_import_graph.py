"""The project's import graph, read from the source with ``ast`` (nothing is imported): no import cycles, no
module reaching for another module's private names, and the core never importing ``doodl_lightning.testing``.

Scope: every ``.py`` under ``doodl_lightning/`` and ``callbacks/``, and ``cli.py``. A file's module name is its
dotted path (``doodl_lightning/shapes/data.py`` -> ``doodl_lightning.shapes.data``; a package's ``__init__.py``
is the package, ``doodl_lightning.shapes``). Every ``import`` statement counts wherever it stands: at module
level, inside a function (a lazy import is still a dependency, and a cycle through one is a cycle the day it
moves to the top), under ``if TYPE_CHECKING:`` or in a ``try:``. Imports built from strings (``importlib``) are
not seen.

The edge rule (what an import statement depends on):

- ``import a.b.c`` depends on the longest project module that ``a.b.c`` names (``a.b.c`` itself if it is one).
- ``from P import n`` (``P`` resolved, relative imports included) depends on the submodule ``P.n`` when ``P.n``
  is a module of the project, and otherwise on ``P`` itself (``n`` is a name defined by ``P``).
- Only what the statement names counts. Python also runs the parent packages' ``__init__.py`` before a
  submodule, but those implicit parent imports are NOT edges: otherwise every package whose ``__init__.py``
  imports its submodules (``callbacks/__init__.py`` importing ``.compute`` to re-export ``ComputeMeter``) would
  be a cycle with each of them by construction. A package and its submodule form a cycle only when the
  submodule names the package back -- ``from . import X`` for a name ``X`` that ``__init__.py`` defines, or
  ``from callbacks import X`` -- and that is a real cycle: the submodule then runs while its package is
  half-initialised, and works or not depending on which of the two was imported first.
- An import of a module by itself is ignored.

Private names: a single-underscore name (``_x``, not ``__x__``) belongs to the module that defines it. A
module may not ``from M import _x``, nor use ``M._x`` through a name bound to module ``M`` by an import (alias
chains such as ``pkg.sub._x`` are followed; which names are bound to modules is tracked per function scope).
A private *module* (``callbacks/_dist.py``) is private to its package: modules inside that package (and its
subpackages) may import it and its public names; modules outside may not.
"""
from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("doodl_lightning", "callbacks", "cli.py")
TESTING = "doodl_lightning.testing"


@dataclass(frozen=True)
class Edge:
    src: str   # importing module
    dst: str   # imported module
    path: str  # importing file, relative to the root
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class PrivateUse:
    module: str  # the module whose private name is used
    name: str
    path: str
    line: int
    how: str     # the source text that uses it, e.g. "from doodl_lightning.sampling.edict import _order"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.how} (private name {self.name!r} of {self.module})"


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: list[Edge]
    private_uses: list[PrivateUse]


# ------------------------------------------------------------------------------------------------ parsing
def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def collect_modules(root: Path, sources: Sequence[str] = SOURCES) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the ``sources`` (directories or single files) of ``root``."""
    modules: dict[str, Path] = {}
    for src in sources:
        p = root / src
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
        for f in files:
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = f
    return modules


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _scope_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of one scope: everything under ``scope`` except the insides of nested functions, lambdas and
    classes (the nested scope nodes themselves are yielded: the caller scans each as a scope of its own)."""
    todo = deque(ast.iter_child_nodes(scope))
    while todo:
        node = todo.popleft()
        yield node
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))


class _FileScanner:
    """One file's import edges, module bindings and private-name uses."""

    def __init__(self, name: str, path: Path, root: Path, modules: dict[str, Path]):
        self.name, self.modules = name, modules
        self.rel = path.relative_to(root).as_posix()
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.edges: list[Edge] = []
        self.private: list[PrivateUse] = []
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    # -- helpers -----------------------------------------------------------------------------------------
    def _longest_module(self, dotted: str) -> str | None:
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in self.modules:
                return ".".join(parts[:k])
        return None

    def _resolve_from(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        base = self.package.split(".") if self.package else []
        if node.level - 1 > len(base):
            return None
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else [])) or None

    def _inside(self, package: str) -> bool:
        return self.name == package or self.name.startswith(package + ".")

    def _edge(self, dst: str | None, line: int) -> None:
        if dst is not None and dst != self.name:
            self.edges.append(Edge(self.name, dst, self.rel, line))

    def _private_module_use(self, module: str, line: int, how: str) -> None:
        """``module`` (a project module) is named; flag it if a component is private outside its package."""
        parts = module.split(".")
        for k, part in enumerate(parts):
            if is_private(part) and not self._inside(".".join(parts[:k])):
                self.private.append(PrivateUse(".".join(parts[:k]), part, self.rel, line, how))
                return

    # -- imports ------------------------------------------------------------------------------------------
    def _bind_imports(self, nodes: Iterable[ast.AST]) -> dict[str, str]:
        """Record the edges and private imports of the import statements among ``nodes``; return the names they
        bind to project modules."""
        bound: dict[str, str] = {}
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = self._longest_module(a.name)
                    self._edge(target, node.lineno)
                    if target is None:
                        continue
                    self._private_module_use(target, node.lineno, f"import {a.name}")
                    if a.asname:
                        if target == a.name:
                            bound[a.asname] = target
                    else:
                        top = a.name.split(".")[0]
                        if top in self.modules:
                            bound[top] = top
            elif isinstance(node, ast.ImportFrom):
                base = self._resolve_from(node)
                if base is None:
                    continue
                text = f"from {'.' * node.level}{node.module or ''} import "
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if a.name != "*" and sub in self.modules:
                        self._edge(sub, node.lineno)
                        self._private_module_use(sub, node.lineno, text + a.name)
                        bound[a.asname or a.name] = sub
                    elif base in self.modules:
                        self._edge(base, node.lineno)
                        self._private_module_use(base, node.lineno, text + a.name)
                        if is_private(a.name) and base != self.name:
                            self.private.append(PrivateUse(base, a.name, self.rel, node.lineno, text + a.name))
        return bound

    # -- attribute uses -------------------------------------------------------------------------------------
    def _module_of(self, expr: ast.AST, scopes: list[dict[str, str]]) -> str | None:
        if isinstance(expr, ast.Name):
            for s in reversed(scopes):
                if expr.id in s:
                    return s[expr.id]
            return None
        if isinstance(expr, ast.Attribute):
            m = self._module_of(expr.value, scopes)
            if m is not None and f"{m}.{expr.attr}" in self.modules:
                return f"{m}.{expr.attr}"
        return None

    def _scan_scope(self, scope: ast.AST, outer: list[dict[str, str]]) -> None:
        nodes = list(_scope_nodes(scope))
        scopes = outer + [self._bind_imports(nodes)]
        for node in nodes:
            if isinstance(node, _SCOPES):
                self._scan_scope(node, scopes)
            elif isinstance(node, ast.Attribute):
                m = self._module_of(node.value, scopes)
                if m is None or m == self.name:
                    continue
                sub = f"{m}.{node.attr}"
                how = f"{ast.unparse(node)}"
                if sub in self.modules:
                    self._private_module_use(sub, node.lineno, how)
                elif is_private(node.attr):
                    self.private.append(PrivateUse(m, node.attr, self.rel, node.lineno, how))

    def scan(self) -> "_FileScanner":
        self._scan_scope(self.tree, [])
        return self


def build_graph(root: Path, sources: Sequence[str] = SOURCES) -> Graph:
    modules = collect_modules(root, sources)
    edges: list[Edge] = []
    private: list[PrivateUse] = []
    for name, path in sorted(modules.items()):
        s = _FileScanner(name, path, root, modules).scan()
        edges += s.edges
        private += s.private
    return Graph(modules, list(dict.fromkeys(edges)), sorted(set(private), key=lambda u: (u.path, u.line, u.name)))


# ------------------------------------------------------------------------------------------------ cycles
def _strongly_connected(nodes: Iterable[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(succ.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def find_cycles(edges: Sequence[Edge]) -> list[list[str]]:
    """Import cycles as module chains ``[a, b, ..., a]``: for every edge inside a strongly connected group of
    modules, the shortest cycle through it (deduplicated), so that every import that closes a cycle appears in
    at least one chain."""
    succ: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        succ[e.src].add(e.dst)
    nodes = set(succ) | {e.dst for e in edges}
    cycles: dict[tuple[str, ...], list[str]] = {}
    for comp in _strongly_connected(nodes, succ):
        if len(comp) < 2:
            continue
        inside = set(comp)
        for u in comp:
            for v in sorted(succ[u] & inside):
                # shortest path v -> u inside the group, closing u -> v -> ... -> u
                prev = {v: None}
                todo = deque([v])
                while todo and u not in prev:
                    x = todo.popleft()
                    for y in sorted(succ[x] & inside):
                        if y not in prev:
                            prev[y] = x
                            todo.append(y)
                path, x = [], u
                while x is not None:
                    path.append(x)
                    x = prev[x]
                chain = [u] + path[::-1]  # u, v, ..., u
                ring = chain[:-1]
                k = ring.index(min(ring))
                key = tuple(ring[k:] + ring[:k])
                cycles.setdefault(key, list(key) + [key[0]])
    return [cycles[k] for k in sorted(cycles, key=lambda c: (len(c), c))]


def describe_cycle(chain: Sequence[str], edges: Sequence[Edge]) -> str:
    """``a -> b -> a`` and, for each hop, the import statements (file:line) that make it."""
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in edges:
        where[(e.src, e.dst)].append(e.where())
    hops = [f"    {a} -> {b}: {', '.join(where[(a, b)])}" for a, b in zip(chain, chain[1:])]
    return " -> ".join(chain) + "\n" + "\n".join(hops)


def layer_violations(edges: Sequence[Edge], lower: str = TESTING) -> list[Edge]:
    """Imports of ``lower`` (a package) or its submodules by modules outside it."""
    def within(m: str) -> bool:
        return m == lower or m.startswith(lower + ".")
    return [e for e in edges if within(e.dst) and not within(e.src)]


# ------------------------------------------------------------------------------------------------ the tree
@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(ROOT)


def test_the_graph_covers_the_project(graph):
    """Guard against a vacuous pass: the scan sees the packages, the CLI and imports of each kind."""
    for m in ("cli", "callbacks", "doodl_lightning", "doodl_lightning.module", "doodl_lightning.shapes.quality"):
        assert m in graph.modules
    pairs = {(e.src, e.dst) for e in graph.edges}
    assert ("callbacks", "callbacks.compute") in pairs  # relative, package -> submodule
    assert ("doodl_lightning.shapes.quality", "doodl_lightning.shapes") in pairs  # ``from . import ShapesWeights``
    assert ("doodl_lightning.shapes", "doodl_lightning.shapes.evaluator") in pairs  # a function-level import
    assert len(graph.edges) > 150


def test_no_import_cycles(graph):
    cycles = find_cycles(graph.edges)
    assert not cycles, (f"{len(cycles)} import cycle(s) (each hop lists the imports that make it; cut one per "
                        "cycle):\n" + "\n".join(describe_cycle(c, graph.edges) for c in cycles))


def test_no_private_names_across_modules(graph):
    uses = graph.private_uses
    assert not uses, (f"{len(uses)} use(s) of another module's private name (make the name public, or move the "
                      "code that needs it):\n" + "\n".join(f"    {u}" for u in uses))


def test_core_and_shapes_never_import_testing(graph):
    """``doodl_lightning.testing`` (random-weight models for tests and benchmarks) may import the shapes world
    and the core; nothing outside it may import it (the shapes world included)."""
    bad = layer_violations(graph.edges)
    assert not bad, "imports of doodl_lightning.testing from outside it:\n" + "\n".join(
        f"    {e.where()}: {e.src} imports {e.dst}" for e in bad)


# ------------------------------------------------------------------------------------------------ self-test
def _tree(tmp_path: Path, files: dict[str, str]) -> Graph:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    tops = sorted({rel.split("/")[0] for rel in files})
    return build_graph(tmp_path, tops)


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    g = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import helper\n\ndef load():\n    return helper()\n",
        "pkg/b.py": "import os\n\ndef helper():\n    from .a import load  # lazy\n    return load\n",
        "pkg/c.py": "from pkg import a\n",  # imports into the cycle, not part of it
    })
    cycles = find_cycles(g.edges)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]
    text = describe_cycle(cycles[0], g.edges)
    assert text.startswith("pkg.a -> pkg.b -> pkg.a\n")
    assert "pkg/a.py:1" in text and "pkg/b.py:4" in text


def test_checker_reports_every_cycle_of_a_tangled_group(tmp_path):
    g = _tree(tmp_path, {
        "p/__init__.py": "",
        "p/x.py": "from . import y\n",
        "p/y.py": "from . import x, z\n",
        "p/z.py": "import p.x\n",
    })
    assert find_cycles(g.edges) == [["p.x", "p.y", "p.x"], ["p.x", "p.y", "p.z", "p.x"]]


def test_a_package_importing_its_submodules_is_not_a_cycle_until_one_imports_it_back(tmp_path):
    files = {
        "lib/__init__.py": "from .core import run\nfrom . import extra\n__all__ = ['run']\nVERSION = 1\n",
        "lib/core.py": "from .helpers import twice\n\ndef run():\n    return twice(1)\n",
        "lib/helpers.py": "def twice(x):\n    return 2 * x\n",
        "lib/extra.py": "from .core import run\n",
        "lib/sub/__init__.py": "from .leaf import LEAF\n",
        "lib/sub/leaf.py": "from ..helpers import twice\nLEAF = twice(2)\n",
    }
    g = _tree(tmp_path, files)
    assert find_cycles(g.edges) == []
    assert ("lib.sub.leaf", "lib.helpers") in {(e.src, e.dst) for e in g.edges}  # two-level relative import
    # a submodule naming its package back closes a real cycle
    files["lib/helpers.py"] = "from . import VERSION\n\ndef twice(x):\n    return 2 * x * VERSION\n"
    g = _tree(tmp_path, files)
    assert find_cycles(g.edges) == [["lib", "lib.core", "lib.helpers", "lib"],
                                    ["lib", "lib.extra", "lib.core", "lib.helpers", "lib"]]


def test_checker_finds_private_names(tmp_path):
    g = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "_SECRET = 1\n__version__ = '1'\nPUBLIC = 2\n\ndef _helper():\n    pass\n",
        "pkg/_impl.py": "def run():\n    pass\n",
        "pkg/b.py": ("from .a import _helper, PUBLIC, __version__\n"  # line 1: _helper
                     "from . import a as A, _impl\n"                    # line 2: _impl is the package's own: fine
                     "from ._impl import run\n"                         # line 3: fine
                     "\n"
                     "def f(a):\n"
                     "    return A._SECRET + a._x + A.__version__\n"    # line 6: A._SECRET (a._x: a parameter)
                     "\n"
                     "def g():\n"
                     "    import pkg.a\n"
                     "    return pkg.a._helper\n"),                     # line 10
        "other/__init__.py": "",
        "other/c.py": "from pkg._impl import run\nimport pkg._impl as I\n",  # lines 1, 2: outside pkg
    })
    found = {(u.path, u.line, u.name) for u in g.private_uses}
    assert found == {("pkg/b.py", 1, "_helper"), ("pkg/b.py", 6, "_SECRET"), ("pkg/b.py", 10, "_helper"),
                     ("other/c.py", 1, "_impl"), ("other/c.py", 2, "_impl")}
    assert "pkg/b.py:6: A._SECRET (private name '_SECRET' of pkg.a)" in [str(u) for u in g.private_uses]


def test_checker_finds_the_core_importing_testing(tmp_path):
    g = _tree(tmp_path, {
        "doodl_lightning/__init__.py": "",
        "doodl_lightning/testing/__init__.py": "",
        "doodl_lightning/testing/architectures.py": "from ..shapes.schedule import CONFIG\n",  # allowed direction
        "doodl_lightning/shapes/__init__.py": "",
        "doodl_lightning/shapes/schedule.py": "CONFIG = {}\n",
        "doodl_lightning/shapes/modules.py": "def f():\n    from ..testing.architectures import CONFIG\n",
    })
    bad = layer_violations(g.edges)
    assert [(e.where(), e.dst) for e in bad] == [("doodl_lightning/shapes/modules.py:2",
                                                  "doodl_lightning.testing.architectures")]
