"""Round tuning: the deadline and the holding window, every knob documented.

All times are seconds of whatever clock the caller feeds in as ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, slots=True)
class RoundConfig:
    deadline_factor: float = 3.0
    """A round's deadline is this multiple of the median of the recent round
    durations (begin to close). Three medians lets an ordinary slow round (a slow
    function batch, a retransmitted body) finish, yet bounds a straggler."""

    deadline_floor_s: float = 2.0
    """The deadline is never shorter than this: very short rounds would otherwise
    leave no room for one gossip retransmission."""

    deadline_ceiling_s: float = 120.0
    """...and never longer than this: a run of slow rounds (or rounds that waited
    for a quorum) must not stretch the bound on a straggler without limit."""

    initial_deadline_s: float = 60.0
    """Deadline used until one round duration is known: the first round pays the
    functions' cold starts, which the later rounds do not."""

    history: int = 8
    """Recent round durations kept for the median. The median ignores the odd
    outlier (a round that waited for a quorum) that a mean would follow."""

    future_window: int = 2
    """Gradients for rounds r+1..r+window (their base digest not checkable yet) are
    held until their round begins; later rounds are rejected as "future". Bounds
    held gradients to window x members."""

    strikes: int = 2
    """A member that missed this many deadlines in a row (without a valid
    contribution in between) is taken back into the view only by a valid
    contribution, no longer by announcing our (round, digest). A one-off straggler
    is back the round after it missed one; a persistently slow peer, which would
    announce every round and then miss it, costs no round a full deadline."""

    body_grace: float = 0.5
    """At a deadline with a quorum, gradients whose announcement was accepted and
    whose body is still on its way are waited for up to this fraction of the
    deadline more. Peers' deadlines fire at different moments with different bodies
    in hand; closing on the bodies in flight too keeps their contributor sets (and
    so their models) the same under load, where each split costs a state sync."""

    def for_inner_steps(self, inner_steps: int) -> RoundConfig:
        """This config for rounds of H inner steps (outer rounds): such a round takes
        about H times as long before its first gradient is out, so the first round's
        deadline and the ceiling scale with H (the adaptive deadline then follows the
        measured rounds)."""
        if inner_steps <= 1:
            return self
        return replace(
            self,
            initial_deadline_s=self.initial_deadline_s * inner_steps,
            deadline_ceiling_s=self.deadline_ceiling_s * inner_steps,
        )

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be finite")
        if self.body_grace < 0:
            raise ValueError("body_grace must be >= 0")
        if self.deadline_factor <= 0:
            raise ValueError("deadline_factor must be > 0")
        if self.deadline_floor_s <= 0:
            raise ValueError("deadline_floor_s must be > 0")
        if self.deadline_ceiling_s < self.deadline_floor_s:
            raise ValueError("deadline_ceiling_s must be >= deadline_floor_s")
        if self.initial_deadline_s <= 0:
            raise ValueError("initial_deadline_s must be > 0")
        if self.history < 1:
            raise ValueError("history must be >= 1")
        if self.future_window < 0:
            raise ValueError("future_window must be >= 0")
        if self.strikes < 1:
            raise ValueError("strikes must be >= 1")
