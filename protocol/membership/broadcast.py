"""The bounded queue of updates waiting to be gossiped.

* One entry per subject node: a newer update about a node replaces the queued one
  (memberlist's invalidation), and starts again at zero transmissions.
* The least-sent updates go first; among equals, the one that reached that
  count most recently (so a fresh update goes out before older news).
* Each update is sent until it reaches the retransmit limit (which the caller
  derives from log N), then dropped: by then it has spread epidemically.
* Packing fills a byte budget. An update that does not fit waits for the next
  message; nothing is dropped for size.
* The queue is bounded. When full, the most-sent (hence most-spread) update is
  evicted and counted as ``broadcast_evicted``; push-pull repairs what it carried.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from itertools import accumulate, islice

from .messages import Update

_MIN_UPDATE_BYTES = 16  # no encoded update is smaller: stop packing below this


class _Item:
    __slots__ = ("key", "live", "size", "transmits", "update")

    def __init__(self, key: str, update: Update) -> None:
        self.key = key
        self.update = update
        self.size = len(update.encoded())
        self.transmits = 0
        self.live = True


class BroadcastQueue:
    """Items sent t times sit in ``_items_at[t]`` (oldest first) with their sizes in
    the parallel ``_sizes_at[t]``. A replaced or removed item is only flagged dead
    and skipped (compacted when dead ones pile up). Taking a batch is then a
    list-tail slice whose length comes from a cumulative sum and a bisection, all
    in C: a join storm moves millions of updates through these queues."""

    __slots__ = ("_counters", "_dead", "_items", "_items_at", "_sizes_at", "limit")

    def __init__(self, limit: int, counters: Counter[str]) -> None:
        if limit < 1:
            raise ValueError("broadcast queue limit must be >= 1")
        self.limit = limit
        self._counters = counters
        self._items: dict[str, _Item] = {}
        self._items_at: list[list[_Item]] = [[]]
        self._sizes_at: list[list[int]] = [[]]
        self._dead = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Update | None:
        item = self._items.get(key)
        return item.update if item is not None else None

    def transmits(self, key: str) -> int | None:
        item = self._items.get(key)
        return item.transmits if item is not None else None

    def add(self, key: str, update: Update) -> None:
        old = self._items.get(key)
        if old is not None:
            self._kill(old)
        elif len(self._items) >= self.limit:
            self._evict()
        item = _Item(key, update)
        self._items[key] = item
        self._items_at[0].append(item)
        self._sizes_at[0].append(item.size)

    def remove(self, key: str) -> None:
        item = self._items.get(key)
        if item is not None:
            self._kill(item)

    def _kill(self, item: _Item) -> None:
        item.live = False
        del self._items[item.key]
        self._dead += 1
        if self._dead > 64 and self._dead > len(self._items):
            self._compact()

    def _compact(self) -> None:
        self._items_at = [[it for it in b if it.live] for b in self._items_at]
        self._sizes_at = [[it.size for it in b] for b in self._items_at]
        self._dead = 0

    def _evict(self) -> None:
        for bucket in reversed(self._items_at):
            for item in bucket:
                if item.live:
                    self._kill(item)
                    self._counters["broadcast_evicted"] += 1
                    return

    def take(self, budget: int, retransmit_limit: int, skip: str | None = None) -> list[Update]:
        """Updates to send in one message, at most ``budget`` encoded bytes; each one
        taken counts as transmitted once more."""
        if not self._items or budget < _MIN_UPDATE_BYTES:
            return []
        items_at = self._items_at
        sizes_at = self._sizes_at
        skip_item = self._items.get(skip) if skip is not None else None
        out: list[Update] = []
        moves: list[tuple[int, list[_Item], list[int]]] = []
        remaining = budget
        for t in range(len(items_at)):
            bucket = items_at[t]
            if not bucket:
                continue
            sizes = sizes_at[t]
            if t >= retransmit_limit:
                # The limit shrank (fewer members): these have been sent enough.
                for item in bucket:
                    if item.live:
                        item.live = False
                        del self._items[item.key]
                bucket.clear()
                sizes.clear()
                continue
            n = len(sizes)
            acc = list(accumulate(islice(reversed(sizes), remaining // _MIN_UPDATE_BYTES)))
            k = bisect_right(acc, remaining)
            if k:
                remaining -= acc[k - 1]
                cut = n - k
                moved = bucket[cut:]
                moved_sizes = sizes[cut:]
                del bucket[cut:]
                del sizes[cut:]
                if skip_item is not None and skip_item.transmits == t and skip_item in moved:
                    j = moved.index(skip_item)
                    del moved[j]
                    bucket.append(skip_item)
                    sizes.append(moved_sizes.pop(j))
                    skip_item = None
                out.extend([it.update for it in reversed(moved) if it.live])
                moves.append((t + 1, moved, moved_sizes))
            if k < n or remaining < _MIN_UPDATE_BYTES:
                break  # what is left waits for the next message
        # Move after the scan, so nothing is taken twice for one message.
        for nt, moved, moved_sizes in moves:
            if nt >= retransmit_limit:
                for item in moved:
                    if item.live:
                        item.live = False
                        del self._items[item.key]
                continue
            if nt == len(items_at):
                items_at.append([])
                sizes_at.append([])
            for item in moved:
                item.transmits = nt
            # Appended after the older items already there: newest stays last.
            items_at[nt].extend(moved)
            sizes_at[nt].extend(moved_sizes)
        return out
