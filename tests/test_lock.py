"""The committed lock files are what gets installed, and they cover what the code imports.

A distribution imported by the code but missing from the lock would be installed at
whatever version a fresh machine resolves that day, which is exactly the failure the
lock exists to prevent (redis-py 8's new warning broke JSON logs on a fresh install).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
OWN_PACKAGES = {"spirtd", "protocol", "bench", "tests"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (version, hashes) for every pin in a pip-compile lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in pins, f"{path.name}: {current} pinned twice"
            pins[current] = (m.group(2), [])
            rest = line[m.end() :]
        elif current is not None and line.startswith(" "):
            rest = line
        else:
            current = None
            continue
        pins[current][1].extend(re.findall(r"--hash=sha256:([0-9a-f]{64})", rest))
    return pins


def third_party_imports(*dirs: str) -> set[str]:
    """Top-level module names imported anywhere under dirs, less stdlib and our own."""
    names: set[str] = set()
    for d in dirs:
        for path in (ROOT / d).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - OWN_PACKAGES - {"__future__"}


def distributions_of(modules: set[str]) -> dict[str, set[str]]:
    """module -> canonical names of the installed distributions that provide it."""
    provided = md.packages_distributions()
    missing = sorted(m for m in modules if m not in provided)
    assert not missing, f"imported but not installed in this environment: {missing}"
    return {m: {canonicalize_name(d) for d in provided[m]} for m in modules}


def test_every_distribution_the_daemon_imports_is_in_the_runtime_lock() -> None:
    pins = read_lock(RUNTIME_LOCK)
    dists = distributions_of(third_party_imports("spirtd", "protocol", "bench"))
    assert "torch" in dists and "redis" in dists  # the walk found the imports at all
    unlocked = {m: d for m, d in dists.items() if not d & pins.keys()}
    assert not unlocked, f"imported by spirtd/protocol/bench, absent from the lock: {unlocked}"


def test_every_distribution_the_tests_import_is_in_the_test_lock() -> None:
    pins = read_lock(TEST_LOCK)
    dists = distributions_of(third_party_imports("tests"))
    assert "pytest" in dists
    unlocked = {m: d for m, d in dists.items() if not d & pins.keys()}
    assert not unlocked, f"imported by the tests, absent from the test lock: {unlocked}"


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, TEST_LOCK], ids=lambda p: p.name)
def test_every_pin_is_exact_hashed_and_within_pyproject_ranges(lock: Path) -> None:
    pins = read_lock(lock)
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"{lock.name}: pins without a hash: {unhashed}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    if lock == TEST_LOCK:
        wanted += project["optional-dependencies"]["test"]
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {name}, a dependency in pyproject.toml"
        version = Version(pins[name][0])
        # The lock pins torch's CPU build (a local label); the range is on the release.
        assert req.specifier.contains(Version(version.public), prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside pyproject.toml's {req.specifier}"
        )


def test_torch_is_the_cpu_build_and_both_locks_agree() -> None:
    runtime, test = read_lock(RUNTIME_LOCK), read_lock(TEST_LOCK)
    assert Version(runtime["torch"][0]).local == "cpu", "torch must be the CPU build"
    assert not any(n.startswith("nvidia-") for n in test), "a CUDA package reached the lock"
    differ = {n: (v, test[n][0]) for n, (v, _) in runtime.items() if test[n][0] != v}
    assert not differ, f"the runtime and test locks pin different versions: {differ}"


def test_this_environment_is_installed_from_the_lock() -> None:
    """What the suite runs against is what the lock says (deploy/install-venv.sh)."""
    pins = read_lock(TEST_LOCK)
    wrong = {}
    for name, (version, _) in pins.items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed) != Version(version):
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from the lock (locked, installed): {wrong}"
