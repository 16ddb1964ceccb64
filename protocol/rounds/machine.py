"""The training-round state machine, sans-IO.

Synchronous data-parallel SGD without a coordinator. Every peer holds theta_r with
digest D_r; each round it computes a local gradient (functions), publishes it with
its base digest, collects the others' gradients for (job, r, D_r), closes the
round, aggregates the contributors in node-id order, and starts r+1 from the
digest the daemon reports. The machine decides; the daemon does the I/O.

Nothing here reads a clock or draws a random number: ``now`` comes into every
call, work goes out through ``drain_actions()`` and facts through
``drain_events()`` (the drain verbs of every protocol machine), and the caller
calls ``tick`` at ``next_deadline()``.

Phases of the current round: "idle" (before the first ``begin``), "computing"
(functions running), "collecting" (own gradient done or failed, waiting for the
others), "aggregating" (closed, daemon aggregating), "done" (last round
aggregated). Gradients are counted in "computing" and "collecting" alike.

Byzantine peers: a gradient proven unusable (wrong size, non-finite values) takes
its origin out of the current round at once (it cannot send another one), and
``exclude`` takes a peer proven to equivocate out of the job for good. Each such
peer is one of the at most f Byzantine identities, so, given the rule's
``min_for_f``, the quorum shrinks with them: otherwise f liars that send garbage
would leave a Krum round at n = 2f + 3 short of its quorum forever. The f a
round is aggregated with depends on its contributor count only (``_f_for``),
never on this peer's view of who was proven bad, which differs between peers.

Any call may come in any order (a late body, a duplicate report, an old round):
what does not apply to the current state is ignored and counted in ``counters``
or, for gradients, rejected and counted in ``rejected``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from .config import RoundConfig
from .deadline import AdaptiveDeadline
from .events import (
    JOIN_DIGEST,
    Action,
    Aggregate,
    Diverged,
    Evaluate,
    Event,
    Finished,
    GradientRejected,
    InvokeFunctions,
    LeftView,
    PublishGradient,
    PublishState,
    QuorumWait,
    RoundClosed,
)
from .view import RoundView

IDLE = "idle"
COMPUTING = "computing"
COLLECTING = "collecting"
AGGREGATING = "aggregating"
DONE = "done"

# Rejection reasons (also the keys of ``rejected``).
R_JOB = "job"
R_STALE = "stale"
R_FUTURE = "future"
R_DIGEST = "digest"
R_DUPLICATE = "duplicate"
R_SIZE = "size"
R_NOT_MEMBER = "not_member"
R_EXCLUDED = "excluded"

# How a gradient's round relates to ours.
_CURRENT = 0
_HELD = 1

BYTES_PER_PARAM = 4  # float32

DEFAULT_CONFIG = RoundConfig()


class RoundMachine:
    def __init__(
        self,
        *,
        self_id: str,
        job_id: str,
        rounds: int,
        min_contributors: int,
        eval_every: int,
        param_count: int,
        members: Iterable[str],
        config: RoundConfig = DEFAULT_CONFIG,
        start_round: int = 1,
        f: int = 0,
        min_for_f: Callable[[int], int] | None = None,
        body_size: int | None = None,
    ) -> None:
        """``members``: the live members known now (self may be included or not).
        ``min_contributors``: the aggregation rule's minimum n (2f+3 for Krum).
        ``eval_every``: evaluate every that many rounds (0: only after the last).
        ``f``, ``min_for_f``: the job's Byzantine bound and the rule's minimum n for
        a given f; with them, peers proven Byzantine lower both (see above) and
        every ``Aggregate`` says which f to aggregate with. ``body_size``: the exact
        size of a gradient body (compressed ones are smaller than ``param_count``
        float32 values)."""
        config.validate()
        if rounds < 1:
            raise ValueError("rounds must be >= 1")
        if min_contributors < 1:
            raise ValueError("min_contributors must be >= 1")
        if eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if param_count < 1:
            raise ValueError("param_count must be >= 1")
        if not 1 <= start_round <= rounds:
            raise ValueError("start_round must be in [1, rounds]")
        if f < 0:
            raise ValueError("f must be >= 0")
        self.self_id = self_id
        self.job_id = job_id
        self.rounds = rounds
        self.min_contributors = min_contributors
        self.f = f
        self._min_for_f = min_for_f
        self.eval_every = eval_every
        self.param_count = param_count
        self.config = config
        self.round = start_round
        self.phase = IDLE
        self.digest = b""
        self.participating = True
        self.rejected: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.begun_at = 0.0
        self.deadline_s = config.initial_deadline_s  # this round's deadline, after begin
        self.deadline_at: float | None = None
        self._now = 0.0
        self.body_size = self._size = (
            param_count * BYTES_PER_PARAM if body_size is None else body_size
        )
        self._deadline = AdaptiveDeadline(config)
        self._view = RoundView(self_id, members, config.strikes, self._left)
        self._quorum_waited = False
        # Origins of this round whose announcement we accepted and whose body has not
        # been stored yet (``RoundConfig.body_grace``).
        self._in_flight: set[str] = set()
        self._failed_round = 0  # the round whose local gradient failed, if this one
        self._closed_with: tuple[str, ...] = ()
        self._positions: dict[str, tuple[int, bytes]] = {}
        self._final_diverged: set[str] = set()  # final positions found different from ours
        # Gradients for rounds not begun yet: round -> origin -> base digest.
        self._held: dict[int, dict[str, bytes]] = {}
        # Origins whose gradient for a round not begun yet was refused after all
        # (non-finite, wrong size): that round starts without waiting for them.
        self._held_bad: dict[int, set[str]] = {}
        self._actions: list[Action] = []
        self._events: list[Event] = []

    # --- draining and inspection ----------------------------------------------------------

    def drain_actions(self) -> list[Action]:
        out = self._actions
        self._actions = []
        return out

    def drain_events(self) -> list[Event]:
        out = self._events
        self._events = []
        return out

    def next_deadline(self) -> float | None:
        if not self.is_open or self.deadline_at is None:
            return None
        if self._now >= self.deadline_at and self._in_flight:
            grace = self._grace_until()
            if self._now < grace:
                return grace  # a quorum waits for bodies in flight, this long at most
        # Once QuorumWait is out, nothing happens by time alone: the round closes
        # on the arrival that makes the quorum.
        return None if self._quorum_waited else self.deadline_at

    def _grace_until(self) -> float:
        assert self.deadline_at is not None
        return self.deadline_at + self.config.body_grace * self.deadline_s

    @property
    def is_open(self) -> bool:
        """A round is open: computing or collecting."""
        return self.phase == COMPUTING or self.phase == COLLECTING

    @property
    def waiting_for_quorum(self) -> bool:
        """The open round is past its deadline with fewer gradients than a quorum."""
        return self.is_open and self._quorum_waited

    def status(self) -> dict[str, Any]:
        v = self._view
        open_ = self.is_open
        return {
            "round": self.round,
            "phase": self.phase,
            "digest": self.digest.hex(),
            "view": sorted(v.members),
            "have": sorted(v.have) if open_ else list(self._closed_with),
            "waiting_for": sorted(v.missing) if open_ else [],
            "quorum": v.quorum(self._min()),
            "deadline_in_s": (
                self.deadline_at - self._now if open_ and self.deadline_at is not None else None
            ),
            "waiting_for_quorum": self.waiting_for_quorum,
            "absent": sorted(v.absent),
            "diverged": sorted(v.diverged),
            "excluded": sorted(v.excluded),
            "bad_gradient": sorted(v.bad) if open_ else [],
            "not_participating": sorted(v.nonpart),
            "live": len(v.live) + 1,
            "held": {r: len(h) for r, h in sorted(self._held.items())},
            "rejected": dict(self.rejected),
            # Local failures by reason and the rounds computed again after one.
            "local": {k: n for k, n in self.counters.items() if k.startswith("local_")},
        }

    def held_rounds(self) -> frozenset[int]:
        """The rounds after the open one for which a gradient is held."""
        return frozenset(r for r, h in self._held.items() if h)

    def peer_positions(self) -> dict[str, tuple[int, bytes]]:
        """The latest (round, digest) each live peer announced."""
        return dict(self._positions)

    # --- the daemon's reports -------------------------------------------------------------

    def begin(self, round: int, digest: bytes, now: float, *, participating: bool = True) -> None:
        """The daemon holds theta for ``round`` with ``digest`` (after an update, at
        start, or after state sync): start that round, abandoning any other.
        ``participating=False`` follows the rounds without computing (syncing, no
        data): the next rounds, started by ``aggregated``, keep that setting."""
        if not 1 <= round <= self.rounds:
            raise ValueError("round out of range")
        if not digest:
            raise ValueError("empty digest")
        self._now = now
        if (
            self.is_open
            and round == self.round
            and digest == self.digest
            and participating == self.participating
        ):
            self.counters["begin_repeated"] += 1
            return
        self._begin(round, digest, participating, now)

    def take_part(self, now: float) -> None:
        """A follower computes the open round after all. Not ``begin``: that would
        drop the gradients counted so far, which their senders never send again
        (the round could then close only on gradients sent later, if any)."""
        self._now = now
        if self.phase != COLLECTING or self.participating:
            return
        self._compute_now(now)
        self._maybe_close(now)

    def local_gradient_ready(self, round: int, now: float) -> None:
        self._now = now
        if round != self.round or self.phase != COMPUTING:
            self.counters["late_local_gradient"] += 1
            return
        self.phase = COLLECTING
        self._view.contributed(self.self_id)
        self._actions.append(PublishGradient(round, self.digest))
        self._maybe_close(now)

    def local_gradient_failed(self, round: int, reason: str, now: float) -> None:
        self._now = now
        if round != self.round or self.phase != COMPUTING:
            self.counters["late_local_failure"] += 1
            return
        self.counters[f"local_failed:{reason}"] += 1
        self._failed_round = round
        self.phase = COLLECTING
        self._view.self_failed()
        # Tell the others at once: without it every peer would wait for our gradient
        # until the deadline, and a deadline close is where contributor sets split.
        self._actions.append(PublishState(round, self.digest, False))
        self._maybe_close(now)

    def validate(
        self, origin: str, job: str, round: int, base_digest: bytes, size: int, now: float
    ) -> str | None:
        """The pub/sub validation hook, before the body is pulled: None to accept,
        else the reason (counted, ``GradientRejected``; a digest mismatch for the
        current round also takes ``origin`` out of the view, ``Diverged``)."""
        self._now = now
        reason, where = self._check(origin, job, round, base_digest, size)
        if reason is not None:
            self._rejected(origin, round, base_digest, reason)
            self._maybe_close(now)  # a diverged origin may have been the last awaited
        elif where == _CURRENT:
            self._in_flight.add(origin)
        return reason

    def receive(
        self, origin: str, job: str, round: int, base_digest: bytes, size: int, now: float
    ) -> str | None:
        """The body arrived and is stored: count it, or say why not (checked again:
        the round may have moved since ``validate``). A gradient for a round not
        begun yet is held and counted when that round begins with a matching
        digest."""
        self._now = now
        if round == self.round:
            self._in_flight.discard(origin)
        reason, where = self._check(origin, job, round, base_digest, size)
        if reason is not None:
            self._rejected(origin, round, base_digest, reason)
            self._maybe_close(now)
            return reason
        if where == _CURRENT:
            self._view.contributed(origin)
            self._maybe_close(now)
        else:
            self._held.setdefault(round, {})[origin] = base_digest
        return None

    def reject(self, origin: str, round: int, reason: str, now: float) -> None:
        """The daemon found the stored body bad (non-finite values, ...): forget it,
        and stop waiting for its origin this round (one gradient per origin and
        round: it cannot send a good one any more). Once the round is closed it is
        too late to take it out (the Aggregate went out); it is still counted."""
        self._now = now
        self.rejected[reason] += 1
        self._events.append(GradientRejected(origin, round, reason))
        if round == self.round and self.is_open:
            self._in_flight.discard(origin)
            self._view.spoil(origin)
            self._maybe_close(now)
        else:
            held = self._held.get(round)
            if held is not None:
                held.pop(origin, None)
            self._spoil_later(origin, round)

    def exclude(self, node_id: str, now: float) -> None:
        """``node_id`` is proven Byzantine (it equivocated): its gradients are refused
        and the rounds never wait for it again, for the rest of the job. A
        contribution already counted in the open round is dropped; one in a
        closed round is not (its Aggregate went out)."""
        self._now = now
        if node_id == self.self_id or node_id in self._view.excluded:
            return
        self.counters["excluded"] += 1
        self._view.exclude(node_id)
        for held in self._held.values():
            held.pop(node_id, None)
        self._maybe_close(now)

    @property
    def excluded(self) -> frozenset[str]:
        return frozenset(self._view.excluded)

    def announce(
        self, origin: str, job: str, round: int, digest: bytes, participating: bool, now: float
    ) -> None:
        """A peer's heads-up: it is at (round, digest), or does not take part."""
        self._now = now
        v = self._view
        if job != self.job_id:
            self.counters["announce_wrong_job"] += 1
            return
        if origin == self.self_id:
            return
        if v.is_gone(origin):
            # Sent before it died and delivered late: it must not come back into
            # the view until membership says it is alive.
            self.counters["announce_from_gone"] += 1
            return
        last = self._positions.get(origin)
        if (
            last is not None
            and last[1] == JOIN_DIGEST
            and not participating
            and round < last[0]
            and not v.is_gone(origin)
        ):
            # It follows the rounds before the one it joins at (the join may
            # overtake this heads-up): out of those, whatever the order.
            v.not_participating(origin)
            self._maybe_close(now)
            return
        if last is not None and (
            round < last[0]
            # Within one position a peer only stops taking part (its functions
            # failed), never starts again: a "participating" arriving after a "not
            # participating" for the same position is a delayed retransmission.
            or (participating and last == (round, digest) and origin in v.nonpart)
            # A join is sent before the heads-up of the round it names.
            or (participating and digest == JOIN_DIGEST and round <= last[0])
        ):
            # Overtaken by a later announcement (gossip does not keep order).
            self.counters["announce_out_of_order"] += 1
            if not participating and self.is_open and (round, digest) == (self.round, self.digest):
                # Still true of the round we are in (its functions failed, then it
                # moved on): do not wait for it in this round.
                v.skip_round(origin)
                self._maybe_close(now)
            return
        v.alive(origin)  # an announcing peer is a live member
        self._positions[origin] = (round, digest)
        if round > self.rounds:
            # A final position (after the last round): only compared, never a view change.
            if self.phase == DONE and digest != self.digest:
                self._final_mismatch(origin, round, digest)
            return
        if not participating:
            v.not_participating(origin)
        elif digest == JOIN_DIGEST:
            # It computes from that round's start on (a join heard only once we began
            # it counts in it all the same); until then it stays out.
            if self.is_open and round == self.round:
                v.matched(origin)
        elif self.is_open and round == self.round:
            if digest == self.digest:
                v.matched(origin)
            else:
                self._diverge(origin, digest)
        else:
            v.participating(origin)
        self._maybe_close(now)

    def member_alive(self, node_id: str, now: float) -> None:
        self._now = now
        self._view.alive(node_id)

    def member_gone(self, node_id: str, now: float) -> None:
        """Dead or left: out of the view at once. Its gradients already counted or
        held stay (a peer that received a body before the death counts it; dropping
        it here would make this peer differ from those that closed earlier)."""
        self._now = now
        if node_id == self.self_id:
            return
        self._view.gone_(node_id)
        self._in_flight.discard(node_id)
        self._positions.pop(node_id, None)
        self._final_diverged.discard(node_id)
        self._maybe_close(now)

    def aggregated(
        self, round: int, new_digest: bytes, now: float, *, participate: bool | None = None
    ) -> None:
        """The daemon aggregated ``round`` and updated theta to ``new_digest``.
        ``participate`` changes whether the next round computes (a peer that caught
        up by state sync follows a round without computing, then joins in at the
        next round start, when everyone's view can take it in); None keeps it."""
        self._now = now
        if round != self.round or self.phase != AGGREGATING:
            self.counters["late_aggregated"] += 1
            return
        if not new_digest:
            raise ValueError("empty digest")
        if (self.eval_every and round % self.eval_every == 0) or round == self.rounds:
            self._actions.append(Evaluate(round))
        if round == self.rounds:
            self.phase = DONE
            self.digest = new_digest
            self._actions.append(Finished(round))
            # The last round has no next round whose announcements would reveal a
            # split: publish the final position and compare it with the others'.
            final = self.rounds + 1
            self._actions.append(PublishState(final, new_digest, False))
            for origin, (r, d) in list(self._positions.items()):
                if r == final and d != new_digest:
                    self._final_mismatch(origin, r, d)
            return
        nxt = self.participating if participate is None else participate
        self._begin(round + 1, new_digest, nxt, now)

    def tick(self, now: float) -> None:
        self._now = now
        self._maybe_close(now)

    # --- internals ------------------------------------------------------------------------

    def _begin(self, round: int, digest: bytes, participating: bool, now: float) -> None:
        v = self._view
        self.round = round
        self.digest = digest
        self.participating = participating
        self.phase = COMPUTING if participating else COLLECTING
        self.begun_at = now
        self.deadline_s = self._deadline.current()
        self.deadline_at = now + self.deadline_s
        self._quorum_waited = False
        self._in_flight.clear()
        self._failed_round = 0
        self._closed_with = ()
        self._final_diverged.clear()
        v.start(participating)
        if participating:
            self._actions.append(InvokeFunctions(round))
        self._actions.append(PublishState(round, digest, participating))

        # Peers that announced this round before we reached it.
        for origin, (r, d) in list(self._positions.items()):
            if r != round or (origin in v.nonpart and d != JOIN_DIGEST):
                continue
            if d in (digest, JOIN_DIGEST):
                v.matched(origin)
            else:
                self._diverge(origin, d)

        # Held gradients: this round's can now be checked; those of rounds we skipped
        # (state sync) or that fell out of the window (begin went back) are dropped.
        window = self.config.future_window
        for hr in sorted(self._held):
            if not round < hr <= round + window:
                held = self._held.pop(hr)
                for origin in sorted(held):
                    base = held[origin]
                    if hr != round:
                        self._rejected(origin, hr, base, R_STALE if hr < round else R_FUTURE)
                    elif base != digest:
                        self._rejected(origin, hr, base, R_DIGEST)
                    else:
                        v.contributed(origin)
        for hr in [r for r in self._held_bad if r <= round]:
            for origin in sorted(self._held_bad.pop(hr)):
                if hr == round:
                    v.spoil(origin)
        self._maybe_close(now)

    def _check(
        self, origin: str, job: str, round: int, base_digest: bytes, size: int
    ) -> tuple[str | None, int]:
        """Validation, cheapest and least telling first; the digest comes last
        because its failure takes the origin out of the view, which a malformed
        or unwanted message must not be able to do."""
        if job != self.job_id:
            return R_JOB, 0
        v = self._view
        if origin in v.excluded:
            return R_EXCLUDED, 0
        if not v.is_member(origin) or v.is_gone(origin):
            return R_NOT_MEMBER, 0
        if round > self.rounds:
            return R_FUTURE, 0
        if self.is_open:
            if round == self.round:
                where = _CURRENT
            elif round < self.round:
                return R_STALE, 0
            else:
                where = _HELD
        else:
            # Idle: our round has not begun, it is held too. Aggregating or done:
            # our round is closed.
            first = self.round if self.phase == IDLE else self.round + 1
            if round < first:
                return R_STALE, 0
            where = _HELD
        if round > self.round + self.config.future_window:
            return R_FUTURE, 0
        if where == _CURRENT:
            if origin in v.have or origin in v.bad or origin == self.self_id:
                return R_DUPLICATE, 0
        else:
            held = self._held.get(round)
            if (
                origin == self.self_id
                or (held is not None and origin in held)
                or origin in self._held_bad.get(round, ())
            ):
                return R_DUPLICATE, 0
        if size != self._size:
            return R_SIZE, 0
        if where == _CURRENT and base_digest != self.digest:
            return R_DIGEST, 0
        return None, where

    def _rejected(self, origin: str, round: int, base: bytes, reason: str) -> None:
        self.rejected[reason] += 1
        self._events.append(GradientRejected(origin, round, reason))
        if reason == R_DIGEST and round == self.round and self.is_open:
            self._diverge(origin, base)
        elif reason == R_SIZE and round == self.round and self.is_open:
            self._view.spoil(origin)
        elif reason == R_SIZE:
            self._spoil_later(origin, round)

    def _spoil_later(self, origin: str, round: int) -> None:
        """A bad gradient for a round not begun yet (a peer ahead of us sent it):
        without this, that round would wait for the origin, and a Krum round at
        n = 2f + 3 would never reach its quorum."""
        ahead = round > self.round or (round == self.round and self.phase == IDLE)
        if ahead and round <= self.round + self.config.future_window:
            self._held_bad.setdefault(round, set()).add(origin)

    def _diverge(self, origin: str, digest: bytes) -> None:
        if self._view.diverge(origin, digest):
            self._events.append(Diverged(origin, self.round, digest))

    def _final_mismatch(self, origin: str, round: int, digest: bytes) -> None:
        if origin not in self._final_diverged:
            self._final_diverged.add(origin)
            self._events.append(Diverged(origin, round, digest))

    def _left(self, node_id: str, why: str) -> None:
        self._events.append(LeftView(self.round, node_id, why))

    def _f_now(self) -> int | None:
        """The f left for the honest-looking rest: the job's f less the peers proven
        Byzantine (excluded for good, or bad this round). None without ``min_for_f``."""
        if self._min_for_f is None:
            return None
        v = self._view
        return max(0, self.f - len(v.excluded | v.bad))  # one liar may be both

    def _f_for(self, n: int) -> int | None:
        """The f a round with ``n`` contributors is aggregated with: the largest f up
        to the job's that the rule accepts at n. A function of the contributor
        count alone, so peers that closed with the same set aggregate with the same
        f and stay bit-identical, however their views of who was proven bad
        differ: one peer may have pulled a liar's non-finite body before closing
        while another closed at the deadline before it came, and a Krum or a
        trimmed mean with f = 0 on one and f = 2 on the other forks the model.
        The quorum guaranteed n >= min_for_f(_f_now()), so this is never below
        the f the proven liars leave."""
        if self._min_for_f is None:
            return None
        f = self.f
        while f > 0 and self._min_for_f(f) > n:
            f -= 1
        return f

    def _min(self) -> int:
        f = self._f_now()
        if f is None or self._min_for_f is None:
            return self.min_contributors
        return max(1, min(self.min_contributors, self._min_for_f(f)))

    def _maybe_close(self, now: float) -> None:
        if not self.is_open:
            return
        v = self._view
        need = v.quorum(self._min())
        have = len(v.have)
        if not v.missing and have >= need:
            self._close("complete", now)
        elif self.deadline_at is not None and now >= self.deadline_at:
            if have >= need:
                if now < self._grace_until() and any(
                    o not in v.have and o not in v.excluded for o in self._in_flight
                ):
                    return  # tick at the end of the grace (next_deadline)
                self._close("deadline", now)
            elif self._failed_round == self.round and self.participating and need > len(v.members):
                # Not even every member still awaited could make the quorum.
                self._retry_local(now)
            elif not self._quorum_waited:
                self._quorum_waited = True
                self._events.append(QuorumWait(self.round, have, need))

    def _retry_local(self, now: float) -> None:
        """Our gradient failed and the round cannot close without it (a lone peer, or
        one of too few: no quorum even if every member in the view contributed):
        compute it again rather than wait for a quorum that cannot come. Each retry
        costs one more deadline; nothing was published for the round, so a second
        computation is no equivocation."""
        self.counters["local_retries"] += 1
        self._compute_now(now)

    def _compute_now(self, now: float) -> None:
        """Computes the open round from here, keeping what it counted already."""
        self._failed_round = 0
        self._quorum_waited = False
        self.participating = True
        self.phase = COMPUTING
        self._view.self_retry()
        self.deadline_at = now + self.deadline_s
        self._actions.append(InvokeFunctions(self.round))
        self._actions.append(PublishState(self.round, self.digest, True))

    def _close(self, reason: str, now: float) -> None:
        v = self._view
        if reason == "deadline":
            v.mark_absent(self.round)
        v.close()
        self.phase = AGGREGATING
        contributors = tuple(sorted(v.have))
        self._closed_with = contributors
        duration = now - self.begun_at
        if self.participating:
            # A round followed without computing (catching up after a sync) may have
            # begun mid-round and close at once from buffered gradients: it says
            # nothing about how long rounds take, and would shrink the deadline.
            self._deadline.record(duration)
        self._events.append(RoundClosed(self.round, contributors, duration, reason))
        self._actions.append(Aggregate(self.round, contributors, self._f_for(len(contributors))))
