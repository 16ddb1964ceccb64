"""The record cipher: how two peers settle on it in the handshake, that a third
party cannot push them to the slower one, and that records round-trip under
each (sans-IO, then over real transports on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import nacl.bindings as sodium
import pytest

from protocol import aead, strictpack
from protocol.errors import HandshakeError, SessionError
from protocol.handshake import Handshake, ReplayCache, Role
from protocol.identity import NodeKey, TrustStore
from protocol.session import FrameKind, Session
from spirtd.config import TransportConfig
from spirtd.localcluster import async_wait_for
from spirtd.net.transport import Transport
from tests.protocol_helpers import NOW, cert, key, rng_bytes, run, trust

pytestmark = pytest.mark.timeout(60)

AES, CHACHA = aead.AES256GCM, aead.CHACHA20POLY1305
BOTH = (AES, CHACHA)
needs_aes = pytest.mark.skipif(not aead.HARDWARE_AES, reason="no hardware AES on this host")


def pair(i_offer, r_offer, seed: int = 1) -> tuple[Handshake, Handshake]:
    i = Handshake(
        Role.INITIATOR,
        key("alice"),
        cert(key("alice")),
        trust(),
        random_bytes=rng_bytes(seed),
        now=NOW,
        ciphers=i_offer,
    )
    r = Handshake(
        Role.RESPONDER,
        key("bob"),
        cert(key("bob")),
        trust(),
        random_bytes=rng_bytes(seed + 1000),
        now=NOW,
        replay_cache=ReplayCache(),
        ciphers=r_offer,
    )
    return i, r


@pytest.mark.parametrize(
    ("i_offer", "r_offer", "chosen"),
    [
        (BOTH, BOTH, AES),
        ((CHACHA, AES), BOTH, AES),  # the order of an offer does not matter
        (BOTH, (CHACHA,), CHACHA),
        ((CHACHA,), BOTH, CHACHA),
        ((CHACHA,), (CHACHA,), CHACHA),
        (("aegis999", CHACHA), BOTH, CHACHA),  # a name we do not know is skipped
    ],
    ids=["both-aes", "order", "responder-without", "initiator-without", "neither", "unknown"],
)
def test_both_ends_choose_the_same_cipher_from_the_two_offers(i_offer, r_offer, chosen):
    i, r = pair(i_offer, r_offer)
    run(i, r)
    assert i.result.cipher == r.result.cipher == chosen
    assert aead.choose(i_offer, r_offer) == aead.choose(r_offer, i_offer) == chosen


def test_offers_without_a_common_cipher_are_refused():
    i, r = pair((AES,), (CHACHA,))
    with pytest.raises(HandshakeError) as e:
        r.receive(i.start(), NOW)
    assert e.value.reason == "no_common_cipher"
    # And by the initiator, if a responder answers with an offer it cannot use.
    i, r = pair((CHACHA,), ("aegis999",))
    with pytest.raises(HandshakeError) as e:
        i.receive(r.receive(i.start(), NOW), NOW)
    assert e.value.reason == "no_common_cipher"


def test_the_default_offer_is_what_this_host_can_run():
    assert aead.offer() == aead.available()
    assert CHACHA in aead.offer()
    assert (AES in aead.offer()) == aead.HARDWARE_AES
    assert aead.offer(allow_aes=False) == (CHACHA,)


def _rewrite(msg: bytes, path: tuple[str, ...], value) -> bytes:
    """``msg`` with one field replaced, re-encoded as a man in the middle would."""
    m = strictpack.unpack(msg)
    if len(path) == 2:  # a field of the reply's clear part
        inner = strictpack.unpack(m[path[0]])
        inner[path[1]] = value
        m[path[0]] = strictpack.pack(inner)
    else:
        m[path[0]] = value
    return strictpack.pack(m)


def test_stripping_aes_from_the_hello_breaks_the_handshake_instead_of_downgrading():
    i, r = pair(BOTH, BOTH)
    hello = _rewrite(i.start(), ("a",), [CHACHA])
    reply = r.receive(hello, NOW)  # the responder sees a peer without AES ...
    assert r._cipher == CHACHA
    with pytest.raises(HandshakeError) as e:  # ... but the initiator's transcript differs
        i.receive(reply, NOW)
    assert e.value.reason in ("handshake_tampered", "handshake_bad_signature")
    assert i.result is None and r.result is None


def test_stripping_aes_from_the_reply_breaks_the_handshake_instead_of_downgrading():
    i, r = pair(BOTH, BOTH)
    reply = _rewrite(r.receive(i.start(), NOW), ("h", "a"), [CHACHA])
    with pytest.raises(HandshakeError) as e:
        i.receive(reply, NOW)
    assert e.value.reason in ("handshake_tampered", "handshake_bad_signature")
    assert i.result is None


def test_an_untampered_rewrite_still_completes():
    # The tamper tests above must fail for the edit, not for the re-encoding.
    i, r = pair(BOTH, BOTH)
    hello = _rewrite(i.start(), ("a",), list(BOTH))
    reply = _rewrite(r.receive(hello, NOW), ("h", "a"), list(BOTH))
    finish = i.receive(reply, NOW)
    i.receive(r.receive(finish, NOW), NOW)
    assert i.result.cipher == r.result.cipher == AES


def test_the_session_keys_depend_on_the_offers():
    a, b = pair(BOTH, BOTH, seed=3), pair((CHACHA,), BOTH, seed=3)
    run(*a)
    run(*b)
    assert a[0].result.send_key != b[0].result.send_key


# --- the record layer under each cipher -------------------------------------------------


K1, K2 = os.urandom(32), os.urandom(32)
CIPHERS = [pytest.param(AES, marks=needs_aes), CHACHA]


@pytest.mark.parametrize("name", CIPHERS)
def test_records_round_trip(name):
    a = Session(K1, K2, cipher_name=name)
    b = Session(K2, K1, cipher_name=name)
    for size in (0, 1, 1000, 256 * 1024 + 3):
        msg = os.urandom(size)
        f = b.open(*a.seal(FrameKind.STREAM_DATA, memoryview(msg), stream=9))
        assert (f.kind, f.stream, bytes(f.payload)) == (FrameKind.STREAM_DATA, 9, msg)
    h, c = a.seal(FrameKind.MESSAGE, b"x" * 64)
    c = bytearray(c)
    c[3] ^= 1
    with pytest.raises(SessionError) as e:
        b.open(h, bytes(c))
    assert e.value.reason == "tampered_frame"


@needs_aes
def test_aes_records_are_what_pynacl_public_aes256gcm_makes_and_accepts():
    a, b = Session(K1, K2, cipher_name=AES), Session(K2, K1, cipher_name=AES)
    msg = os.urandom(5000)
    header, ct = a.seal(FrameKind.MESSAGE, msg)
    nonce = bytes(4) + header[4:12]  # the counter field
    assert sodium.crypto_aead_aes256gcm_decrypt(bytes(ct), header, nonce, K1) == msg
    assert b.open(header, ct).payload == msg
    header, _ = Session(K1, K2, cipher_name=AES).seal(FrameKind.MESSAGE, b"y")
    theirs = sodium.crypto_aead_aes256gcm_encrypt(b"y", header, bytes(12), K1)
    assert Session(K2, K1, cipher_name=AES).open(header, theirs).payload == b"y"


@needs_aes
def test_a_record_sealed_under_one_cipher_does_not_open_under_the_other():
    a = Session(K1, K2, cipher_name=AES)
    b = Session(K2, K1, cipher_name=CHACHA)
    with pytest.raises(SessionError) as e:
        b.open(*a.seal(FrameKind.MESSAGE, b"hello"))
    assert e.value.reason == "tampered_frame"


@pytest.mark.parametrize("name", CIPHERS)
def test_keys_roll_after_rekey_bytes_in_lock_step(name):
    a = Session(K1, K2, cipher_name=name, rekey_bytes=1000)
    b = Session(K2, K1, cipher_name=name, rekey_bytes=1000)
    stale = Session(K2, K1, cipher_name=name)  # never rolls within this test
    for _ in range(3):  # 900 bytes under the first key: no roll yet
        rec = a.seal(FrameKind.MESSAGE, bytes(300))
        assert b.open(*rec).payload == bytes(300)
        stale.open(*rec)
    rec = a.seal(FrameKind.MESSAGE, bytes(300))  # 1200: the key rolls after this one
    b.open(*rec)
    stale.open(*rec)
    rec = a.seal(FrameKind.MESSAGE, b"under the next key")
    assert b.open(*rec).payload == b"under the next key"
    with pytest.raises(SessionError):
        stale.open(*rec)


def test_a_cipher_this_host_cannot_run_is_refused():
    with pytest.raises(ValueError):
        Session(K1, K2, cipher_name="aegis999")


# --- real transports ----------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.done = asyncio.Event()
        self.messages: list[bytes] = []

    def on_message(self, link, data: bytes) -> None:
        self.messages.append(data)

    def on_stream(self, link, stream, total, meta):
        outer = self

        class _S:
            async def write(self, data: memoryview) -> None:
                outer.data += data

            async def finish(self) -> None:
                outer.done.set()

            def abort(self, reason: str) -> None:
                pass

        return _S()


@pytest.mark.parametrize(
    ("a_aes", "b_aes", "chosen"),
    [
        pytest.param(True, True, AES, marks=needs_aes, id="both-aes"),
        pytest.param(False, True, CHACHA, id="dialer-forced-off"),
        pytest.param(True, False, CHACHA, id="listener-forced-off"),
    ],
)
async def test_links_use_the_negotiated_cipher_and_carry_streams(a_aes, b_aes, chosen):
    ka, kb = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    sa, sb = Sink(), Sink()
    a = Transport(
        ka,
        None,
        TrustStore("t", allowlist={kb.public_key}),
        TransportConfig(aes_gcm=a_aes, stream_chunk_bytes=64 * 1024),
        sa,
        counters=Counter(),
    )
    b = Transport(
        kb,
        None,
        TrustStore("t", allowlist={ka.public_key}),
        TransportConfig(aes_gcm=b_aes, stream_chunk_bytes=64 * 1024),
        sb,
        counters=Counter(),
    )
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    try:
        link = await a.connect(b.listen_addr)
        await async_wait_for(lambda: a.node_id in b.links, 10, "the listener's side of the link")
        assert link.info()["cipher"] == b.links[a.node_id].info()["cipher"] == chosen
        payload = os.urandom(1_000_003)
        await link.send_stream(b"meta", len(payload), [payload])
        await asyncio.wait_for(sb.done.wait(), 20)
        assert bytes(sb.data) == payload
        await b.links[a.node_id].send(b"and back")
        await async_wait_for(lambda: sa.messages == [b"and back"], 10, "the reply")
    finally:
        await a.stop()
        await b.stop()
