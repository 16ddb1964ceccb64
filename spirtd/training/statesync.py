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

A transfer joined from several sources that fails its digest cannot say by itself
who lied, so the receiver checks it (spec-free, ``checkpoint.encoded_digest``)
before handing it on. If it fails, the peer being asked now sends its whole state
again: when that verifies, the earlier bytes are compared with it and each source
whose range differs is blamed (``blamed``, ``training.sync_bad_state``); when it
does not, that peer alone served it and is blamed. A partial holding bytes of a
blamed peer is never resumed. A transfer from one source is left to the caller's
digest check, which then blames the right peer already.

Serving is bounded twice: at most ``max_serves`` transfers at once, and per
requesting peer a token bucket: ``SERVE_BURST`` requests back to back, then one
per ``SERVE_EVERY_S`` seconds (``SERVE_PEERS`` peers tracked, the least recently
seen forgotten). A ``get`` over budget gets a ``busy`` reply saying so
(``why: rate``), counted in ``training.sync_rate_limited``; the link stays up.

The same envelope type carries ``job?``/``job``: a member that hears heads-ups
for a job it does not know asks their origin for the job record. A record is
taken only as the answer to such a question: from the peer asked, for the job
asked about, within ``RECORD_WAIT_S``, once, and hashing to that job id. Anything
else is dropped and counted (``training.sync_record_unasked``/``_mismatch``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import strictpack
from protocol.budget import KeyedBuckets
from protocol.errors import DecodeError
from protocol.wire import Envelope, MsgType
from spirtd.net.link import Link, LinkClosed, StreamSink
from spirtd.training.checkpoint import Snapshot, SnapshotError, encoded_digest
from spirtd.training.job import JobSpec

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi

log = logging.getLogger("spirtd.training")

STREAM_KIND = "training.state"
_LIMITS = strictpack.Limits(max_size=16384, max_depth=2, max_items=16, max_str=64, max_bin=12000)
_HEADER_LIMITS = strictpack.Limits(max_size=256, max_depth=1, max_items=10, max_str=64, max_bin=32)

SERVE_BURST = 6  # state requests one peer may make back to back...
SERVE_EVERY_S = 5.0  # ...then one per this many seconds
SERVE_PEERS = 256  # requesting peers whose budget is tracked
RECORD_WAIT_S = 30.0  # how long an asked-for job record is awaited
MAX_JOB_ASKS = 64  # jobs whose record we asked for, remembered
MAX_BLAMED = 256  # peers remembered as having served bad state bytes

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


# Who served which bytes of a transfer: (peer, start, end), in order, back to back.
Sources = tuple[tuple[str, int, int], ...]


@dataclass
class _Partial:
    """The bytes of an interrupted transfer of ``position``: buf[:pos] are good as far
    as we know (the digest check after the rest arrives decides)."""

    position: Position
    buf: bytearray
    pos: int
    sources: Sources


@dataclass
class _Got:
    """A transfer received in full (not yet checked against its digest)."""

    data: bytes
    position: Position
    sources: Sources


@dataclass
class _JobAsk:
    peer: str
    at: float
    open: bool = True  # no record taken for it yet


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
        serve_burst: int = SERVE_BURST,
        serve_every_s: float = SERVE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self._snapshot = snapshot
        self._record = record
        self._on_record = on_record
        self._on_served = on_served
        self._clock = clock
        self.max_serves = max_serves
        self.serving = 0
        self._serve_budget = KeyedBuckets(1.0 / serve_every_s, serve_burst, SERVE_PEERS)
        self._requests: dict[str, _Request] = {}  # by peer: one outstanding request each
        self._partial: dict[str, _Partial] = {}  # by job: at most one, the newest
        self._job_asks: dict[str, _JobAsk] = {}  # by job, oldest first
        self.blamed: dict[str, int] = {}  # peer -> state transfers it served bad bytes in
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
        that position is asked for instead of the whole state. ``timeout`` bounds each
        transfer; a joined transfer that fails its digest costs a second one."""
        part = self._partial.get(job)
        if part is not None and (
            want is None
            or part.position != want
            or any(src in self.blamed for src, _, _ in part.sources)
        ):
            del self._partial[job]  # a position nobody is after, or bytes of a liar
            part = None
        log.info(
            "asking %s for job %s state%s",
            peer,
            job[:12],
            "" if want is None else f" (round {want.completed})",
        )
        got = await self._transfer(peer, job, max_total, timeout, part)
        if len({src for src, _, _ in got.sources}) < 2:
            return got.data  # one source: the caller's digest check blames it alone
        try:
            await asyncio.to_thread(encoded_digest, got.data, job_id=job)
            return got.data
        except SnapshotError as e:
            self.node.counters["training.sync_joined_bad"] += 1
            log.warning(
                "job %s state joined from %s fails its digest (%s); asking %s for all of it",
                job[:12],
                ", ".join(f"{s}[{a}:{b}]" for s, a, b in got.sources),
                e,
                peer,
            )
        whole = await self._transfer(peer, job, max_total, timeout, None)
        try:
            position = Position(*await asyncio.to_thread(encoded_digest, whole.data, job_id=job))
        except SnapshotError as e:
            self._blame(peer, 0, len(whole.data), str(e))
            raise SyncError(f"the state {peer} served does not match its digest") from None
        if position == got.position:
            bad = await asyncio.to_thread(_differing, got, whole.data)
            for src, start, end in bad:
                self._blame(src, start, end, "differs from the verified state")
        else:
            log.info(
                "job %s: %s moved on meanwhile; which source served bad bytes stays unknown",
                job[:12],
                peer,
            )
        return whole.data

    async def _transfer(
        self, peer: str, job: str, max_total: int, timeout: float, part: _Partial | None
    ) -> _Got:
        """One request to ``peer`` (for the rest of ``part`` if given) and its stream."""
        if peer in self._requests:
            raise SyncError(f"a transfer from {peer} is already under way")
        link = self._link(peer)
        if link is None:
            raise SyncError(f"no link to {peer}")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        req = _Request(peer, job, max_total, fut, resume=part)
        self._requests[peer] = req
        ask: dict[str, Any] = {"k": "get", "job": job}
        if part is not None:
            ask.update(at=part.pos, round=part.position.completed, digest=part.position.digest)
        try:
            self._send(link, ask)
            data = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise SyncError(f"no state from {peer} within {timeout:.0f}s") from None
        finally:
            self._requests.pop(peer, None)
            self._keep_partial(req)
        self._partial.pop(job, None)
        assert req.sink is not None  # a result is only set by the sink
        return _Got(data, req.sink.position, _sources(req, len(data)))

    def _keep_partial(self, req: _Request) -> None:
        sink = req.sink
        if sink is None:
            return
        sink.detached = True
        if req.future.done() and not req.future.cancelled() and req.future.exception() is None:
            return
        if sink.pos > sink.start or (req.resume is not None and sink.start == req.resume.pos):
            # Got something (or nothing new, but still hold the earlier part): keep it.
            part = _Partial(sink.position, sink.buf, sink.pos, _sources(req, sink.pos))
            self._partial = {req.job: part}
            self.node.counters["training.sync_partial_kept"] += 1

    def _blame(self, peer: str, start: int, end: int, why: str) -> None:
        self.blamed[peer] = self.blamed.pop(peer, 0) + 1
        while len(self.blamed) > MAX_BLAMED:
            del self.blamed[next(iter(self.blamed))]
        self.node.counters["training.sync_bad_state"] += 1
        log.warning("state bytes %d..%d served by %s are bad: %s", start, end, peer, why)

    def ask_job(self, peer: str, job: str, now: float, every_s: float = 5.0) -> None:
        """Asks ``peer`` for ``job``'s record, at most once per ``every_s`` per job.
        ``now``: this StateSync's clock (time.monotonic unless one was passed)."""
        ask = self._job_asks.pop(job, None)
        if ask is not None and now - ask.at < every_s:
            self._job_asks[job] = ask
            return
        link = self._link(peer)
        if link is None:
            # No link to that origin yet (a joiner's links come up one by one): no
            # question went out, so none is remembered, and the next heads-up, from
            # a peer we are linked to, asks at once instead of ``every_s`` later.
            return
        self._job_asks[job] = _JobAsk(peer, now)
        while len(self._job_asks) > MAX_JOB_ASKS:
            del self._job_asks[next(iter(self._job_asks))]
        self._send(link, {"k": "job?", "job": job})

    def _take_record(self, link: Link, job: str, record: object) -> None:
        ask = self._job_asks.get(job)
        if (
            ask is None
            or not ask.open
            or ask.peer != link.peer_id
            or self._clock() - ask.at > RECORD_WAIT_S
        ):
            self.node.counters["training.sync_record_unasked"] += 1
            log.info("dropped a job %s record %s did not get asked for", job[:12], link.peer_id)
            return
        if not isinstance(record, bytes) or JobSpec.job_id(record) != job:
            self.node.counters["training.sync_record_mismatch"] += 1
            log.warning("job record from %s does not hash to job %s", link.peer_id, job[:12])
            return
        ask.open = False
        log.info("job %s record from %s", job[:12], link.peer_id)
        self._spawn(self._on_record(job, record, link.peer_id))

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
            if self._serve_budget.try_take(link.peer_id, 1, self._clock()):
                self._spawn(self._serve(link, job, _resume_point(obj)))
            else:
                self.node.counters["training.sync_rate_limited"] += 1
                self._send(link, {"k": "busy", "job": job, "why": "rate"})
        elif kind == "busy":
            req = self._requests.get(link.peer_id)
            if req is not None and req.job == job and not req.future.done():
                why = (
                    "refused: this node asked it for state too often"
                    if obj.get("why") == "rate"
                    else "busy serving others"
                )
                req.future.set_exception(SyncError(f"{link.peer_id} {why}"))
        elif kind == "job?":
            record = self._record(job)
            if record is not None:
                self._send(link, {"k": "job", "job": job, "record": record})
        elif kind == "job":
            self._take_record(link, job, obj.get("record"))
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


def _sources(req: _Request, end: int) -> Sources:
    """Who served buf[:end] of ``req``'s sink: the resumed partial's sources, then
    the peer asked now for what it sent."""
    sink = req.sink
    assert sink is not None
    prior = req.resume.sources if req.resume is not None and sink.start > 0 else ()
    return (*prior, (req.peer, sink.start, end)) if end > sink.start else prior


def _differing(got: _Got, good: bytes) -> list[tuple[str, int, int]]:
    """The sources of ``got`` whose bytes differ from ``good`` (same length)."""
    a, b = memoryview(got.data), memoryview(good)
    return [(src, s, e) for src, s, e in got.sources if a[s:e] != b[s:e]]


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
