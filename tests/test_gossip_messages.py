"""Gossip wire forms: strict decoding, content ids, and fuzzing of every decoder."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.gossip.messages import (
    ID_SIZE,
    Announcement,
    Control,
    Prune,
    Publish,
    RefuseCode,
    decode,
    decode_control,
    encode,
    encode_control,
    message_id,
)
from tests.protocol_helpers import key

LIMITS = {"max_payload": 1 << 30, "max_meta": 4096, "inline_max": 16 * 1024}
MID = bytes(range(ID_SIZE))


def full_control() -> Control:
    return Control(
        subs=[("a", True), ("b", False)],
        graft=["a"],
        prune=[Prune("a", 60, (("12D3KooWx", "127.0.0.1:1"),))],
        ihave=[("a", [MID, bytes(ID_SIZE)])],
        iwant=[MID],
        pull=[(MID, 3)],
        refuse=[(MID, RefuseCode.BUSY)],
        cancel=[MID],
    )


def test_control_round_trips() -> None:
    c = full_control()
    assert Control.from_obj(c.to_obj()) == c
    assert decode(encode(c)) == c
    # Inside an envelope, as the daemon sends it: bytes the envelope does not walk.
    env = wire.decode(wire.seal(key("a"), wire.MsgType.GOSSIP, 1, 0, encode_control(c)))
    assert decode_control(env.body) == c
    assert Control().empty() and not c.empty()
    assert c.parts() == [c]  # a batch that fits travels whole


def test_a_batch_too_big_for_one_message_is_split_into_parts_that_decode() -> None:
    ids = [i.to_bytes(ID_SIZE, "big") for i in range(5000)]
    peers = tuple((f"node{i}", f"10.0.0.{i}:1") for i in range(16))
    big = Control(
        subs=[(f"t{i}", True) for i in range(300)],
        prune=[Prune(f"t{i}", 60, peers) for i in range(300)],
        ihave=[("a", ids[:3000]), ("b", ids[3000:])],
        iwant=ids[:2500],
        cancel=ids[:300],
    )
    with pytest.raises(DecodeError):
        decode_control(encode_control(big))  # whole, it would be refused (and charged)
    parts = big.parts()
    assert len(parts) > 1
    for p in parts:
        assert decode_control(encode_control(p)) == p
    merged = Control()
    for p in parts:
        merged.subs += p.subs
        merged.prune += p.prune
        merged.ihave += p.ihave
        merged.iwant += p.iwant
        merged.cancel += p.cancel
    # Nothing lost, nothing reordered; IHAVE entries may be cut into pieces.
    assert (merged.subs, merged.prune, merged.iwant, merged.cancel) == (
        big.subs,
        big.prune,
        big.iwant,
        big.cancel,
    )
    assert [i for _, piece in merged.ihave for i in piece] == ids
    assert {t for t, _ in merged.ihave} == {"a", "b"}


def test_decode_control_refuses_what_is_not_a_control() -> None:
    for data, reason in [
        ({"w": [MID]}, "bad_field"),  # the map itself, not its bytes
        (strictpack.pack([MID] * 10), "bad_field"),
        # Three lists as long as a list may be: more items than any control needs.
        (strictpack.pack({k: [[]] * 2048 for k in "wxq"}), "oversized"),
        (b"\xc1", "malformed"),
    ]:
        with pytest.raises(DecodeError) as e:
            decode_control(data)  # type: ignore[arg-type]
        assert e.value.reason == reason, data


@pytest.mark.parametrize(
    "obj,reason",
    [
        ([], "bad_field"),
        ({"z": []}, "bad_field"),
        ({"s": [["a", 1]]}, "bad_field"),  # flag must be a bool
        ({"s": [["", True]]}, "bad_field"),
        ({"s": [["x" * 201, True]]}, "bad_field"),
        ({"g": ["a"] * 257}, "oversized"),
        ({"p": [["a", -1, []]]}, "bad_field"),
        ({"p": [["a", True, []]]}, "bad_field"),  # a bool is not a backoff
        ({"p": [["a", 1, [["n", "a"]] * 17]]}, "bad_field"),
        ({"h": [["a", [b"short"]]]}, "bad_field"),
        ({"h": [["a", [MID] * 1025], ["b", [MID] * 1024]]}, "oversized"),
        ({"w": [MID] * 2049}, "oversized"),
        ({"q": [[MID, -1]]}, "bad_field"),
        ({"r": [[MID, 7]]}, "bad_field"),
        ({"x": [b"\0" * 19]}, "bad_field"),
    ],
)
def test_control_rejects(obj: object, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        Control.from_obj(obj)
    assert e.value.reason == reason


def test_announcement_round_trip_and_rejects() -> None:
    a = Announcement("grad", 5, bytes(32), 1024, b"meta", b"hello")
    assert Announcement.from_obj(a.to_obj(), **LIMITS) == a
    big = Announcement("grad", 1 << 20, bytes(32), 1 << 18)
    assert Announcement.from_obj(big.to_obj(), **LIMITS) == big
    bad = [
        ({**a.to_obj(), "extra": 1}, "bad_field"),
        ({**big.to_obj(), "n": (1 << 30) + 1}, "oversized"),
        ({**big.to_obj(), "n": -1}, "oversized"),
        ({**big.to_obj(), "d": bytes(31)}, "bad_field"),
        ({**big.to_obj(), "c": 512}, "bad_field"),
        ({**big.to_obj(), "m": bytes(4097)}, "oversized"),
        ({**a.to_obj(), "x": b"hell"}, "bad_field"),  # inline length != size
        ({**big.to_obj(), "x": bytes(1 << 20)}, "oversized"),  # too big to inline
        ({**a.to_obj(), "n": True}, "bad_field"),
    ]
    for obj, reason in bad:
        with pytest.raises(DecodeError) as e:
            Announcement.from_obj(obj, **LIMITS)
        assert e.value.reason == reason, obj


def test_message_id_binds_content_not_signature() -> None:
    k = key("origin")
    ann = Announcement("grad", 0, bytes(32), 1024).to_obj()
    e1 = wire.seal(k, wire.MsgType.GOSSIP_PUBLISH, 1, 0, ann)
    e2 = wire.seal(k, wire.MsgType.GOSSIP_PUBLISH, 2, 0, ann)
    forged = e1[:-1] + bytes([e1[-1] ^ 1])
    assert len(message_id(e1)) == ID_SIZE
    assert message_id(e1) == message_id(forged)  # same signed bytes: same id
    assert message_id(e1) != message_id(e2)
    with pytest.raises(DecodeError):
        message_id(b"x" * 64)


def test_publish_frame_keeps_the_exact_bytes() -> None:
    e = wire.seal(key("o"), wire.MsgType.GOSSIP_PUBLISH, 1, 0, {"t": "x"})
    assert decode(encode(Publish(e))) == Publish(e)
    with pytest.raises(DecodeError):
        decode(b"")
    with pytest.raises(DecodeError):
        decode(b"Z123")


# --- fuzzing: every decoder raises DecodeError and nothing else ----------------------------
# A few hundred examples per run keeps the suite fast; the long run goes deeper.
FUZZ_EXAMPLES = 300

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=40),
    st.text(max_size=12),
)
_objs = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.sampled_from(list("sgphwqrxtndcmz")), inner, max_size=6),
    ),
    max_leaves=30,
)


def _control(obj: object) -> None:
    try:
        c = Control.from_obj(obj)
    except DecodeError:
        return
    assert Control.from_obj(c.to_obj()) == c


def _announcement(obj: object) -> None:
    try:
        a = Announcement.from_obj(obj, **LIMITS)
    except DecodeError:
        return
    assert Announcement.from_obj(a.to_obj(), **LIMITS) == a


def _bytes(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


_frames = st.one_of(st.binary(max_size=300), _objs.map(lambda o: b"C" + strictpack.pack(o)))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(_objs, _frames)
def test_fuzz_decoders(obj: object, frame: bytes) -> None:
    _control(obj)
    _announcement(obj)
    _bytes(frame)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.data())
def test_fuzz_mutated_control_bytes(data: st.DataObject) -> None:
    raw = bytearray(encode(full_control()))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _bytes(bytes(raw))


@pytest.mark.long
@settings(max_examples=5_000, deadline=None)
@given(_objs, _frames)
def test_fuzz_decoders_deep(obj: object, frame: bytes) -> None:
    _control(obj)
    _announcement(obj)
    _bytes(frame)
