"""Member states, the member table, and what the machine reports about them.

An ``Entry`` is immutable: a change of state is a new entry. That makes entries
shareable, and the table can start from a ``SharedView`` — one read-only converged
view that many machines read through (copy-on-write). The daemon always starts
empty; the simulator uses it to start 10,000 converged machines without 10^8
private entries. Everything else in the machine sees an ordinary table.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from .messages import Alive, Claim


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


ALIVE = MemberState.ALIVE
SUSPECT = MemberState.SUSPECT
DEAD = MemberState.DEAD
LEFT = MemberState.LEFT


class Entry:
    """What this node believes about one member.

    ``record`` is the member's latest signed alive record (address, incarnation);
    ``claim`` is the signed suspect/dead/left record behind a non-alive state;
    ``since`` is when this node moved the member into ``state``.
    """

    __slots__ = ("claim", "incarnation", "record", "since", "state")

    def __init__(
        self, record: Alive, state: MemberState, claim: Claim | None, since: float
    ) -> None:
        self.record = record
        self.state = state
        self.claim = claim
        self.since = since
        inc = record.incarnation
        if claim is not None and claim.incarnation > inc:
            inc = claim.incarnation  # a left signed by the subject may be newer than its alive
        self.incarnation = inc

    def __repr__(self) -> str:
        return (
            f"Entry({self.record.node_id}@{self.record.addr} {self.state} "
            f"inc={self.incarnation} since={self.since})"
        )


@dataclass(frozen=True, slots=True)
class Member:
    """The public view of one member (``members()``)."""

    node_id: str
    addr: str
    state: MemberState
    incarnation: int
    last_heard: float | None  # when we last heard from it directly; None: never


class EventKind(StrEnum):
    JOINED = "joined"  # first seen
    ALIVE = "alive"  # back to alive from suspect, dead or left
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    UPDATED = "updated"  # new address
    REMOVED = "removed"  # tombstone expired; forgotten


@dataclass(slots=True)
class MemberEvent:
    kind: EventKind
    node_id: str
    addr: str
    incarnation: int
    at: float


class SharedView:
    """A read-only converged view many tables can start from."""

    __slots__ = ("counts", "entries", "ids")

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self.entries: dict[str, Entry] = dict(entries)
        self.ids: tuple[str, ...] = tuple(self.entries)
        self.counts: dict[MemberState, int] = {s: 0 for s in MemberState}
        for e in self.entries.values():
            self.counts[e.state] += 1


_REMOVED = None  # an overlay value hiding a base entry that was removed


class MemberTable:
    """node id -> Entry, with O(1) indexed access for random sampling and probing.

    Slots are positions in ``base ids + added ids``; a slot may be empty (removed).
    """

    __slots__ = ("_added", "_base", "_base_ids", "_counts", "_own", "_size", "get")

    def __init__(self, base: SharedView | None = None) -> None:
        self._base: dict[str, Entry] = base.entries if base is not None else {}
        self._base_ids: tuple[str, ...] = base.ids if base is not None else ()
        self._own: dict[str, Entry | None] = {}
        self._added: list[str] = []
        self._counts: dict[MemberState, int] = (
            dict(base.counts) if base is not None else {s: 0 for s in MemberState}
        )
        self._size = len(self._base_ids)
        # Hot path: without a base, the overlay is the whole table.
        self.get: Callable[[str], Entry | None] = (
            self._layered_get if base is not None else self._own.get  # type: ignore[assignment]
        )

    def _layered_get(self, node_id: str) -> Entry | None:
        own = self._own
        if node_id in own:
            return own[node_id]
        return self._base.get(node_id)

    def put(self, node_id: str, entry: Entry, old: Entry | bool | None = False) -> None:
        """Sets ``node_id``'s entry; ``old`` is its current entry when the caller
        already looked it up (False: look it up here)."""
        if old is False:
            old = self.get(node_id)
        if old is None:
            self._size += 1
            if node_id not in self._base:
                self._added.append(node_id)
        else:
            self._counts[old.state] -= 1  # type: ignore[union-attr]
        self._counts[entry.state] += 1
        self._own[node_id] = entry

    def remove(self, node_id: str) -> None:
        old = self.get(node_id)
        if old is None:
            return
        self._counts[old.state] -= 1
        self._size -= 1
        if node_id in self._base:
            self._own[node_id] = _REMOVED
        else:
            del self._own[node_id]
            self._added.remove(node_id)

    def __len__(self) -> int:
        return self._size

    def count(self, state: MemberState) -> int:
        return self._counts[state]

    @property
    def live(self) -> int:
        """Alive or suspect members, this node included."""
        return self._counts[ALIVE] + self._counts[SUSPECT]

    def slot_count(self) -> int:
        return len(self._base_ids) + len(self._added)

    def id_at(self, slot: int) -> str:
        nb = len(self._base_ids)
        return self._base_ids[slot] if slot < nb else self._added[slot - nb]

    def entries(self) -> Iterable[Entry]:
        if not self._base_ids:
            return self._own.values()  # type: ignore[return-value]
        return (e for _, e in self.items())

    def items(self) -> Iterator[tuple[str, Entry]]:
        own = self._own
        for nid in self._base_ids:
            e = own[nid] if nid in own else self._base[nid]
            if e is not None:
                yield nid, e
        for nid in self._added:
            e = own[nid]
            if e is not None:
                yield nid, e

    def sample(
        self, rng: random.Random, k: int, accept: Callable[[str, Entry], bool]
    ) -> list[tuple[str, Entry]]:
        """Up to k distinct random members for which ``accept`` holds."""
        if k <= 0:
            return []
        slots = self.slot_count()
        if slots > 4 * k + 16:
            # Rejection sampling by slot: O(k) when most members qualify.
            out: list[tuple[str, Entry]] = []
            seen: set[str] = set()
            rand = rng.random
            for _ in range(4 * k + 16):
                nid = self.id_at(int(rand() * slots))
                if nid in seen:
                    continue
                seen.add(nid)
                e = self.get(nid)
                if e is not None and accept(nid, e):
                    out.append((nid, e))
                    if len(out) == k:
                        return out
        # Few slots, or few qualify: scan.
        pool = [(nid, e) for nid, e in self.items() if accept(nid, e)]
        if len(pool) <= k:
            rng.shuffle(pool)
            return pool
        return rng.sample(pool, k)


class ProbeOrder:
    """A fresh random permutation of the table's slots each round, in O(1) memory.

    Slot ``(start + i * stride) mod size`` for i = 0..size-1 visits every slot
    once when gcd(stride, size) = 1, so every member is probed once per round
    (SWIM's bounded first-detection time) without shuffling a list per node.
    Members added mid-round are probed from the next round on.
    """

    __slots__ = ("_pos", "_size", "_start", "_stride")

    def __init__(self) -> None:
        self._size = 0
        self._pos = 0
        self._start = 0
        self._stride = 1

    def next(
        self, table: MemberTable, rng: random.Random, accept: Callable[[str, Entry], bool]
    ) -> tuple[str, Entry] | None:
        # Two rounds at most: if nothing qualifies in a full round there is no target.
        for _ in range(2 * table.slot_count() + 2):
            if self._pos >= self._size:
                self._new_round(table.slot_count(), rng)
                if self._size == 0:
                    return None
            slot = (self._start + self._pos * self._stride) % self._size
            self._pos += 1
            if slot >= table.slot_count():
                continue  # a removal shrank the slot list
            nid = table.id_at(slot)
            e = table.get(nid)
            if e is not None and accept(nid, e):
                return nid, e
        return None

    def _new_round(self, size: int, rng: random.Random) -> None:
        self._size = size
        self._pos = 0
        if size <= 1:
            self._start, self._stride = 0, 1
            return
        self._start = rng.randrange(size)
        while True:
            stride = rng.randrange(1, size)
            if math.gcd(stride, size) == 1:
                self._stride = stride
                return
