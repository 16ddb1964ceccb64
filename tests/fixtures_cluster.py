"""Fixtures that run real spirtd processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spirtd.localcluster import LocalCluster


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: unix socket paths (api.sock, redis.sock) must stay < 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="spt-"))
    yield d
    # SPIRT_KEEP_TMP=1 keeps the daemons' data dirs and logs, to read after a failure.
    if not os.environ.get("SPIRT_KEEP_TMP"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_cluster(short_tmp: Path) -> Iterator:
    """Creates LocalClusters under a short temp dir; every process is killed at teardown."""
    made: list[LocalCluster] = []

    def make(n: int, **kw) -> LocalCluster:
        c = LocalCluster(short_tmp / f"c{len(made)}", n, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill_all()


# Fast timers for loopback tests: keepalives every second, quick handshake timeout.
FAST_TRANSPORT = """
[transport]
idle_timeout_s = 3.0
handshake_timeout_s = 2.0
reconnect_min_s = 0.1
reconnect_max_s = 1.0
"""
