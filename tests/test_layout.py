"""The daemon's dependency shape: services see the node only through spirtd.nodeapi."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The process entry point builds the Node; nothing else may reach for it.
ALLOWED = {"spirtd/node.py", "spirtd/cli.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_only_the_entry_point_imports_node() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "spirtd").rglob("*.py"))
        if str(p.relative_to(ROOT)) not in ALLOWED and "spirtd.node" in _imports(p)
    ]
    assert offenders == [], f"import spirtd.nodeapi instead of spirtd.node in {offenders}"


def test_sim_network_does_not_import_host() -> None:
    assert "protocol.sim.host" not in _imports(ROOT / "protocol/sim/network.py")


def test_every_cluster_file_the_suite_schedules_exists() -> None:
    """tests/conftest.py keeps the daemon-cluster files on one xdist worker; a renamed
    file left in that list would silently run beside another cluster."""
    from tests.conftest import CLUSTER_FILES

    missing = sorted(f for f in CLUSTER_FILES if not (ROOT / "tests" / f).is_file())
    assert missing == [], f"CLUSTER_FILES in tests/conftest.py names no such file: {missing}"


def test_the_suite_is_grouped_by_file_under_xdist(request: pytest.FixtureRequest) -> None:
    """Under the default two workers, a test's id carries its xdist group: if a pytest
    or xdist release stops honouring the groups (pytest-xdist#1386), daemon clusters
    would silently run side by side again."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("run in one process (-n 0): there are no xdist groups to check")
    assert request.node.nodeid.endswith("@test_layout.py"), request.node.nodeid
