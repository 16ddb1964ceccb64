"""Moving a job's state between peers: the request, the stream, and the bounds.

A peer that must sync sends a ``get`` request (a STATE envelope) to one peer
that vouches for the target position; that peer answers with a
``training.state`` stream holding a snapshot of its current state
(checkpoint.Snapshot's encoding), or with ``busy`` when it already serves as
many transfers as it allows. The receiver accepts a stream only from a peer it
asked, only for the job it asked about, and only of exactly the size the job's
state has, so it cannot be made to download more. What arrives is verified
against its digest before anything touches the live keys (the trainer does
that), and every wait here has a timeout.

A transfer cut short is resumed, not restarted: the receiver keeps what it got
(one partial per job, already within the job's size bound) and asks the next
voucher for the rest of the same position (``at`` offset, ``want`` round and
digest). A server that holds that position sends only the rest; one that has
moved on sends its whole state, and the partial is dropped. The encoding of a
position is deterministic, so bytes from two vouchers of one position join up;
a voucher that lied about its part is caught by the digest check like any other.

The same envelope type carries ``job?``/``job``: a member that hears heads-ups
for a job it does not know asks their origin for the job record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import strictpack
from protocol.errors import DecodeError
from protocol.wire import Envelope, MsgType
from spirtd.net.link import Link, LinkClosed, StreamSink
from spirtd.training.checkpoint import Snapshot

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi

log = logging.getLogger("spirtd.training")

STREAM_KIND = "training.state"
_LIMITS = strictpack.Limits(max_size=16384, max_depth=2, max_items=16, max_str=64, max_bin=12000)
_HEADER_LIMITS = strictpack.Limits(max_size=256, max_depth=1, max_items=10, max_str=64, max_bin=32)

# (job id) -> a snapshot of our state now, or None if we cannot serve it.
SnapshotSource = Callable[[str], Awaitable[Snapshot | None]]
# (job id) -> the job record, if we run that job.
RecordSource = Callable[[str], bytes | None]
RecordSink = Callable[[str, bytes, str], Awaitable[None]]  # (job id, record, origin)
# (job id, peer, wall-clock start, bytes sent): a transfer served in full.
ServedSink = Callable[[str, str, float, int], None]


class SyncError(RuntimeError):
    """A transfer that failed; the message says why (busy, timeout, refused...)."""


@dataclass(frozen=True)
class Position:
    """What a stream holds: the serving peer's (completed rounds, digest)."""

    completed: int
    digest: bytes


@dataclass
class _Partial:
    """The bytes of an interrupted transfer of ``position``: buf[:pos] are good as far
    as we know (the digest check after the rest arrives decides)."""

    position: Position
    buf: bytearray
    pos: int


@dataclass
class _Request:
    peer: str
    job: str
    max_total: int
    future: asyncio.Future[bytes]
    resume: _Partial | None = None
    sink: _Sink | None = None


class _Sink:
    """Collects one snapshot stream into a buffer sized (and bounded) up front; a
    resumed stream fills the rest of an earlier transfer's buffer."""

    def __init__(self, req: _Request, position: Position, buf: bytearray, pos: int) -> None:
        self.req = req
        self.position = position
        self.buf = buf
        self.start = pos
        self.pos = pos
        self.detached = False  # set when the request gave up: late bytes go nowhere

    async def write(self, data: memoryview) -> None:
        if self.detached:
            return
        end = self.pos + len(data)
        if end > len(self.buf):
            self.abort("longer than announced")
            return
        self.buf[self.pos : end] = data
        self.pos = end

    async def finish(self) -> None:
        if not self.detached and not self.req.future.done():
            if self.pos != len(self.buf):
                self.req.future.set_exception(SyncError("the state stream ended short"))
            else:
                self.req.future.set_result(bytes(self.buf))

    def abort(self, reason: str) -> None:
        if not self.req.future.done():
            self.req.future.set_exception(SyncError(f"the state stream failed: {reason}"))


