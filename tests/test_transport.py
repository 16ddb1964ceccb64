"""Transport and links in one process (real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import functools
import os
import tracemalloc
from collections import Counter

import pytest

from protocol.identity import NodeKey, TrustStore
from spirtd.config import TransportConfig
from spirtd.localcluster import async_wait_for
from spirtd.net.sendqueue import QueueClosed, SendQueue
from spirtd.net.transport import DialError, Transport

pytestmark = pytest.mark.timeout(60)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.got = asyncio.Event()
        self.stream_bytes = 0
        self.stream_done = asyncio.Event()

    def on_message(self, link, data: bytes) -> None:
        self.messages.append(data)
        self.got.set()

    def on_stream(self, link, stream, total, meta):
        rec = self

        class Sink:
            async def write(self, data: memoryview) -> None:
                rec.stream_bytes += len(data)

            async def finish(self) -> None:
                rec.stream_done.set()

            def abort(self, reason: str) -> None:
                pass

        return Sink()


async def make_pair(**cfg) -> tuple[Transport, Transport, Recorder, Recorder]:
    ka, kb = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    ra, rb = Recorder(), Recorder()
    config = TransportConfig(**cfg)
    a = Transport(
        ka, None, TrustStore("t", allowlist={kb.public_key}), config, ra, counters=Counter()
    )
    b = Transport(
        kb, None, TrustStore("t", allowlist={ka.public_key}), config, rb, counters=Counter()
    )
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    return a, b, ra, rb


def _one_agreed_link(a: Transport, b: Transport) -> bool:
    return (
        len(a.links) == len(b.links) == 1
        and a.links[b.node_id].session_id == b.links[a.node_id].session_id
    )


async def test_simultaneous_dials_leave_one_link_both_sides_agree_on():
    for _ in range(5):
        a, b, _, rb = await make_pair()
        try:
            await asyncio.gather(a.connect(b.listen_addr), b.connect(a.listen_addr))
            # Both sides settle on one link each (the duplicate is closed on both).
            await async_wait_for(
                functools.partial(_one_agreed_link, a, b), 30, "one link, agreed on by both sides"
            )
            assert list(a.links) == [b.node_id] and list(b.links) == [a.node_id]
            la, lb = a.links[b.node_id], b.links[a.node_id]
            assert la.session_id == lb.session_id
            assert la.outbound != lb.outbound
            await la.send(b"hello over the surviving link")
            await asyncio.wait_for(rb.got.wait(), 5)
            assert rb.messages == [b"hello over the surviving link"]
        finally:
            await a.stop()
            await b.stop()


async def test_stream_memory_stays_at_a_few_chunks():
    chunk = 256 * 1024
    a, b, _, rb = await make_pair(stream_chunk_bytes=chunk)
    try:
        link = await a.connect(b.listen_addr)
        total = 96 * 1024 * 1024
        piece = os.urandom(chunk)

        def chunks():
            for _ in range(total // chunk):
                yield piece

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        await link.send_stream(b"meta", total, chunks())
        await asyncio.wait_for(rb.stream_done.wait(), 60)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert rb.stream_bytes == total
        # Sender queue + receiver buffer + records in flight: a few chunks, not 96 MiB.
        assert peak < 24 * chunk, f"peak {peak / 2**20:.1f} MiB"
    finally:
        await a.stop()
        await b.stop()


async def test_stream_must_match_its_declared_size():
    a, b, _, _ = await make_pair()
    try:
        link = await a.connect(b.listen_addr)
        with pytest.raises(ValueError, match="declared size"):
            await link.send_stream(b"m", 10, [b"x" * 11])
        with pytest.raises(ValueError, match="ended at"):
            await link.send_stream(b"m", 10, [b"x" * 5])
        # The link survives a sender's mistake: the stream is aborted, not the link.
        await link.send(b"still fine")
        assert link.close_reason is None
    finally:
        await a.stop()
        await b.stop()


async def test_failed_dials_back_off_with_jitter():
    a, b, _, _ = await make_pair(reconnect_min_s=0.5)
    try:
        port = b.listen_addr.rsplit(":", 1)[1]
        await b.stop()
        with pytest.raises(DialError) as e:
            await a.connect(f"127.0.0.1:{port}")
        assert e.value.reason == "unreachable"
        with pytest.raises(DialError) as e:
            await a.connect(f"127.0.0.1:{port}")
        assert e.value.reason == "backoff"
        assert a.counters["transport.dial_backoff"] == 1
    finally:
        await a.stop()


async def test_send_queue_is_bounded_and_control_goes_first():
    q: SendQueue[str] = SendQueue(control_max=2, bulk_max=2)
    assert q.put_nowait("b1", bulk=True) and q.put_nowait("b2", bulk=True)
    assert not q.put_nowait("b3", bulk=True)  # full
    assert q.put_nowait("c1") and q.put_nowait("c2") and not q.put_nowait("c3")
    assert [await q.get() for _ in range(4)] == ["c1", "c2", "b1", "b2"]
    assert q.put_nowait("x", bulk=True)
    assert q.put_nowait("y", bulk=True)
    waiter = asyncio.create_task(q.put("late", bulk=True))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # backpressure: waits for space
    assert await q.get() == "x"
    await asyncio.wait_for(waiter, 1)
    q.close()
    with pytest.raises(QueueClosed):
        q.put_nowait("z")
