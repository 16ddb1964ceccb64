"""Who the current round waits for.

The default is that every live member takes part; a member leaves the view when
it is gone, says it does not take part, holds another model (diverged), or is
absent (missed an earlier deadline). The view, the contributions and the members
still awaited are kept incrementally, so a contribution costs O(1) and closing is
a length test even with hundreds of members. So is the quorum's count of diverged
members: in a fork every peer hears from half the others that they diverged, and
recounting at each arrival made a round cubic in the membership.

Membership knowledge (live, gone, not participating, absent, excluded) outlives
a round; divergence, "learned mid-round", bad gradients and the contributions are
per round. Excluded members (proven Byzantine: equivocation) never come back for
the rest of the job, whatever they announce or send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# Gone members are remembered (so that a late announcement from a dead member
# does not bring it back) up to this many, or twice the live count if larger.
_GONE_MIN = 64


class RoundView:
    __slots__ = (
        "_on_left",
        "_qn",
        "_strikes",
        "absent",
        "bad",
        "diverged",
        "excluded",
        "gone",
        "have",
        "late",
        "live",
        "members",
        "misses",
        "missing",
        "nonpart",
        "open",
        "self_id",
        "self_in",
        "skipped",
    )

    def __init__(
        self,
        self_id: str,
        members: Iterable[str],
        strikes: int,
        on_left: Callable[[str, str], None],
    ) -> None:
        self.self_id = self_id
        self._strikes = strikes
        self._on_left = on_left
        # Insertion-ordered (dicts, not sets) wherever we iterate, so that a run is
        # a pure function of its inputs whatever the string hash seed.
        self.live: dict[str, None] = {m: None for m in members if m != self_id}
        self.gone: dict[str, None] = {}
        self.nonpart: set[str] = set()
        self.absent: set[str] = set()
        self.misses: dict[str, int] = {}  # deadlines missed in a row
        self.diverged: dict[str, bytes] = {}  # this round: origin -> its digest
        self.excluded: set[str] = set()  # proven Byzantine: out for the rest of the job
        self.bad: set[str] = set()  # this round: sent a gradient proven unusable
        self.late: set[str] = set()  # learned (or back) mid-round, not yet at our round
        self.skipped: set[str] = set()  # said (late) it does not take part in this round
        self.members: set[str] = set()  # the view
        self.missing: set[str] = set()  # view members that have not contributed
        self.have: set[str] = set()  # contributions counted this round
        self.open = False
        self.self_in = False
        # Diverged members the quorum counts (see ``_counts``), kept up to date at
        # every change; None forces a fresh count.
        self._qn: int | None = 0

    # --- rounds -----------------------------------------------------------------------

    def start(self, self_in: bool) -> None:
        self._qn = 0  # nobody has diverged in a new round
        self.diverged.clear()
        self.late.clear()
        self.skipped.clear()
        self.bad.clear()
        self.have.clear()
        self.self_in = self_in
        members = {m for m in self.live if self._eligible(m)}
        if self_in:
            members.add(self.self_id)
        self.members = members
        self.missing = set(members)
        self.open = True

    def close(self) -> None:
        self.open = False

    def mark_absent(self, round: int) -> None:
        """The deadline closed the round: members that did not contribute are not
        waited for in the next rounds."""
        for m in sorted(self.missing):
            if m == self.self_id:
                continue
            was = self._counts(m)
            self.absent.add(m)
            self._recount(m, was)
            self.misses[m] = self.misses.get(m, 0) + 1
            self._on_left(m, "absent")

    def quorum(self, min_contributors: int) -> int:
        """A majority of the view and of the members that would be in it but hold
        another model. Counting the diverged keeps a fork from progressing on both
        sides: only a side holding a majority of the eligible members can close,
        the other waits (QuorumWait) and repairs by state sync."""
        d = self._qn
        if d is None:
            d = self._qn = sum(1 for m in self.diverged if self._counts(m))
        n = len(self.members) + d
        return max(min_contributors, n // 2 + 1)

    # --- membership -------------------------------------------------------------------

    def is_member(self, m: str) -> bool:
        return m == self.self_id or m in self.live

    def alive(self, m: str) -> None:
        if m == self.self_id:
            return
        self.gone.pop(m, None)
        if m in self.live:
            return
        self.live[m] = None
        if self.open:
            # It has not seen this round begin (a joiner is still syncing): waiting
            # for it would cost a full deadline. It is in from the next round, or
            # from now if it announces our (round, digest) or contributes.
            was = self._counts(m)
            self.late.add(m)
            self._recount(m, was)

    def is_gone(self, m: str) -> bool:
        return m in self.gone

    def gone_(self, m: str) -> None:
        if m == self.self_id:
            return
        was = self._counts(m)
        self.live.pop(m, None)
        self.nonpart.discard(m)
        self.absent.discard(m)
        self.misses.pop(m, None)
        self.diverged.pop(m, None)
        self.late.discard(m)
        self._recount(m, was)
        self.gone.pop(m, None)
        self.gone[m] = None
        limit = max(_GONE_MIN, 2 * len(self.live))
        while len(self.gone) > limit:
            del self.gone[next(iter(self.gone))]
        if m in self.members:
            self.members.discard(m)
            self.missing.discard(m)
            self._on_left(m, "gone")

    def not_participating(self, m: str) -> None:
        was = self._counts(m)
        self.nonpart.add(m)
        self._recount(m, was)
        self._refresh(m, "not_participating")

    def skip_round(self, m: str) -> None:
        """``m`` does not take part in this round only (its functions failed)."""
        was = self._counts(m)
        self.skipped.add(m)
        self._recount(m, was)
        self._refresh(m, "not_participating")

    def participating(self, m: str) -> None:
        """Takes part again, but announced another round than ours: in from the next
        round, not this one (it cannot contribute to it)."""
        if m in self.nonpart:
            was = self._counts(m)
            self.nonpart.discard(m)
            if self.open:
                self.late.add(m)
            self._recount(m, was)

    def matched(self, m: str) -> None:
        """``m`` announced our (round, digest)."""
        was = self._counts(m)
        self.nonpart.discard(m)
        self.late.discard(m)
        self.diverged.pop(m, None)
        if m in self.absent and self.misses.get(m, 0) < self._strikes:
            self.absent.discard(m)
        self._recount(m, was)
        self._refresh(m, "")

    def diverge(self, m: str, digest: bytes) -> bool:
        """``m`` holds another model for this round; True the first time this round."""
        was = self._counts(m)
        first = m not in self.diverged
        self.diverged[m] = digest
        self._recount(m, was)
        self._refresh(m, "diverged")
        return first

    def contributed(self, m: str) -> None:
        self.have.add(m)
        self.missing.discard(m)
        if m != self.self_id:
            # A valid contribution proves it is at our (round, digest) and in time.
            was = self._counts(m)
            self.late.discard(m)
            self.diverged.pop(m, None)
            self.absent.discard(m)
            self.misses.pop(m, None)
            self._recount(m, was)
            self._refresh(m, "")

    def forget(self, m: str) -> None:
        if m in self.have:
            self.have.discard(m)
            if m in self.members:
                self.missing.add(m)

    def exclude(self, m: str) -> None:
        """``m`` is proven Byzantine: out of this round (its contribution, if
        counted, forgotten) and of every later one."""
        if m == self.self_id or m in self.excluded:
            return
        was = self._counts(m)
        self.excluded.add(m)
        self._recount(m, was)
        self.have.discard(m)
        self._refresh(m, "excluded")

    def spoil(self, m: str) -> None:
        """``m``'s gradient for this round is unusable (wrong size, non-finite): it
        cannot send another, so the round stops waiting for it at once."""
        if m == self.self_id:
            return
        self.bad.add(m)
        self.have.discard(m)
        self._refresh(m, "bad_gradient")

    def self_failed(self) -> None:
        self.self_in = False
        self._refresh(self.self_id, "failed")

    def self_retry(self) -> None:
        """This peer computes the round again after a failure: it is awaited again."""
        self.self_in = True
        self._refresh(self.self_id, "retry")

    # --- internals --------------------------------------------------------------------

    def _eligible(self, m: str) -> bool:
        if m == self.self_id:
            return self.self_in
        return (
            m in self.live
            and m not in self.excluded
            and m not in self.bad
            and m not in self.nonpart
            and m not in self.diverged
            and m not in self.absent
            and m not in self.late
            and m not in self.skipped
        )

    def _counts(self, m: str) -> bool:
        """Whether ``m`` is among the diverged members that ``quorum`` counts."""
        return (
            m in self.diverged
            and m not in self.absent
            and m not in self.excluded
            and m not in self.nonpart
            and m not in self.late
            and m not in self.skipped
        )

    def _recount(self, m: str, was: bool) -> None:
        """``m``'s sets changed; ``was``: ``_counts(m)`` before the change."""
        if self._qn is not None:
            self._qn += self._counts(m) - was

    def _refresh(self, m: str, why: str) -> None:
        if not self.open:
            return
        inside = m in self.members
        if self._eligible(m):
            if not inside:
                self.members.add(m)
                if m not in self.have:
                    self.missing.add(m)
        elif inside:
            self.members.discard(m)
            self.missing.discard(m)
            self._on_left(m, why)
