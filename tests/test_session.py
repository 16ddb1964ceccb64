import os

import pytest

from protocol.errors import SessionError
from protocol.session import HEADER_SIZE, TAG_SIZE, FrameKind, Session

K1, K2 = os.urandom(32), os.urandom(32)


def pair(**kw) -> tuple[Session, Session]:
    return Session(K1, K2, **kw), Session(K2, K1, **kw)


def test_round_trip_all_kinds():
    a, b = pair()
    for kind in FrameKind:
        f = b.open(*a.seal(kind, b"payload-" + bytes([kind]), stream=kind * 3))
        assert (f.kind, f.stream, f.payload) == (kind, kind * 3, b"payload-" + bytes([kind]))


def reason(fn) -> str:
    with pytest.raises(SessionError) as e:
        fn()
    return e.value.reason


def test_tampered_ciphertext_header_or_tag():
    for pos in ["ct", "kind", "stream", "tag"]:
        a, b = pair()
        h, c = a.seal(FrameKind.MESSAGE, b"x" * 64, stream=0)
        h, c = bytearray(h), bytearray(c)
        if pos == "ct":
            c[5] ^= 1
        elif pos == "kind":
            h[12] ^= 1
        elif pos == "stream":
            h[13] ^= 1
        else:
            c[-1] ^= 1
        assert reason(lambda b=b, h=h, c=c: b.open(bytes(h), bytes(c))) == "tampered_frame"


def test_replayed_frame():
    a, b = pair()
    rec = a.seal(FrameKind.MESSAGE, b"once")
    b.open(*rec)
    assert reason(lambda: b.open(*rec)) == "replayed_frame"


def test_reordered_frame():
    a, b = pair()
    a.seal(FrameKind.MESSAGE, b"first")
    second = a.seal(FrameKind.MESSAGE, b"second")
    assert reason(lambda: b.open(*second)) == "reordered_frame"


def test_oversized_frame_refused_from_header_alone():
    a, b = pair(max_payload=1024)
    h, _ = Session(K1, K2).seal(FrameKind.MESSAGE, b"y" * 5000)
    assert reason(lambda: b.check_header(h)) == "oversized_frame"
    # Streaming decode refuses on the header, before buffering the body.
    assert reason(lambda: b.receive_data(h)) == "oversized_frame"
    with pytest.raises(ValueError):
        a.seal(FrameKind.MESSAGE, b"z" * 2000)


def test_wrong_key_is_tampering():
    a = Session(K1, K2)
    b = Session(K2, os.urandom(32))
    assert reason(lambda: b.open(*a.seal(FrameKind.PING, b""))) == "tampered_frame"


def test_rekey_keeps_both_sides_in_step_and_changes_keys():
    a, b = pair(rekey_every=4)
    seen = set()
    for _ in range(20):
        h, c = a.seal(FrameKind.MESSAGE, b"same")
        seen.add(bytes(c))
        assert b.open(h, c).payload == b"same"
    # Same plaintext, different counters and keys: never the same ciphertext.
    assert len(seen) == 20
    # A receiver that did not roll its key cannot read past the boundary.
    a2, b2 = pair(rekey_every=4)
    stale = Session(K2, K1, rekey_every=10**9)
    for _ in range(4):
        rec = a2.seal(FrameKind.MESSAGE, b"m")
        b2.open(*rec)
        stale.open(*rec)
    rec = a2.seal(FrameKind.MESSAGE, b"m")
    assert b2.open(*rec).payload == b"m"
    assert reason(lambda: stale.open(*rec)) == "tampered_frame"


def test_receive_data_in_arbitrary_pieces():
    a, b = pair()
    stream = b"".join(
        h + c for h, c in (a.seal(FrameKind.MESSAGE, bytes([i]) * i) for i in range(50))
    )
    frames = []
    for i in range(0, len(stream), 7):
        frames += b.receive_data(stream[i : i + 7])
    assert [f.payload for f in frames] == [bytes([i]) * i for i in range(50)]


def test_header_and_tag_sizes():
    a, _ = pair()
    h, c = a.seal(FrameKind.MESSAGE, b"abc")
    assert len(h) == HEADER_SIZE == 17
    assert len(c) == 3 + TAG_SIZE


def test_records_interoperate_with_pynacl_public_aead():
    """Session calls libsodium through PyNaCl's cffi binding; its records must be
    exactly what PyNaCl's public ChaCha20-Poly1305-IETF functions make and accept."""
    import nacl.bindings as sodium

    a, b = pair()
    for size in (0, 1, 1000, 256 * 1024 + 3):
        msg = os.urandom(size)
        header, ct = a.seal(FrameKind.STREAM_DATA, memoryview(msg), stream=7)
        nonce = bytes(4) + header[4:12]  # the counter field
        assert sodium.crypto_aead_chacha20poly1305_ietf_decrypt(bytes(ct), header, nonce, K1) == msg
        assert b.open(header, ct).payload == msg
    c, d = pair()
    header, _ = c.seal(FrameKind.MESSAGE, b"x")
    theirs = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(b"x", header, bytes(12), K1)
    assert d.open(header, theirs).payload == b"x"
    with pytest.raises(TypeError):  # views handed out are read-only
        memoryview(a.seal(FrameKind.MESSAGE, b"y")[1])[0] = 0
