"""The package's plan, checked statically (fast tier: no torch, nothing imported).

* No import cycle among hopgate's modules. Every ``import`` counts, including the lazy ones
  inside functions and under ``if TYPE_CHECKING:``: a lazy import hides a cycle, it does not
  remove it.
* One direction: ``hopgate.service`` and the shared top package ``hopgate`` never import torch
  or ``hopgate.model_export``; the top package does not import ``hopgate.service`` either.
* No module over MAX_LINES lines unless its docstring has a line starting with
  ``Long because`` that gives the reason (CONTRIBUTING.md, "Layout rules").

The scanner reads the folders through the package-dir mapping of pyproject.toml (``service/``
is ``hopgate.service``, ``model_export/`` is ``hopgate.model_export``) and resolves relative
imports; the tests at the bottom run it on small planted packages to show it catches what it
should.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder, as [tool.setuptools.package-dir] in pyproject.toml maps them
PACKAGE_DIRS = {
    "hopgate": "hopgate",
    "hopgate.service": "service",
    "hopgate.model_export": "model_export",
}
MAX_LINES = 300
LONG_MARKER = "Long because"
TORCH = ("torch", "torchvision")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(repr=False)
class Graph:
    modules: dict[str, Module]
    root: Path
    package_dirs: dict[str, str]
    # internal edges: (importer, imported) -> line of the first such import in the importer
    edges: dict[tuple[str, str], int] = field(default_factory=dict)
    # every import, resolved to an absolute dotted name: importer -> [(name, line)]
    imports: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Graph({len(self.modules)} modules, {len(self.edges)} internal imports)"

    def where(self, name: str, line: int) -> str:
        return f"{self.modules[name].path.relative_to(self.root)}:{line}"


def discover(root: Path, package_dirs: dict[str, str]) -> dict[str, Module]:
    """Every module under the mapped folders, by its import name."""
    mapped = {(root / folder).resolve() for folder in package_dirs.values()}
    modules: dict[str, Module] = {}
    for pkg, folder in package_dirs.items():
        base = (root / folder).resolve()
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            # a sub-folder mapped to a name of its own is scanned under that name
            if any(p != base and p in mapped and path.is_relative_to(p) for p in mapped):
                continue
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            modules[name] = Module(name, path, is_package)
    return modules


def _resolve_relative(mod: Module, level: int, target: str | None) -> str:
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        raise ImportError(f"{mod.path}: relative import beyond the top package")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def build_graph(root: Path = ROOT, package_dirs: dict[str, str] = PACKAGE_DIRS) -> Graph:
    modules = discover(root, package_dirs)
    graph = Graph(modules, root, package_dirs)
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"), filename=str(mod.path))
        found: list[tuple[str, int]] = []
        for node in ast.walk(tree):  # the whole tree: function bodies and if-blocks too
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve_relative(mod, node.level, node.module)
                else:
                    base = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in modules else base, node.lineno))
        graph.imports[mod.name] = found
        for name, line in found:
            target = _known(name, modules)
            if target is not None and target != mod.name:
                graph.edges.setdefault((mod.name, target), line)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    succ: dict[str, list[str]] = {m: [] for m in graph.modules}
    for a, b in sorted(graph.edges):
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(succ) + 100))
    try:
        for v in sorted(succ):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(limit)

    return [_shortest_cycle(succ, set(comp), comp[0]) for comp in components]


def _shortest_cycle(succ: dict[str, list[str]], members: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in succ[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle but no path returns to it")


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    hops = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        hops.append(f"{a} ({graph.where(a, graph.edges[(a, b)])})")
    return " -> ".join(hops + [cycle[0]])


def forbidden_imports(graph: Graph, importer_prefix: str, banned: tuple[str, ...]) -> list[str]:
    """Imports of ``banned`` names (or their submodules) by modules of ``importer_prefix``;
    the prefix itself names the package, so "hopgate" means the top package's own modules."""
    hits = []
    for name, found in sorted(graph.imports.items()):
        if not _in_package(graph, name, importer_prefix):
            continue
        for target, line in found:
            if any(target == b or target.startswith(b + ".") for b in banned):
                hits.append(f"{graph.where(name, line)} imports {target}")
    return hits


def _in_package(graph: Graph, name: str, package: str) -> bool:
    """Whether module ``name`` lives in ``package`` itself (not in a sub-package that has its
    own folder mapping, as hopgate.service has)."""
    if not (name == package or name.startswith(package + ".")):
        return False
    own = [p for p in graph.package_dirs if p != package and p.startswith(package + ".")]
    return not any(name == p or name.startswith(p + ".") for p in own)


def long_modules(graph: Graph, max_lines: int = MAX_LINES) -> list[str]:
    """Modules over ``max_lines`` lines whose docstring gives no ``Long because`` reason."""
    out = []
    for mod in sorted(graph.modules.values(), key=lambda m: m.name):
        text = mod.path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n <= max_lines:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        reasons = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith(LONG_MARKER)]
        if not any(len(r) > len(LONG_MARKER) + 3 for r in reasons):  # a reason, not the bare words
            out.append(f"{mod.path.relative_to(graph.root)}: {n} lines (limit {max_lines})")
    return out


# --- the tree ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


