"""One authenticated, encrypted link to one peer: the asyncio shell around
protocol.session.Session.

Three tasks per link: a reader (records in → frames → handler), a writer
(send queue → records out), and a watchdog (keepalives and the idle timeout).
After the handshake the socket's protocol becomes a records.RecordReader,
which lands record bodies in place; the reader task decrypts and dispatches.
Streams move payloads of any size in chunks: the sender waits for queue space,
the reader waits for the sink, so memory stays at a few chunks per link however
large the payload.

Every frame but stream data (which we asked for) is charged to the link's
message budget before it is decoded; a peer over budget is simply not read
from until the debt is repaid, so a flood of cheap-to-send messages costs us
at most the budget's worth of decoding, and an honest burst is only delayed.
What decrypting and handling its frames costs (this thread's CPU time, decode
included; stream data aside) is charged to a CPU budget, so however costly a
message a peer finds, one link takes at most a fixed share of a core
(bench.hostile_link measures it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Protocol

from protocol import strictpack
from protocol.budget import LinkBudget, MessageBudget, TokenBucket
from protocol.errors import DecodeError, SessionError
from protocol.handshake import HandshakeResult
from protocol.session import HEADER_SIZE, FrameKind, Session
from spirtd import logs
from spirtd.config import TransportConfig
from spirtd.net.records import ReadClosed, RecordReader
from spirtd.net.sendqueue import QueueClosed, SendQueue

log = logging.getLogger("spirtd.link")

MAX_STREAM_BYTES = 1 << 40  # a stream may be huge; it is never held in memory whole
_STREAM_OPEN_LIMITS = strictpack.Limits(max_size=8192, max_depth=2, max_items=8, max_bin=4096)
_WRITE_HIGH_WATER = 1 << 20
# While in debt the reader re-reads the clock at least this often, so a clock
# that is not the event loop's (tests inject one) is followed.
_BUDGET_POLL_S = 0.25
# A debt smaller than this is let run on: a pause per frame (a flood of small
# ones at the message rate) costs the loop more than the frames themselves.
_MIN_PAUSE_S = 0.02
# The CPU time one link's frames may cost us to decrypt and handle (stream data
# aside): 4% of a core, with a burst of half a second. What is not metered
# (reading the socket, the loop's own work) shrinks with the frames let in, so
# a link costs about twice this at most. Honest traffic needs far less: an
# announcement costs a few hundred microseconds, a full membership state of
# 1700 members 16 ms.
HANDLER_CPU_PER_S = 0.04
HANDLER_CPU_BURST_S = 0.5


class LinkClosed(Exception):
    pass


class StreamSink(Protocol):
    """Where an incoming stream's bytes go. Awaiting ``write`` applies backpressure.
    ``data`` is a view over a buffer of its own, which the sink may keep."""

    async def write(self, data: memoryview) -> None: ...
    async def finish(self) -> None: ...
    def abort(self, reason: str) -> None: ...


# Asked about every message frame before the handler decodes it; False drops the
# frame unread. A service whose peer is known to send only what it ignores
# (gossip's graylist) spares us decoding it: the gate counts what it drops.
MessageGate = Callable[["Link", memoryview], bool]


class LinkHandler(Protocol):
    def on_message(self, link: Link, data: bytes) -> None: ...
    def on_stream(self, link: Link, stream: int, total: int, meta: bytes) -> StreamSink | None: ...


class Link:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        result: HandshakeResult,
        *,
        outbound: bool,
        initiator_id: str,
        dialed_addr: str | None,
        config: TransportConfig,
        handler: LinkHandler,
        counters: Counter[str],
        clock: Callable[[], float] = time.monotonic,
        gates: Sequence[MessageGate] = (),
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session
        self.peer_id = result.peer_id
        self.peer_key = result.peer_key
        self.peer_addr = result.peer_addr or (dialed_addr or "")
        self.admitted_by = result.admitted_by
        self.peer_cert = result.peer_cert
        self.session_id = result.session_id
        self.outbound = outbound
        self.initiator_id = initiator_id
        self.config = config
        self.handler = handler
        self.counters = counters
        self.opened_at = time.time()
        self.last_rx = time.monotonic()
        self.last_tx = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._queue: SendQueue[tuple[FrameKind, int, bytes]] = SendQueue(
            config.send_queue_frames, max(4, config.send_queue_frames // 8)
        )
        self._stream_ids = itertools.count(1)
        self._in_streams: dict[int, _InStream] = {}
        self._tasks: list[asyncio.Task] = []
        self._rx = RecordReader(session)
        self._clock = clock
        self._gates = gates  # the transport's list: gates added later apply too
        self.budget = LinkBudget(message_budget(config), clock())
        self.cpu_budget = TokenBucket(HANDLER_CPU_PER_S, HANDLER_CPU_BURST_S, clock())

    def __repr__(self) -> str:
        return f"<Link {self.peer_id[-8:]} {'out' if self.outbound else 'in'} {self.session_id}>"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        tr = self.writer.transport
        self._rx.take_over(self.reader, tr)  # type: ignore[arg-type]
        tr.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"link-read-{self.peer_id[-8:]}"),
            asyncio.create_task(self._write_loop(), name=f"link-write-{self.peer_id[-8:]}"),
            asyncio.create_task(self._watchdog(), name=f"link-watch-{self.peer_id[-8:]}"),
        ]

    def close(self, reason: str, *, notify_peer: bool = True) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if notify_peer and not self.writer.is_closing():
            try:
                header, ct = self.session.seal(FrameKind.CLOSE, reason.encode()[:200])
                self.writer.writelines((header, ct))
            except Exception:  # best effort on a dying link
                pass
        self._queue.close()
        for s in self._in_streams.values():
            s.sink.abort(f"link closed: {reason}")
        self._in_streams.clear()
        self.writer.close()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.closed.set()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.closed.wait()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        except TimeoutError:
            pass

    # -- sending -------------------------------------------------------------------------

    async def send(self, envelope: bytes) -> None:
        """Queues one message, waiting while the queue is full (backpressure)."""
        try:
            await self._queue.put((FrameKind.MESSAGE, 0, envelope))
        except QueueClosed:
            raise LinkClosed(self.close_reason or "closed") from None

    def try_send(self, envelope: bytes) -> bool:
        """Queues one message if there is room; False (counted) if not."""
        try:
            if self._queue.put_nowait((FrameKind.MESSAGE, 0, envelope)):
                return True
        except QueueClosed:
            return False
        self.counters["transport.send_queue_full"] += 1
        return False

    async def send_stream(
        self, meta: bytes, total: int, chunks: AsyncIterable[bytes] | Iterable[bytes]
    ) -> None:
        """Streams exactly ``total`` bytes from ``chunks``, ``meta`` first.

        Any chunk size may come in; it is cut to the configured chunk size, so
        memory in flight stays at (queue bound × chunk size)."""
        if not 0 <= total <= MAX_STREAM_BYTES:
            raise ValueError(f"stream size {total} out of range")
        sid = next(self._stream_ids) & 0xFFFFFFFF
        step = self.config.stream_chunk_bytes
        sent = 0
        try:
            await self._queue.put(
                (FrameKind.STREAM_OPEN, sid, strictpack.pack([total, meta])), bulk=True
            )

            async def put_piece(piece: bytes) -> None:
                nonlocal sent
                if sent + len(piece) > total:
                    raise ValueError("stream source yields more than its declared size")
                sent += len(piece)
                await self._queue.put((FrameKind.STREAM_DATA, sid, piece), bulk=True)

            async for chunk in aiter_chunks(chunks):
                if isinstance(chunk, bytes) and len(chunk) <= step:
                    await put_piece(chunk)  # the common case: no copy
                    continue
                view = memoryview(chunk)
                for off in range(0, len(view), step):
                    await put_piece(bytes(view[off : off + step]))
            if sent != total:
                raise ValueError(f"stream source ended at {sent} of {total} bytes")
            await self._queue.put((FrameKind.STREAM_END, sid, b""), bulk=True)
        except QueueClosed:
            raise LinkClosed(self.close_reason or "closed") from None
        except BaseException as e:
            if not self._queue._closed:
                self._queue.put_nowait(
                    (FrameKind.STREAM_ABORT, sid, str(e).encode()[:200]), bulk=True
                )
            raise

    # -- tasks ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        tr = self.writer.transport
        write_ok = self._rx.write_ok  # cleared while the socket's send buffer is over the mark
        try:
            while True:
                kind, stream, payload = await self._queue.get()
                if tr.is_closing():
                    raise ConnectionResetError("connection closed")
                header, ct = self.session.seal(kind, payload, stream)
                tr.writelines((header, ct))
                self.bytes_out += HEADER_SIZE + len(ct)
                self.last_tx = time.monotonic()
                if not write_ok.is_set():
                    # A peer that stops reading must not pin us forever.
                    async with asyncio.timeout(self.config.idle_timeout_s):
                        await write_ok.wait()
        except QueueClosed:
            pass
        except TimeoutError:
            self._fail("write_stalled", "peer stopped reading")
        except (ConnectionError, OSError) as e:
            self._fail("connection_lost", str(e))

    async def _read_loop(self) -> None:
        rx = self._rx
        session = self.session
        try:
            while True:
                header, body = await rx.next_record()
                start = time.thread_time()
                frame = session.open(header, body)
                self.last_rx = time.monotonic()
                self.bytes_in += HEADER_SIZE + len(body)
                if frame.kind is not FrameKind.STREAM_DATA:
                    # Stream data is what we asked for (gradient bodies): its
                    # decryption is the transfer's cost, not the peer's doing.
                    self.cpu_budget.charge(time.thread_time() - start, self._clock())
                    await self._pay(len(frame.payload))
                await self._dispatch(frame.kind, frame.stream, frame.payload)
        except SessionError as e:
            self.counters[f"session.{e.reason}"] += 1
            self._fail(e.reason, e.detail)
        except ReadClosed as e:
            self._fail("connection_lost", str(e), quiet=True)
        except (ConnectionError, OSError) as e:
            self._fail("connection_lost", str(e), quiet=True)
        except _PeerClosed as e:
            self._fail(f"peer_closed:{e}", "", quiet=True, notify=False)
        except _StreamViolation as e:
            self.counters["session.stream_violation"] += 1
            self._fail("stream_violation", str(e))

    async def _pay(self, nbytes: int) -> None:
        """Charges one frame to the budget and, if that leaves a debt (or the
        messages before it left a CPU debt), stops reading until it is repaid
        (the frame waits too: it made the debt, or would add to it)."""
        now = self._clock()
        if self.budget.charge(nbytes, now) > _MIN_PAUSE_S:
            self.counters["link.budget_throttled"] += 1
        elif self.cpu_budget.delay(now) > _MIN_PAUSE_S:
            self.counters["link.cpu_throttled"] += 1
        else:
            return
        while (wait := self._delay()) > 0:
            # Keep the watchdog from mistaking a throttled peer for a dead one.
            self.last_rx = time.monotonic()
            await asyncio.sleep(min(wait, _BUDGET_POLL_S))

    def _delay(self) -> float:
        now = self._clock()
        return max(self.budget.delay(now), self.cpu_budget.delay(now))

    async def _watchdog(self) -> None:
        idle = self.config.idle_timeout_s
        while True:
            await asyncio.sleep(idle / 6)
            now = time.monotonic()
            if now - self.last_rx > idle:
                self.counters["transport.idle_timeout"] += 1
                self._fail("idle_timeout", f"nothing received for {idle:.0f}s")
                return
            if now - self.last_tx > idle / 3:
                self._queue.put_nowait((FrameKind.PING, 0, b""))

    def _fail(self, reason: str, detail: str, *, quiet: bool = False, notify: bool = True) -> None:
        if self.close_reason is None:
            # reason and detail may carry the peer's own words (a CLOSE frame).
            (log.debug if quiet else log.warning)(
                "link to %s dropped: %s %s",
                self.peer_id,
                logs.quote(reason),
                logs.quote(detail),
                extra={"peer": self.peer_id},
            )
        self.close(reason, notify_peer=notify)

    # -- incoming frames -----------------------------------------------------------------

    async def _dispatch(self, kind: FrameKind, stream: int, payload: memoryview) -> None:
        # Stream data goes on as the view (sinks copy or keep it); everything else
        # is small and handed on as bytes.
        if kind is FrameKind.MESSAGE:
            # This thread's time only: what the loop spends on this message,
            # not what other threads (training, Redis clients) do meanwhile.
            start = time.thread_time()
            try:
                for gate in self._gates:
                    if not gate(self, payload):
                        return
                self.handler.on_message(self, bytes(payload))
            finally:
                self.cpu_budget.charge(time.thread_time() - start, self._clock())
        elif kind is FrameKind.STREAM_DATA:
            s = self._in_streams.get(stream)
            if s is None:
                raise _StreamViolation(f"data for unknown stream {stream}")
            s.received += len(payload)
            if s.received > s.total:
                raise _StreamViolation(f"stream {stream} exceeds its declared size")
            await s.sink.write(payload)
        elif kind is FrameKind.PING:
            self._queue.put_nowait((FrameKind.PONG, 0, b""))
        elif kind is FrameKind.PONG:
            pass
        elif kind is FrameKind.STREAM_OPEN:
            self._open_stream(stream, bytes(payload))
        elif kind is FrameKind.STREAM_END:
            s = self._in_streams.pop(stream, None)
            if s is None:
                raise _StreamViolation(f"end of unknown stream {stream}")
            if s.received != s.total:
                s.sink.abort("short stream")
                raise _StreamViolation(f"stream {stream} ended at {s.received} of {s.total}")
            await s.sink.finish()
        elif kind is FrameKind.STREAM_ABORT:
            s = self._in_streams.pop(stream, None)
            if s is not None:
                s.sink.abort(logs.sanitize(bytes(payload).decode(errors="replace")))
        elif kind is FrameKind.CLOSE:
            raise _PeerClosed(logs.sanitize(bytes(payload).decode(errors="replace")[:100]))

    def _open_stream(self, stream: int, payload: bytes) -> None:
        if stream in self._in_streams:
            raise _StreamViolation(f"stream {stream} opened twice")
        if len(self._in_streams) >= self.config.max_streams_per_link:
            raise _StreamViolation("too many concurrent streams")
        try:
            obj = strictpack.unpack(payload, _STREAM_OPEN_LIMITS)
        except DecodeError as e:
            raise _StreamViolation(f"bad stream header: {e}") from None
        if not (
            isinstance(obj, list)
            and len(obj) == 2
            and isinstance(obj[0], int)
            and not isinstance(obj[0], bool)
            and 0 <= obj[0] <= MAX_STREAM_BYTES
            and isinstance(obj[1], bytes)
        ):
            raise _StreamViolation("bad stream header")
        total, meta = obj
        sink = self.handler.on_stream(self, stream, total, meta)
        if sink is None:
            self.counters["transport.stream_refused"] += 1
            self._queue.put_nowait((FrameKind.STREAM_ABORT, stream, b"refused"))
            # Keep a discarding entry so the refused stream's data is consumed quietly.
            sink = _Discard()
        self._in_streams[stream] = _InStream(total, sink)

    # -- introspection -------------------------------------------------------------------

    def info(self) -> dict:
        return {
            "node_id": self.peer_id,
            "address": self.peer_addr,
            "direction": "outbound" if self.outbound else "inbound",
            "session": self.session_id,
            "cipher": self.session.cipher_name,
            "admitted_by": self.admitted_by,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "last_heard_s": round(time.monotonic() - self.last_rx, 3),
            "queued_frames": len(self._queue),
        }


def message_budget(config: TransportConfig) -> MessageBudget:
    return MessageBudget(
        messages_per_s=config.messages_per_s,
        message_burst=config.message_burst,
        bytes_per_s=config.message_bytes_per_s,
        byte_burst=config.message_byte_burst,
    )


class _InStream:
    __slots__ = ("received", "sink", "total")

    def __init__(self, total: int, sink: StreamSink) -> None:
        self.total = total
        self.sink = sink
        self.received = 0


class _Discard:
    async def write(self, data: memoryview) -> None:
        return None

    async def finish(self) -> None:
        return None

    def abort(self, reason: str) -> None:
        return None


class _PeerClosed(Exception):
    pass


class _StreamViolation(Exception):
    pass


async def aiter_chunks(
    chunks: AsyncIterable[bytes] | Iterable[bytes],
) -> AsyncIterator[bytes]:
    """Iterates sync and async chunk sources alike."""
    if isinstance(chunks, AsyncIterable):
        async for c in chunks:
            yield c
    else:
        for c in chunks:
            yield c
