"""One training job on one peer, sans-IO: every decision the daemon used to make itself.

The round machine (``machine.py``) decides a round: who it waits for, when it
closes, with whom. This machine owns one and decides the job around it:

* **lifecycle** (``Lifecycle``): starting, running, syncing, done, stopped, failed;
* **whether the round machine's work is done**: while syncing, what it asks is moot
  (there is no valid state to compute on) and is dropped; its facts still count;
* **buffering and replay**: gradients that arrive while syncing, or while
  following for rounds past the round machine's window, are held (bounded) and
  handed back once they fit (``WriteGradient``);
* **when to sync**: after each round, on each ``Diverged``, and every
  ``sync_check_s`` (``vouch.sync_decision`` over this peer's ``VouchTable``); a
  follower that holds gradients for each round between its own and the others'
  replays them instead, however far behind (``_replayable``);
* **a sync pass**: what this node's Redis or newest checkpoint still holds
  (``ReadLocalState``, then ``LoadState("checkpoint")`` if only the checkpoint
  fits), then the decision, a download from each voucher of the target in turn
  (``FetchState``), and a load only once f+1 others vouch for what arrived;
  "in sync" (also when nobody else is there) resumes on the state held; while
  syncing, the peer says again at each check that it takes no part (a peer that
  missed the first would count it in its quorum), and warms its functions up;
* **following**: a peer that loaded a state follows that round without computing,
  warms its functions up (``WarmUp``), and computes again from a round start the
  others' views can take it in at: the round after next, announced a round ahead
  (a heads-up with ``JOIN_DIGEST``), never the next one (the others' heads-ups for
  it may be in flight); past its deadline with nobody ahead, it computes the round
  after all (``Unfollowed``);
* **exclusion verdicts**: a peer proven Byzantine is out of every round and its
  vouches are void;
* **done, stopped, failed**.

The daemon performs the actions (``drain_actions``) and reports back through the
methods below; ``drain_events`` says what happened. Time comes into every call and
the caller calls ``tick`` at ``next_deadline()``. The first periodic sync check is
``check_offset_s`` after the machine is made: a simulator draws it so that peers do
not check in lockstep; the daemon passes 0.

Bounds that hold (and one that does not hold tighter). A peer whose round is past
its deadline without a quorum while a vouched position is ahead syncs to it
however close it is (``stuck``), and a peer already in a sync pass takes a final
position (rounds + 1) however close: so a minority that forks one round before the
last, and follows the majority's state of that round, never waits for gradients
of the last round that the others sent before it got there; it takes their final
model within one sync pass (a decision, at most one transfer per voucher tried,
and ``vouch_wait_s``). A fork is repaired within a round or two as long as f+1
honest peers vouch for the majority's position; with fewer, nothing is loaded
(a liar's state must never be) and the peer waits, saying why in ``detail``.

A peer cut off from the others while its view shrank to itself closes rounds
alone, often faster than they do, and comes back ahead of them in rounds on a
model nobody vouches for. At its next check it compares its own digest at the
newest vouched round, behind it, with the vouched one; if they differ and more
peers held theirs at that round (counting those still closing the round before
as ours), it syncs back to them (``own_at``), instead of waiting until they reach
its round to find it diverged.

What does not hold: a split in which no contributor set of one round is shared by
f+1 peers (each of four peers, f = 1, closes round r at the deadline without a
different one of the others' gradients) leaves every peer alone at r + 1. Nothing
there is vouched, so nobody may load another's state, and the job waits; ``train
status`` says so (``detail``: no model at round r + 1 is vouched for by f+1).
Repairing it needs the peers to agree on round r again (keep theta_r for a round
and re-aggregate on a common contributor set, checked by recomputation), which is
not built. It needs every peer to miss a different body at the deadline: seen
once in a loaded CI run, held by ``test_rounds_stall_sim``'s strict xfail.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter, deque
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from ..gossip import Verdict
from .events import (
    JOIN_DIGEST,
    NO_DIGEST,
    Aggregate,
    CaughtUp,
    Diverged,
    Evaluate,
    Excluded,
    FetchState,
    Finished,
    JobAction,
    JobDone,
    JobEvent,
    JobFailed,
    LoadState,
    PublishState,
    ReadLocalState,
    Resumed,
    StateLoaded,
    StateUnvouched,
    SyncStarted,
    Unfollowed,
    WarmUp,
    WriteGradient,
)
from .machine import RoundMachine
from .vouch import IN_SYNC, SYNC, VouchTable, caught_up, sync_decision

CHECKPOINT = "checkpoint"  # LoadState's source for the newest checkpoint


class Lifecycle(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    SYNCING = "syncing"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """Under way on this peer, whether computing or syncing: a stop applies,
        and a new job must wait for one."""
        return self in (Lifecycle.STARTING, Lifecycle.RUNNING, Lifecycle.SYNCING)


# Where a sync pass is.
_READING = "reading"  # ReadLocalState out
_LOADING_CHECKPOINT = "loading_checkpoint"
_DECIDING = "deciding"  # the next decision at _retry_at
_FETCHING = "fetching"  # FetchState out to _sources[_source]
_VOUCH_WAIT = "vouch_wait"  # a fetched state waits for its vouches until _vouch_until
_LOADING = "loading"  # LoadState out for a fetched state


@dataclass(frozen=True, slots=True)
class JobConfig:
    sync_check_s: float = 1.0  # how often a running peer asks whether it must sync
    sync_retry_s: float = 0.5  # between sync decisions while nothing can be done yet
    vouch_wait_s: float = 2.0  # a fetched state newer than the vouches seen may wait this long
    buffer_max: int = 512  # gradients held while syncing or following
    lag_rounds: int = 2  # sync_decision's: behind by more, a peer syncs
    checkpoint_every: int = 0  # 0: never (the daemon also checkpoints at stop)

    def validate(self) -> None:
        if self.sync_check_s <= 0 or self.sync_retry_s <= 0 or self.vouch_wait_s < 0:
            raise ValueError("sync_check_s and sync_retry_s must be > 0, vouch_wait_s >= 0")
        if self.buffer_max < 1:
            raise ValueError("buffer_max must be >= 1")
        if self.lag_rounds < 0 or self.checkpoint_every < 0:
            raise ValueError("lag_rounds and checkpoint_every must be >= 0")


@dataclass(frozen=True, slots=True)
class _Held:
    origin: str
    job: str
    round: int
    base: bytes
    size: int
    handle: object


class JobMachine:
    def __init__(
        self,
        rounds: RoundMachine,
        *,
        f: int,
        config: JobConfig | None = None,
        check_offset_s: float = 0.0,
        now: float = 0.0,
    ) -> None:
        """``rounds``: the job's round machine, made by the caller (its members,
        rule minimum and tuning are the daemon's business); this machine drives it
        from now on. ``f``: the job's Byzantine bound, for the vouches."""
        self.config = config or JobConfig()
        self.config.validate()
        self.rounds = rounds
        self.self_id = rounds.self_id
        self.job_id = rounds.job_id
        self.last_round = rounds.rounds
        self.vouch = VouchTable(f=f)
        self.lifecycle = Lifecycle.STARTING
        self.detail = ""  # why it stopped or failed
        self.sync_detail = ""  # the sync decision's reason, for ``train status``
        self.digest = b""  # the state this node holds: after ``completed`` rounds
        self.completed = 0
        # round -> the digest this node held at that round's start, for the vouch
        # window's rounds back from its position (``_hold``).
        self._own: dict[int, bytes] = {}
        self.following = False  # caught up by sync; computing again from a round start
        self._joins_at = 0  # the round start a follower announced it computes from
        self._finishing_via = ""  # "sync": it took the others' final model, evaluating it
        self.warmed = False  # the functions answered once (a cold start is behind us)
        self.excluded: dict[str, dict[str, Any]] = {}
        self.counters: Counter[str] = Counter()
        self._sync_ahead = False  # syncing because stuck where the others had moved on
        # When each straggler was last told our position (bounded by the members:
        # forgotten when one leaves).
        self._told: dict[str, float] = {}
        # Heads-ups from a straggler we left to holders ranked before us: each one it
        # repeats, one more of us answers (see _answer_straggler).
        self._passed: dict[str, int] = {}
        self._warming = False
        self._buffer: deque[_Held] = deque()
        self._replayed: set[int] = set()  # rounds of held gradients sent to be written
        self._progress_at = now  # the last round closed (or resumed at)
        self._next_check = now + check_offset_s
        # The sync pass (None: none running).
        self._pass: str | None = None
        self._retry_at: float | None = None
        self._sources: tuple[str, ...] = ()
        self._source = 0
        self._want: tuple[int, bytes] = (0, b"")  # the position asked of each source
        self._fresh_pass_due = False  # after sync trouble: read the local state again
        self._fetched: tuple[int, bytes] | None = None
        self._vouch_until: float | None = None
        self._actions: list[JobAction] = []
        self._events: list[JobEvent] = []

    # --- draining and inspection -------------------------------------------------------

    def drain_actions(self) -> list[JobAction]:
        out = self._actions
        self._actions = []
        return out

    def drain_events(self) -> list[JobEvent]:
        out = self._events
        self._events = []
        return out

    def next_deadline(self) -> float | None:
        # Asked after every call (the simulator runs it millions of times): no lists.
        best = self.rounds.next_deadline()
        life = self.lifecycle
        if life is Lifecycle.RUNNING or life is Lifecycle.SYNCING or life is Lifecycle.DONE:
            t = self._next_check
            if best is None or t < best:
                best = t
        if life is Lifecycle.SYNCING:
            for t in (self._retry_at, self._vouch_until):
                if t is not None and (best is None or t < best):
                    best = t
        return best

    @property
    def state(self) -> str:
        """What ``train status`` shows: a follower is still syncing to the user."""
        return Lifecycle.SYNCING if self.following else self.lifecycle

    def buffered(self) -> int:
        return len(self._buffer)

    def status(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "detail": self.sync_detail if self.lifecycle is Lifecycle.SYNCING else self.detail,
            "round": self.completed,
            "model_digest": self.digest.hex() if self.digest else None,
            "excluded": [self.excluded[k] for k in sorted(self.excluded)],
            "machine": self.rounds.status(),
        }

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, digest: bytes, now: float) -> None:
        """A new job: the daemon wrote the initial state (digest ``digest``)."""
        if self.lifecycle is not Lifecycle.STARTING:
            return
        self._hold(0, digest)
        self.lifecycle = Lifecycle.RUNNING
        self.rounds.begin(1, digest, now)
        self._drain_rounds(now)

    def start_elsewhere(self, why: str, now: float) -> None:
        """A job already under way (a late join, a restart): establish the state from
        this node's Redis or checkpoint if they still fit, else from the peers."""
        self._enter_sync(why, now)

    def stop(self, why: str) -> bool:
        """Stops for good; True if the state held should be checkpointed."""
        was = self.lifecycle
        if was.active:
            self.lifecycle = Lifecycle.STOPPED
            self.detail = why
        self._end_pass()
        return was is Lifecycle.RUNNING and bool(self.digest)

    def fail(self, why: str, now: float) -> None:
        """The daemon cannot go on with this job (a task failed for good)."""
        if self.lifecycle is not Lifecycle.RUNNING:
            return
        self.lifecycle = Lifecycle.FAILED
        self.detail = why
        self._end_pass()
        # The others must not wait for this node's gradients any more.
        self._heads_up_out()
        self._events.append(JobFailed(why))

    def redis_trouble(self, why: str, now: float) -> None:
        """This node's Redis lost or refused the state mid-round: the round's work is
        abandoned and the state re-established."""
        if self.lifecycle is Lifecycle.RUNNING:
            self.counters["redis_trouble"] += 1
            self._enter_sync(why, now)

    def sync_trouble(self, why: str, now: float) -> None:
        """A sync pass's I/O failed in a way the pass cannot step over (Redis down
        while loading): start a fresh pass after ``sync_retry_s``."""
        if self.lifecycle is not Lifecycle.SYNCING:
            return
        self.counters["sync_trouble"] += 1
        self.sync_detail = f"state sync trouble: {why}"
        self._end_pass()
        self._pass = _DECIDING
        self._retry_at = now + self.config.sync_retry_s
        self._fresh_pass_due = True

    def done(self, now: float) -> None:
        """The daemon finished the last round's work (``Finished``: its evaluation)."""
        if self.lifecycle in (Lifecycle.STOPPED, Lifecycle.FAILED, Lifecycle.DONE):
            return
        self.lifecycle = Lifecycle.DONE
        self.following = False  # it may have followed the last round without computing
        self._end_pass()
        self._events.append(JobDone(self.completed, self._finishing_via or "run"))

    # --- time --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.rounds.tick(now)
        self._drain_rounds(now)
        if self.lifecycle is Lifecycle.SYNCING:
            self._sync_timers(now)
        if now >= self._next_check and self.lifecycle in (
            Lifecycle.RUNNING,
            Lifecycle.SYNCING,
            Lifecycle.DONE,
        ):
            # A follower stuck on a round whose gradients it never got, or a peer
            # left far behind, finds out here even when no round closes.
            self._next_check = now + self.config.sync_check_s
            dl = self.rounds.deadline_at
            stuck = self.lifecycle is Lifecycle.RUNNING and dl is not None and now > dl
            self._check_sync(now, stuck=stuck)
            if stuck and self.lifecycle is Lifecycle.RUNNING:
                self._unfollow(now)
            if self.lifecycle is Lifecycle.SYNCING:
                # Our "not taking part" may not have reached everyone (a peer that
                # held us dead when it came drops it), and a peer that counts us in
                # its quorum would wait for us while we wait for its vouches.
                self._heads_up_out()
            if self.lifecycle is Lifecycle.RUNNING and self._unheard(now):
                # Our one heads-up for this round may have gone out before the others'
                # gossip had us back (a restart faster than their failure detector),
                # and peers that finished meanwhile answer only a heads-up they hear.
                # Repeated, it reaches them.
                self._actions.append(self._open_heads_up())
            if self.following:
                # A failed warm-up is tried again: a cold follower never computes.
                self._warm_up(self.rounds.round)

    # --- membership --------------------------------------------------------------------

    @property
    def hears_members(self) -> bool:
        """Whether membership events are for this machine (the daemon passes them
        only then): running, or syncing, where a dead voucher must leave the table
        before the next fetch tries it and the view it resumes with must not wait a
        deadline for it. Before the job starts and after it ends, the view is moot."""
        return self.lifecycle in (Lifecycle.RUNNING, Lifecycle.SYNCING)

    def member_alive(self, node_id: str, now: float) -> None:
        self.rounds.member_alive(node_id, now)
        self._drain_rounds(now)
        # A peer that (re)joined heard none of the heads-ups sent before it came: a
        # restarted one without state, that our round needs for its quorum, would
        # otherwise find nobody's position to sync to, and wait, while we wait for
        # it. Only then: out of its time a heads-up also brings back into the view
        # peers that missed a deadline, and closes would differ between peers.
        heads_up = self._repeatable()
        if heads_up is not None and self.lifecycle is Lifecycle.RUNNING:
            self._actions.append(heads_up)

    def member_gone(self, node_id: str, now: float) -> None:
        self.rounds.member_gone(node_id, now)
        self.vouch.forget(node_id)
        self._told.pop(node_id, None)
        self._passed.pop(node_id, None)
        self._drain_rounds(now)

    # --- heads-ups and gradients ---------------------------------------------------------

    def announce(
        self, origin: str, job: str, round: int, digest: bytes, participating: bool, now: float
    ) -> None:
        """A peer's heads-up (it is at (round, digest), taking part or not)."""
        position = participating or round > self.last_round
        if job == self.job_id and position and digest != JOIN_DIGEST:
            self._note(origin, round, digest, now)
        if job == self.job_id and origin != self.self_id:
            self._answer_straggler(origin, round, participating, now)
        self.rounds.announce(origin, job, round, digest, participating, now)
        self._drain_rounds(now)

    def validate_gradient(
        self, origin: str, job: str, round: int, base: bytes, size: int, now: float
    ) -> Verdict:
        """The pub/sub hook on a gradient's announcement, before any body byte (the
        daemon checks it for equivocation first)."""
        if origin in self.excluded:
            # Proven Byzantine: nothing of it is pulled again. IGNORE, not REJECT:
            # the neighbour that relayed it need not know yet. A wrong size is
            # wrong whatever one knows, so its relay is charged as for anyone's.
            if size != self.rounds.body_size:
                self.counters["gradient_rejected.size"] += 1
                return Verdict.REJECT
            self.counters["gradient_rejected.excluded"] += 1
            return Verdict.IGNORE
        if job == self.job_id:
            self._note(origin, round, base, now)
        if self.holds(round):
            # Held for the rounds we will follow once the state is loaded, or that a
            # follower reaches soon (the round machine checks them then); far older
            # ones can never be used.
            if size != self.rounds.body_size:
                return Verdict.REJECT
            newest = self.vouch.newest_round() or 0
            return Verdict.ACCEPT if round >= min(newest - 1, self.rounds.round) else Verdict.IGNORE
        reason = self.rounds.validate(origin, job, round, base, size, now)
        self._drain_rounds(now)
        if reason is None:
            return Verdict.ACCEPT
        # Wrong size or a second gradient for one round is misbehaviour; the rest
        # (late, early, another model) happens to honest peers too.
        return Verdict.REJECT if reason in ("size", "duplicate") else Verdict.IGNORE

    def gradient_arrived(
        self, origin: str, job: str, round: int, base: bytes, size: int, handle: object, now: float
    ) -> bool:
        """A gradient's body is here: True if the daemon writes it into Redis now (and
        reports ``gradient_stored``), False if it is held (``handle`` comes back in a
        ``WriteGradient`` once it fits)."""
        if not self.holds(round):
            return True
        if len(self._buffer) >= self.config.buffer_max:
            self._buffer.popleft()
            self.counters["buffer_dropped"] += 1
        self._buffer.append(_Held(origin, job, round, base, size, handle))
        return False

    def gradient_stored(
        self, origin: str, job: str, round: int, base: bytes, size: int, now: float
    ) -> str | None:
        """The body is in Redis: counted by the round machine, or the reason it is not
        (then the daemon deletes it)."""
        reason = self.rounds.receive(origin, job, round, base, size, now)
        self._drain_rounds(now)
        return reason

    def gradient_refused(self, origin: str, round: int, reason: str, now: float) -> None:
        """The stored body is bad (non-finite) or could not be stored."""
        self.rounds.reject(origin, round, reason, now)
        self._drain_rounds(now)

    def convict(self, origin: str, round: int, kind: str, how: str, now: float) -> bool:
        """``origin`` is proven Byzantine: out of every round from now on, its vouches
        void. False if it was out already (or is this peer)."""
        if origin == self.self_id or origin in self.excluded:
            return False
        self.excluded[origin] = {
            "node_id": origin,
            "reason": kind,  # "equivocation" or "nonfinite"
            "round": round,  # the round it misbehaved in
            "at_round": self.rounds.round,  # ours when we excluded it
            "how": how,
        }
        self._events.append(Excluded(origin, round, kind, how))
        self.rounds.exclude(origin, now)
        self.vouch.bar(origin)
        self._buffer = deque(h for h in self._buffer if h.origin != origin)
        self._drain_rounds(now)
        return True

    # --- the daemon's work, reported -----------------------------------------------------

    def local_gradient_ready(self, round: int, now: float) -> None:
        self.warmed = True
        self.rounds.local_gradient_ready(round, now)
        self._drain_rounds(now)

    def local_gradient_failed(self, round: int, reason: str, now: float, *, warm: bool) -> None:
        """``warm``: some of the functions answered (they are not cold any more)."""
        self.warmed = self.warmed or warm
        self.rounds.local_gradient_failed(round, reason, now)
        self._drain_rounds(now)

    def warm_up_done(self, ok: bool, now: float) -> None:
        self._warming = False
        self.warmed = self.warmed or ok

    def aggregated(self, round: int, digest: bytes, now: float) -> None:
        """The daemon aggregated ``round`` and holds the updated state ``digest`` (also
        when a sync took over meanwhile: that pass then finds it in Redis)."""
        self._hold(round, digest)
        self._progress_at = now
        participate, join_at = None, 0
        if self.following and self.warmed:
            t = self.vouch.target(exclude=(self.self_id,))
            if self._joins_at == round + 1:
                # The others heard a round ago that we join at the next round: its
                # start, at every peer, comes after our heads-up for it, so every view
                # takes this peer in.
                self.following, participate = False, True
                self._events.append(CaughtUp(round + 1))
            elif (
                self._joins_at <= round
                and round + 2 <= self.last_round
                and (t is None or t.round <= round + 1)
            ):
                # The others close this round when we do and begin the next one at
                # once; a vouch table that shows nobody there yet only means their
                # heads-ups are in flight. Computing it would put our gradient in the
                # views of those that hear our heads-up before they close and not in
                # the others' (a fork each time, under rounds of tens of
                # milliseconds): follow it, and tell them now that we take part in the
                # one after. Two or more rounds behind, it keeps following (it replays
                # buffered rounds faster than they run them), and it follows the last
                # round, for which no join can be announced ahead (unless the others
                # wait for it there: then ``_unfollow`` at the deadline).
                join_at = round + 2
        self.rounds.aggregated(round, digest, now, participate=participate)
        self._drain_rounds(now)
        if join_at:
            # After the heads-up of the round it follows (that one says "not in it").
            self._joins_at = join_at
            self._actions.append(PublishState(join_at, JOIN_DIGEST, True))
        if self._buffer:
            self._replay(now)
        self._check_sync(now)

    # --- the sync pass, reported ---------------------------------------------------------

    def local_state(
        self,
        redis: tuple[int, bytes] | None,
        checkpoint: tuple[int, bytes] | None,
        now: float,
    ) -> None:
        """The answer to ``ReadLocalState``: (completed, digest) of the state in this
        node's Redis (None unless its marks match what it holds) and of the newest
        checkpoint (None if none)."""
        if self.lifecycle is not Lifecycle.SYNCING or self._pass != _READING:
            return
        if redis is not None and (not self.digest or redis[1] == self.digest):
            self._hold(*redis)
        elif checkpoint is not None and (
            not self.digest
            or checkpoint[1] == self.digest
            or self.vouch.vouched(checkpoint[0] + 1, checkpoint[1])
        ):
            self._pass = _LOADING_CHECKPOINT
            self._actions.append(LoadState(CHECKPOINT, *checkpoint))
            return
        else:
            self._hold(0, b"")
        self._sync_step(now)

    def state_fetched(self, peer: str, completed: int, digest: bytes, now: float) -> None:
        """The state ``FetchState`` asked ``peer`` for arrived and matches the digest it
        claims (which may be newer than the one asked for)."""
        if not self._fetching(peer):
            return
        self._fetched = (completed, digest)
        self._pass = _VOUCH_WAIT
        # The others' heads-ups for that round may be in flight.
        self._vouch_until = now + self.config.vouch_wait_s
        self._vouch_check(now)

    def fetch_failed(self, peer: str, why: str, now: float) -> None:
        """No state from ``peer`` (unreachable, refused, or it did not match its
        digest): the next voucher."""
        if not self._fetching(peer):
            return
        self.counters["fetch_failed"] += 1
        self._next_source(now)

    def state_loaded(self, source: str, completed: int, digest: bytes, now: float) -> None:
        """``LoadState`` is done: the state is in Redis, its position marked."""
        if self.lifecycle is not Lifecycle.SYNCING or self._pass not in (
            _LOADING,
            _LOADING_CHECKPOINT,
        ):
            return
        self._hold(completed, digest)
        n = len(self.vouch.vouchers(completed + 1, digest) - {self.self_id})
        self._events.append(StateLoaded(source, completed, digest, n))
        if self._pass == _LOADING_CHECKPOINT:
            self._sync_step(now)
        else:
            self._resume(completed + 1, now)

    # --- internals: the round machine -------------------------------------------------

    def _hold(self, completed: int, digest: bytes) -> None:
        """This node now holds the state after ``completed`` rounds. Its recent
        positions are kept so that a fork found behind it (the others vouch for
        another model at a round it passed) can be told from a plain lead; a
        position from a branch it left (a sync went back) is forgotten."""
        self.digest, self.completed = digest, completed
        at = completed + 1
        oldest = at - self.vouch.window
        for r in [r for r in self._own if r >= at or r <= oldest]:
            del self._own[r]
        if digest:
            self._own[at] = digest

    def _drain_rounds(self, now: float) -> None:
        actions = self.rounds.drain_actions()
        if self.lifecycle is Lifecycle.SYNCING:
            # No valid state to compute on; whatever the round machine asks is moot
            # (it is begun afresh once the state is back). Its events still count.
            actions = []
        for a in actions:
            if isinstance(a, Aggregate):
                every = self.config.checkpoint_every
                if every and (a.round % every == 0 or a.round == self.last_round):
                    a = replace(a, checkpoint=True)
            self._actions.append(a)
        diverged = False
        for ev in self.rounds.drain_events():
            self._events.append(ev)
            if isinstance(ev, Diverged):
                self.vouch.note(ev.origin, ev.round, ev.digest)
                diverged = True
        if diverged:
            self._check_sync(now)
        if self.lifecycle is Lifecycle.SYNCING and self._pass == _VOUCH_WAIT:
            self._vouch_check(now)

    def _note(self, origin: str, round: int, digest: bytes, now: float) -> None:
        self.vouch.note(origin, round, digest)
        if self.lifecycle is Lifecycle.SYNCING and self._pass == _VOUCH_WAIT:
            self._vouch_check(now)

    def _heads_up_out(self) -> None:
        """Not taking part: nobody should wait for this peer's gradients."""
        self._actions.append(
            PublishState(max(1, self.rounds.round), self.digest or NO_DIGEST, False)
        )

    def _repeatable(self) -> PublishState | None:
        """The heads-up worth repeating out of its time, if any: running and waiting
        for a quorum, our open round's; done, our final position. Not otherwise: out
        of its time a heads-up also brings back into the view peers that missed a
        deadline, and closes would differ between peers."""
        if not self.digest:
            return None
        if self.lifecycle is Lifecycle.DONE:
            return PublishState(self.last_round + 1, self.digest, False)
        if self.lifecycle is Lifecycle.RUNNING and self.rounds.waiting_for_quorum:
            return self._open_heads_up()
        return None

    def _open_heads_up(self) -> PublishState:
        m = self.rounds
        return PublishState(m.round, m.digest or self.digest, m.participating)

    def _unheard(self, now: float) -> bool:
        """Whether our open round looks unheard: past its deadline without a quorum,
        or nobody announced it (or a later round) in the ``sync_check_s`` since it
        began. Not in a job that runs: its peers' heads-ups for a round come as it
        begins, and a heads-up repeated out of its time would bring peers that
        missed a deadline back into some views and not others."""
        m = self.rounds
        if not self.digest or not m.is_open:
            return False
        if m.waiting_for_quorum:
            return True
        newest = self.vouch.newest_round(exclude=(self.self_id,))
        quiet = newest is None or newest < m.round
        return quiet and now - m.begun_at >= self.config.sync_check_s

    def _answer_straggler(self, origin: str, round: int, participating: bool, now: float) -> None:
        """A peer announces a round behind ours: one that restarted from its own
        state (or with none) while we waited for it, or after we finished. Its
        membership event reached us before its job resumed, so what we repeated
        then went unheard; it may take itself for in sync (nobody ahead of it) and
        wait for a quorum that is not coming. Our position tells it to sync.

        Not everyone answers: every holder of our position broadcasting to every
        peer is N^2 messages per straggler (at 200 simulated peers it more than
        doubled the run). It needs f + 1 honest vouches, so the 2f + 1 holders that
        rank first for this straggler answer (a rendezvous hash every holder
        computes alike from the same table), each once per ``sync_check_s``. A
        holder ranked first may not answer (dead, restarted without its job, or
        lying by silence): each heads-up the straggler repeats brings in the next
        holder, so it hears from enough of us within a few repeats. While
        running, only a peer out of the rounds is answered: one taking part a
        round behind is merely slow, and heard our heads-up in time."""
        if participating and self.lifecycle is Lifecycle.RUNNING:
            return
        heads_up = self._repeatable()
        if heads_up is None or round >= heads_up.round:
            return
        if now < self._told.get(origin, -math.inf) + self.config.sync_check_s:
            return
        holders = self.vouch.vouchers(heads_up.round, heads_up.digest) - {origin}
        answer = 2 * self.vouch.f + 1
        if len(holders) >= answer:
            key = origin.encode() + b"\0"
            mine = zlib.crc32(key + self.self_id.encode())
            ahead = sum(1 for p in holders if zlib.crc32(key + p.encode()) < mine)
            passed = self._passed.get(origin, 0)
            if ahead >= answer + passed:
                self._passed[origin] = passed + 1
                return
        self._told[origin] = now
        self._actions.append(heads_up)

    # --- internals: buffering -----------------------------------------------------------

    def holds(self, round: int) -> bool:
        """Whether a gradient for ``round`` is held rather than going to the round
        machine: while syncing, and while following for rounds past the round
        machine's window (a follower replays rounds faster than the others run
        them, so it needs the gradients of every round between its state and
        theirs)."""
        if self.lifecycle is Lifecycle.SYNCING:
            return True
        return self.following and round > self.rounds.round + self.rounds.config.future_window

    def _replay(self, now: float) -> None:
        """Held gradients that now fit the round machine go to it (checked again)."""
        held, self._buffer = self._buffer, deque()
        for h in held:
            if self.holds(h.round):
                self._buffer.append(h)
                continue
            verdict = self.validate_gradient(h.origin, h.job, h.round, h.base, h.size, now)
            if verdict is Verdict.ACCEPT:
                self._actions.append(WriteGradient(h.origin, h.round, h.handle))
                self._replayed.add(h.round)

    # --- internals: sync ------------------------------------------------------------------

    def _check_sync(self, now: float, *, stuck: bool = False) -> None:
        """Are we the ones who must sync? ``stuck``: the open round is past its
        deadline; then a final position the others announce counts however close
        it is (there are no more rounds in which to catch up with them)."""
        if self.lifecycle not in (Lifecycle.RUNNING, Lifecycle.DONE) or not self.digest:
            return
        # Past the deadline for want of a quorum (not merely slow functions): a
        # position the others moved on to is out of reach by rounds.
        ahead = stuck and self.rounds.waiting_for_quorum
        d = sync_decision(
            self.vouch,
            self_id=self.self_id,
            round=self.completed + 1,
            digest=self.digest,
            lag_rounds=self.config.lag_rounds + self._replayable(now),
            final_round=self.last_round + 1 if stuck else None,
            stuck=ahead,
            own_at=self._own,
        )
        if d.action == SYNC:
            # The sync pass must take a position ahead, not resume into the round
            # we were stuck in (which would only get us stuck again).
            self._sync_ahead = ahead
            self._enter_sync(d.reason, now)

    def _replayable(self, now: float) -> int:
        """How many rounds after the open one a follower holds gradients for, without
        a gap, while its replay makes progress. It closes them faster than the
        others run them (no functions), so that much lag is no reason to sync: a
        joiner whose transfer took longer than ``lag_rounds`` rounds of the others
        was otherwise sent back to sync again on its first check, and again, while
        the others ran on (4 transfers for one join were seen in bench.sync). A
        round it holds no gradient for, or a replay that closed no round for two
        ``sync_check_s`` (a body lost, or a liar's gradients for rounds ahead with
        nothing for the open one), still sends it to sync. (The first replayed
        round, behind the writes of every held body, took up to 1.8 s under load.)"""
        if not self.following or now - self._progress_at > 2 * self.config.sync_check_s:
            return 0
        # Rounds whose gradients are on their way into Redis (WriteGradient) count:
        # after a transfer, the daemon writes a few rounds' bodies before the first
        # of them closes.
        self._replayed = {r for r in self._replayed if r > self.rounds.round}
        held = self.rounds.held_rounds() | {h.round for h in self._buffer} | self._replayed
        n, r = 0, self.rounds.round + 1
        while r in held:
            n, r = n + 1, r + 1
        return n

    def _unfollow(self, now: float) -> None:
        """A follower whose round is past its deadline while nobody is past it may be
        waiting for other followers, which wait for it in turn: compute this round
        after all (a wrong guess shows as a divergence and is repaired by sync)."""
        r = self.rounds.round
        if self.following and self.warmed and caught_up(self.vouch, self.self_id, r - 1):
            self.following = False
            self._events.append(Unfollowed(r))
            self.rounds.take_part(now)
            self._drain_rounds(now)

    def _enter_sync(self, why: str, now: float) -> None:
        if self._finishing_via:
            return  # it holds the final model the others vouch for; evaluating it
        if self.lifecycle not in (
            Lifecycle.RUNNING,
            Lifecycle.SYNCING,
            Lifecycle.STARTING,
            Lifecycle.DONE,
        ):
            return
        if self.lifecycle is not Lifecycle.SYNCING:
            self._events.append(SyncStarted(why))
        self.lifecycle, self.sync_detail = Lifecycle.SYNCING, why
        self.following = False
        self._heads_up_out()
        # A join or a restart starts cold; warming needs no parameters, so it runs
        # beside the sync instead of after it (seconds on a node's way back).
        self._warm_up(max(1, self.rounds.round))
        if self._pass is None:
            self._begin_pass()

    def _warm_up(self, round: int) -> None:
        if not self.warmed and not self._warming:
            self._warming = True
            self._actions.append(WarmUp(round))

    def _begin_pass(self) -> None:
        self._pass = _READING
        self._retry_at = self._vouch_until = None
        self._actions.append(ReadLocalState())

    def _end_pass(self) -> None:
        self._pass = None
        self._retry_at = self._vouch_until = None
        self._fetched = None
        self._sources, self._source = (), 0
        self._fresh_pass_due = False

    def _sync_timers(self, now: float) -> None:
        if self._pass == _DECIDING and self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            if self._fresh_pass_due:
                self._fresh_pass_due = False
                self._begin_pass()
            else:
                self._sync_step(now)
        elif self._pass == _VOUCH_WAIT:
            self._vouch_check(now)

    def _sync_step(self, now: float) -> None:
        """One decision and, if it says so, the first transfer."""
        own = self.completed + 1 if self.digest else None
        d = sync_decision(
            self.vouch,
            self_id=self.self_id,
            round=own,
            digest=self.digest or None,
            lag_rounds=self.config.lag_rounds,
            # Already out of the rounds: once the others have finished there is no
            # round left to catch up in, so their final model is the only way out.
            final_round=self.last_round + 1,
            stuck=self._sync_ahead,
            own_at=self._own,
        )
        self.sync_detail = d.reason
        # A peer alone (nobody else announced anything) is "in sync": with an empty
        # table nothing contradicts the state it holds, so it needs no case of its own.
        if own is not None and d.action == IN_SYNC:
            self._resume(own, now)
            return
        if d.action != SYNC or d.target is None:
            self._retry(now)
            return
        self._sources = tuple(v for v in d.target.vouchers if v != self.self_id)
        self._source = -1
        self._want = (d.target.round - 1, d.target.digest)
        self._next_source(now)

    def _retry(self, now: float) -> None:
        self._pass = _DECIDING
        self._fetched = None
        self._retry_at = now + self.config.sync_retry_s

    def _fetching(self, peer: str) -> bool:
        return (
            self.lifecycle is Lifecycle.SYNCING
            and self._pass == _FETCHING
            and 0 <= self._source < len(self._sources)
            and self._sources[self._source] == peer
        )

    def _next_source(self, now: float) -> None:
        self._source += 1
        self._fetched = self._vouch_until = None
        if self._source >= len(self._sources):
            self._retry(now)
            return
        self._pass = _FETCHING
        self._actions.append(FetchState(self._sources[self._source], *self._want))

    def _vouch_check(self, now: float) -> None:
        """A fetched state is loaded only once f+1 others vouch for its position."""
        assert self._fetched is not None
        completed, digest = self._fetched
        if self.vouch.vouched(completed + 1, digest):
            self._pass = _LOADING
            self._vouch_until = None
            self._actions.append(LoadState(self._sources[self._source], completed, digest))
        elif self._vouch_until is not None and now >= self._vouch_until:
            self.counters["sync_unvouched"] += 1
            self._events.append(StateUnvouched(self._sources[self._source], completed))
            self._next_source(now)

    def _resume(self, round: int, now: float) -> None:
        """Runs again from ``round`` with the state held: following that round
        (others' gradients only), computing again from the next round start."""
        self._end_pass()
        self._sync_ahead = False
        if round > self.last_round:
            # The final position, as a peer that ran the last round publishes it:
            # until it is heard, the others count this peer as still closing that
            # round, and a lone peer on another final model would never see its
            # rival outnumber it.
            self._actions.append(PublishState(self.last_round + 1, self.digest, False))
            # Evaluated like a run's last round (the model it ends with is not one it
            # evaluated); done once the daemon has (``done``).
            self._finishing_via = "sync"
            self._actions.append(Evaluate(self.last_round))
            self._actions.append(Finished(self.last_round))
            return
        self.lifecycle, self.sync_detail, self.following = Lifecycle.RUNNING, "", True
        self._joins_at = 0
        self._replayed.clear()
        self._progress_at = now
        self._events.append(Resumed(round))
        self.rounds.begin(round, self.digest, now, participating=False)
        self._warm_up(round)
        self._drain_rounds(now)
        self._replay(now)
