"""The in-memory body store keeps received chunks by reference (pubsub_store.Segments)."""

import os

import pytest

from spirtd.pubsub.store import Segments


def fill(seg: Segments, data: bytes, sizes: list[int], start: int = 0) -> None:
    off = start
    for n in sizes:
        seg.write(off, memoryview(data)[off : off + n])
        off += n


def test_sequential_writes_read_back_exactly_from_any_offset():
    data = os.urandom(10_000)
    seg = Segments()
    fill(seg, data, [100, 3000, 1, 4899, 2000])
    assert seg.size == len(data) and seg.read() == data
    for start in (0, 1, 99, 100, 3100, 3101, 9999, 10_000):
        assert b"".join(seg.pieces(start, step=777)) == data[start:]
        assert all(len(p) <= 777 for p in seg.pieces(start, step=777))


def test_resume_before_the_end_cuts_back_then_continues():
    good = os.urandom(4000)
    bad = bytearray(good)
    bad[2500] ^= 1
    seg = Segments()
    fill(seg, bytes(bad), [1000, 1000, 1000])  # the third piece holds a bad byte
    fill(seg, good, [1000, 1000], start=2000)  # resumed at the last verified offset
    assert seg.read() == good
    fill(seg, good, [500], start=1500)  # a cut inside a piece
    assert seg.size == 2000 and seg.read() == good[:2000]


def test_gaps_are_refused():
    seg = Segments()
    seg.write(0, memoryview(b"abc"))
    with pytest.raises(ValueError, match="non-sequential"):
        seg.write(10, memoryview(b"x"))


def test_whole_immutable_chunks_are_kept_and_served_without_copies():
    chunks = [os.urandom(1000) for _ in range(3)]
    seg = Segments()
    off = 0
    for c in chunks:
        seg.write(off, memoryview(c))
        off += len(c)
    assert [p is c for p, c in zip(seg.pieces(0, step=1000), chunks, strict=True)] == [True] * 3


def test_mutable_sources_are_copied():
    buf = bytearray(b"x" * 100)
    seg = Segments()
    seg.write(0, memoryview(buf))
    buf[:] = b"y" * 100  # the producer reuses its buffer
    assert seg.read() == b"x" * 100


def test_a_partial_keeps_its_verified_table_for_the_next_source():
    from protocol.gossip import Announcement
    from protocol.gossip.transfer import TransferError, digest_of, stream_pieces
    from spirtd.pubsub.store import _Partial

    cs = 1024
    data = os.urandom(8 * cs)
    table, digest = digest_of(data, cs)
    p = _Partial(Announcement("t", len(data), digest, cs))
    p.mem = Segments()
    rx = p.receiver(0)
    assert p.table == b""
    bad = bytearray(data)
    bad[3 * cs] ^= 1
    with pytest.raises(TransferError):
        rx.feed(table + bytes(bad), p.write)
    assert p.table == table and rx.verified == 3 * cs
    # The next source resumes at chunk 3; its table is compared, never held.
    rx2 = p.receiver(3)
    for piece in stream_pieces(table, data, cs, 3, 100):
        for off in range(0, len(piece), 100):
            rx2.feed(piece[off : off + 100], p.write)
            assert rx2.buffered == 0
    assert rx2.done and p.mem.read() == data
