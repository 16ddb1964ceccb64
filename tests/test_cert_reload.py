"""A renewed node certificate and a rotated CA take effect without restarting
any daemon, as the operator guide says: real spirtd processes, changed only the
way an operator changes them (`spirtctl ca sign` / `ca install`, editing
trust/ca.pub).

What shows the new certificate is presented: a peer's `status` lists, for each
link, the certificate the other side presented in that link's handshake.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from protocol.identity import Admission, NodeKey, TrustStore, node_id
from protocol.membership import (
    Membership,
    MemberState,
    ed25519_signer,
    ed25519_verifier,
    lan,
)
from spirtd.keyfiles import CaDir, DataDir
from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from tests.fixtures_cluster import FAST_TRANSPORT
from tests.protocol_helpers import NOW, cert, key

pytestmark = pytest.mark.timeout(300)

ARGS = ["--profile", "local"]


def _ctl(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout.strip()


def _reissue(ca: CaDir, node: LocalNode, days: float) -> dict[str, Any]:
    """The operator's renewal: sign the node's key on the CA machine, install it on the host."""
    signed = json.loads(
        _ctl("ca", "sign", "--ca-dir", str(ca.root), node.public_key, "--days", str(days), "--json")
    )
    _ctl("ca", "install", "--data-dir", str(node.data_dir), signed["certificate"])
    return signed


def _own_cert(node: LocalNode) -> dict[str, Any] | None:
    return node.status()["certificate"]


def _presented(viewer: LocalNode, peer: LocalNode) -> dict[str, Any] | None:
    """The certificate ``peer`` presented on ``viewer``'s current link to it."""
    for link in viewer.status()["links"]:
        if link["node_id"] == peer.node_id:
            return link["certificate"]
    return None


def _cluster(make_cluster: Any, n: int) -> LocalCluster:
    c: LocalCluster = make_cluster(n, args=ARGS, config=FAST_TRANSPORT)
    c.start()
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "every node to see every other alive")
    return c


def test_renewed_certificate_is_presented_on_new_handshakes(make_cluster: Any) -> None:
    c = _cluster(make_cluster, 2)
    a, b = c.nodes
    before = _own_cert(b)
    assert before is not None
    signed = _reissue(c.ca, b, days=400)
    assert signed["expires_at"] > before["expires_at"] + 300 * 86400
    # b picks up its new node.cert by itself (no restart, no signal).
    wait_for(
        lambda: (_own_cert(b) or {}).get("serial") == signed["serial"],
        30,
        "b to load its renewed certificate",
    )
    assert b.proc is not None and b.proc.poll() is None
    # A node joining now handshakes with b and is shown the renewed certificate.
    newcomer = c.add_node(args=ARGS, config=FAST_TRANSPORT, start=False)
    newcomer.bootstrap = [b.address]
    newcomer.start()
    wait_for(
        lambda: (_presented(newcomer, b) or {}).get("serial") == signed["serial"],
        60,
        "the newcomer's link to b to carry b's renewed certificate",
    )
    assert _presented(newcomer, b)["expires_at"] == signed["expires_at"]  # type: ignore[index]
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "all three alive")
    # a's link to b predates the renewal; it stays up on the old certificate.
    assert (_presented(a, b) or {}).get("serial") == before["serial"]


def test_ca_rotation_without_restarts(make_cluster: Any, short_tmp: Path) -> None:
    c = _cluster(make_cluster, 2)
    old_ca = node_id(c.ca.key().public_key)
    new = CaDir(short_tmp / "ca-new")
    new.init("spirt")
    new_ca = node_id(new.key().public_key)
    new_line = new.pub_path.read_text()
    # 1. Every host trusts both CAs.
    for n in c.nodes:
        with DataDir(n.data_dir).ca_pub_path.open("a") as f:
            f.write(new_line)
    # 2. Every host is re-signed by the new CA.
    for n in c.nodes:
        _reissue(new, n, days=365)
    wait_for(
        lambda: all((_own_cert(n) or {}).get("issuer") == new_ca for n in c.nodes),
        30,
        "both nodes to present the new CA's certificate",
    )
    # A host enrolled under the new CA only, trusting only it, joins the running
    # cluster: it admits the old members only by their new certificates.
    d = c.root / "node2"
    new.enroll(DataDir(d), now=time.time(), days=30)
    assert DataDir(d).ca_pub_path.read_text() == new_line
    fresh = c.add_node(args=ARGS, config=FAST_TRANSPORT, start=False, index=2, enroll=False)
    fresh.start()
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 90, "the new-CA node to join the old members")
    # 3. The old CA is dropped everywhere: links made under it are re-made under
    # the new one, and nobody leaves.
    for n in c.nodes[:2]:
        DataDir(n.data_dir).ca_pub_path.write_text(new_line)

    def all_links_new_ca() -> bool:
        issuers = {
            (link["certificate"] or {}).get("issuer")
            for n in c.nodes
            for link in n.status()["links"]
        }
        return issuers == {new_ca}

    wait_for(all_links_new_ca, 60, "every link to be under the new CA")
    wait_for(lambda: all_see(c.nodes, everyone), 60, "all three still alive")
    assert all(n.proc is not None and n.proc.poll() is None for n in c.nodes)
    assert old_ca != new_ca


# --- the membership record carries the renewed certificate (sans-IO) ---------------------


def test_membership_announces_a_renewed_certificate() -> None:
    """After a CA rotation a member that trusts only the new CA judges our alive
    record by the certificate it carries; the record must carry the new one (a
    peer that has no link to us has nothing else to judge us by)."""
    old_ca, new_ca = key("old-ca"), key("new-ca")
    me_key, x_key = key("observer"), key("renewed")
    admission = Admission(TrustStore("c1", ca_keys={new_ca.public_key}))

    def machine(k: NodeKey, n: int, cert_bytes: bytes, adm: Admission | None) -> Membership:
        return Membership(
            k.node_id,
            f"10.0.0.{n}:7946",
            lan(),
            random.Random(n),
            0.0,
            record_signer=ed25519_signer(k),
            record_verifier=ed25519_verifier(),
            certificate=cert_bytes,
            admission=adm,
            wall_offset=NOW if adm is not None else None,
        )

    me = machine(me_key, 1, cert(me_key, ca=new_ca).encode(), admission)
    x = machine(x_key, 2, cert(x_key, ca=old_ca).encode(), None)
    me.join([], 0.0)

    def x_pushes(now: float) -> None:
        x.join([me.addr], now)
        for out in x.drain_outgoing():
            if out.addr == me.addr:
                me.receive(x_key.node_id, x.addr, out.message, now)

    x_pushes(1.0)
    assert me.member(x_key.node_id) is None  # the old CA's certificate: refused
    assert me.counters["member_refused.peer_untrusted"] >= 1
    x.set_certificate(cert(x_key, ca=new_ca).encode(), 2.0)
    assert x.incarnation == 1  # a new record, so it supersedes the old one everywhere
    x_pushes(3.0)
    seen = me.member(x_key.node_id)
    assert seen is not None and seen.state is MemberState.ALIVE and seen.incarnation == 1
