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

The same envelope type carries ``job?``/``job``: a member that hears heads-ups
for a job it does not know asks their origin for the job record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
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
_HEADER_LIMITS = strictpack.Limits(max_size=256, max_depth=1, max_items=4, max_str=64)

# (job id) -> a snapshot of our state now, or None if we cannot serve it.
SnapshotSource = Callable[[str], Awaitable[Snapshot | None]]
# (job id) -> the job record, if we run that job.
RecordSource = Callable[[str], bytes | None]
RecordSink = Callable[[str, bytes, str], Awaitable[None]]  # (job id, record, origin)


class SyncError(RuntimeError):
    """A transfer that failed; the message says why (busy, timeout, refused...)."""


@dataclass
class _Request:
    peer: str
    job: str
    max_total: int
    future: asyncio.Future[bytes]


class _Sink:
    """Collects one snapshot stream into a buffer sized (and bounded) up front."""

    def __init__(self, req: _Request, total: int) -> None:
        self.req = req
        self.buf = bytearray(total)
        self.pos = 0

    async def write(self, data: memoryview) -> None:
        end = self.pos + len(data)
        if end > len(self.buf):
            self.abort("longer than announced")
            return
        self.buf[self.pos : end] = data
        self.pos = end

    async def finish(self) -> None:
        if not self.req.future.done():
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
    ) -> None:
        self.node = node
        self._snapshot = snapshot
        self._record = record
        self._on_record = on_record
        self.max_serves = max_serves
        self.serving = 0
        self._requests: dict[str, _Request] = {}  # by peer: one outstanding request each
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

    async def fetch(self, peer: str, job: str, max_total: int, timeout: float) -> bytes:
        """The encoded snapshot ``peer`` serves for ``job``; raises SyncError."""
        if peer in self._requests:
            raise SyncError(f"a transfer from {peer} is already under way")
        link = self._link(peer)
        if link is None:
            raise SyncError(f"no link to {peer}")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._requests[peer] = _Request(peer, job, max_total, fut)
        try:
            self._send(link, {"k": "get", "job": job})
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise SyncError(f"no state from {peer} within {timeout:.0f}s") from None
        finally:
            self._requests.pop(peer, None)

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
        if (
            req is None
            or req.future.done()
            or not isinstance(obj, dict)
            or obj.get("job") != req.job
            or not 0 < total <= req.max_total
        ):
            # Unasked, for another job, or bigger than the job's state can be.
            self.node.counters["training.sync_stream_refused"] += 1
            return None
        return _Sink(req, total)

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
            self._spawn(self._serve(link, job))
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

    async def _serve(self, link: Link, job: str) -> None:
        if self.serving >= self.max_serves:
            self.node.counters["training.sync_busy"] += 1
            self._send(link, {"k": "busy", "job": job})
            return
        self.serving += 1
        try:
            snap = await self._snapshot(job)
            if snap is None:
                self._send(link, {"k": "busy", "job": job})
                return
            pieces = snap.encode()
            total = sum(len(p) for p in pieces)
            meta = self.node.stream_meta(STREAM_KIND, strictpack.pack({"job": job}))
            await link.send_stream(meta, total, pieces)
            self.node.counters["training.sync_served"] += 1
            log.info(
                "served job %s state (round %d, %d bytes) to %s",
                job[:12],
                snap.completed,
                total,
                link.peer_id,
            )
        except LinkClosed:
            pass
        finally:
            self.serving -= 1

    # --- plumbing ----------------------------------------------------------------------------

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
