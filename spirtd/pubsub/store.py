"""Where pub/sub bodies live: in memory up to a per-body and a total budget, in
0600 files under DATA_DIR/pubsub beyond that, for ``retain_s`` and at most
``disk_total`` bytes, oldest evicted first, or until their owner releases them
(``release``: a closed round's gradients). Bodies being received are
``_Partial``s until their last chunk verifies.

A body being served is pinned: evicting or releasing it takes it out of the
store at once (nobody new finds it) but frees its memory or file only when the
last serve ends, so a stream never reads freed slabs or a closed (and perhaps
reused) file descriptor.

In memory, a body of at least a slab goes into slabs of the store's SlabPool
(recycled pages: see bufpool); a smaller one keeps the pieces it arrived in.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import shutil
import threading
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
    BodyReceiver,
    ByteBudget,
)
from spirtd import malloc_tuning
from spirtd.config import PubSubConfig
from spirtd.pubsub.bufpool import ARENA_BYTES, SlabPool, round_up

if TYPE_CHECKING:
    pass

log = logging.getLogger("spirtd.pubsub")

READ_PIECE = 256 * 1024
# Record buffers in flight while bodies move, from the C heap: per link up to a
# 1 MiB receive queue, 2 MiB of queued chunks and a 1 MiB socket write buffer.
# With reserve set, this much heap is touched at start-up too (see reset).
HEAP_WORKING_SET = 32 << 20


@dataclass(frozen=True, slots=True)
class StoreLimits:
    # A round's gradients are tens of MB each and are read back at once, so they
    # belong in memory: spilling 40 MB bodies to files made page-cache writeback
    # a third of a receiving daemon's time in bench.dissemination (py-spy).
    memory_body_max: int = 64 << 20
    memory_total: int = 512 << 20
    disk_total: int = 16 << 30  # beyond memory_total: 0600 files under DATA_DIR/pubsub
    retain_s: float = 300.0
    # Body memory faulted in at start-up, so the first round lands in warm pages.
    memory_reserve: int = 0

    @classmethod
    def from_config(cls, c: PubSubConfig) -> StoreLimits:
        mb = 1 << 20
        return cls(
            memory_body_max=c.body_memory_max_mb * mb,
            memory_total=c.memory_mb * mb,
            disk_total=c.disk_mb * mb,
            retain_s=c.retain_s,
            memory_reserve=c.reserve_mb * mb,
        )


class Segments:
    """A small body in memory, held as the pieces it arrived in.

    Received chunks are already immutable ``bytes`` (fresh from decryption), so we
    keep views of them rather than copy; whole pieces go back out when serving
    without a copy. Writes are sequential; a write before the end (a transfer
    resumed at the last verified chunk from another source) first cuts the
    pieces back to that offset."""

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

    def free(self) -> None:
        self._parts, self._ends, self.size = [], [], 0


class SlabBody:
    """A large body in memory, copied into slabs of the store's pool.

    Same write contract as Segments (sequential; an earlier offset cuts back).
    Readers may run on worker threads: ``pieces`` registers its reader before
    returning, and ``free`` while someone reads only marks the body, the last
    reader giving the slabs back, so a slab is never reused under a reader."""

    __slots__ = ("_freed", "_lock", "_pool", "_readers", "_slabs", "size")

    def __init__(self, pool: SlabPool) -> None:
        self._pool = pool
        self._slabs: list[int] = []
        self.size = 0
        self._lock = threading.Lock()
        self._readers = 0
        self._freed = False

    def write(self, off: int, data: memoryview) -> None:
        if off < self.size:
            self._truncate(off)
        elif off > self.size:
            raise ValueError(f"non-sequential write at {off} (have {self.size} bytes)")
        pool = self._pool
        sb = pool.slab_bytes
        view = memoryview(data).cast("B")
        while len(view):
            i, o = divmod(self.size, sb)
            if i == len(self._slabs):
                sid = pool.take()
                if sid is None:
                    raise OSError("body pool exhausted")
                self._slabs.append(sid)
            n = min(sb - o, len(view))
            pool.view(self._slabs[i])[o : o + n] = view[:n]
            self.size += n
            view = view[n:]

    def _truncate(self, off: int) -> None:
        keep = round_up(off, self._pool.slab_bytes) // self._pool.slab_bytes
        for sid in self._slabs[keep:]:
            self._pool.give(sid)
        del self._slabs[keep:]
        self.size = off

    def pieces(self, start: int = 0, step: int = READ_PIECE) -> Iterator[bytes]:
        with self._lock:
            if self._freed:
                raise OSError("body was evicted")
            self._readers += 1
        return _SlabReader(self, start, step)

    def read(self) -> bytes:
        return b"".join(self.pieces())

    def _piece(self, pos: int, step: int) -> bytes:
        """A copy of up to ``step`` bytes at ``pos``, within one slab."""
        sb = self._pool.slab_bytes
        i, o = divmod(pos, sb)
        n = min(step, sb - o, self.size - pos)
        return bytes(self._pool.view(self._slabs[i])[o : o + n])

    def _done_reading(self) -> None:
        with self._lock:
            self._readers -= 1
            release = self._freed and self._readers == 0
        if release:
            self._give_all()

    def free(self) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = True
            release = self._readers == 0
        if release:
            self._give_all()

    def _give_all(self) -> None:
        slabs, self._slabs = self._slabs, []
        for sid in slabs:
            self._pool.give(sid)


class _SlabReader:
    """Copies a SlabBody out in pieces; unregisters when exhausted, closed or dropped."""

    __slots__ = ("_body", "_pos", "_step")

    def __init__(self, body: SlabBody, start: int, step: int) -> None:
        self._body: SlabBody | None = body
        self._pos = start
        self._step = step

    def __iter__(self) -> _SlabReader:
        return self

    def __next__(self) -> bytes:
        body = self._body
        if body is None or self._pos >= body.size:
            self.close()
            raise StopIteration
        piece = body._piece(self._pos, self._step)
        self._pos += len(piece)
        return piece

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body._done_reading()

    def __del__(self) -> None:
        self.close()


class Body:
    """A verified body held by this node, in memory or in a file."""

    __slots__ = ("_fd", "_mem", "chunk_size", "path", "reserved", "size", "stored_at", "table")

    def __init__(
        self,
        size: int,
        chunk_size: int,
        table: bytes,
        *,
        mem: bytes | Segments | SlabBody | None = None,
        reserved: int = 0,
        path: Path | None = None,
        fd: int | None = None,
    ) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.table = table
        self._mem = mem
        self.reserved = reserved  # memory budget held (slabs are whole)
        self.path = path
        self._fd = fd
        self.stored_at = time.monotonic()

    @property
    def in_memory(self) -> bool:
        return self._mem is not None

    def pieces(self, start: int = 0, step: int = READ_PIECE) -> Iterator[bytes]:
        if isinstance(self._mem, Segments | SlabBody):
            return self._mem.pieces(start, step)
        return self._other_pieces(start, step)

    def _other_pieces(self, start: int, step: int) -> Iterator[bytes]:
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
        if isinstance(self._mem, Segments | SlabBody):
            return self._mem.read()
        if self._mem is not None:
            return bytes(self._mem)
        return b"".join(self.pieces())

    def close(self) -> None:
        if isinstance(self._mem, Segments | SlabBody):
            self._mem.free()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class _Partial:
    """A body being received: storage for ``size`` bytes, verified up to a chunk
    boundary; survives a change of source so the transfer resumes there.

    It also keeps the chunk table once one source's copy has verified, so a
    resumed pull compares the next source's copy in place instead of buffering
    another one (see transfer.BodyReceiver)."""

    __slots__ = ("_rx", "ann", "fd", "mem", "path", "reserved", "table", "verified_chunks")

    def __init__(self, ann: Announcement) -> None:
        self.ann = ann
        self.mem: Segments | SlabBody | None = None
        self.path: Path | None = None
        self.fd: int | None = None
        self.reserved = 0
        self.verified_chunks = 0
        self.table = b""
        self._rx: BodyReceiver | None = None

    def receiver(self, first_chunk: int) -> BodyReceiver:
        """The verifier for a pull of this body starting at ``first_chunk``."""
        ann = self.ann
        rx = BodyReceiver(
            ann.size, ann.chunk_size, ann.digest, first_chunk, known_table=self.table or None
        )
        self._rx = rx
        return rx

    def write(self, off: int, data: memoryview) -> None:
        if not self.table and self._rx is not None:
            # A body byte is only ever written after its table verified.
            self.table = self._rx.table
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
        # Slab use never exceeds the memory budget (reservations are in whole slabs).
        self.pool = SlabPool(round_up(limits.memory_total, ARENA_BYTES))
        self.bodies: dict[bytes, Body] = {}
        self._order: deque[bytes] = deque()
        self._names = itertools.count(1)
        self.evicted = 0
        self.released = 0
        self._pins: dict[Body, int] = {}  # (by identity) serves reading the body
        self._doomed: set[Body] = set()  # out of the store, freed at the last unpin

    def reset(self) -> None:
        # Bodies do not survive a restart (the machine forgets its ids too).
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, mode=0o700, exist_ok=True)
        if self.limits.memory_reserve:
            t = time.monotonic()
            try:
                self.pool.reserve(self.limits.memory_reserve)
                malloc_tuning.prewarm_heap(HEAP_WORKING_SET)
            except OSError as e:  # the reserve only saves time: run without the rest
                log.warning(
                    "body memory: reserved %d of %d MiB (%s); the rest is faulted in on use",
                    self.pool.capacity >> 20,
                    self.limits.memory_reserve >> 20,
                    e,
                )
            else:
                log.info(
                    "body memory: %d MiB faulted in in %.2fs",
                    self.pool.capacity >> 20,
                    time.monotonic() - t,
                )

    def close(self) -> None:
        for mid in list(self.bodies):
            self._evict(mid)
        doomed, self._doomed = self._doomed, set()
        self._pins.clear()
        for body in doomed:
            self._free(body)
        self.pool.close()

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
        sb = self.pool.slab_bytes
        slabbed = size >= sb
        need = round_up(size, sb) if slabbed else size
        self.make_room(need)
        if size <= self.limits.memory_body_max and self.memory.reserve(need):
            p.mem = SlabBody(self.pool) if slabbed else Segments()
            p.reserved = need
            return
        if not self.disk.reserve(size):
            raise OSError(f"body store full: {size} bytes do not fit in {self.disk.limit}")
        p.path, p.fd = self._new_file(size)

    def release_partial(self, p: _Partial) -> None:
        if p.mem is not None:
            self.memory.release(p.reserved)
            p.mem.free()
        elif p.fd is not None:
            self.disk.release(p.ann.size)
            with contextlib.suppress(OSError):
                os.close(p.fd)
            if p.path is not None:
                p.path.unlink(missing_ok=True)
        p.mem, p.fd, p.path = None, None, None

    def commit(self, mid: bytes, p: _Partial, table: bytes) -> Body:
        body = Body(
            p.ann.size,
            p.ann.chunk_size,
            table,
            mem=p.mem,
            reserved=p.reserved,
            path=p.path,
            fd=p.fd,
        )
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
        body = Body(len(data), chunk_size, table, mem=data, reserved=len(data))
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

    def release(self, mid: bytes) -> bool:
        """The owner is done with ``mid``'s body: out now (freed once no serve reads
        it). False if the store did not hold it (never, expired, evicted)."""
        if mid not in self.bodies:
            return False
        self._evict(mid, released=True)
        return True

    def pin(self, body: Body) -> None:
        """A serve reads ``body`` until the matching ``unpin``."""
        self._pins[body] = self._pins.get(body, 0) + 1

    def unpin(self, body: Body) -> None:
        n = self._pins.get(body, 0) - 1
        if n > 0:
            self._pins[body] = n
            return
        self._pins.pop(body, None)
        if body in self._doomed:
            self._doomed.discard(body)
            self._free(body)

    def _evict(self, mid: bytes, *, released: bool = False) -> None:
        body = self.bodies.pop(mid, None)
        if body is None:
            return
        if self._order and self._order[0] == mid:
            self._order.popleft()  # expiry and make_room: the common case, O(1)
        else:
            with contextlib.suppress(ValueError):
                self._order.remove(mid)
        if released:
            self.released += 1
        else:
            self.evicted += 1
        if body in self._pins:
            # Its budget stays held until the serve ends: the memory is still in use.
            self._doomed.add(body)
        else:
            self._free(body)

    def _free(self, body: Body) -> None:
        if body.in_memory:
            self.memory.release(body.reserved)
        else:
            self.disk.release(body.size)
        body.close()

    def status(self) -> dict[str, Any]:
        return {
            "bodies": len(self.bodies),
            "memory_bytes": self.memory.used,
            "disk_bytes": self.disk.used,
            "evicted": self.evicted,
            "released": self.released,
            "released_pending": len(self._doomed),  # out, but still being served
            "pool": self.pool.status(),
        }


def partial_pieces(p: _Partial, size: int) -> Iterator[bytes]:
    if p.mem is not None:
        yield from p.mem.pieces(0)
        return
    assert p.fd is not None
    for off in range(0, size, READ_PIECE):
        yield os.pread(p.fd, min(READ_PIECE, size - off), off)
