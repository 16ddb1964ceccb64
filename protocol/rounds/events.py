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


# A heads-up's digest when the peer holds no state (participating=False), or when it
# announces a round ahead that it takes part from that round on (participating=True;
# it cannot know that round's digest yet). Neither is a position anyone vouches for.
NO_DIGEST = bytes(32)
JOIN_DIGEST = NO_DIGEST


@dataclass(frozen=True, slots=True)
class PublishState:
    """Publish the heads-up: this peer is at (round, digest) and takes part or not.
    Sent at every round start; with ``participating=False`` when this peer's
    functions failed (no one should wait for its gradient); once after the last
    round as (rounds + 1, final digest, False), so a split in the last round is
    detected too; and by a follower as (round, JOIN_DIGEST, True) a round before it
    computes again."""

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
    # Set by the job machine: checkpoint the updated state before reporting.
    checkpoint: bool = False


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


# --- the job machine's own actions (protocol/rounds/job.py) -------------------------------
# Beside these the job machine passes on the round machine's actions while it runs,
# with ``Aggregate.checkpoint`` set on the rounds that are checkpointed.


@dataclass(frozen=True, slots=True)
class WriteGradient:
    """A gradient held back while syncing or following now fits the round machine
    (and passed its validation again): write its body into Redis, as for one that
    just arrived, and report with ``gradient_arrived``/``gradient_stored``. ``handle``
    is what the daemon gave ``gradient_arrived`` when it was held back."""

    origin: str
    round: int
    handle: object


@dataclass(frozen=True, slots=True)
class WarmUp:
    """One throwaway invocation for ``round``'s minibatch (cold functions after a
    join or a restart); report with ``warm_up_done``."""

    round: int


@dataclass(frozen=True, slots=True)
class ReadLocalState:
    """A sync pass begins: what state does this node still hold? Report with
    ``local_state``: Redis's (completed, digest) if its marks match what it holds,
    and the newest checkpoint's (completed, digest)."""


@dataclass(frozen=True, slots=True)
class FetchState:
    """Download the state after ``completed`` rounds with ``digest`` (or the newer one
    the peer holds) from ``peer``; verify it against the digest it claims. Report
    with ``state_fetched`` or ``fetch_failed``, and keep it until ``LoadState`` or
    the next ``FetchState``."""

    peer: str
    completed: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class LoadState:
    """Load a state into Redis (``source``: "checkpoint", the newest checkpoint
    read for ``ReadLocalState``, or the peer it was fetched from), record its
    position beside it, and report ``state_loaded``."""

    source: str
    completed: int
    digest: bytes


JobAction = Action | WriteGradient | WarmUp | ReadLocalState | FetchState | LoadState


# --- the job machine's own events ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncStarted:
    """The job stopped computing to re-establish its state (``why``: one line)."""

    why: str


@dataclass(frozen=True, slots=True)
class StateLoaded:
    """A state was loaded: from the newest checkpoint or from peer ``source``;
    ``vouchers``: the others vouching for (completed + 1, digest) when it was loaded."""

    source: str
    completed: int
    digest: bytes
    vouchers: int


@dataclass(frozen=True, slots=True)
class StateUnvouched:
    """A state fetched from ``peer`` was not vouched for by f+1 peers in time."""

    peer: str
    completed: int


@dataclass(frozen=True, slots=True)
class Resumed:
    """Running again from ``round``, following it without computing; what the
    daemon kept for earlier rounds is moot."""

    round: int


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """A follower computes again from ``round``."""

    round: int


@dataclass(frozen=True, slots=True)
class Unfollowed:
    """A follower past its deadline with nobody ahead computes ``round`` after all."""

    round: int


@dataclass(frozen=True, slots=True)
class Excluded:
    """``origin`` is proven Byzantine (``kind``: "equivocation" or "nonfinite", in
    ``round``; ``how``: "detected" here or "evidence" from a peer), out for good."""

    origin: str
    round: int
    kind: str
    how: str


@dataclass(frozen=True, slots=True)
class JobDone:
    """The job is over on this peer: ``via`` "run" (its last round aggregated here)
    or "sync" (it took the others' final model)."""

    round: int
    via: str


@dataclass(frozen=True, slots=True)
class JobFailed:
    why: str


JobEvent = (
    Event
    | SyncStarted
    | StateLoaded
    | StateUnvouched
    | Resumed
    | CaughtUp
    | Unfollowed
    | Excluded
    | JobDone
    | JobFailed
)
