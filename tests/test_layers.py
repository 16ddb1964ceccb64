"""Layering: the daemon's packages import each other without circles.

Every ``import`` counts, at module level or inside a function (a lazy import still
couples the packages; it only hides the cycle from the interpreter), and so does an
import under ``if TYPE_CHECKING:`` (the types still say which way the dependency runs).

The graph's nodes are the subpackages of spirtd/ (``spirtd.redis``, ``spirtd.rules``,
...; a subpackage's own modules may import each other freely) and each top-level module
of spirtd/ on its own. The top-level modules are not one layer: node.py, cli.py and
services.py compose every service, while config.py, logs.py, keyfiles.py and nodeapi.py
are what every service stands on; lumping them into one node "spirtd" would make every
service sit in a cycle with the process that starts it. Counting them one by one still
catches a base module that reaches up (nodeapi.py importing a service, say).

There is no exception list: every cycle fails.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIRTD = ROOT / "spirtd"
# The control plane sits above the services: they raise nodeapi.ApiError and register
# their routes through nodeapi, and only the process (top-level modules) wires the API.
CONTROL = "spirtd.control"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> Iterator[tuple[str, int]]:
    """Every module name ``path`` imports, with the line, at any depth of the file."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    return _imports_in(path.read_text(), package, str(path))


def _imports_in(source: str, package: str, filename: str) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target, node.lineno
            # "from spirtd import config" names a module, not an attribute of the package.
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def _unit(module: str) -> str | None:
    """The layering node ``module`` belongs to (None: not part of spirtd, or a name
    inside a module rather than a module)."""
    parts = module.split(".")
    if parts[0] != "spirtd":
        return None
    if len(parts) == 1:
        return "spirtd"
    head = SPIRTD / parts[1]
    if head.is_dir():
        return f"spirtd.{parts[1]}"
    if head.with_suffix(".py").is_file():
        return f"spirtd.{parts[1]}"
    return None


def _edges() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: "file:line" of one import that makes the edge}."""
    edges: dict[str, dict[str, str]] = {}
    for path in sorted(SPIRTD.rglob("*.py")):
        src = _unit(_module_name(path))
        assert src is not None
        out = edges.setdefault(src, {})
        for target, line in _imported(path):
            dst = _unit(target)
            if dst is not None and dst != src:
                out.setdefault(dst, f"{path.relative_to(ROOT)}:{line}")
    return edges


def find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None; deterministic (sorted walk)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, {})):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def _describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    steps = [f"  {a} -> {b}  ({edges[a][b]})" for a, b in itertools.pairwise(cycle)]
    return "import cycle between spirtd packages:\n" + "\n".join(steps)


def test_the_package_graph_has_no_cycle() -> None:
    edges = _edges()
    # The walk must see the packages it is about, or an empty graph would pass.
    assert {"spirtd.redis", "spirtd.functions", "spirtd.node"} <= set(edges)
    assert "spirtd.redis" in edges["spirtd.functions"]
    cycle = find_cycle(edges)
    assert cycle is None, _describe(cycle or [], edges)


def test_find_cycle_reports_the_cycle() -> None:
    edges = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}, "d": {}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert "b -> c  (b.py:2)" in _describe(["a", "b", "c", "a"], edges)
    assert find_cycle({"a": {"b": "x"}, "b": {}, "c": {"a": "y"}}) is None


def test_unit_groups_subpackages_and_keeps_top_level_modules_apart() -> None:
    assert _unit("spirtd.redis.store") == "spirtd.redis"
    assert _unit("spirtd.functions.runtime.worker") == "spirtd.functions"
    assert _unit("spirtd.node") == "spirtd.node"
    # "from spirtd.config import ConfigError" names the module's node, not a new one.
    assert _unit("spirtd.config.ConfigError") == "spirtd.config"
    assert _unit("spirtd.__version__") is None
    assert _unit("spirtd.nodeapi") == "spirtd.nodeapi"
    assert _unit("protocol.wire") is None


def test_lazy_relative_and_type_checking_imports_count() -> None:
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi
def f():
    import spirtd.training.job
    from ..redis import store
    from . import sibling
"""
    got = {name for name, _ in _imports_in(source, "spirtd.functions", "x.py")}
    assert {"spirtd.nodeapi", "spirtd.training.job", "spirtd.redis.store"} <= got
    assert "spirtd.functions.sibling" in got
    units = {_unit(name) for name in got} - {None}
    assert units == {"spirtd.nodeapi", "spirtd.training", "spirtd.redis", "spirtd.functions"}


def test_services_do_not_import_the_control_plane() -> None:
    subpackages = {f"spirtd.{p.name}" for p in SPIRTD.iterdir() if (p / "__init__.py").is_file()}
    offenders: set[str] = set()
    for path in sorted(SPIRTD.rglob("*.py")):
        src = _unit(_module_name(path))
        if src in subpackages and src != CONTROL:
            offenders.update(
                f"{path.relative_to(ROOT)}:{line}"
                for target, line in _imported(path)
                if _unit(target) == CONTROL
            )
    assert not offenders, f"import ApiError from spirtd.nodeapi instead: {sorted(offenders)}"


def test_protocol_never_imports_spirtd() -> None:
    offenders = sorted(
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in (ROOT / "protocol").rglob("*.py")
        for target, line in _imported(path)
        if target == "spirtd" or target.startswith("spirtd.")
    )
    assert offenders == [], "protocol/ is sans-IO and below the daemon:\n" + "\n".join(offenders)
