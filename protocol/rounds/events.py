"""What the round machine asks of the daemon (actions) and tells it (events).

Actions are work the daemon must do, in order; events are facts to log, count or
act on (state sync watches ``Diverged`` and ``QuorumWait``). Both are drained.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvokeFunctions:
    """Start the functions computing this peer's gradient on theta_round; report with
    ``local_gradient_ready`` or ``local_gradient_failed``."""

    round: int


@dataclass(frozen=True, slots=True)
class PublishState:
    """Publish the heads-up: this peer is at (round, digest) and takes part or not.
    Sent at every round start; with ``participating=False`` when this peer's
    functions failed (no one should wait for its gradient); and once after the last
    round as (rounds + 1, final digest, False), so a split in the last round is
    detected too."""

    round: int
    digest: bytes
    participating: bool


@dataclass(frozen=True, slots=True)
class PublishGradient:
    """Publish the stored local gradient for ``round``, carrying ``base_digest``."""

    round: int
    base_digest: bytes


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Aggregate these stored gradients (sorted by node id: the order is part of the
    result's bits), update theta, and report ``aggregated`` with the new digest.
    Stored bodies of other origins for this round, and of any earlier round, can
    be deleted. ``f``: the Byzantine bound to aggregate with (the largest up to the
    job's that the rule accepts with this many contributors: equal on every peer
    that closed with the same set), or None when the machine was not told the
    job's f."""

    round: int
    contributors: tuple[str, ...]
    f: int | None = None


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Evaluate theta after ``round``'s update on the test split."""

    round: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The job's last round was aggregated."""

    round: int


Action = InvokeFunctions | PublishState | PublishGradient | Aggregate | Evaluate | Finished


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundClosed:
    """``reason`` is "complete" (every view member contributed) or "deadline"."""

    round: int
    contributors: tuple[str, ...]
    duration_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class GradientRejected:
    """A gradient was refused (``reason`` as returned by validate/receive) or, after
    being stored, forgotten: the daemon must not keep or use its body."""

    origin: str
    round: int
    reason: str


@dataclass(frozen=True, slots=True)
class Diverged:
    """``origin`` is at ``round`` with another model (``digest``) than ours: one of
    us needs state sync. Emitted once per origin and round. ``round`` is
    rounds + 1 when the final models differ."""

    origin: str
    round: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class QuorumWait:
    """The deadline passed with ``have`` contributions of the ``need`` required; the
    round stays open and closes as soon as the quorum is met. Once per round."""

    round: int
    have: int
    need: int


@dataclass(frozen=True, slots=True)
class LeftView:
    """``node_id`` is no longer waited for. ``why``: "gone", "not_participating",
    "diverged", "failed" (this peer's own functions), "absent" (missed this
    round's deadline: not waited for in the next rounds), "bad_gradient" (its
    gradient for this round was refused after all) or "excluded" (proven
    Byzantine: never again in this job)."""

    round: int
    node_id: str
    why: str


Event = RoundClosed | GradientRejected | Diverged | QuorumWait | LeftView