def test_package_dirs_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    assert declared == PACKAGE_DIRS


def test_scanner_sees_the_packages(graph):
    names = set(graph.modules)
    assert {"hopgate", "hopgate.bundle", "hopgate.service", "hopgate.model_export"} <= names
    assert any(n.startswith("hopgate.service.") for n in names)
    assert any(n.startswith("hopgate.model_export.") for n in names)
    # the export half uses the shared contract: the scanner resolves imports across folders
    assert any(b == "hopgate.bundle" for (_, b) in graph.edges)


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(
        describe_cycle(graph, c) for c in cycles
    )


@pytest.mark.parametrize("package", ["hopgate.service", "hopgate"])
def test_serving_half_and_shared_package_never_import_torch_or_the_export_half(graph, package):
    banned = TORCH + ("hopgate.model_export",)
    if package == "hopgate":
        banned += ("hopgate.service",)  # the shared package sits below both halves
    hits = forbidden_imports(graph, package, banned)
    assert not hits, f"{package} must not import {', '.join(banned)}:\n" + "\n".join(hits)


def test_no_module_over_the_line_limit_without_a_reason(graph):
    long = long_modules(graph)
    assert not long, (
        f"modules over {MAX_LINES} lines: split them, or say why in the module docstring with "
        f"a line starting '{LONG_MARKER} ...':\n" + "\n".join(long)
    )


# --- the scanner itself, on planted packages --------------------------------------------


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


PLANTED_DIRS = {"pkg": "pkg", "pkg.srv": "srv", "pkg.exp": "exp"}


def test_scanner_finds_a_cycle_hidden_in_a_lazy_relative_import(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "srv/__init__.py": "",
        "srv/api.py": "def app():\n    from .v2 import router\n    return router\n",
        "srv/v2.py": "from .api import app\nrouter = 1\n",
        "exp/__init__.py": "",
    })
    g = build_graph(root, PLANTED_DIRS)
    cycles = find_cycles(g)
    assert [sorted(c) for c in cycles] == [["pkg.srv.api", "pkg.srv.v2"]]
    text = describe_cycle(g, cycles[0])
    assert "srv/api.py:2" in text and "srv/v2.py:1" in text


def test_scanner_finds_a_longer_cycle_across_folders(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "import pkg.srv.core\n",
        "srv/__init__.py": "",
        "srv/core.py": "from ..exp import tool\n",  # relative, climbing to the top package
        "exp/__init__.py": "",
        "exp/tool.py": "from pkg import base\n",
    })
    g = build_graph(root, PLANTED_DIRS)
    [cycle] = find_cycles(g)
    assert set(cycle) == {"pkg.base", "pkg.srv.core", "pkg.exp.tool"}
    assert describe_cycle(g, cycle).count("->") == 3


def test_scanner_accepts_an_acyclic_package(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "__version__ = '1'\n",
        "pkg/contract.py": "import json\n",
        "srv/__init__.py": "from .api import app\n",  # a package re-exporting its module
        "srv/api.py": "from pkg import __version__\nfrom pkg.contract import x\n"
                      "from . import util\n",
        "srv/util.py": "from __future__ import annotations\n",
        "exp/__init__.py": "",
        "exp/build.py": "from pkg.srv.api import app\nimport torch\n",  # export -> serve is fine
    })
    g = build_graph(root, PLANTED_DIRS)
    assert find_cycles(g) == []
    assert ("pkg.srv.api", "pkg.srv.util") in g.edges
    assert ("pkg.srv.api", "pkg.contract") in g.edges


def test_scanner_flags_torch_and_the_export_half_in_the_serving_half(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/shared.py": "def f():\n    from pkg.srv import api\n",
        "srv/__init__.py": "",
        "srv/api.py": "def f():\n    import torch.nn as nn\n    from ..exp.model import M\n",
        "exp/__init__.py": "",
        "exp/model.py": "import torch\n",
    })
    g = build_graph(root, PLANTED_DIRS)
    hits = forbidden_imports(g, "pkg.srv", ("torch", "pkg.exp"))
    assert hits == ["srv/api.py:2 imports torch.nn", "srv/api.py:3 imports pkg.exp.model"]
    # the top package's own modules only; pkg.srv's imports are not the top package's
    assert forbidden_imports(g, "pkg", ("torch",)) == []
    assert forbidden_imports(g, "pkg", ("pkg.srv",)) == ["pkg/shared.py:2 imports pkg.srv.api"]
    assert forbidden_imports(g, "pkg.exp", ("torch",)) == ["exp/model.py:1 imports torch"]


def test_scanner_flags_long_modules_without_a_reason(tmp_path):
    body = "x = 1\n" * (MAX_LINES + 1)
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/long.py": '"""A long module."""\n' + body,
        "pkg/bare.py": '"""A long module.\n\nLong because\n"""\n' + body,
        "pkg/reasoned.py": '"""A long module.\n\nLong because: one state machine.\n"""\n' + body,
        "pkg/short.py": "x = 1\n" * MAX_LINES,
        "srv/__init__.py": "",
        "exp/__init__.py": "",
    })
    g = build_graph(root, PLANTED_DIRS)
    assert [s.split(":")[0] for s in long_modules(g)] == ["pkg/bare.py", "pkg/long.py"]
