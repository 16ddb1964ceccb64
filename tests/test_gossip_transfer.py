"""Body digests, the chunk table and verified reception (protocol.gossip.transfer)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.gossip.transfer import (
    BodyReceiver,
    ByteBudget,
    TableBuilder,
    TransferError,
    body_digest,
    chunk_count,
    digest_of,
    stream_pieces,
    stream_size,
)

CS = 1024


def split(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 3 * CS)
        out.append(data[i : i + n])
        i += n
    return out


def receive(rx: BodyReceiver, stream: bytes, rng: random.Random) -> bytearray:
    body = bytearray(rx.size)
    for piece in split(stream, rng):
        rx.feed(piece, writer(body))
    return body


def writer(body: bytearray):
    def write(off: int, seg: memoryview) -> None:
        body[off : off + len(seg)] = seg

    return write


def test_digest_is_a_hash_of_the_chunk_hashes() -> None:
    data = random.Random(1).randbytes(3 * CS + 17)
    table, digest = digest_of(data, CS)
    chunks = [data[i : i + CS] for i in range(0, len(data), CS)]
    assert table == b"".join(hashlib.sha256(c).digest() for c in chunks)
    assert digest == body_digest(len(data), CS, table)
    # Size and chunk size are bound into the digest.
    assert digest != body_digest(len(data) + 1, CS, table)
    assert digest != body_digest(len(data), 2 * CS, table)


def test_table_builder_is_independent_of_how_the_body_is_cut() -> None:
    data = random.Random(2).randbytes(10 * CS + 5)
    for seed in range(5):
        b = TableBuilder(CS)
        for piece in split(data, random.Random(seed)):
            b.update(piece)
        assert b.finish() == digest_of(data, CS)


def test_receiver_accepts_a_body_cut_anywhere() -> None:
    data = random.Random(3).randbytes(7 * CS + 100)
    table, digest = digest_of(data, CS)
    rx = BodyReceiver(len(data), CS, digest)
    stream = b"".join(stream_pieces(table, data, CS, 0, 4096))
    assert len(stream) == stream_size(len(data), CS, 0) == rx.stream_total
    body = receive(rx, stream, random.Random(4))
    assert rx.done and rx.verified == len(data)
    assert bytes(body) == data
    assert rx.table == table


def test_bad_chunk_is_caught_within_that_chunk_and_verified_stops_before_it() -> None:
    data = random.Random(5).randbytes(6 * CS)
    table, digest = digest_of(data, CS)
    bad = bytearray(data)
    bad[3 * CS + 10] ^= 1
    rx = BodyReceiver(len(data), CS, digest)
    with pytest.raises(TransferError) as e:
        receive(rx, table + bytes(bad), random.Random(6))
    assert e.value.reason == "bad_chunk"
    assert rx.verified == 3 * CS
    assert not rx.done


def test_a_table_that_does_not_match_the_digest_releases_no_body_bytes() -> None:
    data = random.Random(7).randbytes(3 * CS)
    table, digest = digest_of(data, CS)
    forged = bytearray(table)
    forged[0] ^= 1
    rx = BodyReceiver(len(data), CS, digest)
    with pytest.raises(TransferError) as e:
        rx.feed(bytes(forged) + data, writer(bytearray(len(data))))
    assert e.value.reason == "bad_table"
    assert rx.verified == 0


def test_resume_from_a_chunk() -> None:
    data = random.Random(8).randbytes(5 * CS + 3)
    table, digest = digest_of(data, CS)
    rx = BodyReceiver(len(data), CS, digest, first_chunk=2)
    stream = b"".join(stream_pieces(table, data, CS, 2, 1000))
    assert len(stream) == stream_size(len(data), CS, 2) == len(table) + len(data) - 2 * CS
    body = bytearray(len(data))
    body[: 2 * CS] = data[: 2 * CS]  # what an earlier source delivered
    offsets: list[int] = []

    def write(off: int, seg: memoryview) -> None:
        offsets.append(off)
        body[off : off + len(seg)] = seg

    rx.feed(stream, write)
    assert min(offsets) == 2 * CS
    assert rx.done and bytes(body) == data


def test_overrun_and_bounds() -> None:
    data = b"x" * (2 * CS)
    table, digest = digest_of(data, CS)
    rx = BodyReceiver(len(data), CS, digest)
    with pytest.raises(TransferError) as e:
        rx.feed(table + data + b"!", writer(bytearray(len(data))))
    assert e.value.reason == "overrun"
    with pytest.raises(ValueError):
        BodyReceiver(len(data), CS, digest, first_chunk=3)
    with pytest.raises(ValueError):
        stream_size(len(data), CS, 3)


def test_empty_body() -> None:
    table, digest = digest_of(b"", CS)
    assert table == b"" and chunk_count(0, CS) == 0
    rx = BodyReceiver(0, CS, digest)
    rx.feed(b"", writer(bytearray()))
    assert rx.done


def test_byte_budget() -> None:
    b = ByteBudget(100)
    assert b.reserve(60) and not b.reserve(41) and b.reserve(40)
    assert b.used == 100
    b.release(70)
    assert b.used == 30 and not b.reserve(-1)


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(0, 9 * CS),
    first=st.integers(0, 9),
    flip=st.one_of(st.none(), st.integers(0, 9 * CS + 9 * 32)),
    seed=st.integers(0, 1000),
)
def test_receiver_property(size: int, first: int, flip: int | None, seed: int) -> None:
    """Whatever the cut and wherever a bit flips, the receiver either reproduces the
    body exactly or raises, and never vouches for a byte it has not checked."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    table, digest = digest_of(data, CS)
    first = min(first, chunk_count(size, CS))
    stream = bytearray(b"".join(stream_pieces(table, data, CS, first, 777)))
    if flip is not None and stream:
        stream[flip % len(stream)] ^= 0x80
    rx = BodyReceiver(size, CS, digest, first)
    body = bytearray(data[: first * CS]) + bytearray(size - min(size, first * CS))
    try:
        for piece in split(bytes(stream), rng):
            rx.feed(piece, writer(body))
    except TransferError:
        assert flip is not None
        assert bytes(body[: rx.verified]) == data[: rx.verified]
        return
    assert rx.done
    assert bytes(body) == data


