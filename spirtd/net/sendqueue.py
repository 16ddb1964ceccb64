"""A bounded two-class send queue for one link.

Control frames (envelopes, keepalives) go ahead of bulk frames (stream
chunks), so a 100 MB gradient transfer never delays a membership probe by more
than one chunk — the "flapping under load" failure mode starts exactly there.
Stream frames all use the bulk class, which keeps OPEN/DATA/END in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueClosed(Exception):
    pass


class SendQueue(Generic[T]):
    def __init__(self, control_max: int, bulk_max: int) -> None:
        self._queues: tuple[deque[T], deque[T]] = (deque(), deque())
        self._limits = (control_max, bulk_max)
        self._readable = asyncio.Event()
        self._space = (asyncio.Event(), asyncio.Event())
        self._space[0].set()
        self._space[1].set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    def put_nowait(self, item: T, *, bulk: bool = False) -> bool:
        if self._closed:
            raise QueueClosed
        q = self._queues[bulk]
        if len(q) >= self._limits[bulk]:
            return False
        q.append(item)
        if len(q) >= self._limits[bulk]:
            self._space[bulk].clear()
        self._readable.set()
        return True

    async def put(self, item: T, *, bulk: bool = False) -> None:
        while not self.put_nowait(item, bulk=bulk):
            await self._space[bulk].wait()

    async def get(self) -> T:
        while True:
            for cls in (0, 1):
                q = self._queues[cls]
                if q:
                    item = q.popleft()
                    self._space[cls].set()
                    return item
            if self._closed:
                raise QueueClosed
            self._readable.clear()
            await self._readable.wait()

    def close(self) -> None:
        """Wakes every waiter; later puts raise QueueClosed."""
        self._closed = True
        self._queues[0].clear()
        self._queues[1].clear()
        self._readable.set()
        # Waiters in put() loop back into put_nowait, which raises QueueClosed.
        self._space[0].set()
        self._space[1].set()
