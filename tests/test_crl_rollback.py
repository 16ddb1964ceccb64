"""Revocation that sticks (issue 13, finding 6), and key-file writes that cannot
be redirected (finding 10).

The review copied an old revocation list back, or deleted it, and the revoked
node was re-admitted about 3 s later: each reload built a fresh trust store, so
"newer than the one held" compared against nothing.
"""

from __future__ import annotations

import logging
import os
import stat

import pytest

from protocol.errors import TrustError
from protocol.identity import RevocationList
from spirtd.keyfiles import CaDir, DataDir, write_public, write_secret
from spirtd.localcluster import linked_peers, wait_for
from tests.fixtures_cluster import FAST_TRANSPORT
from tests.protocol_helpers import NOW


@pytest.fixture
def enrolled(tmp_path):  # type: ignore[no-untyped-def]
    ca = CaDir(tmp_path / "ca")
    ca.init("prod", now=NOW)
    victim, _ = ca.enroll(DataDir(tmp_path / "victim"), now=NOW, days=10)
    d = DataDir(tmp_path / "node")
    ca.enroll(d, now=NOW, days=10)
    return ca, d, victim


def revoked_in(d: DataDir, public_key: bytes) -> bool:
    return d.trust_store().is_revoked(public_key)


def test_an_old_list_copied_back_does_not_undo_a_revocation(enrolled, caplog) -> None:
    ca, d, victim = enrolled
    v1 = d.crl_path.read_bytes()
    ca.revoke(victim.public_key, now=NOW)
    d.crl_path.write_bytes(ca.crl_path.read_bytes())
    assert revoked_in(d, victim.public_key)

    d.crl_path.write_bytes(v1)  # the rollback
    with caplog.at_level(logging.ERROR, logger="spirtd.keyfiles"):
        store = d.trust_store()
    assert store.is_revoked(victim.public_key)
    assert store.crls[ca.key().public_key].version == 2
    assert "older than the held v2" in caplog.text
    with pytest.raises(TrustError) as e:
        store.check(victim.public_key, None, NOW)
    assert e.value.reason == "peer_revoked"


def test_a_deleted_list_does_not_undo_a_revocation(enrolled, caplog) -> None:
    ca, d, victim = enrolled
    ca.revoke(victim.public_key, now=NOW)
    d.crl_path.write_bytes(ca.crl_path.read_bytes())
    assert revoked_in(d, victim.public_key)

    d.crl_path.unlink()
    with caplog.at_level(logging.ERROR, logger="spirtd.keyfiles"):
        assert revoked_in(d, victim.public_key)
    assert "is missing; keeping the held list v2" in caplog.text


def test_the_held_list_is_private_and_newer_lists_replace_it(enrolled) -> None:
    ca, d, victim = enrolled
    ca.revoke(victim.public_key, now=NOW)
    d.crl_path.write_bytes(ca.crl_path.read_bytes())
    d.trust_store()
    held = d.crl_held_dir / ca.key().public_key.hex()
    assert stat.S_IMODE(held.stat().st_mode) == 0o600
    assert RevocationList.decode(held.read_bytes()).version == 2

    other = DataDir(d.root.parent / "other")
    k3, _ = ca.enroll(other, now=NOW, days=1)
    ca.revoke(k3.public_key, now=NOW)
    d.crl_path.write_bytes(ca.crl_path.read_bytes())
    store = d.trust_store()
    assert store.is_revoked(victim.public_key) and store.is_revoked(k3.public_key)
    assert RevocationList.decode(held.read_bytes()).version == 3


def test_lists_carry_a_next_update_and_are_flagged_before_it_passes(enrolled) -> None:
    ca, d, victim = enrolled
    crl = ca.revoke(victim.public_key, now=NOW, days=10)
    assert crl.next_update == int(NOW + 10 * 86400)
    assert RevocationList.decode(crl.encode()).next_update == crl.next_update
    d.crl_path.write_bytes(ca.crl_path.read_bytes())
    store = d.trust_store()
    week = 7 * 86400
    assert store.stale_crls(NOW, week) == []
    [(due, left)] = store.stale_crls(NOW + 4 * 86400, week)
    assert due.version == crl.version and left == pytest.approx(6 * 86400, abs=1)
    [(_, left)] = store.stale_crls(NOW + 11 * 86400, week)
    assert left < 0
    # Past its next update the list is still enforced: revocations are never dropped.
    assert store.is_revoked(victim.public_key)


def test_write_public_does_not_follow_a_planted_symlink(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "trust" / "ca.pub"
    target.parent.mkdir()
    # The old predictable temporary name, and the destination itself, as links.
    (target.parent / "ca.pub.tmp").symlink_to(victim)
    write_public(target, b"one\n")
    assert victim.read_text() == "precious"
    assert target.read_bytes() == b"one\n" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    target.unlink()
    target.symlink_to(victim)
    write_secret(target, b"two\n")
    assert victim.read_text() == "precious"
    assert target.read_bytes() == b"two\n" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(target.parent)) == ["ca.pub", "ca.pub.tmp"]  # no temp left


# --- on live daemons ----------------------------------------------------------------------


def counters(node) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return node.status()["counters"]


def refusals(node) -> int:  # type: ignore[no-untyped-def]
    return counters(node).get("handshake.peer_revoked", 0)


def refused_again(node) -> None:  # type: ignore[no-untyped-def]
    """Waits until the revoked peer has been refused once more from now on."""
    before = refusals(node)
    wait_for(lambda: refusals(node) > before, 30, "the revoked peer to be refused again")


@pytest.mark.timeout(240)
def test_revocation_survives_rollback_deletion_and_restart(make_cluster) -> None:
    c = make_cluster(2, config=FAST_TRANSPORT).start()
    a, b = c.nodes
    wait_for(lambda: linked_peers(a) == {b.node_id}, 20, "cluster to form")
    crl_path = a.data_dir / "trust" / "crl"
    old = crl_path.read_bytes()
    c.ca.revoke(bytes.fromhex(b.public_key))
    crl_path.write_bytes(c.ca.crl_path.read_bytes())
    wait_for(lambda: linked_peers(a) == set(), 20, "a to drop the revoked peer")
    wait_for(lambda: refusals(a) >= 1, 20, "b's redial refused")

    crl_path.write_bytes(old)  # roll back to the list that did not revoke b
    wait_for(lambda: "refused (a rollback?)" in a.log_tail(200), 20, "a to refuse the rollback")
    refused_again(a)
    assert linked_peers(a) == set()

    crl_path.unlink()  # delete it altogether
    wait_for(lambda: "is missing; keeping the held" in a.log_tail(200), 20, "a to keep the list")
    refused_again(a)
    assert linked_peers(a) == set()

    # A restart with no list on disk still enforces the held one.
    assert a.stop() == 0
    a.start(timeout=60)
    wait_for(lambda: refusals(a) >= 1, 30, "b refused by the restarted a")
    assert linked_peers(a) == set()
    assert a.running and b.running
