"""Who may hold a pending (not yet authenticated) handshake on our listener.

Opening a TCP connection costs an attacker nothing, so slots for pending
handshakes are the first thing a flood goes for. The policy, as hardened
servers do it:

* one source address (an IPv4 address, an IPv6 /64) holds at most
  ``max_per_source`` pending handshakes;
* when a table (the source's or the whole one) is full, a newcomer is not
  refused: a connection that has not yet sent its hello is dropped instead,
  the oldest first, since an honest initiator says hello at once. Connections
  past their hello are in real work; one of them is dropped only when no
  silent one is left, and then a random one, so a flood cannot aim at the
  newest honest handshake;
* a source whose slots are all past their hello gets its newcomer refused.

Pure bookkeeping: the transport closes what ``admit`` says to evict.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class Pending:
    source: str
    abort: Callable[[], None]
    said_hello: bool = False
    evicted: bool = False


class PendingTable:
    def __init__(self, max_total: int, max_per_source: int, rng: random.Random) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.rng = rng
        self._entries: list[Pending] = []  # oldest first
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def admit(self, source: str, abort: Callable[[], None]) -> tuple[Pending | None, list[Pending]]:
        """Registers a new connection from ``source``: (its entry, or None if it
        must be refused; the entries evicted to make room, already removed)."""
        evicted: list[Pending] = []
        if self.count(source) >= self.max_per_source:
            victim = self._victim(
                [p for p in self._entries if p.source == source], silent_only=True
            )
            if victim is None:
                return None, evicted
            self._evict(victim, evicted)
        if len(self._entries) >= self.max_total:
            victim = self._victim(self._entries, silent_only=False)
            if victim is None:
                return None, evicted
            self._evict(victim, evicted)
        entry = Pending(source, abort)
        self._entries.append(entry)
        self._per_source[source] = self.count(source) + 1
        return entry, evicted

    def said_hello(self, entry: Pending) -> None:
        entry.said_hello = True

    def remove(self, entry: Pending) -> None:
        try:
            self._entries.remove(entry)
        except ValueError:
            return  # already evicted
        self._forget_source(entry.source)

    def _victim(self, candidates: list[Pending], *, silent_only: bool) -> Pending | None:
        for p in candidates:  # oldest first
            if not p.said_hello:
                return p
        if silent_only or not candidates:
            return None
        return self.rng.choice(candidates)

    def _evict(self, victim: Pending, out: list[Pending]) -> None:
        self._entries.remove(victim)
        self._forget_source(victim.source)
        victim.evicted = True
        out.append(victim)

    def _forget_source(self, source: str) -> None:
        n = self._per_source.get(source, 0) - 1
        if n > 0:
            self._per_source[source] = n
        else:
            self._per_source.pop(source, None)


def source_key(host: str) -> str:
    """What one attacker is assumed to control: an IPv4 address, or an IPv6 /64
    (one host commonly gets a whole /64). Anything unparsable is its own key."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