# --- the chunk table is bounded and verified as it arrives (SECURITY.md) ----------------------


def test_an_announcement_cannot_imply_a_table_past_the_bound() -> None:
    from protocol.errors import DecodeError
    from protocol.gossip.messages import MAX_CHUNKS, Announcement

    def ann(size: int, chunk: int) -> Announcement:
        obj = Announcement("t", size, bytes(32), chunk).to_obj()
        return Announcement.from_obj(obj, max_payload=1 << 30, max_meta=0, inline_max=0)

    # The worst the old decoder allowed: 1 GiB in 1 KiB chunks, a 32 MiB table.
    with pytest.raises(DecodeError) as e:
        ann(1 << 30, 1024)
    assert e.value.reason == "oversized"
    assert ann(MAX_CHUNKS * 1024, 1024).size == MAX_CHUNKS * 1024  # 1 MiB of table
    assert ann(1 << 30, 256 * 1024).chunk_size == 256 * 1024  # the default chunk size
    with pytest.raises(ValueError):
        BodyReceiver(MAX_CHUNKS * CS + 1, CS, bytes(32))


def test_unverified_table_held_never_exceeds_what_the_size_implies() -> None:
    data = random.Random(9).randbytes(40 * CS)
    table, digest = digest_of(data, CS)
    rx = BodyReceiver(len(data), CS, digest)
    held = []
    stream = table + data
    for off in range(0, len(stream), 500):
        rx.feed(stream[off : off + 500], writer(bytearray(len(data))))
        held.append(rx.buffered)
    assert max(held) <= len(table) and held[-1] == 0
    assert rx.done and rx.table == table


def test_a_resumed_pull_checks_the_table_in_place_against_the_verified_one() -> None:
    data = random.Random(10).randbytes(20 * CS)
    table, digest = digest_of(data, CS)
    # The honest copy passes without being held...
    rx = BodyReceiver(len(data), CS, digest, 5, known_table=table)
    stream = b"".join(stream_pieces(table, data, CS, 5, 100))
    body = bytearray(data[: 5 * CS]) + bytearray(15 * CS)
    for off in range(0, len(stream), 100):
        rx.feed(stream[off : off + 100], writer(body))
        assert rx.buffered == 0
    assert rx.done and bytes(body) == data
    # ...and a lying source is caught at its first wrong piece, not at the end.
    forged = bytearray(table)
    forged[40] ^= 1
    rx = BodyReceiver(len(data), CS, digest, 5, known_table=table)
    rx.feed(bytes(forged[:32]), writer(body))
    with pytest.raises(TransferError) as e:
        rx.feed(bytes(forged[32:64]), writer(body))
    assert e.value.reason == "bad_table" and rx.verified == 5 * CS
