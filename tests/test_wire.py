from collections import Counter

import msgpack
import pytest

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.identity import SIGNATURE_SIZE
from protocol.wire import DOMAIN_ENVELOPE, MsgType
from tests.protocol_helpers import key

K = key("alice")


def resign(raw: bytes) -> bytes:
    return raw + K.sign(DOMAIN_ENVELOPE, raw)


def test_seal_decode_round_trip():
    # GOSSIP_PUBLISH: the one type whose body is structure at envelope level.
    data = wire.seal(K, MsgType.GOSSIP_PUBLISH, 42, 1234, {"topic": "g", "ids": [b"x" * 32]})
    env = wire.decode(data)
    assert (env.version, env.type, env.origin, env.seq, env.ts_ms) == (
        1,
        MsgType.GOSSIP_PUBLISH,
        K.public_key,
        42,
        1234,
    )
    assert env.body == {"topic": "g", "ids": [b"x" * 32]}
    assert env.wire == data


def test_signature_covers_exact_bytes_every_byte_matters():
    data = wire.seal(K, MsgType.MEMBERSHIP, 1, 1, b"body")
    for i in range(len(data) - SIGNATURE_SIZE):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(DecodeError):
            wire.decode(bytes(bad))


def test_signature_domain_is_separated():
    raw = strictpack.pack([1, int(MsgType.GOSSIP), K.public_key, 1, 1, None])
    # A signature over the same bytes made for another purpose does not verify.
    with pytest.raises(DecodeError) as e:
        wire.decode(raw + K.sign(b"spirt/v1/cert\0", raw))
    assert e.value.reason == "bad_signature"


def test_origin_must_match_signer():
    raw = strictpack.pack([1, int(MsgType.GOSSIP), key("bob").public_key, 1, 1, None])
    with pytest.raises(DecodeError) as e:
        wire.decode(resign(raw))
    assert e.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([2, 32, None, 1, 1, None], "bad_version"),
        ([1, 999, None, 1, 1, None], "unknown_type"),
        ([1, 32, b"short", 1, 1, None], "bad_field"),
        ([1, 32, None, -1, 1, None], "bad_field"),
        ([1, 32, None, True, 1, None], "bad_field"),
        (["1", 32, None, 1, 1, None], "bad_field"),
        ([1, 32, None, 1, 1], "malformed"),
    ],
)
def test_strict_field_checks(fields, reason):
    fields = [K.public_key if f is None and i == 2 else f for i, f in enumerate(fields)]
    with pytest.raises(DecodeError) as e:
        wire.decode(resign(msgpack.packb(fields, use_bin_type=True)))
    assert e.value.reason == reason


def test_limits_checked_before_allocation():
    # An array header claiming 2^32-1 elements in a 70-byte message: refused by
    # the fixed-position peek, before the signature or any scan.
    raw = b"\xdd\xff\xff\xff\xff" + b"\x00" * 5
    with pytest.raises(DecodeError) as e:
        wire.decode(raw + bytes(SIGNATURE_SIZE))
    assert e.value.reason == "malformed"
    # The same claim inside a signed body is caught by the structural scan.
    head = strictpack.pack([1, int(MsgType.GOSSIP), K.public_key, 1, 1])[1:]
    raw = b"\x96" + head + b"\xdd\xff\xff\xff\xff" + b"\x00" * 5
    with pytest.raises(DecodeError) as e:
        wire.decode(resign(raw))
    assert e.value.reason == "oversized"
    with pytest.raises(DecodeError) as e:
        wire.decode(bytes(wire.MAX_ENVELOPE + 1))
    assert e.value.reason == "oversized"


def test_depth_limit():
    body: object = 1
    for _ in range(20):
        body = [body]
    raw = strictpack.pack([1, int(MsgType.GOSSIP), K.public_key, 1, 1, body])
    with pytest.raises(DecodeError) as e:
        wire.decode(resign(raw))
    assert e.value.reason == "too_deep"


def test_ext_types_refused():
    raw = msgpack.packb([1, 32, K.public_key, 1, 1, msgpack.ExtType(5, b"x")], use_bin_type=True)
    with pytest.raises(DecodeError):
        wire.decode(resign(raw))


def test_rejections_are_counted_by_reason():
    c: Counter[str] = Counter()
    assert wire.decode_counted(b"\x00" * 100, c) is None
    good = wire.seal(K, MsgType.GOSSIP, 1, 1, None)
    assert wire.decode_counted(good, c) is not None
    bad = bytearray(good)
    bad[-1] ^= 1
    assert wire.decode_counted(bytes(bad), c) is None
    assert c["wire.bad_signature"] == 1
    assert sum(c.values()) == 2
