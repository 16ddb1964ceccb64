"""State sync, sans-IO: who vouches for which model, and what a peer should sync to.

A heads-up or gradient for round r carrying digest D is a peer's statement "my
model at the start of round r (after r - 1 completed rounds) has digest D"; the
final announcement after the last round uses rounds + 1. ``VouchTable`` keeps
these statements, bounded, and answers which (round, digest) at least f + 1
DISTINCT peers announce: with at most f liars, such a position is held by at
least one honest peer, so a peer that loads it never loads a made-up state.

``sync_decision`` turns the table and a peer's own position into "in_sync",
"sync" (to a target) or "wait" (with a reason for ``train status``). The daemon
then downloads the target from one of its vouchers, checks that the digest of
what arrived is the one it asked for (or, if the voucher has moved on, that the
position it got is itself ``vouched``), and loads it.

Nothing here reads a clock or draws a random number; every answer is a pure
function of the statements noted, whatever the string hash seed.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

IN_SYNC = "in_sync"
SYNC = "sync"
WAIT = "wait"

SyncAction = Literal["in_sync", "sync", "wait"]


@dataclass(frozen=True, slots=True)
class Target:
    """A position vouched for by at least f + 1 distinct peers."""

    round: int
    digest: bytes
    vouchers: tuple[str, ...]  # sorted; any of them can serve the state


@dataclass(frozen=True, slots=True)
class Decision:
    action: SyncAction
    target: Target | None
    reason: str  # one line for ``train status``


def _peers(n: int) -> str:
    return f"{n} peer" if n == 1 else f"{n} peers"


class VouchTable:
    __slots__ = (
        "_at",
        "_barred",
        "_by_origin",
        "_newest",
        "_sorted",
        "counters",
        "f",
        "max_peers",
        "window",
    )

    def __init__(self, *, f: int, window: int = 64, max_peers: int = 4096) -> None:
        """``f``: the job's tolerated number of Byzantine peers. ``window``: rounds
        kept per origin, counted back from the newest it announced. A peer announces
        every round, so the window must outlast a transfer: a peer that downloads
        the state of round r from a voucher that has since moved on checks the
        position it got against the table, and that needs the vouches for it to
        still be here. ``max_peers``: origins tracked at most."""
        if f < 0:
            raise ValueError("f must be >= 0")
        if window < 1:
            raise ValueError("window must be >= 1")
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.f = f
        self.window = window
        self.max_peers = max_peers
        self.counters: Counter[str] = Counter()
        # origin -> round -> digest: one digest per (origin, round), the latest, so
        # an origin that equivocates still vouches once per round.
        self._by_origin: dict[str, dict[int, bytes]] = {}
        self._newest: dict[str, int] = {}  # origin -> newest round it announced
        # round -> digest -> origins: the inverse index, so that a vouch count is a
        # length and ``target`` does not rescan every origin.
        self._at: dict[int, dict[bytes, set[str]]] = {}
        self._barred: set[str] = set()  # proven Byzantine: never vouches again
        # (round, digest) -> its origins, sorted: kept up to date once ``target`` has
        # asked for them, since sorting them afresh at every decision made a fork's
        # rounds (a decision per Diverged) cubic in the membership.
        self._sorted: dict[tuple[int, bytes], list[str]] = {}

    # --- statements -------------------------------------------------------------------

    def note(self, origin: str, round: int, digest: bytes) -> None:
        """``origin`` announced (round, digest). Input from the network: what cannot
        be a position is counted and ignored rather than raised."""
        if not origin or round < 1 or not digest:
            self.counters["invalid"] += 1
            return
        if origin in self._barred:
            self.counters["barred"] += 1
            return
        rounds = self._by_origin.get(origin)
        if rounds is None:
            if len(self._by_origin) >= self.max_peers:
                # Refuse rather than evict: otherwise a flood of made-up origins
                # could push honest origins' vouches out of the table.
                self.counters["refused_origin"] += 1
                return
            rounds = self._by_origin[origin] = {}
            self._newest[origin] = round
        newest = self._newest[origin]
        if round <= newest - self.window:
            # Gossip delivered it late, or the peer went back (restarted from an
            # old checkpoint): outside its window either way.
            self.counters["too_old"] += 1
            return
        old = rounds.get(round)
        if old == digest:
            self.counters["repeated"] += 1
            return
        if old is not None:
            # Resynced within the round (or equivocates): the latest statement wins.
            self.counters["replaced"] += 1
            self._unindex(origin, round, old)
        rounds[round] = digest
        # Called for every heads-up a peer hears: no empty dict or set made per call.
        by_digest = self._at.get(round)
        if by_digest is None:
            by_digest = self._at[round] = {}
        origins = by_digest.get(digest)
        if origins is None:
            origins = by_digest[digest] = set()
        origins.add(origin)
        if self._sorted:
            in_order = self._sorted.get((round, digest))
            if in_order is not None:
                insort(in_order, origin)
        self.counters["noted"] += 1
        if round > newest:
            self._newest[origin] = round
            floor = round - self.window
            for r in [r for r in rounds if r <= floor]:
                self._unindex(origin, r, rounds.pop(r))
                self.counters["evicted"] += 1

    def forget(self, origin: str) -> None:
        """Dead, left or revoked: its vouches no longer count (a dead peer cannot
        serve the state, a revoked one must not be trusted)."""
        rounds = self._by_origin.pop(origin, None)
        if rounds is None:
            return
        del self._newest[origin]
        for r, d in rounds.items():
            self._unindex(origin, r, d)
        self.counters["forgotten"] += 1

    def bar(self, origin: str) -> None:
        """Proven Byzantine (it equivocated): its vouches, past and future, never
        count again; a peer must not load a state on a liar's word."""
        self._barred.add(origin)
        self.forget(origin)

    # --- queries ----------------------------------------------------------------------

    def vouchers(self, round: int, digest: bytes) -> frozenset[str]:
        return frozenset(self._at.get(round, {}).get(digest, ()))

    def count(self, round: int, digest: bytes, exclude: Collection[str] = ()) -> int:
        """How many origins outside ``exclude`` announced (round, digest)."""
        return self._count(self._at.get(round, {}).get(digest, ()), frozenset(exclude))

    def vouched(self, round: int, digest: bytes, *, exclude: Collection[str] = ()) -> bool:
        """At least f + 1 distinct origins, not counting ``exclude`` (a peer checking a
        download excludes itself: it cannot vouch for what it is about to load)."""
        return self._count(self._at.get(round, {}).get(digest, ()), frozenset(exclude)) > self.f

    def target(self, exclude: Collection[str] = ()) -> Target | None:
        """The newest vouched position; between two digests vouched at the same round,
        the one with more vouchers, then the lower digest bytes, so that every peer
        looking at the same statements picks the same one."""
        ex = frozenset(exclude)
        for r in sorted(self._at, reverse=True):
            best = self._best_at(r, ex, vouched_only=True)
            if best is not None:
                _, digest = best
                origins = self._at[r][digest]
                in_order = self._sorted.get((r, digest))
                if in_order is None:
                    in_order = self._sorted[(r, digest)] = sorted(origins)
                if any(o in origins for o in ex):
                    return Target(r, digest, tuple(o for o in in_order if o not in ex))
                return Target(r, digest, tuple(in_order))
        return None

    def newest_round(self, exclude: Collection[str] = ()) -> int | None:
        """The highest round anyone tracked announced, vouched or not (a liar's too:
        for display and "the cluster moved on" hints, never for loading)."""
        if not exclude:
            return max(self._at, default=None)
        ex = frozenset(exclude)
        for r in sorted(self._at, reverse=True):
            if any(self._count(s, ex) for s in self._at[r].values()):
                return r
        return None

    def best(self, exclude: Collection[str] = ()) -> tuple[int, bytes, int] | None:
        """(round, digest, vouchers) of the position with the most vouchers, vouched or
        not, newest first on ties: what a waiting peer is closest to being able to
        sync to. None when nobody (outside ``exclude``) announced anything."""
        ex = frozenset(exclude)
        top: tuple[int, int, bytes] | None = None  # (count, round, digest)
        for r in sorted(self._at, reverse=True):
            b = self._best_at(r, ex, vouched_only=False)
            if b is not None and (top is None or b[0] > top[0]):
                top = (b[0], r, b[1])
        return None if top is None else (top[1], top[2], top[0])

    def others_at(self, round: int, digest: bytes, exclude: Collection[str] = ()) -> int:
        """How many origins (outside ``exclude``) announced another digest at ``round``."""
        ex = frozenset(exclude)
        return sum(self._count(s, ex) for d, s in self._at.get(round, {}).items() if d != digest)

    def undecided(self, round: int, exclude: Collection[str] = ()) -> int:
        """Origins (outside ``exclude``) that announced ``round - 1`` but nothing at
        ``round`` yet: they have not closed that round, so which side of a fork at
        ``round`` they end on is still open."""
        now = self._at.get(round, {}).values()
        # An origin is in one digest's set per round, so the counts per set add up
        # (and no union of every origin is built at each sync decision).
        return sum(len(s.difference(*now, exclude)) for s in self._at.get(round - 1, {}).values())

    def rival(
        self, round: int, digest: bytes, exclude: Collection[str] = ()
    ) -> tuple[bytes, int] | None:
        """The vouched digest other than ``digest`` at ``round`` with the most vouchers
        (lower bytes on ties), with its count; None if no other digest is vouched."""
        ex = frozenset(exclude)
        top: tuple[int, bytes] | None = None
        for d, s in self._at.get(round, {}).items():
            n = self._count(s, ex)
            if d == digest or n <= self.f:
                continue
            if top is None or n > top[0] or (n == top[0] and d < top[1]):
                top = (n, d)
        return None if top is None else (top[1], top[0])

    def status(self) -> dict[str, Any]:
        t = self.target()
        return {
            "f": self.f,
            "peers": len(self._by_origin),
            "entries": sum(len(r) for r in self._by_origin.values()),
            "newest_round": self.newest_round(),
            "target": (
                None
                if t is None
                else {"round": t.round, "digest": t.digest.hex(), "vouchers": len(t.vouchers)}
            ),
            "counters": dict(self.counters),
        }

    # --- internals --------------------------------------------------------------------

    def _count(self, origins: Collection[str], ex: frozenset[str]) -> int:
        """How many of ``origins`` (a set of the index) are not in ``ex``. ``ex`` is
        mostly the asking peer alone: looking its few members up, rather than
        walking every origin, keeps a sync decision from costing O(peers), which
        a fork (a decision per Diverged) made cubic in the membership."""
        if not ex:
            return len(origins)
        if len(ex) < len(origins):
            return len(origins) - sum(1 for o in ex if o in origins)
        return sum(1 for o in origins if o not in ex)

    def _best_at(
        self, round: int, ex: frozenset[str], *, vouched_only: bool
    ) -> tuple[int, bytes] | None:
        """(count, digest) of the digest at ``round`` with the most vouchers, the lower
        bytes on ties; the order of the dict never matters."""
        top: tuple[int, bytes] | None = None
        floor = self.f + 1 if vouched_only else 1
        for d, s in self._at[round].items():
            n = self._count(s, ex)
            if n >= floor and (top is None or n > top[0] or (n == top[0] and d < top[1])):
                top = (n, d)
        return top

    def _unindex(self, origin: str, round: int, digest: bytes) -> None:
        by_digest = self._at[round]
        origins = by_digest[digest]
        origins.discard(origin)
        in_order = self._sorted.get((round, digest))
        if in_order is not None:
            del in_order[bisect_left(in_order, origin)]
        if not origins:
            self._sorted.pop((round, digest), None)
            del by_digest[digest]
            if not by_digest:
                del self._at[round]


