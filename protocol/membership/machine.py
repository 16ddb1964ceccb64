"""The membership state machine: SWIM with Lifeguard, sans-IO.

Time and randomness come in as arguments; messages go out through
``drain_outgoing`` and state changes through ``drain_events``. The caller feeds
received messages to ``receive`` and calls ``tick`` at ``next_deadline``.

Transport assumptions. Messages travel over authenticated, reliable, ordered
links (TCP): ``sender_id`` in ``receive`` is trustworthy, and a message is lost
only when a link is down. Because there is one transport, memberlist's "UDP and
TCP reachability disagree" failure mode does not exist here: a probe and a
push-pull take the same path. Relayed claims about *other* nodes are not
trusted: every update carries a signature checked by the injected verifier.

Design against memberlist's recurring complaints:
* flapping under CPU load — Lifeguard awareness (probing stretches when we are
  the slow one), nacks (so the prober can tell), a suspicion timer that starts
  long and shrinks only with independent signed confirmations, and stall
  detection: a timer that fires late means *we* were paused, so no accusation;
* oversized broadcasts silently dropped — updates are packed to a byte budget,
  the rest wait for the next message; nothing is dropped for size;
* unbounded queues — the broadcast queue, relays, the member table and suspicion
  probes are bounded, and every refusal is counted in ``counters``;
* rejoin with a new address — a member is keyed by node id; a higher-incarnation
  alive record signed by the node itself moves it (``updated`` event), so there is
  never a second entry, and nobody else can move it.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass

from ..identity import Admission
from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import MembershipConfig
from .messages import (
    MAX_INT,
    MAX_UPDATES_PER_MESSAGE,
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Update,
    updates_size,
)
from .probe import Probe, Relay
from .signing import RecordSigner, RecordVerifier, record_bytes
from .state import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Entry,
    EventKind,
    Member,
    MemberEvent,
    MemberState,
    MemberTable,
    ProbeOrder,
    SharedView,
)
from .suspicion import Suspicion

MAX_SEEDS = 64

# Timer kinds in the heap.
_T_PROBE_DIRECT = 0
_T_PROBE_END = 1
_T_RELAY = 2
_T_SUSPICION = 3
_T_TOMBSTONE = 4


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Send ``message`` to ``node_id`` at ``addr``. ``node_id`` is None when only the
    address is known (join seeds): the link learns who answers."""

    node_id: str | None
    addr: str
    message: Message


