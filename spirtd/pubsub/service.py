"""Publish/subscribe inside spirtd: the asyncio shell around protocol.gossip.

What the trainer uses::

    ps = node_pubsub                       # the "pubsub" service
    ps.subscribe("grad", handler, validator=check)
    info = await ps.publish("grad", payload, meta=b"round=7")   # bytes, a file, chunks
    # handler(msg: Message) gets topic, origin, size, digest, meta and msg.body,
    # whose bytes were verified against the digest before the handler runs.

All protocol decisions are the machine's. This file moves envelopes between links
and the machine, keeps the body store, streams bodies (``gossip.body`` streams,
chunk table first), verifies incoming ones chunk by chunk as they arrive, runs
the timer, and calls subscribers.

Bodies are stored in memory up to ``memory_body_max`` each and ``memory_total``
in all, and in files (mode 0600, under DATA_DIR/pubsub) beyond that; a transfer
in flight holds one hash state and whatever the link hands over, never a second
copy. Stored bodies are kept ``retain_s`` and at most ``disk_total`` bytes,
oldest evicted first, so neighbours can still pull them after delivery; a
topic's owner that knows sooner when nobody needs a body any more (the trainer,
when a round is far enough behind) frees it with ``release``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.gossip import (
    Announcement,
    BodyDropped,
    Delivered,
    GossipConfig,
    GossipMachine,
    Graylisted,
    PeerExchange,
    Publish,
    PullEnded,
    PullStarted,
    ServeBody,
    StopServe,
    Verdict,
)
from protocol.gossip.messages import ID_SIZE, check_topic, decode_control, encode_control
from protocol.gossip.transfer import (
    BodyReceiver,
    TableBuilder,
    TransferError,
    digest_of,
    stream_size,
)
from protocol.identity import node_id
from protocol.wire import Envelope, MsgType
from spirtd.net.link import Link, LinkClosed, StreamSink, aiter_chunks
from spirtd.pubsub import http
from spirtd.pubsub.store import READ_PIECE, Body, BodyStore, StoreLimits, _Partial, partial_pieces

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi

log = logging.getLogger("spirtd.pubsub")

STREAM_KIND = "gossip.body"
_HEADER_LIMITS = strictpack.Limits(max_size=64, max_depth=1, max_items=2, max_bin=ID_SIZE)
INBOX_MAX = 4096
DELIVERY_QUEUE = 1024  # deliveries waiting for one topic's handler
MAX_STAGED = 64

Handler = Callable[["Message"], Awaitable[None] | None]
AppValidator = Callable[["Info"], Verdict]
Payload = bytes | bytearray | memoryview | Path | Iterable[bytes] | AsyncIterable[bytes]


@dataclass(frozen=True, slots=True)
class Info:
    """What a validator sees: the signed announcement, before any body byte moves."""

    topic: str
    origin: str  # node id
    seq: int
    ts_ms: int
    size: int
    digest: bytes
    meta: bytes
    # The origin's signed envelope, byte for byte: what a validator keeps as proof
    # when an origin signs two conflicting messages (training's equivocation).
    wire: bytes = b""


# --- what subscribers get -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    msg_id: bytes
    topic: str
    origin: str
    seq: int
    ts_ms: int
    size: int
    digest: bytes
    meta: bytes
    source: str  # the neighbour that first announced it
    body: Body  # verified; kept for StoreLimits.retain_s or until released

    async def read(self) -> bytes:
        return (
            await asyncio.to_thread(self.body.read) if self.size > READ_PIECE else self.body.read()
        )


@dataclass(frozen=True, slots=True)
class Staged:
    """A body stored and digested ahead of publishing (so publishing is instant)."""

    handle: int
    size: int
    chunk_size: int
    table: bytes
    digest: bytes
    partial: _Partial | None  # storage when not inline
    data: bytes | None  # the bytes when small enough to keep inline


class _Subscription:
    def __init__(self, topic: str, handler: Handler) -> None:
        self.topic = topic
        self.handler = handler
        self.queue: asyncio.Queue[Message] = asyncio.Queue(DELIVERY_QUEUE)
        self.task: asyncio.Task[None] | None = None


# --- the service --------------------------------------------------------------------------


class _BodySink:
    """The StreamSink for one pulled body: verifies as bytes arrive, writes them
    to the partial, and reports to the machine."""

    def __init__(self, ps: PubSub, peer: str, mid: bytes, p: _Partial, rx: BodyReceiver) -> None:
        self.ps = ps
        self.peer = peer
        self.mid = mid
        self.p = p
        self.rx = rx
        self.dead = False
        self.received = 0

    async def write(self, data: memoryview) -> None:
        if self.dead:
            return
        self.received += len(data)
        before = self.rx.verified
        failure = None
        try:
            self.rx.feed(data, self.p.write)
        except TransferError as e:
            failure = e.reason
            self.ps.counters[f"gossip.body_{e.reason}"] += 1
        except OSError as e:
            failure = "store_error"
            log.error("cannot store body %s: %s", self.mid.hex(), e)
        now = time.monotonic()
        if self.rx.verified != before:
            # Everything counted as verified is written, even when a later chunk failed:
            # the next source resumes right after it.
            self.p.verified_chunks = self.rx.verified // self.p.ann.chunk_size
            self.ps.m.body_progress(self.peer, self.mid, self.p.verified_chunks, now)
        if failure is not None:
            self.dead = True
            self.ps._end_sink(self)
            self.ps.m.body_failed(self.peer, self.mid, failure, now)
            self.ps._pump()

    async def finish(self) -> None:
        if self.dead:
            return
        self.dead = True
        self.ps._end_sink(self)
        if not self.rx.done:
            self.ps.m.body_failed(self.peer, self.mid, "short", time.monotonic())
            self.ps._pump()
            return
        self.ps._body_complete(self)

    def abort(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.ps._end_sink(self)
        self.ps.m.body_failed(self.peer, self.mid, "aborted", time.monotonic())
        self.ps._pump()


class PubSub:
    name = "pubsub"

    def __init__(
        self,
        node: NodeApi,
        config: GossipConfig | None = None,
        limits: StoreLimits | None = None,
    ) -> None:
        self.node = node
        self.config = config or GossipConfig()
        self.counters = node.counters
        self.store = BodyStore(
            node.data.root / "pubsub", limits or StoreLimits.from_config(node.config.pubsub)
        )
        self.m: GossipMachine | None = None  # set in start()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subs: dict[str, _Subscription] = {}
        self._app_validators: dict[str, AppValidator] = {}
        self._partials: dict[bytes, _Partial] = {}
        self._expected: dict[tuple[str, bytes], tuple[int, Announcement]] = {}
        self._sinks: dict[tuple[str, bytes], _BodySink] = {}
        self._serves: dict[tuple[str, bytes], asyncio.Task[None]] = {}
        self._dials: set[asyncio.Task[None]] = set()
        self._staged: dict[int, Staged] = {}
        self._handles = itertools.count(1)
        self.inbox: deque[dict[str, Any]] = deque(maxlen=INBOX_MAX)
        self._inbox_topics: set[str] = set()
        self._cert = b""  # our certificate, carried in our announcements (set in start)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        node = self.node
        self.store.reset()
        now = time.monotonic()
        self.m = GossipMachine(
            node.key.node_id,
            self.config,
            random.Random(),
            now,
            wall_offset=time.time() - now,
            admission=node.admission,
        )
        self._cert = node.certificate.encode() if node.certificate else b""
        node.register(MsgType.GOSSIP_PUBLISH, self._on_publish_envelope)
        node.register(MsgType.GOSSIP, self._on_control_envelope)
        node.register_stream(STREAM_KIND, self._on_stream)
        node.add_link_listener(self._on_link)
        if node.transport is not None:
            node.transport.gates.append(self._admit)
            for link in list(node.transport.links.values()):
                self._on_link(link, True)
        if node.api is not None:
            http.register(self, node.api)
        self._task = asyncio.create_task(self._run(), name="pubsub")

    def certificate_renewed(self, certificate: bytes) -> None:
        """Called by the node when it presents a new certificate: later
        announcements carry it, so receivers judge us by the current one."""
        self._cert = certificate

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.node.transport is not None and self._admit in self.node.transport.gates:
            self.node.transport.gates.remove(self._admit)
        for t in [*self._serves.values(), *self._dials]:
            t.cancel()
        for sub in self._subs.values():
            if sub.task is not None:
                sub.task.cancel()
        for p in list(self._partials.values()):
            self.store.release_partial(p)
        for s in self._staged.values():
            if s.partial is not None:
                self.store.release_partial(s.partial)
        self.store.close()

    def status(self) -> dict[str, Any]:
        if self.m is None:
            return {}
        return {"pubsub": {**self.m.status(), "store": self.store.status()}}

    # -- the API the trainer uses --------------------------------------------------------

    def subscribe(
        self, topic: str, handler: Handler, *, validator: AppValidator | None = None
    ) -> None:
        """Calls ``handler(message)`` for every valid message on ``topic`` whose body
        has arrived and checked out. ``validator(info)`` sees the signed announcement
        first and answers ACCEPT, REJECT (invalid: the sender is penalised) or
        IGNORE (not wanted now, e.g. a closed round)."""
        check_topic(topic)
        assert self.m is not None, "start() first"
        old = self._subs.pop(topic, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        sub = _Subscription(topic, handler)
        sub.task = asyncio.create_task(self._deliver_loop(sub), name=f"pubsub-{topic}")
        self._subs[topic] = sub
        if validator is not None:
            self._app_validators[topic] = validator
        else:
            self._app_validators.pop(topic, None)
        self.m.subscribe(topic, time.monotonic(), self._validate)
        self._pump()

    def subscribe_inbox(self, topic: str) -> None:
        """Records ``topic``'s deliveries in :attr:`inbox` (for spirtctl and tests);
        an application subscription already there keeps its handler."""
        if topic not in self._subs:
            self.subscribe(topic, _noop)
        self._inbox_topics.add(topic)

    def unsubscribe(self, topic: str) -> None:
        assert self.m is not None
        sub = self._subs.pop(topic, None)
        if sub is not None and sub.task is not None:
            sub.task.cancel()
        self._app_validators.pop(topic, None)
        self._inbox_topics.discard(topic)
        self.m.unsubscribe(topic, time.monotonic())
        self._pump()

    async def stage(self, payload: Payload, *, size: int | None = None) -> Staged:
        """Stores and digests a body ahead of publishing. ``payload`` is bytes, a
        file path, or (async) chunks; chunks need ``size`` up front so the storage
        is bounded before the first byte is read."""
        c = self.config
        if isinstance(payload, bytes | bytearray | memoryview):
            data = bytes(payload)
            if len(data) > c.max_payload:
                raise ValueError(f"payload of {len(data)} bytes exceeds {c.max_payload}")
            table, digest = await _digest(data, c.chunk_size)
            if len(data) <= c.inline_max:
                return self._keep(Staged(0, len(data), c.chunk_size, table, digest, None, data))
            p = _Partial(Announcement("-", len(data), digest, c.chunk_size))
            self.store.allocate(p, len(data))
            p.write(0, memoryview(data))
            return self._keep(Staged(0, len(data), c.chunk_size, table, digest, p, None))
        if isinstance(payload, Path):
            size = payload.stat().st_size
            return await self.stage(_file_chunks(payload), size=size)
        if size is None:
            raise ValueError("a chunked payload needs its size")
        if not 0 <= size <= c.max_payload:
            raise ValueError(f"payload of {size} bytes exceeds {c.max_payload}")
        p = _Partial(Announcement("-", size, bytes(32), c.chunk_size))
        self.store.allocate(p, size)
        builder = TableBuilder(c.chunk_size)
        try:
            async for chunk in aiter_chunks(payload):
                if builder.size + len(chunk) > size:
                    raise ValueError("payload is longer than its declared size")
                p.write(builder.size, memoryview(chunk))
                if len(chunk) > READ_PIECE:
                    await asyncio.to_thread(builder.update, chunk)  # hashlib drops the GIL
                else:
                    builder.update(chunk)
            if builder.size != size:
                raise ValueError(f"payload ended at {builder.size} of {size} bytes")
        except BaseException:
            self.store.release_partial(p)
            raise
        table, digest = builder.finish()
        if size <= c.inline_max:
            data = b"".join(partial_pieces(p, size))
            self.store.release_partial(p)
            return self._keep(Staged(0, size, c.chunk_size, table, digest, None, data))
        return self._keep(Staged(0, size, c.chunk_size, table, digest, p, None))

    def _keep(self, s: Staged) -> Staged:
        if len(self._staged) >= MAX_STAGED:
            raise ValueError(f"more than {MAX_STAGED} staged payloads; publish or drop some")
        h = next(self._handles)
        staged = Staged(h, s.size, s.chunk_size, s.table, s.digest, s.partial, s.data)
        self._staged[h] = staged
        return staged

    def staged(self, handle: Any) -> Staged | None:
        """The payload staged under ``handle``, if it is still waiting to be published."""
        return self._staged.get(handle)

    def drop_staged(self, handle: int) -> None:
        s = self._staged.pop(handle, None)
        if s is not None and s.partial is not None:
            self.store.release_partial(s.partial)

    async def publish(
        self, topic: str, payload: Payload | Staged, *, meta: bytes = b"", size: int | None = None
    ) -> dict[str, Any]:
        """Signs an announcement for ``payload`` and floods it to ``topic``'s peers;
        they pull the body from us (or from each other). Returns msg_id, digest, size.
        Our own subscribers are not called for our own messages."""
        assert self.m is not None
        check_topic(topic)
        if len(meta) > self.config.max_meta:
            raise ValueError(f"meta of {len(meta)} bytes exceeds {self.config.max_meta}")
        staged = payload if isinstance(payload, Staged) else await self.stage(payload, size=size)
        if self._staged.pop(staged.handle, None) is None:
            raise ValueError("that staged payload was already published or dropped")
        ann = Announcement(
            topic, staged.size, staged.digest, staged.chunk_size, meta, staged.data, self._cert
        )
        envelope = self.node.seal(MsgType.GOSSIP_PUBLISH, ann.to_obj())
        mid = self.m.publish(envelope, time.monotonic())
        if staged.partial is not None:
            staged.partial.ann = ann
            self.store.commit(mid, staged.partial, staged.table)
        self._pump()
        self._wake.set()
        return {"msg_id": mid.hex(), "digest": staged.digest.hex(), "size": staged.size}

    def release(self, msg_ids: Iterable[bytes]) -> int:
        """The caller is done with these messages' bodies (received or its own): they
        leave the store now rather than at ``retain_s``, and are no longer offered
        to peers; a peer that still asks is told RELEASED and asks elsewhere. A
        serve already streaming one finishes first (the body is freed when it
        ends). Unknown ids (inline bodies, already evicted) are skipped. Returns the
        bodies released, also counted in ``pubsub.bodies_released``."""
        assert self.m is not None
        now = time.monotonic()
        n = 0
        for mid in msg_ids:
            self.m.release_body(mid, now)
            if self.store.release(mid):
                n += 1
        if n:
            self.counters["pubsub.bodies_released"] += n
        return n

    # -- validation and delivery ---------------------------------------------------------

    def _validate(self, ann: Announcement, env: Envelope) -> Verdict:
        fn = self._app_validators.get(ann.topic)
        if fn is None:
            return Verdict.ACCEPT
        info = Info(
            ann.topic,
            node_id(env.origin),
            env.seq,
            env.ts_ms,
            ann.size,
            ann.digest,
            ann.meta,
            env.wire,
        )
        try:
            return fn(info)
        except Exception:
            log.exception("validator for %s failed; ignoring the message", ann.topic)
            return Verdict.IGNORE

    def _deliver(self, ev: Delivered) -> None:
        ann, env = ev.announcement, ev.envelope
        body = self.store.get(ev.msg_id)
        if body is None:
            if ann.inline is None:
                self.counters["gossip.deliver_without_body"] += 1
                return
            table, _ = digest_of(ann.inline, ann.chunk_size)
            body = Body(ann.size, ann.chunk_size, table, mem=ann.inline)
        msg = Message(
            ev.msg_id,
            ann.topic,
            node_id(env.origin),
            env.seq,
            env.ts_ms,
            ann.size,
            ann.digest,
            ann.meta,
            ev.source,
            body,
        )
        if ann.topic in self._inbox_topics:
            self.inbox.append(
                {
                    "msg_id": ev.msg_id.hex(),
                    "topic": ann.topic,
                    "origin": msg.origin,
                    "size": ann.size,
                    "digest": ann.digest.hex(),
                    "meta": ann.meta.hex(),
                    "source": ev.source,
                    "received_at": time.time(),
                }
            )
        sub = self._subs.get(ann.topic)
        if sub is not None:
            try:
                sub.queue.put_nowait(msg)
            except asyncio.QueueFull:
                self.counters["gossip.delivery_queue_full"] += 1
                log.warning("subscriber of %s is too slow; a message was dropped", ann.topic)

    async def _deliver_loop(self, sub: _Subscription) -> None:
        while True:
            msg = await sub.queue.get()
            try:
                r = sub.handler(msg)
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("subscriber of %s failed on %s", sub.topic, msg.msg_id.hex())

    # -- links and envelopes -------------------------------------------------------------

    def _on_link(self, link: Link, up: bool) -> None:
        assert self.m is not None
        now = time.monotonic()
        if up:
            self.m.add_peer(link.peer_id, now, link.peer_addr)
        else:
            self.m.remove_peer(link.peer_id, now)
        self._pump()

    def _admit(self, link: Link, frame: memoryview) -> bool:
        """The link gate: gossip from a peer the machine ignores (graylisted) is
        dropped before it is decoded, its type read from the envelope's head at
        fixed positions. Its other messages are not gossip's to judge."""
        m = self.m
        if m is None or not m.ignores(link.peer_id):
            return True
        try:
            typ = wire.peek(frame)[1]
        except DecodeError:
            return True  # the node's decode refuses and counts it
        if typ is not MsgType.GOSSIP and typ is not MsgType.GOSSIP_PUBLISH:
            return True
        self.counters["gossip.graylisted_unread"] += 1
        return False

    def _on_publish_envelope(self, link: Link, env: Envelope) -> None:
        assert self.m is not None
        # The exact bytes the origin signed, as relayed: never re-encoded.
        self.m.receive(link.peer_id, Publish(env.wire), time.monotonic())
        self._pump()

    def _on_control_envelope(self, link: Link, env: Envelope) -> None:
        assert self.m is not None
        if env.origin != link.peer_key:
            self.counters["gossip.origin_mismatch"] += 1
            return
        try:
            ctrl = decode_control(env.body)
        except DecodeError as e:
            self.counters[f"gossip.decode.{e.reason}"] += 1
            # Signed by the peer itself: its junk, charged to it. Enough of it
            # graylists the peer, and _admit then drops its frames unread.
            self.m.malformed(link.peer_id, e.reason)
            self._pump()
            return
        self.m.receive(link.peer_id, ctrl, time.monotonic())
        self._pump()

    def _send(self, peer: str, data: bytes) -> None:
        assert self.node.transport is not None
        link = self.node.transport.links.get(peer)
        if link is None or link.close_reason is not None or not link.try_send(data):
            # Gossip tolerates loss: IHAVE/IWANT and pull retries repair it.
            self.counters["gossip.send_dropped"] += 1

    # -- the machine pump ----------------------------------------------------------------

    async def _run(self) -> None:
        assert self.m is not None
        while True:
            now = time.monotonic()
            self.m.tick(now)
            for mid in self.store.expire(now):
                self.m.forget_body(mid)
            self._pump()
            delay = min(max(self.m.next_deadline() - time.monotonic(), 0.0), 1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _pump(self) -> None:
        m = self.m
        assert m is not None
        for out in m.drain_outgoing():
            msg = out.message
            if isinstance(msg, Publish):
                self._send(out.peer_id, msg.wire)
            else:
                for part in msg.parts():
                    self._send(out.peer_id, self.node.seal(MsgType.GOSSIP, encode_control(part)))
        for ev in m.drain_events():
            if isinstance(ev, Delivered):
                self._deliver(ev)
            elif isinstance(ev, PullStarted):
                self._expected[(ev.peer_id, ev.msg_id)] = (ev.first_chunk, ev.announcement)
            elif isinstance(ev, PullEnded):
                self._expected.pop((ev.peer_id, ev.msg_id), None)
                sink = self._sinks.pop((ev.peer_id, ev.msg_id), None)
                if sink is not None:
                    sink.dead = True  # the rest of its stream is discarded
            elif isinstance(ev, ServeBody):
                self._start_serve(ev)
            elif isinstance(ev, StopServe):
                task = self._serves.get((ev.peer_id, ev.msg_id))
                if task is not None:
                    task.cancel()
            elif isinstance(ev, BodyDropped):
                p = self._partials.pop(ev.msg_id, None)
                if p is not None:
                    self.store.release_partial(p)
                log.warning("gave up on body %s: %s", ev.msg_id.hex(), ev.reason)
            elif isinstance(ev, Graylisted):
                log.warning("peer %s graylisted (score %.1f)", ev.peer_id, ev.score)
            elif isinstance(ev, PeerExchange):
                self._peer_exchange(ev)
        for k, v in m.counters.items():
            self.counters[f"gossip.{k}"] = v

    def _peer_exchange(self, ev: PeerExchange) -> None:
        assert self.m is not None
        if len(self.m.addrs) >= self.config.d:
            return
        # Only members we admitted, at the address their own signed record gives: a
        # PRUNE must not aim our dials at a host:port of the sender's choosing.
        known = {m["node_id"]: m["address"] for m in self.node.members() if m["state"] == "alive"}
        for nid, addr in ev.peers[: self.config.d]:
            if len(self._dials) >= self.config.d:
                break
            if known.get(nid) != addr:
                self.counters["gossip.px_unknown_peer"] += 1
                continue
            task = asyncio.create_task(self._dial(nid, addr))
            self._dials.add(task)
            task.add_done_callback(self._dials.discard)

    async def _dial(self, nid: str, addr: str) -> None:
        try:
            await self.node.link_to(nid, addr)
        except Exception as e:  # a suggestion that did not work out; nothing to repair
            log.debug("peer exchange: cannot reach %s at %s: %s", nid, addr, e)

    # -- serving bodies ------------------------------------------------------------------

    def _start_serve(self, ev: ServeBody) -> None:
        key = (ev.peer_id, ev.msg_id)
        self._serves[key] = asyncio.create_task(self._serve(ev), name="pubsub-serve")

    async def _serve(self, ev: ServeBody) -> None:
        assert self.m is not None and self.node.transport is not None
        key = (ev.peer_id, ev.msg_id)
        body = self.store.get(ev.msg_id)
        if body is not None:
            self.store.pin(body)  # released or evicted meanwhile, it is freed when we end
        try:
            link = self.node.transport.links.get(ev.peer_id)
            if body is None or link is None:
                return
            total = stream_size(body.size, body.chunk_size, ev.first_chunk)
            header = strictpack.pack([ev.msg_id, ev.first_chunk])
            start = min(body.size, ev.first_chunk * body.chunk_size)

            def pieces() -> Iterator[bytes]:
                yield body.table
                yield from body.pieces(start)

            await link.send_stream(self.node.stream_meta(STREAM_KIND, header), total, pieces())
            self.counters["gossip.bodies_served"] += 1
        except (LinkClosed, OSError) as e:
            log.debug("serving %s to %s stopped: %s", ev.msg_id.hex(), ev.peer_id, e)
        finally:
            if body is not None:
                self.store.unpin(body)
            self._serves.pop(key, None)
            self.m.serve_done(ev.peer_id, ev.msg_id)
            self._pump()

    # -- receiving bodies ----------------------------------------------------------------

    def _on_stream(self, link: Link, total: int, header: bytes) -> StreamSink | None:
        assert self.m is not None
        try:
            obj = strictpack.unpack(header, _HEADER_LIMITS)
        except DecodeError:
            obj = None
        if not (
            isinstance(obj, list)
            and len(obj) == 2
            and isinstance(obj[0], bytes)
            and len(obj[0]) == ID_SIZE
            and isinstance(obj[1], int)
            and not isinstance(obj[1], bool)
        ):
            self.counters["gossip.stream_bad_header"] += 1
            return None
        mid, first = obj
        key = (link.peer_id, mid)
        expected = self._expected.get(key)
        if expected is None or expected[0] != first or key in self._sinks:
            self.counters["gossip.stream_unexpected"] += 1
            return None
        ann = expected[1]
        if total != stream_size(ann.size, ann.chunk_size, first):
            self.counters["gossip.stream_bad_size"] += 1
            self.m.body_failed(link.peer_id, mid, "overrun", time.monotonic())
            self._pump()
            return None
        p = self._partials.get(mid)
        if p is None:
            p = _Partial(ann)
            try:
                self.store.allocate(p, ann.size)
            except OSError as e:
                log.error("cannot store body %s: %s", mid.hex(), e)
                self.m.body_failed(link.peer_id, mid, "store_error", time.monotonic())
                self._pump()
                return None
            self._partials[mid] = p
        if first > p.verified_chunks:
            self.m.body_failed(link.peer_id, mid, "bad_resume", time.monotonic())
            self._pump()
            return None
        rx = p.receiver(first)  # reuses a table verified by an earlier source
        sink = _BodySink(self, link.peer_id, mid, p, rx)
        self._sinks[key] = sink
        return sink

    def _end_sink(self, sink: _BodySink) -> None:
        key = (sink.peer, sink.mid)
        if self._sinks.get(key) is sink:
            del self._sinks[key]

    def _body_complete(self, sink: _BodySink) -> None:
        assert self.m is not None
        p = self._partials.get(sink.mid)
        if p is None or not self.m.body_received(sink.peer, sink.mid, time.monotonic()):
            self._pump()
            return
        del self._partials[sink.mid]
        self.counters["gossip.body_bytes_in"] += sink.received
        self.store.commit(sink.mid, p, sink.rx.table)
        self._pump()


# --- helpers ------------------------------------------------------------------------------


def _noop(msg: Message) -> None:
    return None


async def _digest(data: bytes, chunk_size: int) -> tuple[bytes, bytes]:
    if len(data) > READ_PIECE:
        return await asyncio.to_thread(digest_of, data, chunk_size)
    return digest_of(data, chunk_size)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(READ_PIECE * 4):
            yield chunk
