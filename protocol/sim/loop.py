"""A discrete-event loop on simulated time.

Events are (time, sequence, callback, argument); ties run in scheduling order, so
a run is a pure function of its seed. Nothing here reads a clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    __slots__ = ("_heap", "_seq", "events_run", "now", "stopped")

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.events_run = 0
        self.stopped = False

    def schedule(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        if when < self.now:
            when = self.now
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, arg))

    def call_later(self, delay: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.schedule(self.now + delay, fn, arg)

    def every(
        self, interval: float, fn: Callable[[float], None], start: float | None = None
    ) -> None:
        """Calls ``fn(now)`` every ``interval`` from ``start`` (default: now) on."""
        if interval <= 0:
            raise ValueError("interval must be > 0")

        def fire(_: Any) -> None:
            fn(self.now)
            self.schedule(self.now + interval, fire)

        self.schedule(self.now if start is None else start, fire)

    def stop(self) -> None:
        """Makes the current ``run`` return after the event being run."""
        self.stopped = True

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float) -> float:
        """Runs events up to and including time ``until`` (or until ``stop()``);
        returns the simulated time reached."""
        heap = self._heap
        pop = heapq.heappop
        self.stopped = False
        n = 0
        while heap and heap[0][0] <= until:
            when, _, fn, arg = pop(heap)
            self.now = when
            fn(arg)
            n += 1
            if self.stopped:
                break
        self.events_run += n
        if not self.stopped:
            self.now = max(self.now, until)
        return self.now
