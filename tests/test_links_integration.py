"""Real spirtd processes on 127.0.0.1: admission, tampering, and abuse."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import time

import pytest

from protocol import aead
from spirtd.keyfiles import CaDir, DataDir
from spirtd.localcluster import LocalNode, linked_peers, wait_for
from tests.fixtures_cluster import FAST_TRANSPORT
from tests.tcpproxy import FlipProxy

pytestmark = pytest.mark.timeout(120)


def counters(node: LocalNode) -> dict[str, int]:
    return node.status()["counters"]


def test_two_nodes_with_same_ca_link_and_list_each_other(make_cluster):
    c = make_cluster(2, config=FAST_TRANSPORT).start()
    a, b = c.nodes
    wait_for(lambda: linked_peers(a) == {b.node_id}, 20, "a to list b")
    wait_for(lambda: linked_peers(b) == {a.node_id}, 20, "b to list a")
    link = a.status()["links"][0]
    assert link["admitted_by"] == "certificate"
    # Two daemons on this host negotiate the fastest cipher both can run.
    assert link["cipher"] == aead.offer()[0] == b.status()["links"][0]["cipher"]
    # The status reports what INTERFACES.md promises.
    s = b.status()
    assert s["node_id"] == b.node_id and s["address"] == b.address
    me = [m for m in s["members"] if m["node_id"] == b.node_id]
    assert me and me[0]["state"] == "alive"
    assert {"job", "state", "round", "model_digest", "loss", "accuracy"} <= set(s["training"])
    assert c.stop() == [0, 0]


def make_intruder(kind: str, root, c, bootstrap: str) -> LocalNode:
    d = root / f"intruder-{kind}"
    args: list[str] = []
    if kind == "other_ca":
        other = CaDir(root / "other-ca")
        other.init("spirt")
        other.enroll(DataDir(d), now=time.time(), days=1)
        # It trusts our CA, so only *our* side's refusal is in play.
        (d / "trust" / "ca.pub").write_text(c.ca.pub_path.read_text())
    elif kind == "wrong_cluster":
        c.ca.enroll(DataDir(d), now=time.time(), days=1)
        args = ["--cluster", "elsewhere"]
    else:
        # No certificate, but it trusts our CA: only our refusal is in play.
        (d / "trust").mkdir(parents=True)
        (d / "trust" / "ca.pub").write_text(c.ca.pub_path.read_text())
    return LocalNode(d, bootstrap=[bootstrap], args=args, config=FAST_TRANSPORT)


def test_intruders_are_refused_counted_and_logged(make_cluster, short_tmp):
    c = make_cluster(2, config=FAST_TRANSPORT).start()
    a, b = c.nodes
    wait_for(lambda: linked_peers(a) == {b.node_id}, 20, "cluster to form")
    expected = {
        "no_certificate": "peer_untrusted",
        "other_ca": "peer_untrusted",
        "wrong_cluster": "wrong_cluster",
    }
    intruders = {k: make_intruder(k, short_tmp, c, a.address) for k in expected}
    for x in intruders.values():
        x.spawn()
    try:
        for x in intruders.values():
            x.wait_started()
        wait_for(
            lambda: (
                counters(a).get("handshake.peer_untrusted", 0) >= 2
                and counters(a).get("handshake.wrong_cluster", 0) >= 1
            ),
            20,
            "a to count every refusal",
        )
        log = a.log_path.read_text()
        for reason in set(expected.values()):
            assert f"refused: {reason}" in log
        for x in intruders.values():
            assert x.node_id not in linked_peers(a)
            assert linked_peers(x) == set()
        # Both real nodes are up and still linked.
        assert a.running and b.running
        assert linked_peers(a) == {b.node_id} and linked_peers(b) == {a.node_id}
    finally:
        for x in intruders.values():
            x.kill()


def test_flipped_byte_drops_the_link_which_reconnects(make_cluster):
    c = make_cluster(1, config=FAST_TRANSPORT).start()
    a = c.nodes[0]
    host, port = a.address.rsplit(":", 1)
    proxy = FlipProxy((host, int(port)))
    try:
        b = c.add_node(config=FAST_TRANSPORT, start=False)
        b.bootstrap = [proxy.address]
        b.start()
        assert proxy.flipped.wait(20), "no session record crossed the proxy"
        wait_for(
            lambda: sum(v for k, v in counters(a).items() if k.startswith("session.")) >= 1,
            20,
            "a to count the tampered record",
        )
        assert counters(a).get("session.tampered_frame", 0) >= 1
        wait_for(lambda: linked_peers(a) == {b.node_id}, 20, "the link to come back")
        wait_for(lambda: linked_peers(b) == {a.node_id}, 20, "the link to come back on b")
        assert counters(b).get("transport.links_opened", 0) >= 2
        assert a.running and b.running
    finally:
        proxy.close()


def test_random_frames_and_half_open_connections_do_not_hurt(make_cluster):
    c = make_cluster(1, config=FAST_TRANSPORT).start()
    a = c.nodes[0]
    host, port = a.address.rsplit(":", 1)
    rng = random.Random(7)
    sent = 0
    conns = 0
    sock: socket.socket | None = None
    while sent < 10_000:
        if sock is None:
            sock = socket.create_connection((host, int(port)), timeout=5)
            conns += 1
        size = rng.randrange(0, 600)
        frame = struct.pack(">I", rng.choice([size, rng.getrandbits(32)])) + rng.randbytes(size)
        try:
            sock.sendall(frame)
            sent += 1
        except OSError:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()

    # Half-open: one connection that says nothing, one stuck mid-record.
    silent = socket.create_connection((host, int(port)), timeout=10)
    partial = socket.create_connection((host, int(port)), timeout=10)
    partial.sendall(struct.pack(">I", 1000) + b"x" * 10)

    # The daemon still answers spirtctl (the real CLI, as a process).
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spirtd.control.ctl",
            "status",
            "--json",
            "--data-dir",
            str(a.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    assert '"node_id"' in out.stdout
    # Both half-open connections are closed: the silent one at the hello deadline,
    # the one stuck mid-record because its length is past any hello's.
    for s in (silent, partial):
        s.settimeout(10)
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"" or data[4:].find(b"reject") >= 0
        s.close()
    cnt = counters(a)
    refused = sum(v for k, v in cnt.items() if k.startswith("handshake."))
    assert refused >= conns  # every garbage connection was refused and counted
    assert cnt.get("handshake.hello_timeout", 0) >= 1
    assert a.running


def test_revocation_drops_a_live_link_and_keeps_it_out(make_cluster):
    c = make_cluster(2, config=FAST_TRANSPORT).start()
    a, b = c.nodes
    wait_for(lambda: linked_peers(a) == {b.node_id}, 20, "cluster to form")
    c.ca.revoke(bytes.fromhex(b.public_key))
    # The operator copies the new revocation list to a; a picks it up by itself.
    (a.data_dir / "trust" / "crl").write_bytes(c.ca.crl_path.read_bytes())
    wait_for(lambda: linked_peers(a) == set(), 20, "a to drop the revoked peer")
    wait_for(lambda: counters(a).get("handshake.peer_revoked", 0) >= 1, 20, "b's redial refused")
    assert linked_peers(a) == set()
    assert a.running and b.running
