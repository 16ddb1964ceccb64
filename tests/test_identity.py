import os
import stat

import pytest

from protocol import base58
from protocol.errors import DecodeError, TrustError
from protocol.identity import (
    Certificate,
    RevocationList,
    TrustStore,
    node_id,
    parse_public_key,
    public_key_from_node_id,
)
from spirtd.keyfiles import CaDir, DataDir, KeyFileError, load_or_create_key
from tests.protocol_helpers import CA, NOW, cert, key, trust


def test_node_id_is_libp2p_style_and_round_trips():
    k = key("alice")
    nid = k.node_id
    # Ed25519 identity-multihash peer ids in libp2p all start with 12D3KooW.
    assert nid.startswith("12D3KooW")
    assert public_key_from_node_id(nid) == k.public_key
    assert parse_public_key(nid) == k.public_key
    assert parse_public_key(k.public_key.hex()) == k.public_key
    assert node_id(key("bob").public_key) != nid


def test_rfc8032_vector_and_libp2p_id_layout():
    # RFC 8032 section 7.1, test 1: seed -> public key.
    from protocol.identity import NodeKey

    k = NodeKey(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert k.public_key.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    # libp2p layout: identity multihash (0x00, len 36) of protobuf
    # PublicKey{Type=Ed25519 (field 1 = 1), Data (field 2, 32 bytes)}.
    raw = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + k.public_key
    assert base58.decode(k.node_id) == raw


def test_base58_round_trip_with_leading_zeros():
    for data in [b"", b"\0", b"\0\0\1", os.urandom(40), b"\0" + os.urandom(10)]:
        assert base58.decode(base58.encode(data)) == data


def test_parse_public_key_rejects_garbage():
    with pytest.raises(ValueError, match="not a public key"):
        parse_public_key("hello")


def test_certificate_round_trip_and_signature():
    c = cert(key("alice"))
    d = Certificate.decode(c.encode())
    assert d == c and d.signature_valid()


def test_certificate_tampering_is_detected():
    c = cert(key("alice"))
    forged = Certificate(
        c.cluster,
        key("mallory").public_key,
        c.issuer,
        c.serial,
        c.issued_at,
        c.expires_at,
        c.signature,
    )
    assert not forged.signature_valid()
    raw = bytearray(c.encode())
    raw[-1] ^= 1
    assert not Certificate.decode(bytes(raw)).signature_valid()


def test_trust_admits_ca_certificate():
    assert trust().check(key("alice").public_key, cert(key("alice")), NOW) == "certificate"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: None, "peer_untrusted"),
        (lambda k: cert(k, ca=key("other-ca")), "peer_untrusted"),
        (lambda k: cert(key("someone-else")), "peer_untrusted"),
        (lambda k: cert(k, cluster="c2"), "wrong_cluster"),
        (lambda k: cert(k, days=-1), "peer_expired"),
    ],
)
def test_trust_refusals(make, reason):
    k = key("alice")
    with pytest.raises(TrustError) as e:
        trust().check(k.public_key, make(k), NOW)
    assert e.value.reason == reason


def test_admission_is_closed_by_default():
    k = key("alice")
    with pytest.raises(TrustError):
        TrustStore("c1").check(k.public_key, cert(k), NOW)


def test_allowlist_admits_without_certificate():
    k = key("alice")
    t = TrustStore("c1", allowlist={k.public_key})
    assert t.check(k.public_key, None, NOW) == "allowlist"


def test_revocation_list_revokes_and_only_newer_lists_are_taken():
    k = key("alice")
    t = trust()
    crl1 = RevocationList.issue(CA, 1, frozenset({k.public_key}), now=NOW)
    assert t.add_crl(RevocationList.decode(crl1.encode()))
    with pytest.raises(TrustError) as e:
        t.check(k.public_key, cert(k), NOW)
    assert e.value.reason == "peer_revoked"
    # An older or equal version is ignored (no rollback by replaying an old list).
    assert not t.add_crl(RevocationList.issue(CA, 1, frozenset(), now=NOW))
    # A list signed by another CA is ignored.
    assert not t.add_crl(RevocationList.issue(key("other-ca"), 9, frozenset(), now=NOW))
    assert t.is_revoked(k.public_key)


def test_certificate_decoder_rejects_non_canonical_and_garbage():
    with pytest.raises(DecodeError):
        Certificate.decode(b"\x93\x01\x02")
    with pytest.raises(DecodeError):
        Certificate.decode(os.urandom(50))


def test_key_file_created_0600_and_reloaded(tmp_path):
    p = tmp_path / "d" / "node.key"
    k1, created = load_or_create_key(p)
    assert created
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    k2, created = load_or_create_key(p)
    assert not created and k2.public_key == k1.public_key


def test_key_file_readable_by_others_is_refused(tmp_path):
    p = tmp_path / "node.key"
    load_or_create_key(p)
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_key(p)


def test_ca_enroll_installs_material_and_revoke_reaches_trust_store(tmp_path):
    ca = CaDir(tmp_path / "ca")
    ca.init("prod")
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    d1, d2 = DataDir(tmp_path / "n1"), DataDir(tmp_path / "n2")
    k1, c1 = ca.enroll(d1, now=NOW, days=10)
    _k2, _ = ca.enroll(d2, now=NOW, days=10)
    t2 = d2.trust_store()
    assert t2.cluster == "prod"
    assert t2.check(k1.public_key, d1.certificate(), NOW + 1) == "certificate"
    ca.revoke(k1.public_key)
    d2.crl_path.write_bytes(ca.crl_path.read_bytes())
    with pytest.raises(TrustError):
        d2.trust_store().check(k1.public_key, c1, NOW + 1)
    with pytest.raises(KeyFileError, match="already exists"):
        ca.init("prod")
