"""In-process nodes for StateSync tests: real Transports and links on 127.0.0.1,
with only the node parts StateSync uses."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.identity import NodeKey, TrustStore
from protocol.wire import Envelope, MsgType
from spirtd.config import TransportConfig
from spirtd.localcluster import async_wait_for
from spirtd.net.link import Link, StreamSink
from spirtd.net.transport import Transport
from spirtd.node import Node
from spirtd.training import statesync
from spirtd.training.checkpoint import Snapshot
from spirtd.training.statesync import StateSync

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

    def link_to(self, other: MiniNode) -> Link:
        assert self.transport is not None
        return self.transport.links[other.key.node_id]


@contextlib.asynccontextmanager
async def sync_nodes(
    count: int,
    held: dict[int, Snapshot],
    options: Callable[[int], dict[str, Any]] = lambda i: {},
) -> AsyncIterator[tuple[list[MiniNode], list[StateSync]]]:
    """``count`` nodes, node 0 linked to each other one (both ends up); node i serves
    ``held[i]`` (looked up at each request) and is built with ``options(i)``."""
    nodes = [MiniNode() for _ in range(count)]
    keys = {n.key.public_key for n in nodes}
    config = TransportConfig(stream_chunk_bytes=8192)
    syncs = []
    for i, n in enumerate(nodes):
        n.transport = Transport(
            n.key, None, TrustStore("t", allowlist=keys), config, n, counters=n.counters
        )
        await n.transport.start("127.0.0.1:0")

        async def source(job: str, i: int = i) -> Snapshot | None:
            return held.get(i)

        kw: dict[str, Any] = {
            "snapshot": source,
            "record": lambda job: None,
            "on_record": lambda *a: asyncio.sleep(0),
            "max_serves": 2,
        }
        syncs.append(StateSync(n, **(kw | options(i))))  # type: ignore[arg-type]
    try:
        for n in nodes[1:]:
            await nodes[0].transport.connect(n.transport.listen_addr)  # type: ignore[union-attr]
            await async_wait_for(
                lambda n=n: nodes[0].key.node_id in n.transport.links,  # type: ignore[union-attr]
                10.0,
                "the accepting end of a link",
            )
        yield nodes, syncs
    finally:
        for sync in syncs:
            sync.close()
        for n in nodes:
            await n.transport.stop()  # type: ignore[union-attr]


def snapshot(completed: int, fill: int, *, claim: bytes | None = None) -> Snapshot:
    """A state of three 40 kB tensors of byte ``fill``; ``claim``: the digest it says
    it has instead of its own (a lying server's)."""
    tensors = tuple((role, bytes([fill]) * 40_000) for role in ("theta", "m", "v"))
    snap = Snapshot(JOB, completed, b"\0" * 32, tensors)
    return Snapshot(JOB, completed, claim or snap.compute_digest(), tensors)


def cut_first_transfer(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Makes the first state transfer served (by any node) break halfway, the sender
    aborting the stream; later ones go through. Returns what each transfer would
    send, by offset."""
    sent: Counter[int] = Counter()
    real_pieces = statesync.stream_pieces

    def cutting_pieces(pieces: list[bytes], at: int) -> Iterator[bytes | memoryview]:
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
    return sent
