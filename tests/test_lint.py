"""The tree stays ruff-clean (lint and format), as the style guide asks; ruff is
a declared test dependency, so its absence is a failure, not a skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREES = ["spirtd", "protocol", "bench", "tests", "examples", "setup.py"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *TREES],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_ruff_check() -> None:
    r = ruff("check", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = ruff("format", "--check", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