def sync_decision(
    table: VouchTable,
    *,
    self_id: str,
    round: int | None,
    digest: bytes | None,
    lag_rounds: int = 2,
    final_round: int | None = None,
    stuck: bool = False,
    own_at: Mapping[int, bytes] | None = None,
) -> Decision:
    """What a peer at (round, digest) should do; (None, None) when it has no usable
    state (a joiner, a restart without a trusted state, a Redis that lost its data).
    ``target`` is the table's target whenever there is one; only "sync" acts on it.
    ``final_round`` (the job's rounds + 1) marks positions announced after the last
    round: a peer behind one of those syncs however small its lag. ``stuck``: the
    peer's open round is past its deadline without a quorum; then any vouched
    position ahead of it is one it cannot reach by rounds (the others have left
    the round it waits in, and their gradients for it, if it ever dropped them,
    will not come again), so it syncs however small its lag.

    Vouches never count self: a peer cannot vouch for its own model. Being a bit
    behind (at most ``lag_rounds``) is normal and left to the rounds to catch up;
    further behind, or on the losing side of a fork, the peer syncs. The two sides of
    a fork at one round compare holders (self included: it holds its model, it just
    cannot vouch for it), more holders winning, the lower digest on a tie, so that
    both sides of an even split reach the same verdict and only one of them moves."""
    if lag_rounds < 0:
        raise ValueError("lag_rounds must be >= 0")
    me = (self_id,)
    need = table.f + 1
    t = table.target(exclude=me)
    if round is None or digest is None:
        if t is None:
            return Decision(WAIT, None, "waiting: no usable state; " + _nothing(table, me))
        return Decision(SYNC, t, f"syncing: no usable state; {_vouched_by(t)}")

    if t is not None and final_round is not None and round < final_round <= t.round:
        # The others finished the job: there are no more rounds to catch up in, so
        # even a small lag must be closed by taking the final model.
        return Decision(SYNC, t, f"syncing: the others finished the job; {_vouched_by(t)}")
    if t is not None and stuck and t.round > round:
        return Decision(
            SYNC,
            t,
            f"syncing: stuck in round {round} past its deadline while the others moved "
            f"on; {_vouched_by(t)}",
        )
    if t is not None and t.round > round + lag_rounds:
        return Decision(
            SYNC, t, f"syncing: at round {round}, {t.round - round} behind; {_vouched_by(t)}"
        )
    if t is not None and own_at is not None and t.round < round:
        mine = own_at.get(t.round)
        if mine is not None and mine != t.digest:
            # Behind us, on another model than ours at that round: a fork at or
            # before it. The side with more holders of its model at that round wins
            # (peers still closing the round before may yet end on ours); waiting
            # for them to reach our round would cost as many rounds as we ran alone.
            ours_then = table.count(t.round, mine, exclude=me) + 1
            if len(t.vouchers) > ours_then + table.undecided(t.round, exclude=me):
                return Decision(
                    SYNC,
                    t,
                    f"syncing: on a fork since round {t.round} or before (ours there: "
                    f"{mine.hex()[:12]}, {_peers(ours_then)}); {_vouched_by(t)}",
                )

    ours = table.count(round, digest, exclude=me)
    holders = ours + 1
    rival = table.rival(round, digest, exclude=me)
    if rival is not None:
        rival_digest, rival_n = rival
        # Peers still closing round - 1 may yet join our side: right after our own
        # aggregation only the peers that closed earlier have announced, and counting
        # them alone would send a majority to a minority's model.
        open_ = table.undecided(round, exclude=me)
        if rival_n > holders + open_ or (
            rival_n == holders and open_ == 0 and rival_digest < digest
        ):
            # The minority (or the loser of an even split): t exists, since the rival
            # is vouched, and is at this round or newer.
            assert t is not None
            return Decision(
                SYNC,
                t,
                f"syncing: diverged at round {round} ({_peers(rival_n)} hold another "
                f"model, {holders} ours); {_vouched_by(t)}",
            )
    if ours >= need:
        return Decision(IN_SYNC, t, f"in sync: round {round} vouched for by {_peers(ours)}")
    if t is not None and t.round > round:
        # Our own position is unconfirmed and a newer one is confirmed: nothing to
        # lose by taking the confirmed one.
        why = f"round {round} is not vouched for by f+1 = {_peers(need)}"
        return Decision(SYNC, t, f"syncing: {why}; {_vouched_by(t)}")
    if rival is not None:
        # An even split that we win on the digest: the other side moves to us.
        why = f"even split at round {round} ({holders} and {rival[1]})"
        return Decision(IN_SYNC, t, f"in sync: {why}, ours wins the tie")
    against = table.others_at(round, digest, exclude=me)
    if against:
        # Nothing to resolve it with: syncing to an unvouched model could load a
        # liar's, and keeping ours silently would hide the split.
        return Decision(
            WAIT,
            t,
            f"waiting: {_peers(against)} hold another model at round {round} and "
            + (
                f"no model at round {round} is vouched for by f+1 = {_peers(need)}"
                if t is not None
                else _nothing(table, me)
            ),
        )
    newest = table.newest_round(exclude=me)
    if t is None and newest is not None and newest > round + lag_rounds:
        return Decision(
            WAIT,
            None,
            f"waiting: peers announce round {newest} (we are at {round}) but "
            + _nothing(table, me),
        )
    return Decision(
        IN_SYNC,
        t,
        f"in sync: nobody contradicts round {round} "
        f"(vouched for by {ours} of f+1 = {_peers(need)})",
    )


def _vouched_by(t: Target) -> str:
    return f"round {t.round} is vouched for by {_peers(len(t.vouchers))}"


def _nothing(table: VouchTable, me: tuple[str]) -> str:
    """Why there is nothing to sync to, and how close the best candidate is."""
    need = table.f + 1
    best = table.best(exclude=me)
    if best is None:
        return f"no position is vouched for by f+1 = {_peers(need)} (nobody announced one)"
    return (
        f"no position is vouched for by f+1 = {_peers(need)} "
        f"(best: round {best[0]} by {_peers(best[2])})"
    )


def caught_up(table: VouchTable, self_id: str, round: int) -> bool:
    """Whether a follower that just closed ``round`` may compute again from the next
    round start: no position past that round is vouched for. Only vouched positions
    count, so f liars announcing rounds ahead cannot keep followers from taking part."""
    t = table.target(exclude=(self_id,))
    return t is None or t.round <= round + 1
