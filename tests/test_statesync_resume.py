"""State transfers cut short resume from another voucher, over real links on 127.0.0.1.

Three in-process nodes: a joiner, a voucher whose transfer breaks halfway, and a
second voucher. The joiner must end with exactly the full encoding while the
second voucher sends only the part that was missing, or its whole state when it
no longer holds the position the joiner is after.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.identity import NodeKey, TrustStore
from protocol.wire import Envelope, MsgType
from spirtd.config import TransportConfig
from spirtd.net.link import Link, StreamSink
from spirtd.net.transport import Transport
from spirtd.node import Node
from spirtd.training import statesync
from spirtd.training.checkpoint import Snapshot
from spirtd.training.statesync import Position, StateSync, SyncError

pytestmark = pytest.mark.timeout(60)

JOB = "ab" * 16


class MiniNode:
    """The parts of a node StateSync uses: envelope and stream dispatch over a Transport."""

    def __init__(self) -> None:
        self.key = NodeKey(os.urandom(32))
        self.counters: Counter[str] = Counter()
        self.transport: Transport | None = None
        self._envelopes: dict[MsgType, Any] = {}
        self._streams: dict[str, Any] = {}
        self._seq = 0

    def register(self, msg_type: MsgType, handler: Any) -> None:
        self._envelopes[msg_type] = handler

    def register_stream(self, kind: str, handler: Any) -> None:
        self._streams[kind] = handler

    def seal(self, msg_type: MsgType, body: Any) -> bytes:
        self._seq += 1
        return wire.seal(self.key, msg_type, self._seq, 0, body)

    stream_meta = staticmethod(Node.stream_meta)

    def on_message(self, link: Link, data: bytes) -> None:
        env: Envelope | None = wire.decode_counted(data, self.counters)
        if env is not None:
            self._envelopes[env.type](link, env)

    def on_stream(self, link: Link, stream: int, total: int, meta: bytes) -> StreamSink | None:
        try:
            kind, header = strictpack.unpack(meta)
        except (DecodeError, ValueError):
            return None
        return self._streams[kind](link, total, header)


def snapshot(completed: int, fill: int) -> Snapshot:
    tensors = tuple((role, bytes([fill]) * 40_000) for role in ("theta", "m", "v"))
    snap = Snapshot(JOB, completed, b"\0" * 32, tensors)
    return Snapshot(JOB, completed, snap.compute_digest(), tensors)


@pytest.fixture
async def trio(monkeypatch: pytest.MonkeyPatch) -> Any:
    nodes = [MiniNode() for _ in range(3)]
    keys = {n.key.public_key for n in nodes}
    config = TransportConfig(stream_chunk_bytes=8192)
    held: dict[int, Snapshot] = {1: snapshot(7, 1), 2: snapshot(7, 1)}
    syncs = []
    for i, n in enumerate(nodes):
        n.transport = Transport(
            n.key, None, TrustStore("t", allowlist=keys), config, n, counters=n.counters
        )
        await n.transport.start("127.0.0.1:0")

        async def source(job: str, i: int = i) -> Snapshot | None:
            return held.get(i)

        syncs.append(
            StateSync(
                n,  # type: ignore[arg-type]
                snapshot=source,
                record=lambda job: None,
                on_record=lambda *a: asyncio.sleep(0),
                max_serves=2,
            )
        )
    for n in nodes[1:]:
        await nodes[0].transport.connect(n.transport.listen_addr)  # type: ignore[union-attr]
    sent: Counter[int] = Counter()
    real_pieces = statesync.stream_pieces

    def cutting_pieces(pieces: list[bytes], at: int) -> Iterator[bytes | memoryview]:
        # The first transfer (the cutter's: each test asks it first) breaks halfway,
        # the sender aborting the stream; later ones go through. Counts what each
        # call would send, by offset.
        total = sum(len(p) for p in pieces) - at
        sent[at] += total
        if sum(sent.values()) > total:
            yield from real_pieces(pieces, at)
            return
        got = 0
        for p in real_pieces(pieces, 0):
            yield p
            got += len(p)
            if got >= total // 2:
                raise RuntimeError("the test cuts this transfer")

    monkeypatch.setattr(statesync, "stream_pieces", cutting_pieces)
    yield nodes, syncs, held, sent
    for s in syncs:
        s.close()
    for n in nodes:
        await n.transport.stop()  # type: ignore[union-attr]


async def test_a_cut_transfer_resumes_from_the_next_voucher(trio: Any) -> None:
    nodes, syncs, held, sent = trio
    joiner, cutter, other = nodes
    want = Position(7, held[1].digest)
    full = b"".join(held[1].encode())
    with pytest.raises(SyncError):
        await syncs[0].fetch(cutter.key.node_id, JOB, len(full), 10.0, want=want)
    kept = syncs[0].partial_bytes(JOB)
    assert 0 < kept < len(full)
    data = await syncs[0].fetch(other.key.node_id, JOB, len(full), 10.0, want=want)
    assert data == full
    assert joiner.counters["training.sync_resumed"] == 1
    assert joiner.counters["training.sync_resumed_bytes"] == kept
    assert sent[kept] == len(full) - kept  # the second voucher sent only the rest
    assert syncs[0].partial_bytes(JOB) == 0


async def test_a_voucher_that_moved_on_sends_its_whole_state(trio: Any) -> None:
    nodes, syncs, held, _ = trio
    joiner, cutter, other = nodes
    want = Position(7, held[1].digest)
    size = len(b"".join(held[1].encode()))
    with pytest.raises(SyncError):
        await syncs[0].fetch(cutter.key.node_id, JOB, size, 10.0, want=want)
    assert syncs[0].partial_bytes(JOB) > 0
    held[2] = snapshot(8, 2)  # the other voucher closed a round meanwhile
    data = await syncs[0].fetch(other.key.node_id, JOB, size, 10.0, want=want)
    assert data == b"".join(held[2].encode())
    assert joiner.counters["training.sync_resumed"] == 0


async def test_a_partial_is_only_resumed_for_the_position_it_holds(trio: Any) -> None:
    nodes, syncs, held, sent = trio
    joiner, cutter, other = nodes
    size = len(b"".join(held[1].encode()))
    with pytest.raises(SyncError):
        await syncs[0].fetch(cutter.key.node_id, JOB, size, 10.0, want=Position(7, held[1].digest))
    # A later decision targets another position: the old bytes are dropped, not mixed in.
    data = await syncs[0].fetch(other.key.node_id, JOB, size, 10.0, want=Position(9, b"\1" * 32))
    assert data == b"".join(held[2].encode())
    assert joiner.counters["training.sync_resumed"] == 0
    assert sent[0] == 2 * size
