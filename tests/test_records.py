"""records.RecordReader on real loopback sockets: records cut correctly from any
segmentation (including bytes buffered before the switch from the handshake's
StreamReader), memory bounded when nobody consumes, errors after good records."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import SessionError
from protocol.session import FrameKind, Session
from spirtd.localcluster import async_wait_for
from spirtd.net.records import QUEUE_HIGH, ReadClosed, RecordReader

KEY = os.urandom(32)


async def connected() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter]:
    """(reader, writer) of our side and the raw writer of the peer's side."""
    peer: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer.set_result(w)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    theirs = await asyncio.wait_for(peer, 5)
    server.close()
    return reader, writer, theirs


def records(sizes: list[int]) -> tuple[bytes, list[bytes]]:
    tx = Session(KEY, KEY)
    wire, plain = bytearray(), []
    for n in sizes:
        p = os.urandom(n)
        h, c = tx.seal(FrameKind.STREAM_DATA, p, stream=1)
        wire += h + c
        plain.append(p)
    return bytes(wire), plain


async def take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RecordReader:
    rx = RecordReader(Session(KEY, KEY))
    rx.take_over(reader, writer.transport)  # type: ignore[arg-type]
    return rx


async def test_in_order_records_from_a_fresh_switch() -> None:
    reader, writer, peer = await connected()
    sizes = [0, 1, 17, 100, 5000, 16 * 1024, 16 * 1024 + 1, 256 * 1024, 1 << 20] * 3
    random.Random(1).shuffle(sizes)
    wire, plain = records(sizes)
    hello = b"handshake-done"
    peer.write(hello + wire[:3000])  # records right behind the last handshake bytes
    await peer.drain()
    assert await reader.readexactly(len(hello)) == hello
    # The records must already sit in the stream's buffer when the reader takes over.
    await async_wait_for(lambda: len(reader._buffer) >= 3000, 10, "records buffered")
    rx = await take_over(reader, writer)
    rng = random.Random(2)
    pos = 3000
    while pos < len(wire):
        n = rng.choice([1, 7, 100, 4096, 70_000, 300_000])
        peer.write(wire[pos : pos + n])
        pos += n
        if rng.random() < 0.3:
            await peer.drain()
    rx_session = Session(KEY, KEY)
    for p in plain:
        header, body = await asyncio.wait_for(rx.next_record(), 10)
        assert rx_session.open(header, body).payload == p
    peer.close()
    with pytest.raises(ReadClosed):
        await asyncio.wait_for(rx.next_record(), 10)
    writer.close()


async def test_unread_records_stop_the_socket_within_the_bound() -> None:
    reader, writer, peer = await connected()
    rx = await take_over(reader, writer)
    wire, plain = records([256 * 1024] * 64)  # 16 MiB that nobody consumes yet
    peer.write(wire)
    await async_wait_for(lambda: rx._paused, 30, "the reader to stop the socket")
    # Reading stopped at the high mark: queued bytes stay within it plus one record,
    # and the rest waits in the kernel and in the sender's buffer.
    assert 0 < rx._queued <= QUEUE_HIGH + 256 * 1024 + 16
    assert peer.transport.get_write_buffer_size() > 0
    rx_session = Session(KEY, KEY)
    for p in plain:  # consuming resumes the socket until everything is through
        header, body = await asyncio.wait_for(rx.next_record(), 10)
        assert rx_session.open(header, body).payload == p
        assert rx._queued <= QUEUE_HIGH + 256 * 1024 + 16
    peer.close()
    writer.close()


async def test_an_oversized_header_fails_after_the_good_records() -> None:
    reader, writer, peer = await connected()
    rx = await take_over(reader, writer)
    wire, plain = records([10, 20])
    bogus = bytearray(wire[:17])
    bogus[0:4] = (64 << 20).to_bytes(4, "big")  # claims 64 MiB: refused before allocating
    peer.write(wire + bytes(bogus) + b"x" * 100)
    rx_session = Session(KEY, KEY)
    for p in plain:
        header, body = await asyncio.wait_for(rx.next_record(), 10)
        assert rx_session.open(header, body).payload == p
    with pytest.raises(SessionError) as e:
        await asyncio.wait_for(rx.next_record(), 10)
    assert e.value.reason == "oversized_frame"
    peer.close()
    writer.close()


def feed_like_the_loop(rx: RecordReader, wire: bytes, cuts: list[int]) -> None:
    """Drives get_buffer/buffer_updated as an event loop would, the kernel
    handing over at most ``cut`` bytes per read."""
    pos, i = 0, 0
    while pos < len(wire):
        buf = rx.get_buffer(-1)
        n = min(len(buf), cuts[i % len(cuts)], len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        rx.buffer_updated(n)
        pos += n
        i += 1


SIZES = [0, 1, 16, 17, 500, 16 * 1024 - 1, 16 * 1024 + 17, 40_000]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(SIZES), max_size=12),
    cuts=st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
)
def test_framing_holds_for_any_read_sizes(sizes: list[int], cuts: list[int]) -> None:
    wire, plain = records(sizes)
    rx = RecordReader(Session(KEY, KEY))
    feed_like_the_loop(rx, wire, cuts)
    opener = Session(KEY, KEY)
    got = [opener.open(h, b).payload for h, b in rx._records]
    assert got == plain
    assert rx._queued == sum(len(b) for _, b in rx._records)
