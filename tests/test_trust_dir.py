"""A node whose trust directory it cannot write refuses to start (exit 78, one
line naming the directory) instead of running without holding revocations.

How the directory is made unwritable: root ignores file modes, so a chmod would
prove nothing when the suite runs as root. Instead the path spirtd must create
a directory at (trust/crl.held, or trust/ itself) is a regular file, which
refuses mkdir for root and for everyone else alike; spirtd's check is the same
create-and-write probe either way, so a root-owned trust/ on a real install
(EACCES) takes the same path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.identity import NodeKey
from spirtd.keyfiles import CaDir, DataDir
from spirtd.localcluster import _REPO_ROOT, LocalNode

EX_CONFIG = 78


def _enrolled(root: Path) -> tuple[CaDir, DataDir]:
    ca = CaDir(root / "ca")
    ca.init("spirt")
    data = DataDir(root / "node")
    ca.enroll(data, now=time.time(), days=30)
    return ca, data


def _run_spirtd(data: DataDir) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spirtd", "--data-dir", str(data.root), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=_REPO_ROOT,
        check=False,
    )


@pytest.mark.parametrize("blocked", ["crl.held", "trust"])
def test_unwritable_trust_dir_refuses_to_start(short_tmp: Path, blocked: str) -> None:
    _, data = _enrolled(short_tmp)
    if blocked == "crl.held":
        data.crl_held_dir.write_text("in the way\n")
    else:
        # An install that put trust material somewhere spirtd cannot create under.
        for f in data.trust_dir.iterdir():
            f.unlink()
        data.trust_dir.rmdir()
        data.trust_dir.write_text("in the way\n")
    r = _run_spirtd(data)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"trust directory {data.trust_dir} is not writable" in lines[0], lines[0]
    # It never came up: no identity lines, no control socket.
    assert "node_id" not in r.stdout and not data.api_socket.exists()


def test_writable_trust_dir_starts_and_holds_the_list(short_tmp: Path) -> None:
    """The control case: the same enrolled dir, writable, gets past the check and
    holds the installed revocation list in trust/crl.held."""
    ca, data = _enrolled(short_tmp)
    node = LocalNode(data.root).start()
    try:
        held = data.crl_held_dir / ca.key().public_key.hex()
        assert held.is_file() and held.stat().st_mode & 0o777 == 0o600
    finally:
        assert node.stop() == 0


def test_a_new_list_is_enforced_even_when_it_cannot_be_held(short_tmp: Path) -> None:
    """At run time (trust reload) an unwritable crl.held must not mean the
    revocation is dropped: the list is enforced, and only holding it fails."""
    ca, data = _enrolled(short_tmp)
    victim = NodeKey(os.urandom(32))
    ca.revoke(victim.public_key, now=time.time())
    (data.trust_dir / "crl").write_bytes(ca.crl_path.read_bytes())
    data.crl_held_dir.write_text("in the way\n")
    store = data.trust_store()
    issuer = ca.key().public_key
    assert store.crls[issuer].version == 2
    assert victim.public_key in store.crls[issuer].revoked
