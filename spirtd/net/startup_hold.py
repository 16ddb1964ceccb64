"""Envelopes that arrive while the node is still starting, held for their service.

The transport listens before the services start (their configuration needs the
address), and peers that redial a restarted node link up while its Redis and
functions are still starting. What they send at once (gossip's subscription list,
sent once per link) would find no handler and be lost for the life of the link: a
restarted peer that never learned who subscribes to the training topics published
its heads-ups and gradients to one peer instead of all (the kill -9 rejoin failure).
So the node holds them, within a byte bound, and hands them over once every service
is up; after that nothing is held.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class StartupHold(Generic[T]):
    __slots__ = ("_bytes", "_items", "dropped", "max_bytes")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: deque[T] | None = deque()
        self._bytes = 0
        self.dropped = 0

    @property
    def holding(self) -> bool:
        return self._items is not None

    def hold(self, item: T, size: int) -> bool:
        """Keeps ``item`` (``size`` bytes) for later; False once released or full."""
        if self._items is None:
            return False
        if self._bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        self._items.append(item)
        self._bytes += size
        return True

    def release(self) -> list[T]:
        """Everything held, in arrival order; from now on nothing is held."""
        items = list(self._items or ())
        self._items = None
        self._bytes = 0
        return items
