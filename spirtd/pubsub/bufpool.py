"""Recycled memory for large bodies: fixed-size slabs carved from mmap'd arenas.

Why a pool rather than the allocator: a round moves (N-1) x S bytes into every
peer, and those bytes must land in memory the process has never touched before
unless something recycles it. Fresh anonymous pages are zeroed by the kernel
on first touch, and on a virtual machine whose host backs guest memory lazily
the first touch is far dearer still: 0.34 GB/s here (12 us per 4 KiB page),
against 2 GB/s for pages the host already backs. In bench.dissemination that
first touch was about half of all CPU (perf: clear_page_erms). glibc returns
freed blocks to the kernel as it sees fit; the pool keeps its arenas for the
life of the daemon, so round r+1 lands in round r's pages, and ``reserve``
can pay for the first round's pages at start-up instead of on the hot path.

Slabs are handed out LIFO (the warmest first). The pool never grows past
``limit`` bytes; ``take`` returns None there and the caller falls back to
something else (the body store spills to files).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from typing import Any

SLAB_BYTES = 1 << 20
ARENA_BYTES = 16 << 20


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class SlabPool:
    def __init__(
        self, limit: int, *, slab_bytes: int = SLAB_BYTES, arena_bytes: int = ARENA_BYTES
    ) -> None:
        if slab_bytes <= 0 or arena_bytes < slab_bytes or arena_bytes % slab_bytes:
            raise ValueError("arena_bytes must be a positive multiple of slab_bytes")
        self.slab_bytes = slab_bytes
        self.arena_bytes = arena_bytes
        self.limit = limit
        self._per_arena = arena_bytes // slab_bytes
        self._arenas: list[mmap.mmap] = []
        self._views: list[memoryview] = []  # one per slab id
        self._free: list[int] = []
        self._is_free: bytearray = bytearray()  # per slab id: catches double frees
        # Readers on worker threads (Message.read, verify) may free the last slab.
        self._lock = threading.Lock()
        self.peak_in_use = 0

    @property
    def capacity(self) -> int:
        return len(self._views) * self.slab_bytes

    @property
    def in_use(self) -> int:
        return (len(self._views) - len(self._free)) * self.slab_bytes

    def _grow(self, populate: bool) -> bool:
        if self.capacity + self.arena_bytes > self.limit:
            return False
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= mmap.MAP_POPULATE  # the kernel faults every page in now, not on use
        arena = mmap.mmap(-1, self.arena_bytes, flags=flags)
        self._arenas.append(arena)
        base = len(self._views)
        whole = memoryview(arena)
        for i in range(self._per_arena):
            self._views.append(whole[i * self.slab_bytes : (i + 1) * self.slab_bytes])
        self._is_free += b"\1" * self._per_arena
        # Pushed in reverse so the arena is handed out front to back.
        self._free.extend(range(base + self._per_arena - 1, base - 1, -1))
        return True

    def reserve(self, nbytes: int) -> int:
        """Maps and faults in arenas until ``nbytes`` (capped at the limit) are
        available; returns the capacity reached."""
        with self._lock:
            while self.capacity < min(nbytes, self.limit) and self._grow(populate=True):
                pass
            return self.capacity

    def take(self) -> int | None:
        """A free slab's id, or None when the pool is at its limit."""
        with self._lock:
            if not self._free and not self._grow(populate=False):
                return None
            sid = self._free.pop()
            self._is_free[sid] = 0
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            return sid

    def view(self, sid: int) -> memoryview:
        return self._views[sid]

    def give(self, sid: int) -> None:
        with self._lock:
            if not 0 <= sid < len(self._views) or self._is_free[sid]:
                raise ValueError(f"slab {sid} is not in use")
            self._is_free[sid] = 1
            self._free.append(sid)

    def close(self) -> None:
        """Drops the arenas. A view still held elsewhere keeps its arena mapped
        until it goes (mmap refuses to unmap exported memory)."""
        with self._lock:
            self._views.clear()
            self._free.clear()
            self._is_free = bytearray()
            for a in self._arenas:
                with contextlib.suppress(BufferError):
                    a.close()
            self._arenas.clear()

    def status(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity,
            "in_use_bytes": self.in_use,
            "peak_in_use_bytes": self.peak_in_use,
            "limit_bytes": self.limit,
        }