class Membership:
    def __init__(
        self,
        node_id: str,
        addr: str,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
        *,
        record_signer: RecordSigner | None = None,
        record_verifier: RecordVerifier | None = None,
        view: SharedView | None = None,
        certificate: bytes = b"",
        admission: Admission | None = None,
        wall_offset: float | None = None,
    ) -> None:
        """``record_signer``/``record_verifier`` sign and check updates; without a
        verifier, relayed claims are taken on trust (tests only). ``view`` is a
        shared converged starting view (simulator); the daemon starts empty.

        ``certificate`` (this node's, encoded) rides in its alive records. With
        ``admission`` (and ``wall_offset``, wall clock minus ``now``, to judge
        certificate expiry) every member and every accuser must pass the same trust
        decision as a link, so an admitted member cannot conjure others."""
        if not 0 <= incarnation < MAX_INT:
            raise ValueError("incarnation out of range")
        if admission is not None and wall_offset is None:
            raise ValueError("admission judges certificates by wall clock: give wall_offset")
        self.node_id = node_id
        self.addr = addr
        self.config = config
        self.counters: Counter[str] = Counter()
        self._rng = rng
        self._now = now
        self._signer = record_signer
        self._verifier = record_verifier
        self._cert = certificate
        self._admission = admission
        self._wall_offset = wall_offset or 0.0
        self._inc = incarnation
        self._table = MemberTable(view)
        self._queue = BroadcastQueue(config.broadcast_queue_limit, self.counters)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._order = ProbeOrder()
        self._out: list[Outgoing] = []
        self._events: list[MemberEvent] = []
        self._timers: list[tuple[float, int, int, object]] = []
        self._timer_seq = 0
        # Random start so a restarted node's sequence numbers do not match stale acks.
        self._seq = rng.getrandbits(32)
        self._probes: dict[int, Probe] = {}
        self._busy: set[str] = set()  # targets with a probe in flight
        self._relays: dict[int, Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._dead_ids: dict[str, None] = {}  # ordered set: reconnect candidates
        self._last_heard: dict[str, float] = {}
        self._hinted: dict[str, float] = {}
        self._answered: dict[str, float] = {}  # push-pull requests answered, by sender
        self._last_addr_refute = -1e18
        # Members first learned from a pushed state and not gossiped by us. Pushing a
        # whole state into every queue would flood them, but a node that knows an
        # update only from a push-pull must still relay it when the epidemic reaches
        # it, or the epidemic dies among nodes that "already know" (join storms).
        self._latent: dict[str, None] = {}
        self._leaving = False
        self._joined = False
        self._seeds: list[str] = []
        self._join_retry_at: float | None = None
        self._limit_cache = (-1, 1)
        # A relay must nack while the prober still listens: the prober waits
        # probe_interval - probe_timeout after asking, so answer within 80% of the
        # shorter of the two (Lifeguard's nack timeout is 80% of the probe timeout).
        self._relay_timeout = 0.8 * min(
            config.probe_timeout, config.probe_interval - config.probe_timeout
        )

        old = self._table.get(node_id)
        if old is not None and old.incarnation >= incarnation:
            self._inc = old.incarnation
        self._set(node_id, Entry(self._sign_alive(), ALIVE, None, now))

        # Stagger periodic work so machines started together do not act in lockstep.
        self._next_probe_at: float | None = now + rng.random() * config.probe_interval
        self._next_gossip_at = now + rng.random() * config.gossip_interval
        pp = config.push_pull_period(self._table.live)
        self._next_push_pull_at = now + pp * (0.5 + 0.5 * rng.random())
        self._next_reconnect_at = now + config.reconnect_interval

    # --- public API -----------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._inc

    @property
    def awareness(self) -> int:
        """Lifeguard local-health score (0 = healthy)."""
        return self._awareness.score

    @property
    def joined(self) -> bool:
        """True once a push-pull with some member succeeded (or there was no seed)."""
        return self._joined

    @property
    def leaving(self) -> bool:
        return self._leaving

    def live_count(self) -> int:
        """Alive and suspect members, this node included."""
        return self._table.live

    def count(self, state: MemberState) -> int:
        """Members in ``state``, this node included."""
        return self._table.count(state)

    def known_count(self) -> int:
        """Entries in the table, tombstones included."""
        return len(self._table)

    def member(self, node_id: str) -> Member | None:
        e = self._table.get(node_id)
        if e is None:
            return None
        return self._member(node_id, e)

    def members(self) -> list[Member]:
        return [self._member(nid, e) for nid, e in self._table.items()]

    def drain_outgoing(self) -> list[Outgoing]:
        out = self._out
        self._out = []
        return out

    def drain_events(self) -> list[MemberEvent]:
        ev = self._events
        self._events = []
        return ev

    def set_certificate(self, certificate: bytes, now: float) -> None:
        """Our certificate was renewed (or re-issued by a new CA): announce it in an
        alive record at the next incarnation, since members judge our records by
        the certificate they carry and may no longer accept the old one."""
        if certificate == self._cert:
            return
        self._cert = certificate
        if self._leaving or self._inc >= MAX_INT:
            return
        self._inc += 1
        rec = self._sign_alive()
        self._set(self.node_id, Entry(rec, ALIVE, None, now))
        self._queue.add(self.node_id, rec)
        self.counters["certificate_renewed"] += 1

    def join(self, seed_addrs: list[str], now: float) -> None:
        """Joins through any of ``seed_addrs`` (known only by address): push-pull with
        each, retried every join_retry_interval until one answers."""
        self._now = now
        self._seeds = [a for a in dict.fromkeys(seed_addrs) if a != self.addr][:MAX_SEEDS]
        if not self._seeds:
            self._joined = True
            return
        self._join_attempt(now)

    def leave(self, now: float) -> None:
        """Graceful leave: a signed ``left`` goes at once to gossip_nodes members and
        into the gossip queue; probing stops. Keep ticking a little while to spread it."""
        if self._leaving:
            return
        self._now = now
        self._leaving = True
        self._next_probe_at = None
        self._join_retry_at = None
        for p in self._probes.values():
            self._busy.discard(p.target_id)
        self._probes.clear()
        left = self._sign(Left(self.node_id, self._inc))
        me = self._table.get(self.node_id)
        assert me is not None
        self._set(self.node_id, Entry(me.record, LEFT, left, now))
        self._emit(EventKind.LEFT, self.node_id, self.addr, self._inc, now)
        self._queue.add(self.node_id, left)
        for nid, e in self._table.sample(self._rng, self.config.gossip_nodes, self._accept_alive):
            self._send(nid, e.record.addr, Gossip((left,)))

    def next_deadline(self) -> float | None:
        heap = self._timers
        while heap and not self._timer_live(heap[0]):
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        for t in (self._next_probe_at, self._next_push_pull_at, self._join_retry_at):
            if t is not None and (best is None or t < best):
                best = t
        if self._queue and (best is None or self._next_gossip_at < best):
            best = self._next_gossip_at
        if self._dead_ids and (best is None or self._next_reconnect_at < best):
            best = self._next_reconnect_at
        return best

    def tick(self, now: float) -> None:
        self._now = now
        heap = self._timers
        while heap and heap[0][0] <= now:
            when, _, kind, key = heapq.heappop(heap)
            if kind == _T_PROBE_DIRECT:
                self._on_probe_direct_timeout(key, when, now)  # type: ignore[arg-type]
            elif kind == _T_PROBE_END:
                self._on_probe_end(key, when, now)  # type: ignore[arg-type]
            elif kind == _T_RELAY:
                self._on_relay_timeout(key, when, now)  # type: ignore[arg-type]
            elif kind == _T_SUSPICION:
                self._on_suspicion_timeout(key, when, now)  # type: ignore[arg-type]
            else:
                self._on_tombstone(key, now)  # type: ignore[arg-type]
        if self._next_probe_at is not None and now >= self._next_probe_at:
            self._probe_round_robin(now)
        if self._queue and now >= self._next_gossip_at:
            self._next_gossip_at = now + self.config.gossip_interval
            self._gossip()
        if now >= self._next_push_pull_at:
            self._next_push_pull_at = now + self.config.push_pull_period(self._table.live)
            if not self._leaving:
                pick = self._table.sample(self._rng, 1, self._accept_alive)
                if pick:
                    nid, e = pick[0]
                    self._send_state(nid, e.record.addr, join=False, reply=False)
        if self._dead_ids and now >= self._next_reconnect_at:
            self._next_reconnect_at = now + self.config.reconnect_interval
            if not self._leaving:
                self._reconnect()
        if self._join_retry_at is not None and now >= self._join_retry_at:
            self._join_attempt(now)

    def receive(self, sender_id: str, sender_addr: str, message: Message, now: float) -> None:
        """Handles one message; ``sender_id`` was authenticated by the link."""
        self._now = now
        if sender_id == self.node_id:
            self.counters["from_self"] += 1
            return
        if len(self._last_heard) > 2 * self.config.max_members:
            self._prune_last_heard()
        self._last_heard[sender_id] = now
        t = type(message)
        if t is Ping:
            self._apply_updates(message.updates, now)  # type: ignore[union-attr]
            self._on_ping(sender_id, sender_addr, message)  # type: ignore[arg-type]
        elif t is Ack:
            self._apply_updates(message.updates, now)  # type: ignore[union-attr]
            self._on_ack(sender_id, message, now)  # type: ignore[arg-type]
        elif t is Gossip:
            self._apply_updates(message.updates, now)  # type: ignore[union-attr]
        elif t is Nack:
            self._on_nack(sender_id, message)  # type: ignore[arg-type]
        elif t is PingReq:
            self._apply_updates(message.updates, now)  # type: ignore[union-attr]
            self._on_ping_req(sender_id, sender_addr, message, now)  # type: ignore[arg-type]
        elif t is PushPull:
            self._on_push_pull(sender_id, sender_addr, message, now)  # type: ignore[arg-type]
        else:
            self.counters["unknown_message"] += 1
            return
        self._hint_refutation(sender_id, sender_addr, now)

    # --- probing --------------------------------------------------------------------------

    def _accept_probe(self, nid: str, e: Entry) -> bool:
        return (e.state is ALIVE or e.state is SUSPECT) and nid != self.node_id

    def _accept_alive(self, nid: str, e: Entry) -> bool:
        return e.state is ALIVE and nid != self.node_id

    def _accept_gossip(self, nid: str, e: Entry) -> bool:
        if nid == self.node_id:
            return False
        s = e.state
        return (
            s is ALIVE
            or s is SUSPECT
            or (s is DEAD and self._now - e.since < self.config.gossip_to_dead_time)
        )

    def _probe_round_robin(self, now: float) -> None:
        self._next_probe_at = now + self._awareness.scale(self.config.probe_interval)
        pick = self._order.next(self._table, self._rng, self._accept_probe)
        if pick is not None and pick[0] not in self._busy:
            self._start_probe(pick[0], pick[1], now, confirm=False)

    def _start_probe(self, nid: str, e: Entry, now: float, *, confirm: bool) -> None:
        cfg = self.config
        seq = self._next_seq()
        p = Probe(
            seq,
            nid,
            e.record.addr,
            e.incarnation,
            now,
            now + self._awareness.scale(cfg.probe_timeout),
            now + self._awareness.scale(cfg.probe_interval),
            confirm,
        )
        self._probes[seq] = p
        self._busy.add(nid)
        # Buddy system: a suspect hears of its suspicion from the very probe.
        extra = (e.claim,) if e.state is SUSPECT and e.claim is not None else ()
        self._send(nid, p.addr, Ping(seq, nid, self._piggyback(extra, skip=nid)))
        self._push_timer(p.direct_deadline, _T_PROBE_DIRECT, seq)
        self._push_timer(p.end, _T_PROBE_END, seq)

    def _on_probe_direct_timeout(self, seq: int, when: float, now: float) -> None:
        p = self._probes.get(seq)
        if p is None:
            return
        if now - when > self.config.stall_threshold:
            self._abandon_stalled_probe(p)
            return
        target = p.target_id

        def accept(nid: str, e: Entry) -> bool:
            return e.state is ALIVE and nid != self.node_id and nid != target

        relays = self._table.sample(self._rng, self.config.indirect_checks, accept)
        p.relays = tuple(nid for nid, _ in relays)
        p.expected_nacks = len(relays)
        for nid, e in relays:
            req = PingReq(seq, target, p.addr, True, self._piggyback())
            self._send(nid, e.record.addr, req)

    def _on_probe_end(self, seq: int, when: float, now: float) -> None:
        p = self._probes.pop(seq, None)
        if p is None:
            return
        self._busy.discard(p.target_id)
        if now - when > self.config.stall_threshold:
            self._awareness.apply(1)
            self.counters["probe_stalled"] += 1
            return
        # Lifeguard: relays that did not even nack suggest the trouble is ours.
        if p.expected_nacks:
            self._awareness.apply(p.expected_nacks - len(p.nackers))
        else:
            self._awareness.apply(1)
        self.counters["probe_failed"] += 1
        e = self._table.get(p.target_id)
        if e is None or e.incarnation != p.incarnation or e.state not in (ALIVE, SUSPECT):
            return
        self._apply_suspect(self._sign(Suspect(p.target_id, p.incarnation, self.node_id)), now)

    def _abandon_stalled_probe(self, p: Probe) -> None:
        del self._probes[p.seq]
        self._busy.discard(p.target_id)
        self._awareness.apply(1)
        self.counters["probe_stalled"] += 1

    def _on_ping(self, sid: str, saddr: str, m: Ping) -> None:
        if m.target_id != self.node_id:
            # The address was reused by a new identity; the prober must not get an ack.
            self.counters["ping_wrong_target"] += 1
            return
        self._send(sid, saddr, Ack(m.seq, self._piggyback()))

    def _on_ack(self, sid: str, m: Ack, now: float) -> None:
        p = self._probes.get(m.seq)
        if p is not None:
            direct = sid == p.target_id
            if not direct and sid not in p.relays:
                self.counters["ack_wrong_sender"] += 1
                return
            del self._probes[m.seq]
            self._busy.discard(p.target_id)
            self._last_heard[p.target_id] = now
            if direct:
                self._awareness.apply(-1)
            return
        r = self._relays.get(m.seq)
        if r is not None and sid == r.target_id:
            del self._relays[m.seq]
            ack = Ack(r.requester_seq, self._piggyback())
            self._send(r.requester_id, r.requester_addr, ack)
            return
        self.counters["ack_unmatched"] += 1  # late, after the probe concluded

    def _on_nack(self, sid: str, m: Nack) -> None:
        p = self._probes.get(m.seq)
        if p is not None and sid in p.relays:
            p.nackers.add(sid)

    def _on_ping_req(self, sid: str, saddr: str, m: PingReq, now: float) -> None:
        if m.target_id == self.node_id or m.target_id == sid:
            self.counters["ping_req_bad_target"] += 1
            return
        e = self._table.get(m.target_id)
        if e is None or not (e.state is ALIVE or e.state is SUSPECT):
            # We dial only members we admitted, at the address they signed: a
            # request must not aim our connections at any host:port it likes.
            self.counters["ping_req_unknown_target"] += 1
            if m.nack:
                self._send(sid, saddr, Nack(m.seq))
            return
        if m.target_addr != e.record.addr:
            self.counters["ping_req_addr_mismatch"] += 1
        if len(self._relays) >= self.config.max_pending_relays:
            self.counters["relay_limit"] += 1
            return
        seq = self._next_seq()
        deadline = now + self._relay_timeout
        self._relays[seq] = Relay(sid, saddr, m.seq, m.target_id, deadline, m.nack)
        self._push_timer(deadline, _T_RELAY, seq)
        extra = (e.claim,) if e.state is SUSPECT and e.claim else ()
        self._send(m.target_id, e.record.addr, Ping(seq, m.target_id, self._piggyback(extra)))

    def _on_relay_timeout(self, seq: int, when: float, now: float) -> None:
        r = self._relays.pop(seq, None)
        if r is not None and r.nack:
            self._send(r.requester_id, r.requester_addr, Nack(r.requester_seq))

    # --- dissemination --------------------------------------------------------------------

    def _retransmit_limit(self) -> int:
        n = self._table.live
        cached_n, limit = self._limit_cache
        if n != cached_n:
            limit = self.config.retransmit_limit(n)
            self._limit_cache = (n, limit)
        return limit

    def _piggyback(
        self, extra: tuple[Update, ...] = (), skip: str | None = None
    ) -> tuple[Update, ...]:
        budget = self.config.piggyback_budget_bytes
        if extra:
            budget -= updates_size(extra)
        if not self._queue:
            return extra
        taken = self._queue.take(budget, self._retransmit_limit(), skip)
        return extra + tuple(taken) if extra else tuple(taken)

    def _gossip(self) -> None:
        budget = self.config.piggyback_budget_bytes
        limit = self._retransmit_limit()
        for nid, e in self._table.sample(self._rng, self.config.gossip_nodes, self._accept_gossip):
            updates = self._queue.take(budget, limit)
            if not updates:
                break
            self._send(nid, e.record.addr, Gossip(tuple(updates)))

    def _hint_refutation(self, sid: str, saddr: str, now: float) -> None:
        """A member we hold as suspect or dead is talking to us: tell it, so it can
        refute at once instead of waiting for gossip to reach it."""
        e = self._table.get(sid)
        if e is None or not (e.state is SUSPECT or e.state is DEAD) or e.claim is None:
            return
        last = self._hinted.get(sid)
        if last is not None and now - last < self.config.probe_interval:
            return
        if len(self._hinted) > 4096:
            self._hinted.clear()
        self._hinted[sid] = now
        self._send(sid, saddr, Gossip((e.claim,)))

    # --- anti-entropy ---------------------------------------------------------------------

    def _state_messages(self, *, join: bool, reply: bool) -> list[PushPull]:
        limit = self.config.max_message_bytes - 64
        chunks: list[list[Update]] = []
        cur: list[Update] = []
        size = 0
        for e in self._table.entries():
            records: tuple[Update, ...] = (e.record,) if e.claim is None else (e.record, e.claim)
            for u in records:
                s = len(u.encoded())
                if cur and (size + s > limit or len(cur) >= MAX_UPDATES_PER_MESSAGE):
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append(u)
                size += s
        chunks.append(cur)
        last = len(chunks) - 1
        return [PushPull(join, reply, i < last, tuple(c)) for i, c in enumerate(chunks)]

    def _send_state(self, nid: str | None, addr: str, *, join: bool, reply: bool) -> None:
        for msg in self._state_messages(join=join, reply=reply):
            self._send(nid, addr, msg)

    def _join_attempt(self, now: float) -> None:
        for addr in self._seeds:
            self._send_state(None, addr, join=True, reply=False)
        self._join_retry_at = now + self.config.join_retry_interval

    def _reconnect(self) -> None:
        ids = list(self._dead_ids)
        nid = ids[self._rng.randrange(len(ids))]
        e = self._table.get(nid)
        if e is not None:
            self.counters["reconnect_attempts"] += 1
            self._send_state(nid, e.record.addr, join=False, reply=False)

    def _on_push_pull(self, sid: str, saddr: str, m: PushPull, now: float) -> None:
        # Merge before answering, so refutations of what the peer believes about us
        # travel back in the answer.
        self._merge(m.updates, sid, now)
        if m.reply:
            if not m.more and not self._joined:
                self._joined = True
                self._join_retry_at = None
                # Updates gossiped while we were joining went to members that did not
                # know us yet. One more push-pull once our own join has spread (one
                # retransmit window) picks them up.
                window = self.config.gossip_interval * self._retransmit_limit()
                self._next_push_pull_at = now + max(self.config.probe_interval, window)
            return
        if not m.more:
            # A full state per request is an amplifier in the hands of a misbehaving
            # member: answer each peer at most once per probe interval (joins retry
            # slower than that, so a genuine join is never starved).
            last = self._answered.get(sid)
            if last is not None and now - last < self.config.probe_interval:
                self.counters["push_pull_throttled"] += 1
                return
            if len(self._answered) > 4096:
                self._answered.clear()
            self._answered[sid] = now
            self._send_state(sid, saddr, join=False, reply=True)

    def _merge(self, updates: tuple[Update, ...], sender: str, now: float) -> None:
        get = self._table.get
        me = self.node_id
        for u in updates:
            t = type(u)
            if t is Alive:
                e = get(u.node_id)
                if e is not None and u.incarnation <= e.incarnation and u.node_id != me:
                    continue
                self._apply_alive(u, now, gossip_new=u.node_id == sender)  # type: ignore[arg-type]
            elif t is Suspect:
                self._apply_suspect(u, now)  # type: ignore[arg-type]
            elif t is Dead:
                self._apply_pushed_dead(u, now)  # type: ignore[arg-type]
            else:
                self._apply_left(u, now)  # type: ignore[arg-type]

    # --- applying updates -----------------------------------------------------------------

    def _apply_updates(self, updates: tuple[Update, ...], now: float) -> None:
        get = self._table.get
        latent = self._latent
        for u in updates:
            t = type(u)
            if t is Alive:
                nid = u.node_id
                e = get(nid)
                if e is not None and u.incarnation <= e.incarnation and nid != self.node_id:
                    # The common case: already known. But if we only knew it from a
                    # pushed state, the epidemic has now reached us: join in.
                    if latent and nid in latent:
                        del latent[nid]
                        if u.incarnation == e.incarnation and e.state is ALIVE:
                            self._queue.add(nid, u)
                    continue
                self._apply_alive(u, now, gossip_new=True)  # type: ignore[arg-type]
            elif t is Suspect:
                self._apply_suspect(u, now)  # type: ignore[arg-type]
            elif t is Dead:
                self._apply_dead(u, now)  # type: ignore[arg-type]
            else:
                self._apply_left(u, now)  # type: ignore[arg-type]

    def _apply_alive(self, u: Alive, now: float, *, gossip_new: bool) -> None:
        nid = u.node_id
        if nid == self.node_id:
            self._alive_about_self(u, now)
            return
        e = self._table.get(nid)
        if e is not None and u.incarnation <= e.incarnation:
            if u.incarnation == e.record.incarnation and u.addr != e.record.addr:
                self.counters["alive_conflict"] += 1
            return
        if not self._admitted(nid, u.cert, "member", now):
            return
        if e is None and len(self._table) >= self.config.max_members:
            self.counters["table_full"] += 1
            return
        if not self._verify(u, nid):
            return
        self._set(nid, Entry(u, ALIVE, None, now), e)
        if self._suspicions:
            self._suspicions.pop(nid, None)
        if e is None:
            self._emit(EventKind.JOINED, nid, u.addr, u.incarnation, now)
        else:
            if e.state is not ALIVE:
                self._emit(EventKind.ALIVE, nid, u.addr, u.incarnation, now)
            if e.record.addr != u.addr:
                self._emit(EventKind.UPDATED, nid, u.addr, u.incarnation, now)
        if e is not None or gossip_new:
            self._queue.add(nid, u)
        elif len(self._latent) < self.config.max_members:
            self._latent[nid] = None

    def _claim_ok(self, e: Entry | None, incarnation: int) -> bool:
        """Whether a suspect/dead claim about a known member is current."""
        if e is None:
            self.counters["claim_unknown_member"] += 1
            return False
        if incarnation < e.incarnation:
            return False  # stale: the member already refuted it
        if incarnation > e.incarnation:
            # Nobody can have seen an incarnation we hold no signed alive record of.
            self.counters["claim_ahead"] += 1
            return False
        return True

    def _apply_suspect(self, u: Suspect, now: float) -> None:
        nid = u.node_id
        if nid == self.node_id:
            self._claim_about_self(u, now)
            return
        e = self._table.get(nid)
        if e is not None and (e.state is DEAD or e.state is LEFT):
            return
        if not self._claim_ok(e, u.incarnation) or not self._accuser_admitted(u, now):
            return
        assert e is not None
        if e.state is SUSPECT:
            s = self._suspicions.get(nid)
            if s is None or not s.wants(u.from_id):
                return
            if not self._verify(u, u.from_id):
                return
            s.confirm(u.from_id)
            self._push_timer(s.deadline, _T_SUSPICION, nid)
            self._queue.add(nid, u)  # spread the confirmation so others count it too
            return
        if not self._verify(u, u.from_id):
            return
        self._start_suspicion(nid, e.incarnation, u.from_id, now)
        self._set(nid, Entry(e.record, SUSPECT, u, now))
        self._emit(EventKind.SUSPECT, nid, e.record.addr, e.incarnation, now)
        self._queue.add(nid, u)
        if u.from_id != self.node_id:
            self._maybe_confirm_probe(nid, now)

    def _apply_dead(self, u: Dead, now: float) -> None:
        nid = u.node_id
        if nid == self.node_id:
            self._claim_about_self(u, now)
            return
        e = self._table.get(nid)
        if e is not None and (e.state is DEAD or e.state is LEFT):
            return
        if not self._claim_ok(e, u.incarnation) or not self._accuser_admitted(u, now):
            return
        assert e is not None
        if not self._verify(u, u.from_id):
            return
        self._mark_gone(nid, e, DEAD, u, now)

    def _apply_pushed_dead(self, u: Dead, now: float) -> None:
        """A dead claim from a pushed state is taken as a suspicion (memberlist's
        mergeState): a stale view from across a partition must not kill anyone
        outright, and the suspect gets its chance to refute."""
        nid = u.node_id
        if nid == self.node_id:
            self._claim_about_self(u, now)
            return
        e = self._table.get(nid)
        if e is not None and (e.state is DEAD or e.state is LEFT):
            return
        if not self._claim_ok(e, u.incarnation) or not self._accuser_admitted(u, now):
            return
        assert e is not None
        if e.state is SUSPECT:
            s = self._suspicions.get(nid)
            if s is not None and s.wants(u.from_id) and self._verify(u, u.from_id):
                s.confirm(u.from_id)
                self._push_timer(s.deadline, _T_SUSPICION, nid)
            return
        if not self._verify(u, u.from_id):
            return
        self._apply_suspect(self._sign(Suspect(nid, e.incarnation, self.node_id)), now)

    def _apply_left(self, u: Left, now: float) -> None:
        nid = u.node_id
        if nid == self.node_id:
            self._claim_about_self(u, now)
            return
        e = self._table.get(nid)
        if e is None:
            self.counters["claim_unknown_member"] += 1
            return
        if u.incarnation < e.incarnation or (u.incarnation == e.incarnation and e.state is LEFT):
            return
        # Signed by the subject itself, so a newer incarnation than we know is fine.
        if not self._verify(u, nid):
            return
        self._mark_gone(nid, e, LEFT, u, now)

    def _mark_gone(self, nid: str, e: Entry, state: object, claim: Dead | Left, now: float) -> None:
        self._set(nid, Entry(e.record, state, claim, now))  # type: ignore[arg-type]
        self._suspicions.pop(nid, None)
        kind = EventKind.DEAD if state is DEAD else EventKind.LEFT
        self._emit(kind, nid, e.record.addr, claim.incarnation, now)
        self._queue.add(nid, claim)
        ttl = self.config.dead_tombstone_ttl if state is DEAD else self.config.left_tombstone_ttl
        self._push_timer(now + ttl, _T_TOMBSTONE, (nid, now))

    def _alive_about_self(self, u: Alive, now: float) -> None:
        if self._leaving:
            return
        if u.incarnation < self._inc or (u.incarnation == self._inc and u.addr == self.addr):
            return
        # Our own signature on an incarnation at least ours, from a previous life (a
        # restart, perhaps at another address): outbid it so everyone takes this one.
        if not self._verify(u, self.node_id):
            return
        if u.addr != self.addr:
            # One outbid settles a restart. If our key is live elsewhere too (a copied
            # data dir), both sides would outbid each other forever: do it rarely and
            # make it visible instead.
            window = 10 * self.config.probe_interval
            if now - self._last_addr_refute < window:
                self.counters["identity_conflict"] += 1
                return
            self._last_addr_refute = now
        self._refute(u.incarnation, now)

    def _claim_about_self(self, u: Suspect | Dead | Left, now: float) -> None:
        if self._leaving:
            return
        if u.incarnation < self._inc:
            return
        is_left = type(u) is Left
        if u.incarnation > self._inc and not is_left:
            self.counters["claim_ahead"] += 1
            return
        signer = self.node_id if is_left else u.from_id  # type: ignore[union-attr]
        if not is_left and not self._accuser_admitted(u, now):  # type: ignore[arg-type]
            return
        if not self._verify(u, signer):
            return
        if not is_left:
            # Lifeguard: being suspected is a hint that we are the slow one.
            self._awareness.apply(1)
        self._refute(u.incarnation, now)

    def _refute(self, incarnation: int, now: float) -> None:
        if incarnation >= MAX_INT:
            self.counters["incarnation_exhausted"] += 1
            return
        self._inc = incarnation + 1
        rec = self._sign_alive()
        self._set(self.node_id, Entry(rec, ALIVE, None, now))
        self._queue.add(self.node_id, rec)
        self.counters["refuted"] += 1

    # --- suspicion ------------------------------------------------------------------------

    def _start_suspicion(self, nid: str, inc: int, from_id: str, now: float) -> None:
        cfg = self.config
        n = self._table.live
        s = Suspicion(
            nid,
            inc,
            from_id,
            now,
            cfg.suspicion_confirmations(n),
            cfg.suspicion_min_timeout(n),
            cfg.suspicion_max_timeout(n),
        )
        self._suspicions[nid] = s
        self._push_timer(s.deadline, _T_SUSPICION, nid)

    def _maybe_confirm_probe(self, nid: str, now: float) -> None:
        """Probe a fresh suspect ourselves with probability fanout / (others), so a
        few members check it at once and their verdicts confirm or refute quickly."""
        cfg = self.config
        if cfg.suspicion_probe_fanout <= 0 or self._leaving or nid in self._busy:
            return
        others = self._table.live - 2
        if others > cfg.suspicion_probe_fanout and (
            self._rng.random() * others >= cfg.suspicion_probe_fanout
        ):
            return
        if sum(1 for p in self._probes.values() if p.confirm) >= cfg.max_confirm_probes:
            self.counters["confirm_probe_limit"] += 1
            return
        e = self._table.get(nid)
        if e is not None:
            self._start_probe(nid, e, now, confirm=True)

    def _on_suspicion_timeout(self, nid: str, when: float, now: float) -> None:
        s = self._suspicions.get(nid)
        if s is None or s.deadline != when:
            return
        e = self._table.get(nid)
        if e is None or e.state is not SUSPECT or e.incarnation != s.incarnation:
            del self._suspicions[nid]
            return
        if now - when > self.config.stall_threshold and not s.graced:
            # We were stalled: a refutation may be sitting unread in our queue. Give it
            # one probe interval to be processed before declaring anyone dead.
            s.graced = True
            s.deadline = now + self.config.probe_interval
            self._push_timer(s.deadline, _T_SUSPICION, nid)
            self.counters["suspicion_stall_grace"] += 1
            return
        del self._suspicions[nid]
        self._mark_gone(nid, e, DEAD, self._sign(Dead(nid, e.incarnation, self.node_id)), now)

    def _on_tombstone(self, key: tuple[str, float], now: float) -> None:
        nid, since = key
        e = self._table.get(nid)
        if e is None or e.since != since or not (e.state is DEAD or e.state is LEFT):
            return
        self._table.remove(nid)
        self._dead_ids.pop(nid, None)
        self._last_heard.pop(nid, None)
        self._hinted.pop(nid, None)
        self._latent.pop(nid, None)
        self._queue.remove(nid)
        self._emit(EventKind.REMOVED, nid, e.record.addr, e.incarnation, now)

    # --- helpers --------------------------------------------------------------------------

    def _set(self, nid: str, entry: Entry, old: Entry | bool | None = False) -> None:
        self._table.put(nid, entry, old)
        if entry.state is DEAD:
            if not self._dead_ids:
                self._next_reconnect_at = max(
                    self._next_reconnect_at, self._now + self.config.reconnect_interval
                )
            self._dead_ids[nid] = None
        elif self._dead_ids:
            self._dead_ids.pop(nid, None)

    def _member(self, nid: str, e: Entry) -> Member:
        heard = self._now if nid == self.node_id else self._last_heard.get(nid)
        return Member(nid, e.record.addr, e.state, e.incarnation, heard)

    def _emit(self, kind: EventKind, nid: str, addr: str, inc: int, now: float) -> None:
        self._events.append(MemberEvent(kind, nid, addr, inc, now))

    def _send(self, nid: str | None, addr: str, message: Message) -> None:
        self._out.append(Outgoing(nid, addr, message))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _push_timer(self, when: float, kind: int, key: object) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, key))

    def _timer_live(self, item: tuple[float, int, int, object]) -> bool:
        when, _, kind, key = item
        if kind in (_T_PROBE_DIRECT, _T_PROBE_END):
            return key in self._probes
        if kind == _T_RELAY:
            return key in self._relays
        if kind == _T_SUSPICION:
            s = self._suspicions.get(key)  # type: ignore[call-overload]
            return s is not None and s.deadline == when
        return True

    def _prune_last_heard(self) -> None:
        get = self._table.get
        self._last_heard = {k: v for k, v in self._last_heard.items() if get(k) is not None}

    def _sign(self, u: Update) -> Update:
        if self._signer is None:
            return u
        sig = self._signer(record_bytes(u))
        t = type(u)
        if t is Suspect or t is Dead:
            return t(u.node_id, u.incarnation, u.from_id, sig)  # type: ignore[union-attr]
        if t is Left:
            return Left(u.node_id, u.incarnation, sig)
        return Alive(u.node_id, u.addr, u.incarnation, sig, u.cert)  # type: ignore[union-attr]

    def _sign_alive(self) -> Alive:
        alive = Alive(self.node_id, self.addr, self._inc, cert=self._cert)
        return self._sign(alive)  # type: ignore[return-value]

    def _admitted(self, nid: str, cert: bytes, role: str, now: float) -> bool:
        """The link's trust decision for an identity named in a record; refusals are
        counted as ``<role>_refused.<reason>``."""
        if self._admission is None:
            return True
        reason = self._admission.check_node(nid, now + self._wall_offset, cert)
        if reason is None:
            return True
        self.counters[f"{role}_refused.{reason}"] += 1
        return False

    def _accuser_admitted(self, u: Suspect | Dead, now: float) -> bool:
        """Made-up accusers would count as independent confirmations and shorten
        a suspicion; an accuser is known to us by its alive record or its link."""
        return u.from_id == self.node_id or self._admitted(u.from_id, b"", "accuser", now)

    def _verify(self, u: Update, signer: str) -> bool:
        verifier = self._verifier
        if verifier is None or verifier(signer, record_bytes(u), u.sig):
            return True
        self.counters["bad_signature"] += 1
        return False
