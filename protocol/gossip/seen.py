"""What has been seen: message ids with a TTL, and per-origin replay windows.

The seen cache makes a duplicate cost one dict lookup (no signature check, no
forwarding). It forgets after its TTL, so on its own it would let a message be
replayed two minutes later; the per-origin sequence window is what stops that.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque


class SeenCache:
    """Ids remembered for ``ttl`` seconds with a small status, at most
    ``max_entries`` of them."""

    __slots__ = ("_entries", "_order", "evicted", "max_entries", "ttl")

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[bytes, int] = {}  # id -> status
        self._order: deque[tuple[float, bytes]] = deque()  # insertion = expiry order
        self.evicted = 0  # forgotten before their TTL because of the bound

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, mid: bytes) -> int | None:
        return self._entries.get(mid)

    def add(self, mid: bytes, now: float, status: int = 0) -> bool:
        """Remembers ``mid``; False (and no change) if it was already there."""
        if mid in self._entries:
            return False
        while len(self._entries) >= self.max_entries and self._order:
            _, old = self._order.popleft()
            if self._entries.pop(old, None) is not None:
                self.evicted += 1
        self._entries[mid] = status
        self._order.append((now + self.ttl, mid))
        return True

    def expire(self, now: float) -> list[bytes]:
        """Forgets ids past their TTL; returns them."""
        order = self._order
        gone: list[bytes] = []
        while order and order[0][0] <= now:
            _, mid = order.popleft()
            if self._entries.pop(mid, None) is not None:
                gone.append(mid)
        return gone


class SeqWindows:
    """Per-origin anti-replay windows over sequence numbers.

    For each origin the last ``window`` accepted seqs are kept sorted. A seq equal
    to a kept one is a replay; a seq at or below the oldest kept one (once the
    window is full) is too old to tell, so it is refused as a replay too. Newer
    seqs, or older ones that still fall inside the window (reordering), pass.
    Origins are forgotten least-recently-active first beyond ``max_origins``.
    """

    __slots__ = ("_origins", "evicted", "max_origins", "window")

    def __init__(self, window: int, max_origins: int) -> None:
        self.window = window
        self.max_origins = max_origins
        self._origins: OrderedDict[bytes, list[int]] = OrderedDict()
        self.evicted = 0

    def check(self, origin: bytes, seq: int) -> bool:
        """True if (origin, seq) has not been accepted and is not too old."""
        seqs = self._origins.get(origin)
        if seqs is None:
            return True
        if len(seqs) >= self.window and seq <= seqs[0]:
            return False
        i = bisect.bisect_left(seqs, seq)
        return not (i < len(seqs) and seqs[i] == seq)

    def accept(self, origin: bytes, seq: int) -> None:
        """Records an accepted seq (call only after ``check`` said True)."""
        seqs = self._origins.get(origin)
        if seqs is None:
            if len(self._origins) >= self.max_origins:
                self._origins.popitem(last=False)
                self.evicted += 1
            seqs = self._origins[origin] = []
        else:
            self._origins.move_to_end(origin)
        bisect.insort(seqs, seq)
        if len(seqs) > self.window:
            del seqs[0]

    def origins(self) -> int:
        return len(self._origins)
