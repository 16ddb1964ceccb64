"""What has been seen: message ids with a TTL, and per-origin replay windows.

The seen cache makes a duplicate cost one dict lookup (no signature check, no
forwarding). It forgets after its TTL, so on its own it would let a message be
replayed two minutes later; the per-origin sequence window is what stops that.
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict, deque


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


# Each kept seq carries a tag of its message's id, packed into one int so that a
# window costs what a list of ints costs: a later message under a kept seq is a
# replay if the tags match and, if they differ, another message that only the
# origin's key can have signed (equivocation).
_TAG_BITS = 32
_TAG_MASK = (1 << _TAG_BITS) - 1


def message_tag(mid: bytes) -> int:
    return int.from_bytes(mid[:4], "big")


class SeqWindows:
    """Per-origin anti-replay windows over sequence numbers.

    For each origin the last ``window`` accepted seqs are kept sorted. A seq equal
    to a kept one is refused: with the kept message tag it is a replay, with
    another it is a second message the origin signed under that seq
    (``held_tag`` tells the two apart); a seq at or below the oldest kept one (once the
    window is full) is too old to tell, so it is refused as a replay too. Newer
    seqs, or older ones that still fall inside the window (reordering), pass.

    A forgotten window would let its origin's old messages be replayed, so windows
    are bounded without evicting live ones: at most ``max_origins`` in all and
    ``max_per_peer`` brought in through one neighbour, and a window is forgotten
    only once its origin has been silent for ``idle_evict`` seconds. A new origin
    that finds no room is refused (``room`` says False) rather than pushing out an
    honest origin's window.
    """

    __slots__ = (
        "_last",
        "_origins",
        "_per_peer",
        "_via",
        "evicted",
        "idle_evict",
        "max_origins",
        "max_per_peer",
        "window",
    )

    def __init__(self, window: int, max_origins: int, max_per_peer: int, idle_evict: float) -> None:
        self.window = window
        self.max_origins = max_origins
        self.max_per_peer = max_per_peer
        self.idle_evict = idle_evict
        self._origins: OrderedDict[bytes, list[int]] = OrderedDict()  # least active first
        self._last: dict[bytes, float] = {}  # origin -> when it last had a seq accepted
        self._via: dict[bytes, str] = {}  # origin -> the neighbour that brought it
        self._per_peer: Counter[str] = Counter()
        self.evicted = 0

    def check(self, origin: bytes, seq: int) -> bool:
        """True if (origin, seq) has not been accepted and is not too old."""
        seqs = self._origins.get(origin)
        if seqs is None:
            return True
        if len(seqs) >= self.window and seq <= seqs[0] >> _TAG_BITS:
            return False
        return self.held_tag(origin, seq) is None

    def held_tag(self, origin: bytes, seq: int) -> int | None:
        """The tag of the message accepted under ``seq`` from ``origin``, if kept."""
        seqs = self._origins.get(origin)
        if seqs is None:
            return None
        i = bisect.bisect_left(seqs, seq << _TAG_BITS)
        if i < len(seqs) and seqs[i] >> _TAG_BITS == seq:
            return seqs[i] & _TAG_MASK
        return None

    def room(self, origin: bytes, via: str, now: float) -> str | None:
        """None if ``origin`` has a window or one can be made for it through
        neighbour ``via`` (forgetting an idle origin if need be); else why not:
        ``origins_per_peer`` or ``origins_full``."""
        if origin in self._origins:
            return None
        if self._per_peer[via] >= self.max_per_peer:
            return "origins_per_peer"
        if len(self._origins) >= self.max_origins:
            oldest = next(iter(self._origins))
            if now - self._last[oldest] < self.idle_evict:
                return "origins_full"
            self._forget(oldest)
            self.evicted += 1
        return None

    def accept(self, origin: bytes, seq: int, now: float, via: str = "", mid: bytes = b"") -> None:
        """Records an accepted seq and the id of the message it came with (call only
        after ``check`` said True and ``room`` said None)."""
        seqs = self._origins.get(origin)
        if seqs is None:
            seqs = self._origins[origin] = []
            self._via[origin] = via
            self._per_peer[via] += 1
        else:
            self._origins.move_to_end(origin)
        self._last[origin] = now
        bisect.insort(seqs, seq << _TAG_BITS | message_tag(mid))
        if len(seqs) > self.window:
            del seqs[0]

    def _forget(self, origin: bytes) -> None:
        del self._origins[origin]
        del self._last[origin]
        via = self._via.pop(origin)
        self._per_peer[via] -= 1
        if not self._per_peer[via]:
            del self._per_peer[via]

    def origins(self) -> int:
        return len(self._origins)

    def brought_by(self, via: str) -> int:
        return self._per_peer[via]
