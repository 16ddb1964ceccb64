"""Round machines on simulated time, with the daemon's part played by the harness.

Each peer is a RoundMachine plus a stand-in daemon: functions take a drawn
delay (or fail); a gradient is announced to every peer (validate) and its body
arrives after a pull delay (receive); aggregation takes a fixed delay and yields
D_{r+1} = sha256(D_r | sorted contributor ids), so two peers agree on theta iff
they aggregated the same set on the same base. Announcements and gradients are
lost with probability ``loss``; gossip's repair (IHAVE/IWANT) is modelled as a
retransmission after ``retransmit_delay``. A crash stops a peer and cuts part of
what it had in flight; every other peer hears ``member_gone`` after a detection
delay. State sync is modelled as the design has it: a peer stuck without quorum,
or that sees most members announce another model, picks the position most peers
announce, stops taking part, and takes a peer's state there when that peer
starts its next round (``sync_delay`` later): it contributes from that round.
After the last round, a peer whose final model is not the most announced one
takes that one. That is the default, ``sync_model="legacy"``.

``sync_model="vouch"`` plays the daemon's state sync instead (spirtd/training/
trainer.py: ``_check_sync``, ``_sync_once``, ``_resume``, ``_buffers``, the follower
switch in ``_aggregate_locked``): every peer notes each heads-up and gradient in its
own ``VouchTable``; after each round, on each Diverged and every ``sync_check_s`` it
asks ``sync_decision`` at (completed + 1, digest); on "sync" it stops taking part,
buffers the gradients it gets, and tries the target's vouchers in sorted order: a
transfer takes ``transfer_s``, the state it gets is the voucher's state at that
time, and it is loaded only once the loader's table vouches for it (polled for
``vouch_wait_s``). It then follows that round without computing and takes part
again at the next round start once nobody announces a round beyond the next one.
Peers without state (``late`` joiners, ``restarts`` that lost theirs) start
syncing with round None; a restarted peer starts with an empty table and a fresh
machine. ``byzantine`` peers also announce made-up digests for rounds ahead and
serve a made-up state; ``cuts`` lose one round's messages between two groups.
Every load is recorded (``loads``) with the vouchers the loader counted.

Everything is drawn from one seeded ``random.Random`` on protocol.sim's event
loop, so a run is a pure function of its parameters. The harness records what
the tests judge: closes (with the deadline and view in force), begins, the
Diverged events, and, as ground truth, every mismatch a peer was shown.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from dataclasses import dataclass, field

from ..sim.loop import EventLoop
from .config import RoundConfig
from .events import (
    Aggregate,
    Diverged,
    Evaluate,
    Finished,
    GradientRejected,
    InvokeFunctions,
    PublishGradient,
    PublishState,
    QuorumWait,
    RoundClosed,
)
from .machine import RoundMachine
from .vouch import IN_SYNC, SYNC, WAIT, VouchTable, caught_up, sync_decision

JOB = "sim-job"
PARAMS = 1000
SIZE = PARAMS * 4
D0 = hashlib.sha256(b"initial parameters").digest()

SYNC_LEGACY = "legacy"  # the harness's own repair (the default)
SYNC_VOUCH = "vouch"  # the daemon's: VouchTable + sync_decision, followers


# (source, destination, (round, digest, participating), time sent)
_Delivery = tuple["SimPeer", "SimPeer", tuple[int, bytes, bool], float]


def next_digest(base: bytes, contributors: tuple[str, ...]) -> bytes:
    return hashlib.sha256(base + b"|" + ",".join(contributors).encode()).digest()


def lie_digest(round: int) -> bytes:
    """The made-up digest Byzantine peers (colluding) announce for ``round``."""
    return hashlib.sha256(b"made-up|%d" % round).digest()


@dataclass(frozen=True, slots=True)
class Cut:
    """Messages from ``senders`` to ``receivers`` about ``round`` (a heads-up's or a
    gradient's round) of the given kinds are lost for good: a partition, or a
    one-way cut, for one round."""

    senders: frozenset[str]
    receivers: frozenset[str]
    round: int
    kinds: frozenset[str] = frozenset({"announce", "gradient"})


@dataclass(frozen=True, slots=True)
class Load:
    """A state loaded by state sync (vouch model)."""

    at: float
    peer: str
    round: int  # the round the loaded state begins: completed + 1
    digest: bytes
    source: str
    vouchers: int  # distinct others vouching for (round, digest) in the loader's table


@dataclass(frozen=True, slots=True)
class SimParams:
    n: int = 200
    rounds: int = 5
    seed: int = 1
    min_contributors: int = 3
    config: RoundConfig = field(
        default_factory=lambda: RoundConfig(
            initial_deadline_s=6.0, deadline_floor_s=2.0, deadline_ceiling_s=15.0
        )
    )
    fn_delay: tuple[float, float] = (1.0, 1.5)  # functions, per peer per round
    fn_fail: float = 0.0  # probability a peer's functions fail in a round
    msg_delay: tuple[float, float] = (0.01, 0.08)  # announcement, one hop
    pull_delay: tuple[float, float] = (0.05, 0.25)  # gradient body after validation
    loss: float = 0.0
    retransmit: bool = True  # lost gradients are repaired by gossip
    announce_retransmit: bool = True  # lost heads-ups too
    retransmit_delay: float = 1.0
    aggregate_delay: float = 0.05
    crashes: int = 0
    crash_rounds: tuple[int, int] = (1, 3)  # a victim crashes during one of these rounds
    crash_cut: float = 0.5  # share of a victim's in-flight gradients lost with it
    detect_delay: tuple[float, float] = (1.0, 3.0)  # crash -> member_gone, per observer
    stragglers: int = 0
    straggler_delay: tuple[float, float] = (40.0, 60.0)
    sync_delay: float = 0.5
    until: float = 600.0
    cuts: tuple[Cut, ...] = ()
    # --- the daemon's state sync (sync_model="vouch"; see the module docstring) ---
    sync_model: str = SYNC_LEGACY
    f: int = 0  # the job's f: VouchTable(f=f)
    lag_rounds: int = 2  # sync_decision's
    transfer_s: tuple[float, float] = (0.5, 1.5)  # a state download
    unreachable_s: float = 1.0  # a download from a dead or unknown peer fails after this
    sync_check_s: float = 1.0  # SYNC_CHECK_S
    sync_retry_s: float = 0.5  # SYNC_RETRY_S
    vouch_wait_s: float = 2.0  # VOUCH_WAIT_S, polled every vouch_poll_s
    vouch_poll_s: float = 0.1
    buffer_max: int = 512  # BUFFER_MAX
    eval_delay: float = 0.05  # Finished -> done (the daemon awaits the evaluation)
    late: int = 0  # the last ``late`` ids are not there at the start and join
    late_at: tuple[float, float] = (10.0, 11.0)  # each joins at a time drawn from this
    restarts: int = 0  # killed all at once at ``restart_at``, back ``restart_down`` later
    restart_at: float = 10.0
    restart_down: tuple[float, float] = (5.0, 6.0)
    restart_lost: int = 0  # of the restarted, how many come back without their state
    byzantine: int = 0  # the first ``byzantine`` ids lie (they sort first among vouchers)
    lie_ahead: tuple[int, ...] = (2, 3, 6)  # rounds ahead of their own they announce


@dataclass(slots=True)
class Close:
    round: int
    base: bytes
    contributors: tuple[str, ...]
    reason: str
    duration_s: float
    deadline_s: float
    at: float
    view: frozenset[str]
    quorum_waited: bool


class SimPeer:
    __slots__ = (
        "accepted",
        "alive",
        "begins",
        "buffer",
        "byzantine",
        "checked_completed",
        "closes",
        "completed",
        "crashed_at",
        "digest",
        "diverged_count",
        "diverged_seen",
        "done",
        "dstate",
        "expected_diverged",
        "final_check_pending",
        "final_digest",
        "finished_at",
        "finished_via",
        "follow",
        "followers",
        "following",
        "gone_at",
        "heard",
        "id",
        "joined_at",
        "lied",
        "loads",
        "machine",
        "prev",
        "quorum_waits",
        "straggler",
        "switches",
        "sync_ahead",
        "sync_detail",
        "sync_running",
        "sync_starts",
        "syncs",
        "table",
        "tick_at",
        "unvouched",
        "warmed",
        "warming",
    )

    def __init__(self, node_id: str, machine: RoundMachine, straggler: bool) -> None:
        self.id = node_id
        self.machine = machine
        self.straggler = straggler
        self.alive = True
        self.crashed_at: float | None = None
        self.done = False
        self.final_digest: bytes | None = None
        self.finished_at: float | None = None
        self.final_check_pending = False
        self.finished_via = ""
        self.tick_at: float | None = None
        self.begins: list[tuple[int, bytes, float]] = []
        self.closes: list[Close] = []
        self.quorum_waits: set[int] = set()
        self.gone_at: dict[str, float] = {}
        self.heard: dict[str, tuple[int, bytes, bool]] = {}  # latest announcement, by peer
        self.accepted: dict[int, set[str]] = {}
        self.diverged_seen: set[tuple[str, int]] = set()
        self.diverged_count: dict[int, int] = {}  # Diverged events per round
        self.expected_diverged: set[tuple[str, int]] = set()
        self.following: SimPeer | None = None  # state sync in progress, from this peer
        self.followers: list[SimPeer] = []  # peers syncing from us at our next round
        self.syncs = 0
        # --- the daemon's state sync (vouch model) ---
        self.table: VouchTable | None = None
        self.dstate = "starting"  # the trainer's state: running, syncing, done
        self.digest = b""  # the state held (Redis): after ``completed`` rounds
        self.completed = 0
        self.follow = False  # caught up by sync, computing again from a next round start
        self.warmed = False
        self.warming = False
        self.buffer: deque[tuple[str, int, bytes]] = deque()
        self.sync_running = False  # the sync loop (a task in the daemon) is on
        self.sync_ahead = False  # Trainer._sync_ahead
        self.sync_detail = ""
        self.sync_starts: list[tuple[float, str]] = []  # (when, why) entering "syncing"
        self.loads: list[Load] = []
        self.unvouched = 0  # downloads not loaded: not vouched for
        self.switches: list[tuple[float, int]] = []  # follower -> participating at round
        self.byzantine = False
        self.lied = 0  # the newest round this (Byzantine) peer lied about
        self.joined_at: float | None = None  # joined or restarted (vouch model)
        self.prev: SimPeer | None = None  # the incarnation before a restart

    @property
    def active(self) -> bool:
        return self.alive and not self.done


class RoundSim:
    def __init__(self, params: SimParams) -> None:
        p = params
        self.p = p
        self.rng = random.Random(p.seed)
        self.loop = EventLoop()
        if p.sync_model not in (SYNC_LEGACY, SYNC_VOUCH):
            raise ValueError(f"unknown sync_model {p.sync_model!r}")
        self.vouch = p.sync_model == SYNC_VOUCH
        if not self.vouch and (p.late or p.restarts or p.byzantine):
            raise ValueError("late, restarts and byzantine need sync_model='vouch'")
        self.ids = [f"p{i:04d}" for i in range(p.n)]
        self.late_ids = self.ids[p.n - p.late :] if p.late else []
        late = set(self.late_ids)
        initial = [x for x in self.ids if x not in late]
        stragglers = set(self.rng.sample(self.ids, p.stragglers))
        self.peers = [
            SimPeer(nid, self._machine(nid, initial), nid in stragglers) for nid in self.ids
        ]
        self.by_id = {x.id: x for x in self.peers}
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.evaluations: Counter[int] = Counter()
        # Crash victims (never stragglers, so each fault stays attributable) and the
        # round in which each dies; whether it dies before or after publishing is drawn.
        others = [x for x in self.ids if x not in stragglers]
        self.victims: dict[str, tuple[int, bool]] = {
            v: (self.rng.randint(*p.crash_rounds), self.rng.random() < 0.5)
            for v in self.rng.sample(others, p.crashes)
        }
        # --- the vouch model -----------------------------------------------------------
        self.lives: list[SimPeer] = list(self.peers)  # every incarnation, restarts included
        self.made: set[tuple[int, bytes]] = {(1, D0)}  # positions some peer aggregated to
        self.lies: set[tuple[int, bytes]] = set()  # positions the Byzantine peers made up
        self.loads: list[Load] = []
        self.byzantine_ids = self.ids[: p.byzantine]
        self.join_at: dict[str, float] = {j: self.rng.uniform(*p.late_at) for j in self.late_ids}
        self.restart_ids: list[str] = []
        self.lost_ids: list[str] = []
        if p.restarts:
            pool = [
                x
                for x in self.ids
                if x not in late
                and x not in stragglers
                and x not in self.victims
                and x not in self.byzantine_ids
            ]
            self.restart_ids = sorted(self.rng.sample(pool, p.restarts))
            self.lost_ids = self.restart_ids[: p.restart_lost]
        if self.vouch:
            for x in self.peers:
                x.table = VouchTable(f=p.f)
                x.byzantine = x.id in self.byzantine_ids
                if x.id in late:
                    x.alive = False  # not there yet

    def _machine(self, nid: str, members: list[str]) -> RoundMachine:
        p = self.p
        return RoundMachine(
            self_id=nid,
            job_id=JOB,
            rounds=p.rounds,
            min_contributors=p.min_contributors,
            eval_every=2,
            param_count=PARAMS,
            members=members,
            config=p.config,
        )

    # --- running ------------------------------------------------------------------------

    def run(self) -> float:
        for x in self.peers:
            if not self.vouch:
                self.loop.schedule(0.0, self._start, x)
            elif x.id in self.join_at:
                self.loop.schedule(self.join_at[x.id], self._d_join, x)
            else:
                self.loop.schedule(0.0, self._d_start, x)
        if self.restart_ids:
            self.loop.schedule(self.p.restart_at, self._d_kill, None)
        return self.loop.run(self.p.until)

    def _start(self, x: SimPeer) -> None:
        x.machine.begin(1, D0, self.loop.now)
        self._flush(x)

    def live_peers(self) -> list[SimPeer]:
        return [x for x in self.peers if x.alive]

    # --- the daemon's side ----------------------------------------------------------------

    @staticmethod
    def _record_close(x: SimPeer, ev: RoundClosed, now: float) -> None:
        m = x.machine
        x.closes.append(
            Close(
                ev.round,
                m.digest,
                ev.contributors,
                ev.reason,
                ev.duration_s,
                m.deadline_s,
                now,
                frozenset(m.status()["view"]),
                ev.round in x.quorum_waits,
            )
        )

    def _flush(self, x: SimPeer) -> None:
        if self.vouch:
            self._d_flush(x)
            return
        m = x.machine
        now = self.loop.now
        for ev in m.drain_events():
            t = type(ev)
            if t is RoundClosed:
                self._record_close(x, ev, now)
            elif t is Diverged:
                x.diverged_seen.add((ev.origin, ev.round))
                if ev.round > self.p.rounds:
                    self._schedule_final_check(x)
                elif ev.round == m.round:
                    # Most members are on another model: we are the minority, sync
                    # now rather than at our deadline (as the design's f+1 rule does).
                    n = x.diverged_count.get(ev.round, 0) + 1
                    x.diverged_count[ev.round] = n
                    if 2 * n == self.p.n - len(x.gone_at) + 1:
                        self.loop.schedule(now, self._sync_check, (x, ev.round))
            elif t is QuorumWait:
                x.quorum_waits.add(ev.round)
                self.loop.schedule(now, self._sync_check, (x, ev.round))
            elif t is GradientRejected:
                self.rejected[ev.reason] += 1
        for a in m.drain_actions():
            t = type(a)
            if t is InvokeFunctions:
                lo, hi = self.p.straggler_delay if x.straggler else self.p.fn_delay
                ok = self.rng.random() >= self.p.fn_fail
                self.loop.schedule(now + self.rng.uniform(lo, hi), self._local, (x, a.round, ok))
                victim = self.victims.get(x.id)
                if victim is not None and (
                    victim == (a.round, False) or a.round > victim[0]  # skipped it (sync)
                ):
                    # Dies while its functions run: it never publishes this round.
                    self.loop.schedule(now + self.rng.uniform(0.1, 1.0), self._crash, x)
            elif t is PublishState:
                x.begins.append((a.round, a.digest, now))
                if a.participating and x.followers:
                    self._release_followers(x, a.round, a.digest)
                payload = (a.round, a.digest, a.participating)
                self._broadcast(x, self._on_announce, payload, announce=True)
            elif t is PublishGradient:
                payload = (a.round, a.base_digest, True)
                self._broadcast(x, self._on_validate, payload, announce=False)
                if x.id in self.victims and self.victims[x.id] == (a.round, True):
                    # Dies with its gradient in flight: some peers get it, some not.
                    self.loop.schedule(now + self.rng.uniform(0.0, 0.1), self._crash, x)
            elif t is Aggregate:
                new = next_digest(m.digest, a.contributors)
                self.loop.schedule(
                    now + self.p.aggregate_delay, self._aggregated, (x, a.round, new)
                )
            elif t is Evaluate:
                self.evaluations[a.round] += 1
            elif t is Finished:
                self._finish(x, m.digest, "run")
        d = m.next_deadline()
        if d is not None and d != x.tick_at and x.active:
            x.tick_at = d
            self.loop.schedule(d, self._tick, (x, d))

    def _tick(self, arg: tuple[SimPeer, float]) -> None:
        x, when = arg
        if x.tick_at != when or not x.active:
            return
        x.tick_at = None
        x.machine.tick(self.loop.now)
        self._flush(x)

    def _local(self, arg: tuple[SimPeer, int, bool]) -> None:
        x, r, ok = arg
        if not x.active:
            return
        x.warmed = x.warmed or ok
        if ok:
            x.machine.local_gradient_ready(r, self.loop.now)
        else:
            x.machine.local_gradient_failed(r, "sim", self.loop.now)
        self._flush(x)

    def _aggregated(self, arg: tuple[SimPeer, int, bytes]) -> None:
        x, r, new = arg
        if not x.active:
            return
        x.machine.aggregated(r, new, self.loop.now)
        self._flush(x)

    # --- the network ------------------------------------------------------------------------

    def _broadcast(
        self, x: SimPeer, fn: object, payload: tuple[int, bytes, bool], announce: bool
    ) -> None:
        rng = self.rng
        p = self.p
        now = self.loop.now
        lo, hi = p.msg_delay
        repair = p.announce_retransmit if announce else p.retransmit
        schedule = self.loop.schedule
        cuts = [
            c
            for c in p.cuts
            if c.round == payload[0]
            and x.id in c.senders
            and ("announce" if announce else "gradient") in c.kinds
        ]
        for y in self.peers:
            if y is x or not y.alive:
                continue
            if cuts and any(y.id in c.receivers for c in cuts):
                self.counters["cut"] += 1
                continue
            t = now + rng.uniform(lo, hi)
            lost = False
            while p.loss and rng.random() < p.loss:
                self.counters["lost"] += 1
                if not repair:
                    lost = True
                    break
                t += p.retransmit_delay
            if not lost:
                schedule(t, fn, (x, y, payload, now))

    def _on_announce(self, arg: _Delivery) -> None:
        if self.vouch:
            self._d_on_announce(arg)
            return
        src, dst, (r, d, participating), _ = arg
        if not dst.alive:  # finished peers still compare final positions
            return
        last = dst.heard.get(src.id)
        stale = last is not None and (r < last[0] or (participating and last == (r, d, False)))
        if not stale:
            # What dst was shown, in order: a message overtaken by a later one from
            # the same peer shows nothing.
            dst.heard[src.id] = (r, d, participating)
            if participating and self._is_mismatch(dst, src.id, r, d):
                dst.expected_diverged.add((src.id, r))
        dst.machine.announce(src.id, JOB, r, d, participating, self.loop.now)
        self._flush(dst)

    def _on_validate(self, arg: _Delivery) -> None:
        if self.vouch:
            self._d_on_validate(arg)
            return
        src, dst, (r, d, _), sent = arg
        if not dst.active:
            return
        if self._cut_by_crash(src, sent):
            return
        if self._is_mismatch(dst, src.id, r, d):
            dst.expected_diverged.add((src.id, r))
        reason = dst.machine.validate(src.id, JOB, r, d, SIZE, self.loop.now)
        if reason is None:
            lo, hi = self.p.pull_delay
            self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._on_body, arg)
        self._flush(dst)

    def _on_body(self, arg: _Delivery) -> None:
        if self.vouch:
            self._d_on_body(arg)
            return
        src, dst, (r, d, _), _ = arg
        if not dst.active:
            return
        if self._is_mismatch(dst, src.id, r, d):
            dst.expected_diverged.add((src.id, r))
        if dst.machine.receive(src.id, JOB, r, d, SIZE, self.loop.now) is None:
            dst.accepted.setdefault(r, set()).add(src.id)
        self._flush(dst)

    def _cut_by_crash(self, src: SimPeer, sent: float) -> bool:
        """A message in flight when its sender crashed arrives only in part: with
        probability crash_cut it never does."""
        crashed = src.crashed_at
        if (
            crashed is not None
            and sent <= crashed < self.loop.now
            and self.rng.random() < self.p.crash_cut
        ):
            self.counters["cut_by_crash"] += 1
            return True
        return False

    def _is_mismatch(self, dst: SimPeer, origin: str, r: int, d: bytes) -> bool:
        """Ground truth, from the harness's own records: ``dst`` is shown another
        digest for the round it is in, by a peer it still counts as a member and that
        has not contributed there yet (else the message is a duplicate)."""
        m = dst.machine
        return (
            m.phase in ("computing", "collecting")
            and r == m.round
            and d != m.digest
            and origin not in dst.gone_at
            and origin not in dst.accepted.get(r, ())
        )

    # --- faults -------------------------------------------------------------------------------

    def _crash(self, x: SimPeer) -> None:
        if not x.alive:
            return
        x.alive = False
        x.crashed_at = self.loop.now
        x.tick_at = None
        for f in x.followers:  # their source died: they choose again
            f.following = None
            self.loop.schedule(self.loop.now, self._sync_check, (f, f.machine.round))
        x.followers = []
        lo, hi = self.p.detect_delay
        for y in self.peers:
            if y is not x:
                self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._gone, (y, x))

    def _gone(self, arg: tuple[SimPeer, SimPeer]) -> None:
        if self.vouch:
            self._d_gone(arg)
            return
        y, x = arg
        if not y.active:
            return
        y.gone_at[x.id] = self.loop.now
        y.machine.member_gone(x.id, self.loop.now)
        self._flush(y)

    # --- state sync (the daemon's repair, modelled) -------------------------------------------

    def _sync_check(self, arg: tuple[SimPeer, int]) -> None:
        """A peer stuck without quorum picks the (round, digest) most peers announce.
        If it is its own, the others come to it. Else it stops taking part (so no one
        waits for it, and it leaves the quorum of those it diverged from), and, as
        the design has it, contributes from the next round: it takes the state of a
        peer at that position when that peer starts its next round."""
        x, r = arg
        m = x.machine
        if not x.active or x.following is not None or m.round != r:
            return
        if not m.status()["waiting_for_quorum"] and 2 * x.diverged_count.get(r, 0) <= (
            self.p.n - len(x.gone_at)
        ):
            return
        mine = (m.round, m.digest)
        positions = m.peer_positions()
        counts = Counter(pos for pos in positions.values() if pos[0] >= m.round)
        counts[mine] += 1
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if best == mine:
            # Look again later in case the picture changes (peers move on, or die).
            self.loop.schedule(self.loop.now + 2.0, self._sync_check, arg)
            return
        sources = sorted(k for k, pos in positions.items() if pos == best)
        source = self.by_id[self.rng.choice(sources)]
        if not source.alive:
            self.loop.schedule(self.loop.now + 0.5, self._sync_check, arg)
            return
        self.counters["syncs"] += 1
        x.syncs += 1
        x.following = source
        if source.done:
            self.loop.schedule(self.loop.now + self.p.sync_delay, self._sync_finished, (x, source))
            return
        source.followers.append(x)
        if m.participating:
            m.begin(m.round, m.digest, self.loop.now, participating=False)
            self._flush(x)

    def _release_followers(self, source: SimPeer, round: int, digest: bytes) -> None:
        when = self.loop.now + self.p.sync_delay
        for f in source.followers:
            self.loop.schedule(when, self._sync_done, (f, round, digest))
        source.followers = []

    def _sync_done(self, arg: tuple[SimPeer, int, bytes]) -> None:
        x, r, d = arg
        x.following = None
        if not x.active:
            return
        x.machine.begin(r, d, self.loop.now, participating=True)
        self._flush(x)

    def _sync_finished(self, arg: tuple[SimPeer, SimPeer]) -> None:
        x, source = arg
        x.following = None
        if x.active and source.final_digest is not None:
            self._finish(x, source.final_digest, "sync")

    def _finish(self, x: SimPeer, digest: bytes, via: str) -> None:
        x.done = True
        x.final_digest = digest
        x.finished_via = via
        x.finished_at = self.loop.now
        for f in x.followers:
            self.loop.schedule(self.loop.now + self.p.sync_delay, self._sync_finished, (f, x))
        x.followers = []
        # Final positions still arrive from slower peers: compare once they are in.
        self._schedule_final_check(x)

    def _schedule_final_check(self, x: SimPeer) -> None:
        if not x.final_check_pending:
            x.final_check_pending = True
            for delay in (2.0, 5.0, 10.0, 20.0, 40.0):
                self.loop.schedule(self.loop.now + delay, self._final_check, x)

    def _final_check(self, x: SimPeer) -> None:
        """A finished peer whose final model is not the one most finished peers
        announce takes theirs (state sync of the final state). Checked a few times:
        the first peers to finish may be a minority that closed the last round
        early."""
        if not x.alive or x.final_digest is None:
            return
        final = self.p.rounds + 1
        counts = Counter(d for r, d in x.machine.peer_positions().values() if r == final)
        counts[x.final_digest] += 1
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if best != x.final_digest:
            x.final_digest = best
            x.finished_via += "+final_sync"
            self.counters["final_syncs"] += 1

    # --- the daemon's state sync (sync_model="vouch") -------------------------------------------
    #
    # Each method mirrors the daemon's method of the same name (spirtd/training/
    # trainer.py), in simulated time: ``dstate`` is the trainer's ``state``, ``digest``
    # and ``completed`` what this node's Redis holds, ``follow`` its ``following``.

    def _d_start(self, x: SimPeer) -> None:
        """Trainer.start: a new job, round 1 from the initial parameters."""
        x.dstate, x.digest, x.completed = "running", D0, 0
        x.machine.begin(1, D0, self.loop.now)
        self._flush(x)
        self._d_schedule_periodic(x)

    def _d_join(self, x: SimPeer) -> None:
        """A node joins the running job: it knows the live members, holds no state."""
        now = self.loop.now
        x.alive = True
        x.joined_at = now
        x.machine = self._machine(x.id, [y.id for y in self.peers if y.alive])
        self._d_announce_member(x)
        self._d_start_elsewhere(x, "joining a running job")

    def _d_kill(self, _: object) -> None:
        lo, hi = self.p.restart_down
        for vid in self.restart_ids:
            x = self.by_id[vid]
            if x.alive:
                self._crash(x)
                self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._d_restart, vid)

    def _d_restart(self, vid: str) -> None:
        """The node comes back: a new process (fresh machine, empty table, cold
        functions) with this node's Redis as it was, or emptied (``restart_lost``)."""
        old = self.by_id[vid]
        members = [y.id for y in self.peers if y.alive] + [vid]
        x = SimPeer(vid, self._machine(vid, members), old.straggler)
        x.prev = old
        x.table = VouchTable(f=self.p.f)
        x.byzantine = old.byzantine
        if vid not in self.lost_ids:
            x.digest, x.completed = old.digest, old.completed
        x.joined_at = self.loop.now
        self.peers[self.ids.index(vid)] = x
        self.by_id[vid] = x
        self.lives.append(x)
        self._d_announce_member(x)
        self._d_start_elsewhere(x, "restarted")

    def _d_announce_member(self, x: SimPeer) -> None:
        """Membership tells the others, each after a detection delay."""
        lo, hi = self.p.detect_delay
        for y in self.peers:
            if y is not x and y.alive:
                self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._d_alive, (y, x))

    def _d_alive(self, arg: tuple[SimPeer, SimPeer]) -> None:
        y, x = arg
        # The service hands member events to a running trainer only.
        if not y.alive or y.done or y.dstate != "running" or not x.alive:
            return
        y.machine.member_alive(x.id, self.loop.now)
        self._flush(y)

    def _d_gone(self, arg: tuple[SimPeer, SimPeer]) -> None:
        y, x = arg
        if not y.alive or y.done or y.dstate != "running":
            return
        y.gone_at[x.id] = self.loop.now
        y.machine.member_gone(x.id, self.loop.now)
        assert y.table is not None
        y.table.forget(x.id)
        self._flush(y)

    def _d_schedule_periodic(self, x: SimPeer) -> None:
        first = self.loop.now + self.rng.uniform(0.0, self.p.sync_check_s)
        self.loop.schedule(first, self._d_periodic, x)

    def _d_periodic(self, x: SimPeer) -> None:
        """Trainer._run: every SYNC_CHECK_S, while running, syncing or done."""
        if not x.alive or x.dstate not in ("running", "syncing", "done"):
            return
        dl = x.machine.deadline_at
        stuck = x.dstate == "running" and dl is not None and self.loop.now > dl
        self._d_check_sync(x, stuck=stuck)
        r = x.machine.round
        if (
            stuck
            and x.dstate == "running"
            and x.follow
            and x.warmed
            and x.table is not None
            and caught_up(x.table, x.id, r - 1)
        ):
            # Trainer._unfollow: nobody computes this round; compute it after all.
            self.counters["unfollowed"] += 1
            x.follow = False
            x.machine.begin(r, x.digest, self.loop.now, participating=True)
            self._flush(x)
        self.loop.schedule(self.loop.now + self.p.sync_check_s, self._d_periodic, x)

    def _d_flush(self, x: SimPeer) -> None:
        """Trainer._pump: the machine's actions (all dropped while syncing), then its
        events."""
        m = x.machine
        now = self.loop.now
        p = self.p
        actions = m.drain_actions()
        if x.dstate == "syncing":
            actions = []
        for a in actions:
            t = type(a)
            if t is InvokeFunctions:
                lo, hi = p.straggler_delay if x.straggler else p.fn_delay
                ok = self.rng.random() >= p.fn_fail
                self.loop.schedule(now + self.rng.uniform(lo, hi), self._local, (x, a.round, ok))
                victim = self.victims.get(x.id)
                if victim is not None and (victim == (a.round, False) or a.round > victim[0]):
                    self.loop.schedule(now + self.rng.uniform(0.1, 1.0), self._crash, x)
            elif t is PublishState:
                x.begins.append((a.round, a.digest, now))
                self._broadcast(
                    x, self._on_announce, (a.round, a.digest, a.participating), announce=True
                )
                if x.byzantine and a.participating:
                    for k in p.lie_ahead:
                        r = a.round + k
                        lie = lie_digest(r)
                        self.lies.add((r, lie))
                        x.lied = max(x.lied, r)
                        self._broadcast(x, self._on_announce, (r, lie, True), announce=True)
            elif t is PublishGradient:
                self._broadcast(
                    x, self._on_validate, (a.round, a.base_digest, True), announce=False
                )
                if x.id in self.victims and self.victims[x.id] == (a.round, True):
                    self.loop.schedule(now + self.rng.uniform(0.0, 0.1), self._crash, x)
            elif t is Aggregate:
                self.loop.schedule(
                    now + p.aggregate_delay, self._d_aggregated, (x, a.round, a.contributors)
                )
            elif t is Evaluate:
                self.evaluations[a.round] += 1
            elif t is Finished:
                self.loop.schedule(now + p.eval_delay, self._d_finished, x)
        for ev in m.drain_events():
            t = type(ev)
            if t is RoundClosed:
                self._record_close(x, ev, now)
            elif t is Diverged:
                x.diverged_seen.add((ev.origin, ev.round))
                assert x.table is not None
                x.table.note(ev.origin, ev.round, ev.digest)
                self._d_check_sync(x)
            elif t is QuorumWait:
                x.quorum_waits.add(ev.round)
            elif t is GradientRejected:
                self.rejected[ev.reason] += 1
        d = m.next_deadline()
        if d is not None and d != x.tick_at and x.active:
            x.tick_at = d
            self.loop.schedule(d, self._tick, (x, d))

    def _d_aggregated(self, arg: tuple[SimPeer, int, tuple[str, ...]]) -> None:
        """Trainer._aggregate_locked: the update on the state held, the follower
        switch, the replay of what fits now, and a sync check."""
        x, r, contributors = arg
        if not x.active:
            return
        assert x.table is not None
        now = self.loop.now
        new = next_digest(x.digest, contributors)
        x.digest, x.completed = new, r
        self.made.add((r + 1, new))
        participate = None
        if x.follow and x.warmed and caught_up(x.table, x.id, r):
            x.follow, participate = False, True
            x.switches.append((now, r + 1))
        x.machine.aggregated(r, new, now, participate=participate)
        if x.buffer:
            self._d_replay(x)
        self._flush(x)
        self._d_check_sync(x)

    def _d_finished(self, x: SimPeer) -> None:
        if not x.alive:
            return
        # finish(): the trainer is done whatever it was doing (a sync in progress too).
        x.dstate = "done"
        self._d_done(x, "run")

    def _d_done(self, x: SimPeer, via: str) -> None:
        x.done = True
        x.final_digest = x.digest
        x.finished_via = via
        x.finished_at = self.loop.now

    # --- receiving --------------------------------------------------------------------

    def _d_buffers(self, x: SimPeer, round: int) -> bool:
        if x.dstate == "syncing":
            return True
        return x.follow and round > x.machine.round + self.p.config.future_window

    def _d_on_announce(self, arg: _Delivery) -> None:
        src, dst, (r, d, participating), _ = arg
        if not dst.alive or (dst.done and r <= self.p.rounds):
            # A done trainer still hears final positions: a split in the last round
            # is repaired like any other.
            return
        assert dst.table is not None
        if participating or r > self.p.rounds:
            dst.table.note(src.id, r, d)
        dst.machine.announce(src.id, JOB, r, d, participating, self.loop.now)
        self._flush(dst)

    def _d_on_validate(self, arg: _Delivery) -> None:
        src, dst, (r, d, _), sent = arg
        if not dst.alive or dst.done:
            return
        if self._cut_by_crash(src, sent):
            return
        assert dst.table is not None
        dst.table.note(src.id, r, d)
        lo, hi = self.p.pull_delay
        if self._d_buffers(dst, r):
            newest = dst.table.newest_round() or 0
            if r >= min(newest - 1, dst.machine.round):
                self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._on_body, arg)
            return
        if dst.machine.validate(src.id, JOB, r, d, SIZE, self.loop.now) is None:
            self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._on_body, arg)
        self._flush(dst)

    def _d_on_body(self, arg: _Delivery) -> None:
        src, dst, (r, d, _), _ = arg
        if not dst.alive or dst.done:
            return
        if self._d_buffers(dst, r):
            dst.buffer.append((src.id, r, d))
            while len(dst.buffer) > self.p.buffer_max:
                dst.buffer.popleft()
                self.counters["buffer_dropped"] += 1
            return
        dst.machine.receive(src.id, JOB, r, d, SIZE, self.loop.now)
        self._flush(dst)

    def _d_replay(self, x: SimPeer) -> None:
        """Trainer._replay: buffered gradients that fit the machine now go to it."""
        assert x.table is not None
        keep: deque[tuple[str, int, bytes]] = deque()
        m = x.machine
        now = self.loop.now
        for origin, r, d in x.buffer:
            if self._d_buffers(x, r):
                keep.append((origin, r, d))
                continue
            x.table.note(origin, r, d)
            if m.validate(origin, JOB, r, d, SIZE, now) is None:
                m.receive(origin, JOB, r, d, SIZE, now)
        x.buffer = keep

    # --- state sync -------------------------------------------------------------------

    def _d_start_elsewhere(self, x: SimPeer, why: str) -> None:
        self._d_enter_sync(x, why)
        self._d_schedule_periodic(x)

    def _d_check_sync(self, x: SimPeer, *, stuck: bool = False) -> None:
        if x.dstate not in ("running", "done") or not x.digest:
            return
        assert x.table is not None
        d = sync_decision(
            x.table,
            self_id=x.id,
            round=x.completed + 1,
            digest=x.digest,
            lag_rounds=self.p.lag_rounds,
            final_round=self.p.rounds + 1 if stuck else None,
            stuck=stuck and x.machine.waiting_for_quorum,  # as the trainer
        )
        if d.action == SYNC:
            x.sync_ahead = stuck and x.machine.waiting_for_quorum
            self._d_enter_sync(x, d.reason)

    def _d_enter_sync(self, x: SimPeer, why: str) -> None:
        if x.dstate not in ("running", "syncing", "starting", "done"):
            return
        x.done = False
        if x.dstate != "syncing":
            x.sync_starts.append((self.loop.now, why))
            self.counters["syncs_started"] += 1
        x.dstate, x.sync_detail = "syncing", why
        x.follow = False
        # Tell the others not to wait for us meanwhile.
        payload = (max(1, x.machine.round), x.digest or bytes(32), False)
        self._broadcast(x, self._on_announce, payload, announce=True)
        if not x.sync_running:
            x.sync_running = True
            self.loop.schedule(self.loop.now, self._d_sync_once, x)

    def _d_sync_once(self, x: SimPeer) -> None:
        """Trainer._sync_once (its loop: retried every sync_retry_s while syncing)."""
        if not x.alive:
            return
        if x.dstate != "syncing":
            x.sync_running = False
            return
        assert x.table is not None
        own = x.completed + 1 if x.digest else None
        d = sync_decision(
            x.table,
            self_id=x.id,
            round=own,
            digest=x.digest or None,
            lag_rounds=self.p.lag_rounds,
            final_round=self.p.rounds + 1,  # as the trainer: no rounds left to catch up in
            stuck=x.sync_ahead,
        )
        x.sync_detail = d.reason
        alone = len(x.machine.status()["view"]) <= 1 and not x.table.newest_round()
        if own is not None and (d.action == IN_SYNC or (d.action == WAIT and alone)):
            self._d_resume(x, own)
            return
        if d.action != SYNC or d.target is None:
            self.loop.schedule(self.loop.now + self.p.sync_retry_s, self._d_sync_once, x)
            return
        self._d_fetch((x, tuple(v for v in d.target.vouchers if v != x.id), 0))

    def _d_fetch(self, arg: tuple[SimPeer, tuple[str, ...], int]) -> None:
        x, sources, i = arg
        if not x.alive:
            return
        if i >= len(sources):
            self.loop.schedule(self.loop.now + self.p.sync_retry_s, self._d_sync_once, x)
            return
        src = self.by_id.get(sources[i])
        if src is None or not src.alive:
            self.loop.schedule(
                self.loop.now + self.p.unreachable_s, self._d_fetched, (x, sources, i, None, None)
            )
            return
        lo, hi = self.p.msg_delay
        self.loop.schedule(
            self.loop.now + self.rng.uniform(lo, hi), self._d_serve, (x, sources, i, src)
        )

    def _d_serve(self, arg: tuple[SimPeer, tuple[str, ...], int, SimPeer]) -> None:
        """Trainer.snapshot on the voucher: its state now, if it has one to give."""
        x, sources, i, src = arg
        lo, hi = self.p.msg_delay
        snap: tuple[int, bytes] | None = None
        if src.alive and src.dstate in ("running", "done") and src.digest:
            if src.byzantine and src.lied:
                snap = (src.lied - 1, lie_digest(src.lied))  # consistent, and made up
            else:
                snap = (src.completed, src.digest)
        if snap is None:
            when = self.loop.now + (self.rng.uniform(lo, hi) if src.alive else self.p.unreachable_s)
        else:
            when = self.loop.now + self.rng.uniform(*self.p.transfer_s)
        self.loop.schedule(when, self._d_fetched, (x, sources, i, src, snap))

    def _d_fetched(
        self,
        arg: tuple[SimPeer, tuple[str, ...], int, SimPeer | None, tuple[int, bytes] | None],
    ) -> None:
        x, sources, i, src, snap = arg
        if not x.alive:
            return
        if snap is None or src is None or not src.alive:
            self.counters["sync_failed"] += 1
            self._d_fetch((x, sources, i + 1))
            return
        self._d_vouch_wait((x, sources, i, snap, 0.0))

    def _d_vouch_wait(
        self, arg: tuple[SimPeer, tuple[str, ...], int, tuple[int, bytes], float]
    ) -> None:
        """The state arrived: loaded only once f+1 others vouch for its position."""
        x, sources, i, snap, waited = arg
        if not x.alive:
            return
        assert x.table is not None
        completed, digest = snap
        if x.table.vouched(completed + 1, digest):
            self._d_load(x, sources[i], snap)
            return
        if waited < self.p.vouch_wait_s:
            poll = self.p.vouch_poll_s
            self.loop.schedule(
                self.loop.now + poll, self._d_vouch_wait, (x, sources, i, snap, waited + poll)
            )
            return
        self.counters["sync_unvouched"] += 1
        x.unvouched += 1
        self._d_fetch((x, sources, i + 1))

    def _d_load(self, x: SimPeer, source: str, snap: tuple[int, bytes]) -> None:
        assert x.table is not None
        completed, digest = snap
        n = len(x.table.vouchers(completed + 1, digest) - {x.id})
        load = Load(self.loop.now, x.id, completed + 1, digest, source, n)
        x.loads.append(load)
        self.loads.append(load)
        self.counters["syncs_done"] += 1
        x.digest, x.completed = digest, completed
        self._d_resume(x, completed + 1)

    def _d_resume(self, x: SimPeer, round: int) -> None:
        """Trainer._resume: follow ``round`` (others' gradients only), computing again
        from a next round start."""
        x.sync_running = False
        x.sync_ahead = False
        if round > self.p.rounds:
            x.dstate = "done"
            self._d_done(x, "sync")
            return
        x.dstate, x.sync_detail, x.follow = "running", "", True
        x.machine.begin(round, x.digest, self.loop.now, participating=False)
        if not x.warmed and not x.warming:
            x.warming = True
            lo, hi = self.p.fn_delay
            self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._d_warmed, x)
        self._d_replay(x)
        self._flush(x)

    def _d_warmed(self, x: SimPeer) -> None:
        x.warming = False
        if x.alive:
            x.warmed = x.warmed or self.rng.random() >= self.p.fn_fail
            self._flush(x)
