"""The receiving half of a link's socket: bytes in, whole records out.

An asyncio BufferedProtocol, so the event loop reads straight into memory we
hand it. A record's ciphertext gets a buffer of its own (its size is checked
from the header first) and, once a record is big enough to matter, the socket
reads land directly in that buffer: the kernel's copy is the only one before
decryption. Small records and headers are cut out of a scratch buffer, so a
burst of small messages still costs one read.

The protocol only frames; the link's reader task decrypts and dispatches.
Complete records wait in a queue bounded in bytes: above the high mark the
socket stops being read (TCP pushes back on the peer), below the low mark it
resumes, so memory per link is at most the queue plus one record in progress.
"""

from __future__ import annotations

import asyncio
from collections import deque

from protocol.errors import SessionError
from protocol.session import HEADER_SIZE, Session, record_buffer

SCRATCH_BYTES = 64 * 1024
# A body with at least this much still to come is read into place, not via scratch.
DIRECT_MIN = 16 * 1024
QUEUE_HIGH = 1 << 20
QUEUE_LOW = 256 * 1024


class ReadClosed(Exception):
    """The peer closed the connection, or it was lost."""


class RecordReader(asyncio.BufferedProtocol):
    def __init__(self, session: Session) -> None:
        self._session = session
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._header = bytearray()
        self._body: memoryview | None = None
        self._got = 0
        self._direct = False
        self._records: deque[tuple[bytes, memoryview]] = deque()
        self._queued = 0
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self.write_ok = asyncio.Event()
        self.write_ok.set()

    # -- set-up ------------------------------------------------------------------------

    def take_over(self, reader: asyncio.StreamReader, transport: asyncio.Transport) -> None:
        """Takes over ``transport`` from the StreamReader that carried the handshake.

        What that reader buffered past the handshake belongs to us (a peer may
        send right after its last handshake message); asyncio offers no public
        way to take a reader's buffer without awaiting, hence ``_buffer``."""
        buffered = bytes(reader._buffer)  # type: ignore[attr-defined]
        reader._buffer.clear()  # type: ignore[attr-defined]
        self._attach(transport, buffered, reader.at_eof())

    def _attach(self, transport: asyncio.Transport, already_read: bytes, at_eof: bool) -> None:
        self._transport = transport
        if transport.is_closing():
            self._fail(ReadClosed("connection closed during the handshake"))
            return
        transport.pause_reading()
        transport.set_protocol(self)
        if already_read:
            self._parse(memoryview(already_read))
        if at_eof:
            self._fail(ReadClosed("peer closed the connection"))
        elif not self._paused:
            transport.resume_reading()

    # -- the consumer side -------------------------------------------------------------

    async def next_record(self) -> tuple[bytes, memoryview]:
        """The next complete (header, ciphertext); raises what ended the stream."""
        while not self._records:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        header, body = self._records.popleft()
        self._queued -= len(body)
        if self._paused and self._queued <= QUEUE_LOW and self._error is None:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return header, body

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        body = self._body
        if body is not None and len(body) - self._got >= DIRECT_MIN:
            self._direct = True
            return body[self._got :]
        self._direct = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._got += nbytes
            assert self._body is not None
            if self._got == len(self._body):
                self._complete()
            return
        self._parse(self._scratch[:nbytes])

    def eof_received(self) -> bool:
        self._fail(ReadClosed("peer closed the connection"))
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ReadClosed(str(exc) if exc else "connection lost"))
        self.write_ok.set()  # wake a writer waiting for room so it sees the close

    def pause_writing(self) -> None:
        self.write_ok.clear()

    def resume_writing(self) -> None:
        self.write_ok.set()

    # -- framing -----------------------------------------------------------------------

    def _parse(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end and self._error is None:
            if self._body is None:
                take = min(HEADER_SIZE - len(self._header), end - pos)
                self._header += data[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_SIZE:
                    return
                try:
                    n = self._session.check_header(bytes(self._header))
                except SessionError as e:
                    self._fail(e)
                    return
                self._body = record_buffer(n)
                self._got = 0
            body = self._body
            take = min(len(body) - self._got, end - pos)
            body[self._got : self._got + take] = data[pos : pos + take]
            self._got += take
            pos += take
            if self._got == len(body):
                self._complete()

    def _complete(self) -> None:
        assert self._body is not None
        self._records.append((bytes(self._header), self._body))
        self._queued += len(self._body)
        self._header.clear()
        self._body = None
        self._got = 0
        self._ready.set()
        if self._queued >= QUEUE_HIGH and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
            tr = self._transport
            if tr is not None and not self._paused and not tr.is_closing():
                self._paused = True
                tr.pause_reading()
        self._ready.set()
