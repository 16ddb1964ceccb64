"""The message cache: announcements this node holds in full (body included),
kept for ``mcache_len`` heartbeats so neighbours can ask for them by id (IWANT),
and advertised in IHAVE for the newest ``mcache_gossip`` heartbeats.

Only messages whose body this node holds enter the cache: an id advertised in
IHAVE is therefore a promise to serve the announcement *and* the body.
"""

from __future__ import annotations

from collections import Counter, deque


class MessageCache:
    __slots__ = ("_entries", "_gossip", "_served", "_windows")

    def __init__(self, history: int, gossip: int) -> None:
        self._gossip = gossip
        self._windows: deque[list[tuple[bytes, str]]] = deque([[]], maxlen=history)
        self._entries: dict[bytes, tuple[str, bytes]] = {}  # id -> (topic, envelope)
        self._served: dict[bytes, Counter[str]] = {}  # id -> IWANT answers per peer

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, mid: bytes, topic: str, wire: bytes) -> None:
        if mid in self._entries:
            return
        self._entries[mid] = (topic, wire)
        self._windows[0].append((mid, topic))

    def get(self, mid: bytes) -> bytes | None:
        entry = self._entries.get(mid)
        return entry[1] if entry else None

    def get_for_iwant(self, mid: bytes, peer: str, limit: int) -> bytes | None:
        """The envelope for ``peer``'s IWANT, unless it asked ``limit`` times already
        (a peer must not make us resend the same message forever)."""
        entry = self._entries.get(mid)
        if entry is None:
            return None
        served = self._served.setdefault(mid, Counter())
        if served[peer] >= limit:
            return None
        served[peer] += 1
        return entry[1]

    def discard(self, mid: bytes) -> None:
        """The body is gone (released): stop answering and advertising ``mid``. Its
        window slot stays until it shifts out; ``gossip_ids`` skips it."""
        self._entries.pop(mid, None)
        self._served.pop(mid, None)

    def gossip_ids(self, topic: str) -> list[bytes]:
        out: list[bytes] = []
        entries = self._entries
        for i, window in enumerate(self._windows):
            if i >= self._gossip:
                break
            out.extend(mid for mid, t in window if t == topic and mid in entries)
        return out

    def shift(self) -> None:
        """A heartbeat: the oldest window falls out."""
        if len(self._windows) == self._windows.maxlen:
            for mid, _ in self._windows[-1]:
                self._entries.pop(mid, None)
                self._served.pop(mid, None)
        self._windows.appendleft([])