class StateSync:
    """Both ends of state transfers, on one node."""

    def __init__(
        self,
        node: NodeApi,
        *,
        snapshot: SnapshotSource,
        record: RecordSource,
        on_record: RecordSink,
        max_serves: int,
        on_served: ServedSink = lambda job, peer, started, nbytes: None,
    ) -> None:
        self.node = node
        self._snapshot = snapshot
        self._record = record
        self._on_record = on_record
        self._on_served = on_served
        self.max_serves = max_serves
        self.serving = 0
        self._requests: dict[str, _Request] = {}  # by peer: one outstanding request each
        self._partial: dict[str, _Partial] = {}  # by job: at most one, the newest
        self._job_asks: dict[str, float] = {}  # job -> when we last asked for its record
        self._tasks: set[asyncio.Task[None]] = set()
        node.register(MsgType.STATE, self._on_envelope)
        node.register_stream(STREAM_KIND, self._on_stream)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for req in self._requests.values():
            if not req.future.done():
                req.future.set_exception(SyncError("shutting down"))

    # --- the requesting side -----------------------------------------------------------------

    async def fetch(
        self,
        peer: str,
        job: str,
        max_total: int,
        timeout: float,
        want: Position | None = None,
    ) -> bytes:
        """The encoded snapshot ``peer`` serves for ``job``; raises SyncError. With
        ``want`` (the position we are after), the rest of an interrupted transfer of
        that position is asked for instead of the whole state."""
        if peer in self._requests:
            raise SyncError(f"a transfer from {peer} is already under way")
        link = self._link(peer)
        if link is None:
            raise SyncError(f"no link to {peer}")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        part = self._partial.get(job)
        if part is not None and (want is None or part.position != want):
            del self._partial[job]  # a position nobody is after any more
            part = None
        req = _Request(peer, job, max_total, fut, resume=part)
        self._requests[peer] = req
        ask: dict[str, Any] = {"k": "get", "job": job}
        if part is not None:
            ask.update(at=part.pos, round=part.position.completed, digest=part.position.digest)
        try:
            self._send(link, ask)
            data = await asyncio.wait_for(fut, timeout)
            self._partial.pop(job, None)
            return data
        except TimeoutError:
            raise SyncError(f"no state from {peer} within {timeout:.0f}s") from None
        finally:
            self._requests.pop(peer, None)
            self._keep_partial(req)

    def _keep_partial(self, req: _Request) -> None:
        sink = req.sink
        if sink is None:
            return
        sink.detached = True
        if req.future.done() and not req.future.cancelled() and req.future.exception() is None:
            return
        if sink.pos > sink.start or (req.resume is not None and sink.start == req.resume.pos):
            # Got something (or nothing new, but still hold the earlier part): keep it.
            self._partial = {req.job: _Partial(sink.position, sink.buf, sink.pos)}
            self.node.counters["training.sync_partial_kept"] += 1

    def ask_job(self, peer: str, job: str, now: float, every_s: float = 5.0) -> None:
        """Asks ``peer`` for ``job``'s record, at most once per ``every_s`` per job."""
        if now - self._job_asks.get(job, -1e9) < every_s:
            return
        if len(self._job_asks) > 64:
            self._job_asks.clear()
        self._job_asks[job] = now
        link = self._link(peer)
        if link is not None:
            self._send(link, {"k": "job?", "job": job})

    def _on_stream(self, link: Link, total: int, header: bytes) -> StreamSink | None:
        req = self._requests.get(link.peer_id)
        try:
            obj = strictpack.unpack(header, _HEADER_LIMITS)
        except DecodeError:
            obj = None
        position = _stream_position(obj)
        if (
            req is None
            or req.future.done()
            or req.sink is not None
            or not isinstance(obj, dict)
            or position is None
            or obj.get("job") != req.job
            or not 0 < total <= req.max_total
        ):
            # Unasked, for another job, or bigger than the job's state can be.
            self.node.counters["training.sync_stream_refused"] += 1
            return None
        at = obj.get("at", 0)
        part = req.resume
        if at:
            # The rest of our partial: same position, from where it stopped, to its end.
            if (
                part is None
                or not isinstance(at, int)
                or at != part.pos
                or position != part.position
                or at + total != len(part.buf)
            ):
                self.node.counters["training.sync_stream_refused"] += 1
                return None
            self.node.counters["training.sync_resumed"] += 1
            self.node.counters["training.sync_resumed_bytes"] += at
            req.sink = _Sink(req, position, part.buf, at)
        else:
            req.sink = _Sink(req, position, bytearray(total), 0)
        return req.sink

    # --- the serving side --------------------------------------------------------------------

    def _on_envelope(self, link: Link, env: Envelope) -> None:
        if env.origin != link.peer_key or not isinstance(env.body, bytes):
            # Point to point only: a peer forwarding someone else's envelope as its own.
            self.node.counters["training.sync_bad_message"] += 1
            return
        try:
            obj = strictpack.unpack(env.body, _LIMITS)
            kind = strictpack.field(obj, "k", str, what="state message")
        except DecodeError:
            self.node.counters["training.sync_bad_message"] += 1
            return
        job = obj.get("job")
        if not isinstance(job, str) or len(job) != 32:
            self.node.counters["training.sync_bad_message"] += 1
            return
        if kind == "get":
            self._spawn(self._serve(link, job, _resume_point(obj)))
        elif kind == "busy":
            req = self._requests.get(link.peer_id)
            if req is not None and not req.future.done():
                req.future.set_exception(SyncError(f"{link.peer_id} is busy serving others"))
        elif kind == "job?":
            record = self._record(job)
            if record is not None:
                self._send(link, {"k": "job", "job": job, "record": record})
        elif kind == "job":
            record = obj.get("record")
            if isinstance(record, bytes):
                self._spawn(self._on_record(job, record, link.peer_id))
        else:
            self.node.counters["training.sync_bad_message"] += 1

    async def _serve(self, link: Link, job: str, resume: tuple[int, Position] | None) -> None:
        if self.serving >= self.max_serves:
            self.node.counters["training.sync_busy"] += 1
            self._send(link, {"k": "busy", "job": job})
            return
        self.serving += 1
        started = time.time()
        try:
            snap = await self._snapshot(job)
            if snap is None:
                self._send(link, {"k": "busy", "job": job})
                return
            pieces = snap.encode()
            full = sum(len(p) for p in pieces)
            at = 0
            if resume is not None and resume[1] == Position(snap.completed, snap.digest):
                at = resume[0] if 0 < resume[0] < full else 0
            header = {"job": job, "at": at, "round": snap.completed, "digest": snap.digest}
            meta = self.node.stream_meta(STREAM_KIND, strictpack.pack(header))
            await link.send_stream(meta, full - at, stream_pieces(pieces, at))
            self.node.counters["training.sync_served"] += 1
            self._on_served(job, link.peer_id, started, full - at)
            log.info(
                "served job %s state (round %d, %d of %d bytes) to %s",
                job[:12],
                snap.completed,
                full - at,
                full,
                link.peer_id,
            )
        except LinkClosed:
            pass
        except Exception as e:  # our Redis, a snapshot that will not encode: say so
            self.node.counters["training.sync_serve_failed"] += 1
            log.warning("serving job %s state to %s failed: %s", job[:12], link.peer_id, e)
        finally:
            self.serving -= 1

    # --- plumbing ----------------------------------------------------------------------------

    def partial_bytes(self, job: str) -> int:
        """How much of an interrupted transfer of ``job`` we hold (for status)."""
        part = self._partial.get(job)
        return part.pos if part is not None else 0

    def _link(self, peer: str) -> Link | None:
        t = self.node.transport
        link = t.links.get(peer) if t is not None else None
        return link if link is not None and link.close_reason is None else None

    def _send(self, link: Link, obj: dict[str, Any]) -> None:
        if not link.try_send(self.node.seal(MsgType.STATE, strictpack.pack(obj))):
            self.node.counters["training.sync_send_dropped"] += 1

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


def stream_pieces(pieces: list[bytes], at: int) -> Iterator[bytes | memoryview]:
    """``pieces`` from byte offset ``at`` on, without copying."""
    for p in pieces:
        if at >= len(p):
            at -= len(p)
            continue
        yield memoryview(p)[at:] if at else p
        at = 0


def _stream_position(obj: object) -> Position | None:
    if not isinstance(obj, dict):
        return None
    r, d = obj.get("round"), obj.get("digest")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        return None
    if not isinstance(d, bytes) or len(d) != 32:
        return None
    return Position(r, d)


def _resume_point(obj: dict[str, Any]) -> tuple[int, Position] | None:
    """A ``get``'s (offset, position) when it asks for the rest of a transfer."""
    at = obj.get("at")
    pos = _stream_position(obj)
    if isinstance(at, bool) or not isinstance(at, int) or at <= 0 or pos is None:
        return None
    return at, pos
