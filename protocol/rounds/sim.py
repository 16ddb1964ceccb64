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
takes that one.

Everything is drawn from one seeded ``random.Random`` on protocol.sim's event
loop, so a run is a pure function of its parameters. The harness records what
the tests judge: closes (with the deadline and view in force), begins, the
Diverged events, and, as ground truth, every mismatch a peer was shown.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
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

JOB = "sim-job"
PARAMS = 1000
SIZE = PARAMS * 4
D0 = hashlib.sha256(b"initial parameters").digest()


# (source, destination, (round, digest, participating), time sent)
_Delivery = tuple["SimPeer", "SimPeer", tuple[int, bytes, bool], float]


def next_digest(base: bytes, contributors: tuple[str, ...]) -> bytes:
    return hashlib.sha256(base + b"|" + ",".join(contributors).encode()).digest()


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
        "closes",
        "crashed_at",
        "diverged_count",
        "diverged_seen",
        "done",
        "expected_diverged",
        "final_check_pending",
        "final_digest",
        "finished_at",
        "finished_via",
        "followers",
        "following",
        "gone_at",
        "heard",
        "id",
        "machine",
        "quorum_waits",
        "straggler",
        "syncs",
        "tick_at",
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

    @property
    def active(self) -> bool:
        return self.alive and not self.done


class RoundSim:
    def __init__(self, params: SimParams) -> None:
        p = params
        self.p = p
        self.rng = random.Random(p.seed)
        self.loop = EventLoop()
        self.ids = [f"p{i:04d}" for i in range(p.n)]
        stragglers = set(self.rng.sample(self.ids, p.stragglers))
        self.peers = [
            SimPeer(
                nid,
                RoundMachine(
                    self_id=nid,
                    job_id=JOB,
                    rounds=p.rounds,
                    min_contributors=p.min_contributors,
                    eval_every=2,
                    param_count=PARAMS,
                    members=self.ids,
                    config=p.config,
                ),
                nid in stragglers,
            )
            for nid in self.ids
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

    # --- running ------------------------------------------------------------------------

    def run(self) -> float:
        for x in self.peers:
            self.loop.schedule(0.0, self._start, x)
        return self.loop.run(self.p.until)

    def _start(self, x: SimPeer) -> None:
        x.machine.begin(1, D0, self.loop.now)
        self._flush(x)

    def live_peers(self) -> list[SimPeer]:
        return [x for x in self.peers if x.alive]

    # --- the daemon's side ----------------------------------------------------------------

    def _flush(self, x: SimPeer) -> None:
        m = x.machine
        now = self.loop.now
        for ev in m.events():
            t = type(ev)
            if t is RoundClosed:
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
        for a in m.actions():
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
        for y in self.peers:
            if y is x or not y.alive:
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
        src, dst, (r, d, _), sent = arg
        if not dst.active:
            return
        crashed = src.crashed_at
        if (
            crashed is not None
            and sent <= crashed < self.loop.now
            and self.rng.random() < self.p.crash_cut
        ):
            self.counters["cut_by_crash"] += 1
            return
        if self._is_mismatch(dst, src.id, r, d):
            dst.expected_diverged.add((src.id, r))
        reason = dst.machine.validate(src.id, JOB, r, d, SIZE, self.loop.now)
        if reason is None:
            lo, hi = self.p.pull_delay
            self.loop.schedule(self.loop.now + self.rng.uniform(lo, hi), self._on_body, arg)
        self._flush(dst)

    def _on_body(self, arg: _Delivery) -> None:
        src, dst, (r, d, _), _ = arg
        if not dst.active:
            return
        if self._is_mismatch(dst, src.id, r, d):
            dst.expected_diverged.add((src.id, r))
        if dst.machine.receive(src.id, JOB, r, d, SIZE, self.loop.now) is None:
            dst.accepted.setdefault(r, set()).add(src.id)
        self._flush(dst)

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
