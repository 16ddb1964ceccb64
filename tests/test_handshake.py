import pytest

from protocol.errors import HandshakeError
from protocol.handshake import Handshake, ReplayCache
from protocol.identity import RevocationList, TrustStore
from protocol.session import FrameKind, Session
from tests.protocol_helpers import CA, NOW, cert, key, pair, run, trust


def test_mutual_handshake_yields_matching_keys_and_identities():
    i, r = pair()
    run(i, r)
    assert i.result.peer_id == key("bob").node_id
    assert r.result.peer_id == key("alice").node_id
    assert i.result.send_key == r.result.recv_key
    assert i.result.recv_key == r.result.send_key
    assert i.result.send_key != i.result.recv_key
    assert i.result.session_id == r.result.session_id
    assert (i.result.peer_addr, r.result.peer_addr) == ("127.0.0.1:2000", "127.0.0.1:1000")
    # The keys work as a session.
    a = Session(i.result.send_key, i.result.recv_key)
    b = Session(r.result.send_key, r.result.recv_key)
    assert b.open(*a.seal(FrameKind.MESSAGE, b"hi")).payload == b"hi"


def test_handshake_is_deterministic_given_randomness_and_time():
    a = run(*pair(seed=5))
    b = run(*pair(seed=5))
    assert a == b
    assert run(*pair(seed=6)) != a


def test_identities_are_not_sent_in_the_clear():
    msgs = run(*pair())
    for m in msgs:
        assert key("alice").public_key not in m
        assert key("bob").public_key not in m


def expect(reason: str, fn):
    with pytest.raises(HandshakeError) as e:
        fn()
    assert e.value.reason == reason, e.value


def test_wrong_cluster_refused_by_responder():
    i, r = pair(i_trust=trust("other"), i_cert=cert(key("alice"), cluster="other"))
    expect("wrong_cluster", lambda: r.receive(i.start(), NOW))


def test_untrusted_initiator_refused():
    i, r = pair(i_cert=None)
    m2 = r.receive(i.start(), NOW)
    m3 = i.receive(m2, NOW)
    expect("peer_untrusted", lambda: r.receive(m3, NOW))


def test_initiator_from_another_ca_refused():
    i, r = pair(i_cert=cert(key("alice"), ca=key("rogue-ca")))
    m3 = i.receive(r.receive(i.start(), NOW), NOW)
    expect("peer_untrusted", lambda: r.receive(m3, NOW))


def test_untrusted_responder_refused_by_initiator():
    i, r = pair(r_cert=cert(key("bob"), ca=key("rogue-ca")))
    m2 = r.receive(i.start(), NOW)
    expect("peer_untrusted", lambda: i.receive(m2, NOW))


def test_expired_peer_refused():
    i, r = pair(i_cert=cert(key("alice"), days=-0.5))
    m3 = i.receive(r.receive(i.start(), NOW), NOW)
    expect("peer_expired", lambda: r.receive(m3, NOW))


def test_revoked_peer_refused():
    t = trust()
    t.add_crl(RevocationList.issue(CA, 2, frozenset({key("alice").public_key}), now=NOW))
    i, r = pair(r_trust=t)
    m3 = i.receive(r.receive(i.start(), NOW), NOW)
    expect("peer_revoked", lambda: r.receive(m3, NOW))


def test_allowlisted_peer_without_certificate_admitted():
    t = TrustStore("c1", allowlist={key("alice").public_key})
    i, r = pair(i_cert=None, r_trust=t)
    run(i, r)
    assert r.result.admitted_by == "allowlist"


def test_replayed_hello_refused():
    cache = ReplayCache()
    i, r = pair(replay=cache)
    hello = i.start()
    r.receive(hello, NOW)
    _, r2 = pair(replay=cache)
    expect("handshake_replay", lambda: r2.receive(hello, NOW + 1))


def test_stale_hello_refused():
    i, r = pair()
    hello = i.start()
    expect("handshake_stale", lambda: r.receive(hello, NOW + 3600))


def test_replayed_finish_into_new_session_refused():
    # A recorded finish message cannot authenticate a different session: the
    # responder's fresh ephemeral key changes the transcript.
    cache = ReplayCache()
    i, r = pair(replay=cache, seed=1)
    msgs = run(i, r)
    i2, r2 = pair(replay=cache, seed=2)
    r2.receive(i2.start(), NOW)
    with pytest.raises(HandshakeError) as e:
        r2.receive(msgs[2], NOW)
    assert e.value.reason in ("handshake_tampered", "handshake_bad_signature")


def test_tampered_reply_refused():
    i, r = pair()
    m2 = bytearray(r.receive(i.start(), NOW))
    m2[-3] ^= 0x40
    with pytest.raises(HandshakeError) as e:
        i.receive(bytes(m2), NOW)
    assert e.value.reason in ("handshake_tampered", "handshake_malformed")


def test_expected_peer_mismatch_refused():
    i, r = pair()
    i.expected_peer = key("carol").node_id
    m2 = r.receive(i.start(), NOW)
    expect("unexpected_peer", lambda: i.receive(m2, NOW))


def test_self_connection_refused():
    i, r = pair(r_key=key("alice"))
    m2 = r.receive(i.start(), NOW)
    expect("self_connect", lambda: i.receive(m2, NOW))


def test_reject_message_surfaces_the_peer_reason():
    i, _ = pair()
    i.start()
    expect("rejected_by_peer", lambda: i.receive(Handshake.reject("wrong_cluster"), NOW))


def test_out_of_order_messages_refused():
    i, r = pair()
    i.start()
    expect(
        "handshake_unexpected",
        lambda: r.receive(Handshake.reject("x")[:0] or b"\x81\xa1k\xa6finish", NOW),
    )


def test_replay_cache_is_bounded():
    c = ReplayCache(max_entries=10)
    for n in range(100):
        c.check_and_add(bytes([n]) * 32, NOW, NOW)
    assert len(c._seen) <= 10
