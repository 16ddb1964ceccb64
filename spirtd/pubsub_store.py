"""Where pub/sub bodies live: in memory up to a per-body and a total budget, in
0600 files under DATA_DIR/pubsub beyond that, for ``retain_s`` and at most
``disk_total`` bytes, oldest evicted first. Bodies being received are
``_Partial``s until their last chunk verifies."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.gossip import (
    Announcement,
)
from protocol.gossip.transfer import (
    ByteBudget,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("spirtd.pubsub")

READ_PIECE = 256 * 1024


@dataclass(frozen=True, slots=True)
class StoreLimits:
    # A round's gradients are tens of MB each and are read back at once, so they
    # belong in memory: spilling 40 MB bodies to files made page-cache writeback
    # a third of a receiving daemon's time in bench.dissemination (py-spy).
    memory_body_max: int = 64 << 20
    memory_total: int = 512 << 20
    disk_total: int = 16 << 30  # beyond memory_total: 0600 files under DATA_DIR/pubsub
    retain_s: float = 300.0


class Segments:
    """A body in memory, held as the pieces it arrived in.

    Received chunks are already immutable ``bytes`` (fresh from decryption), so we
    keep views of them instead of copying into one buffer allocated up front.
    A zero-filled 40 MB bytearray per body made page faults (the kernel zeroing
    new pages) a third of all CPU in bench.dissemination (perf); and whole pieces
    go back out when serving without a copy. Writes are sequential; a write
    before the end (a transfer resumed at the last verified chunk from another
    source) first cuts the pieces back to that offset."""

    __slots__ = ("_ends", "_parts", "size")

    def __init__(self) -> None:
        self._parts: list[memoryview] = []
        self._ends: list[int] = []
        self.size = 0

    def write(self, off: int, data: memoryview) -> None:
        if off < self.size:
            self._truncate(off)
        elif off > self.size:
            raise ValueError(f"non-sequential write at {off} (have {self.size} bytes)")
        if not len(data):
            return
        # Only an immutable exporter may be kept by reference: a producer could
        # reuse a bytearray for its next chunk.
        part = data if isinstance(data.obj, bytes) else memoryview(bytes(data))
        self._parts.append(part)
        self.size += len(part)
        self._ends.append(self.size)

    def _truncate(self, off: int) -> None:
        i = bisect.bisect_right(self._ends, off)
        parts, ends = self._parts[:i], self._ends[:i]
        if i < len(self._parts):
            start = self._ends[i] - len(self._parts[i])
            if off > start:
                parts.append(self._parts[i][: off - start])
                ends.append(off)
        self._parts, self._ends, self.size = parts, ends, off

    def pieces(self, start: int = 0, step: int = READ_PIECE) -> Iterator[bytes]:
        i = bisect.bisect_right(self._ends, start)
        pos = start
        while i < len(self._parts):
            part = self._parts[i]
            part_start = self._ends[i] - len(part)
            view = part[pos - part_start :]
            if len(view) <= step and len(view) == len(view.obj):  # type: ignore[arg-type]
                yield view.obj  # type: ignore[misc]  # a whole received chunk: no copy
            else:
                for o in range(0, len(view), step):
                    yield bytes(view[o : o + step])
            pos = self._ends[i]
            i += 1

    def read(self) -> bytes:
        return b"".join(self.pieces())


class Body:
    """A verified body held by this node, in memory or in a file."""

    __slots__ = ("_fd", "_mem", "chunk_size", "path", "size", "stored_at", "table")

    def __init__(
        self,
        size: int,
        chunk_size: int,
        table: bytes,
        *,
        mem: bytes | Segments | None = None,
        path: Path | None = None,
        fd: int | None = None,
    ) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.table = table
        self._mem = mem
        self.path = path
        self._fd = fd
        self.stored_at = time.monotonic()

    @property
    def in_memory(self) -> bool:
        return self._mem is not None

    def pieces(self, start: int = 0, step: int = READ_PIECE) -> Iterator[bytes]:
        if isinstance(self._mem, Segments):
            yield from self._mem.pieces(start, step)
            return
        if self._mem is not None:
            view = memoryview(self._mem)
            for off in range(start, self.size, step):
                yield bytes(view[off : off + step])
            return
        assert self._fd is not None
        for off in range(start, self.size, step):
            data = os.pread(self._fd, min(step, self.size - off), off)
            if not data:
                raise OSError(f"body file {self.path} is shorter than {self.size}")
            yield data

    def read(self) -> bytes:
        """The whole body (a copy). For large bodies prefer ``pieces``."""
        if isinstance(self._mem, Segments):
            return self._mem.read()
        if self._mem is not None:
            return bytes(self._mem)
        return b"".join(self.pieces())

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class _Partial:
    """A body being received: storage for ``size`` bytes, verified up to a chunk
    boundary; survives a change of source so the transfer resumes there."""

    __slots__ = ("ann", "fd", "mem", "path", "reserved", "verified_chunks")

    def __init__(self, ann: Announcement) -> None:
        self.ann = ann
        self.mem: Segments | None = None
        self.path: Path | None = None
        self.fd: int | None = None
        self.reserved = 0
        self.verified_chunks = 0

    def write(self, off: int, data: memoryview) -> None:
        if self.mem is not None:
            self.mem.write(off, data)
        else:
            assert self.fd is not None
            while len(data):
                n = os.pwrite(self.fd, data, off)
                data = data[n:]
                off += n


class BodyStore:
    def __init__(self, root: Path, limits: StoreLimits) -> None:
        self.root = root
        self.limits = limits
        self.memory = ByteBudget(limits.memory_total)
        self.disk = ByteBudget(limits.disk_total)
        self.bodies: dict[bytes, Body] = {}
        self._order: deque[bytes] = deque()
        self._names = itertools.count(1)
        self.evicted = 0

    def reset(self) -> None:
        # Bodies do not survive a restart (the machine forgets its ids too).
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, mode=0o700, exist_ok=True)

    def _new_file(self, size: int) -> tuple[Path, int]:
        path = self.root / f"b{os.getpid()}-{next(self._names)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return path, fd

    def allocate(self, p: _Partial, size: int) -> None:
        """Memory if it fits the per-body and total budgets, else a file."""
        self.make_room(size)
        if size <= self.limits.memory_body_max and self.memory.reserve(size):
            p.mem = Segments()
            p.reserved = size
            return
        if not self.disk.reserve(size):
            raise OSError(f"body store full: {size} bytes do not fit in {self.disk.limit}")
        p.path, p.fd = self._new_file(size)

    def release_partial(self, p: _Partial) -> None:
        if p.mem is not None:
            self.memory.release(p.reserved)
        elif p.fd is not None:
            self.disk.release(p.ann.size)
            with contextlib.suppress(OSError):
                os.close(p.fd)
            if p.path is not None:
                p.path.unlink(missing_ok=True)
        p.mem, p.fd, p.path = None, None, None

    def commit(self, mid: bytes, p: _Partial, table: bytes) -> Body:
        body = Body(p.ann.size, p.ann.chunk_size, table, mem=p.mem, path=p.path, fd=p.fd)
        p.mem, p.fd, p.path = None, None, None  # ownership moves to the Body
        self._add(mid, body)
        return body

    def _add(self, mid: bytes, body: Body) -> None:
        self.bodies[mid] = body
        self._order.append(mid)

    def put_memory(self, mid: bytes, data: bytes, chunk_size: int, table: bytes) -> Body:
        self.make_room(len(data))
        if not self.memory.reserve(len(data)):
            raise OSError("body store memory budget exhausted")
        body = Body(len(data), chunk_size, table, mem=data)
        self._add(mid, body)
        return body

    def get(self, mid: bytes) -> Body | None:
        return self.bodies.get(mid)

    def make_room(self, size: int) -> None:
        """Evicts the oldest bodies while ``size`` more would not fit both budgets."""
        while self._order and (
            self.memory.used + size > self.memory.limit or self.disk.used + size > self.disk.limit
        ):
            self._evict(self._order[0])

    def expire(self, now: float) -> list[bytes]:
        gone = []
        while self._order and now - self.bodies[self._order[0]].stored_at > self.limits.retain_s:
            gone.append(self._order[0])
            self._evict(self._order[0])
        return gone

    def _evict(self, mid: bytes) -> None:
        with contextlib.suppress(ValueError):
            self._order.remove(mid)
        body = self.bodies.pop(mid, None)
        if body is None:
            return
        self.evicted += 1
        if body.in_memory:
            self.memory.release(body.size)
        else:
            self.disk.release(body.size)
        body.close()

    def status(self) -> dict[str, Any]:
        return {
            "bodies": len(self.bodies),
            "memory_bytes": self.memory.used,
            "disk_bytes": self.disk.used,
            "evicted": self.evicted,
        }


def partial_pieces(p: _Partial, size: int) -> Iterator[bytes]:
    if p.mem is not None:
        yield from p.mem.pieces(0)
        return
    assert p.fd is not None
    for off in range(0, size, READ_PIECE):
        yield os.pread(p.fd, min(READ_PIECE, size - off), off)
