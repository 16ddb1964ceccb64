"""Membership wire format: round trips, exact sizes, strict decoding, and a fuzz of
decode_message (random bytes and mutations of valid messages)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import DecodeError
from protocol.identity import MAX_CERT_BYTES
from protocol.membership.messages import (
    MAX_ADDR_CHARS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_SIG_BYTES,
    MAX_UPDATE_BYTES,
    MAX_UPDATES_PER_MESSAGE,
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    MembershipDecodeError,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    decode_message,
    encode_message,
    message_size,
    signer_of,
)

UPDATES = (
    Alive("12D3KooWabc", "127.0.0.1:7000", 3, b"\x01" * 64),
    Suspect("12D3KooWabc", 3, "12D3KooWdef", b"\x02" * 64),
    Dead("12D3KooWabc", 3, "12D3KooWdef", b"\x03" * 64),
    Left("12D3KooWxyz", 9, b"\x04" * 64),
    Alive("n1", "[::1]:65535", 0),
)

MESSAGES = [
    Ping(1, "n2"),
    Ping(2**32 - 1, "n2", UPDATES),
    PingReq(7, "n3", "10.0.0.3:7946", True, UPDATES[:2]),
    PingReq(8, "n3", "host.example:1", False),
    Ack(5),
    Ack(6, UPDATES),
    Nack(9),
    Gossip(UPDATES),
    Gossip(()),
    PushPull(True, False, False, UPDATES),
    PushPull(False, True, True, ()),
]


def _plain(update: object) -> list[object]:
    """The expected msgpack structure of an update, written out by hand."""
    if isinstance(update, Alive):
        return [1, update.node_id, update.addr, update.incarnation, update.sig, update.cert]
    if isinstance(update, Suspect):
        return [2, update.node_id, update.incarnation, update.from_id, update.sig]
    if isinstance(update, Dead):
        return [3, update.node_id, update.incarnation, update.from_id, update.sig]
    assert isinstance(update, Left)
    return [4, update.node_id, update.incarnation, update.sig]


def _expected_structure(msg: object) -> list[object]:
    if isinstance(msg, Ping):
        return [1, 1, msg.seq, msg.target_id, [_plain(u) for u in msg.updates]]
    if isinstance(msg, PingReq):
        return [
            1,
            2,
            msg.seq,
            msg.target_id,
            msg.target_addr,
            msg.nack,
            [_plain(u) for u in msg.updates],
        ]
    if isinstance(msg, Ack):
        return [1, 3, msg.seq, [_plain(u) for u in msg.updates]]
    if isinstance(msg, Nack):
        return [1, 4, msg.seq]
    if isinstance(msg, Gossip):
        return [1, 5, [_plain(u) for u in msg.updates]]
    assert isinstance(msg, PushPull)
    return [1, 6, msg.join, msg.reply, msg.more, [_plain(u) for u in msg.updates]]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_and_layout(msg: object) -> None:
    data = encode_message(msg)  # type: ignore[arg-type]
    assert decode_message(data) == msg
    # The concatenated encoding is ordinary msgpack with the documented layout.
    assert msgpack.unpackb(data, raw=False) == _expected_structure(msg)
    assert data == msgpack.packb(_expected_structure(msg), use_bin_type=True)
    assert message_size(msg) == len(data)  # type: ignore[arg-type]


def test_many_updates_use_wide_array_headers() -> None:
    ups = tuple(Alive(f"n{i}", f"127.0.0.1:{1000 + i}", i) for i in range(70_000 // 20))
    for msg in (Gossip(ups), PushPull(False, False, False, ups)):
        data = encode_message(msg)
        assert data == msgpack.packb(_expected_structure(msg), use_bin_type=True)
        assert decode_message(data) == msg


def test_max_update_bytes_is_an_upper_bound() -> None:
    big = Alive(
        "a" * MAX_ID_CHARS,
        "h" * (MAX_ADDR_CHARS - 6) + ":65535",
        2**63 - 1,
        b"s" * MAX_SIG_BYTES,
        b"c" * MAX_CERT_BYTES,
    )
    assert len(big.encoded()) <= MAX_UPDATE_BYTES
    assert decode_message(encode_message(Gossip((big,)))) == Gossip((big,))


def test_signer_of() -> None:
    assert [signer_of(u) for u in UPDATES] == [
        "12D3KooWabc",
        "12D3KooWdef",
        "12D3KooWdef",
        "12D3KooWxyz",
        "n1",
    ]


def test_error_is_a_decode_error_with_reason() -> None:
    with pytest.raises(MembershipDecodeError) as ei:
        decode_message(b"\xc1")
    assert isinstance(ei.value, DecodeError)
    assert ei.value.reason == "malformed"


def _raw(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


ALIVE_RAW = [1, "n1", "127.0.0.1:1", 0, b"", b""]

BAD = {
    "empty": (b"", "malformed"),
    "not an array": (_raw({"a": 1}), "malformed"),
    "short array": (_raw([1]), "malformed"),
    "bad version": (_raw([2, 5, []]), "bad_version"),
    "version is bool": (_raw([True, 5, []]), "bad_version"),
    "unknown kind": (_raw([1, 99, []]), "unknown_kind"),
    "kind is a string": (_raw([1, "5", []]), "unknown_kind"),
    "arity": (_raw([1, 5, [], []]), "malformed"),
    "seq negative": (_raw([1, 3, -1, []]), "bad_field"),
    "seq is bool": (_raw([1, 3, True, []]), "bad_field"),
    "seq is float": (_raw([1, 3, 1.0, []]), "bad_field"),
    "seq too big": (_raw([1, 3, 2**64 - 1, []]), "bad_field"),
    "updates not array": (_raw([1, 5, "x"]), "bad_field"),
    "update not array": (_raw([1, 5, [7]]), "bad_update"),
    "update empty": (_raw([1, 5, [[]]]), "bad_update"),
    "unknown update": (_raw([1, 5, [[9, "n1", 0, b""]]]), "unknown_update"),
    "update kind bool": (_raw([1, 5, [[True, "n1", "127.0.0.1:1", 0, b""]]]), "unknown_update"),
    "alive arity": (_raw([1, 5, [[1, "n1", "127.0.0.1:1", 0]]]), "bad_update"),
    "left arity": (_raw([1, 5, [[4, "n1", 0, b"", b""]]]), "bad_update"),
    "empty id": (_raw([1, 5, [[1, "", "127.0.0.1:1", 0, b"", b""]]]), "bad_field"),
    "long id": (
        _raw([1, 5, [[1, "x" * (MAX_ID_CHARS + 1), "127.0.0.1:1", 0, b"", b""]]]),
        "bad_field",
    ),
    "space in id": (_raw([1, 5, [[1, "n 1", "127.0.0.1:1", 0, b"", b""]]]), "bad_field"),
    "control char": (_raw([1, 5, [[1, "n\x001", "127.0.0.1:1", 0, b"", b""]]]), "bad_field"),
    "non-ascii id": (_raw([1, 5, [[1, "nä", "127.0.0.1:1", 0, b"", b""]]]), "bad_field"),
    "id is bytes": (_raw([1, 5, [[1, b"n1", "127.0.0.1:1", 0, b"", b""]]]), "bad_field"),
    "addr no port": (_raw([1, 5, [[1, "n1", "127.0.0.1", 0, b"", b""]]]), "bad_field"),
    "addr port big": (_raw([1, 5, [[1, "n1", "127.0.0.1:65536", 0, b"", b""]]]), "bad_field"),
    "addr port text": (_raw([1, 5, [[1, "n1", "h:http", 0, b"", b""]]]), "bad_field"),
    "addr no host": (_raw([1, 5, [[1, "n1", ":80", 0, b"", b""]]]), "bad_field"),
    "sig is str": (_raw([1, 5, [[1, "n1", "127.0.0.1:1", 0, "sig", b""]]]), "bad_field"),
    "sig too long": (
        _raw([1, 5, [[1, "n1", "127.0.0.1:1", 0, b"s" * (MAX_SIG_BYTES + 1), b""]]]),
        "bad_field",
    ),
    "cert is str": (_raw([1, 5, [[1, "n1", "127.0.0.1:1", 0, b"", "cert"]]]), "bad_field"),
    "cert too long": (
        _raw([1, 5, [[1, "n1", "127.0.0.1:1", 0, b"", b"c" * (MAX_CERT_BYTES + 1)]]]),
        "oversized",
    ),
    "incarnation negative": (_raw([1, 5, [[2, "n1", -3, "n2", b""]]]), "bad_field"),
    "nack flag int": (_raw([1, 2, 1, "n3", "127.0.0.1:3", 1, []]), "bad_field"),
    "join flag int": (_raw([1, 6, 0, False, False, []]), "bad_field"),
    "trailing bytes": (_raw([1, 4, 1]) + b"\x00", "malformed"),
    "truncated": (_raw([1, 5, [ALIVE_RAW]])[:-3], "malformed"),
    "ext type": (b"\x93\x01\x05\xd4\x01\x00", "malformed"),
    "map in update": (_raw([1, 5, [{"k": 1}]]), "bad_update"),
    "too deep": (_raw([1, 5, [[[[1]]]]]), "too_deep"),
    "too many updates": (_raw([1, 5, [ALIVE_RAW] * (MAX_UPDATES_PER_MESSAGE + 1)]), "oversized"),
    "oversized": (b"\x00" * (MAX_MESSAGE_BYTES + 1), "oversized"),
    "invalid utf-8": (
        b"\x93\x01\x05\x91\x96\x01\xa2\xff\xfe\xab127.0.0.1:1\x00\xc4\x00\xc4\x00",
        "malformed",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_strict_decoding_rejects_with_reason(case: str) -> None:
    data, reason = BAD[case]
    with pytest.raises(MembershipDecodeError) as ei:
        decode_message(data)
    assert ei.value.reason == reason, ei.value


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(MembershipDecodeError):
        decode_message("not bytes")  # type: ignore[arg-type]


def test_encode_refuses_foreign_objects() -> None:
    with pytest.raises(TypeError):
        encode_message(object())  # type: ignore[arg-type]


# --- fuzz ----------------------------------------------------------------------------------

_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_addrs = st.builds(lambda h, p: f"{h}:{p}", _ids, st.integers(0, 65535))
_incs = st.integers(0, 2**63 - 1)
_sigs = st.binary(max_size=MAX_SIG_BYTES)
_updates = st.one_of(
    st.builds(Alive, _ids, _addrs, _incs, _sigs, st.binary(max_size=MAX_CERT_BYTES)),
    st.builds(Suspect, _ids, _incs, _ids, _sigs),
    st.builds(Dead, _ids, _incs, _ids, _sigs),
    st.builds(Left, _ids, _incs, _sigs),
)
_update_lists = st.lists(_updates, max_size=6).map(tuple)
_seqs = st.integers(0, 2**63 - 1)
_messages = st.one_of(
    st.builds(Ping, _seqs, _ids, _update_lists),
    st.builds(PingReq, _seqs, _ids, _addrs, st.booleans(), _update_lists),
    st.builds(Ack, _seqs, _update_lists),
    st.builds(Nack, _seqs),
    st.builds(Gossip, _update_lists),
    st.builds(PushPull, st.booleans(), st.booleans(), st.booleans(), _update_lists),
)


@settings(max_examples=100, deadline=None)
@given(_messages)
def test_fuzz_round_trip(msg: object) -> None:
    assert decode_message(encode_message(msg)) == msg  # type: ignore[arg-type]


def _decode_or_reject(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except MembershipDecodeError:
        return
    # Whatever decodes must be a well-formed message that re-encodes and decodes equal.
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_reject(data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_message(draw(_messages)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_fuzz_mutations_of_valid_messages(data: bytes) -> None:
    _decode_or_reject(data)


@pytest.mark.long
@settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutated(), st.binary(max_size=4096)))
def test_fuzz_deep(data: bytes) -> None:
    _decode_or_reject(data)
