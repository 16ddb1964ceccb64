"""The gossip state machine: gossipsub v1.1 topic pub/sub with a pull-based
large-payload path, sans-IO.

The caller feeds received messages to ``receive``, calls ``tick`` at
``next_deadline``, and acts on ``drain_outgoing`` (messages per peer) and
``drain_events`` (deliveries, bodies to serve, pulls started and ended, peer
exchange, graylisting). Time and randomness come in; nothing here reads a clock
or touches a socket.

The path of a published message:

1. The origin stores the body, signs a small announcement (topic, size, body
   digest, chunk size, metadata; the payload itself only when tiny) and hands
   the envelope to ``publish``, which flood-publishes it to every topic peer.
2. A receiver drops duplicates by id (one dict lookup), checks the origin's
   signature, the announcement's fields, the origin's replay window and the
   application validator, in that order, *before* anything is forwarded or
   pulled. Failures are charged to the peer that sent the message.
3. The body is pulled from one neighbour that announced it, and only from one at
   a time: every announcement or IHAVE names another possible source, never a
   second copy. A pull that stalls is cancelled and resumed at the last verified
   chunk from the next source (announce-then-pull is our IDONTWANT: bodies are
   never pushed, so they cannot arrive twice).
4. Once the body is held and verified the message is delivered, enters the
   message cache, and its announcement is forwarded to the mesh. A peer thus
   announces only what it can serve, and an IHAVE is a promise of the body too.

Peers whose messages fail validation, or who break promises, lose score; a
negative score gets them pruned from every mesh at the next heartbeat, and
below the graylist threshold everything they send is ignored.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .. import wire
from ..errors import DecodeError
from ..identity import Admission
from ..wire import Envelope, MsgType
from .config import GossipConfig
from .mcache import MessageCache
from .mesh import Mesh
from .messages import Announcement, Control, Message, Prune, Publish, RefuseCode, message_id
from .score import Scoreboard
from .seen import SeenCache, SeqWindows, message_tag
from .transfer import chunk_count, digest_of


class Verdict(Enum):
    """An application validator's answer (gossipsub's ValidationResult)."""

    ACCEPT = "accept"
    REJECT = "reject"  # invalid: the sender is penalised, nothing is forwarded
    IGNORE = "ignore"  # not wanted now (a closed round): dropped, no penalty


Validator = Callable[[Announcement, Envelope], Verdict]
Verifier = Callable[[bytes], Envelope]

# Seen-cache statuses.
_ACCEPTED, _REJECTED, _IGNORED = 0, 1, 2

# Released ids remembered (for seen_ttl) so a late pull is told RELEASED, not
# MISSING; past this many the oldest are forgotten early (a late pull of one is
# then refused MISSING, as before releases existed).
RELEASED_MAX = 65_536


@dataclass(frozen=True, slots=True)
class Outgoing:
    peer_id: str
    message: Message


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """A valid message whose body is held (verified): hand it to subscribers."""

    msg_id: bytes
    announcement: Announcement
    envelope: Envelope
    source: str  # the first peer that announced it


@dataclass(frozen=True, slots=True)
class ServeBody:
    """Stream our copy of ``msg_id``'s body to ``peer_id`` from ``first_chunk``;
    report the end with ``serve_done``."""

    peer_id: str
    msg_id: bytes
    first_chunk: int


@dataclass(frozen=True, slots=True)
class StopServe:
    """The peer cancelled (or left): stop streaming ``msg_id`` to it."""

    peer_id: str
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class PullStarted:
    """We asked ``peer_id`` for ``msg_id``'s body from ``first_chunk``: accept
    exactly that stream from it, and report progress, completion or failure."""

    peer_id: str
    msg_id: bytes
    first_chunk: int
    announcement: Announcement


@dataclass(frozen=True, slots=True)
class PullEnded:
    """The pull from ``peer_id`` is over without success (stalled, refused, peer
    gone): discard its stream; unverified bytes must not be kept."""

    peer_id: str
    msg_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class BodyDropped:
    """No source could deliver ``msg_id``'s body: it is given up (counted)."""

    msg_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class PeerExchange:
    """A well-scored peer pruned us and suggested others to connect to."""

    peers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Graylisted:
    peer_id: str
    score: float


Event = (
    Delivered | ServeBody | StopServe | PullStarted | PullEnded | BodyDropped | PeerExchange
) | Graylisted


# --- per-message state ------------------------------------------------------------------


@dataclass(slots=True)
class _Want:
    """A valid message whose body we still need."""

    msg_id: bytes
    ann: Announcement
    env: Envelope
    first_source: str
    created: float
    sources: list[str] = field(default_factory=list)  # holders not yet tried, in order
    holders: set[str] = field(default_factory=set)  # everyone known to hold it
    source: str | None = None  # the active pull
    deadline: float = 0.0
    first_chunk: int = 0  # chunks verified so far
    attempts: int = 0


@dataclass(slots=True)
class _Held:
    ann: Announcement
    env: Envelope


class GossipMachine:
    def __init__(
        self,
        self_id: str,
        config: GossipConfig,
        rng: random.Random,
        now: float,
        *,
        verify: Verifier = wire.decode,
        wall_offset: float | None = None,
        admission: Admission | None = None,
    ) -> None:
        """``verify`` parses and authenticates an envelope (wire.decode). With
        ``wall_offset`` (wall clock minus ``now``), announcements are also checked
        for age against their signed timestamp. With ``admission`` (which needs
        ``wall_offset`` for certificate expiry), every origin must pass the same
        trust decision as a link; without it any correctly signed origin is taken
        (simulations and unit tests only)."""
        if admission is not None and wall_offset is None:
            raise ValueError("admission judges certificates by wall clock: give wall_offset")
        self.self_id = self_id
        self.config = config
        self.rng = rng
        self._verify = verify
        self._wall_offset = wall_offset
        self._admission = admission
        self.counters: Counter[str] = Counter()
        self.mesh = Mesh(config)
        self.scores = Scoreboard(config)
        self.seen = SeenCache(config.seen_ttl, config.seen_max)
        self.seqs = SeqWindows(
            config.seq_window,
            config.max_origins,
            config.max_origins_per_peer,
            config.max_message_age + config.max_future_skew,
        )
        self.mcache = MessageCache(config.mcache_len, config.mcache_gossip)
        self.subscriptions: set[str] = set()
        self.validators: dict[str, Validator] = {}
        self.addrs: dict[str, str] = {}  # connected peer -> address (for peer exchange)
        self._wants: dict[bytes, _Want] = {}
        self._ready: OrderedDict[bytes, _Want] = OrderedDict()  # idle wants with sources
        self._sched = False  # something changed that may let a pull start
        self._pull_deadline = float("inf")  # earliest active pull deadline
        self._active: dict[bytes, _Want] = {}  # wants with a pull in flight
        self._pulls_from: Counter[str] = Counter()
        self._held: dict[bytes, _Held] = {}
        self._held_order: deque[tuple[float, bytes]] = deque()
        self._released: OrderedDict[bytes, float] = OrderedDict()  # id -> forget at
        self._serving: set[tuple[str, bytes]] = set()
        self._serves_to: Counter[str] = Counter()
        self._promises: dict[bytes, tuple[str, float]] = {}  # IWANT out: id -> (peer, due)
        self._ihaves_in: Counter[str] = Counter()  # per heartbeat
        self._iwant_asked: Counter[str] = Counter()  # per heartbeat
        self._graylisted: set[str] = set()
        self._out: list[Outgoing] = []
        self._ctrl: dict[str, Control] = {}
        self._events: list[Event] = []
        self._next_heartbeat = now + config.heartbeat_interval
        self.heartbeats = 0

    # -- the sans-IO surface -------------------------------------------------------------

    def drain_outgoing(self) -> list[Outgoing]:
        out, self._out = self._out, []
        if self._ctrl:
            out.extend(Outgoing(p, c) for p, c in self._ctrl.items() if not c.empty())
            self._ctrl = {}
        return out

    def drain_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def next_deadline(self) -> float:
        return min(self._next_heartbeat, self._pull_deadline)

    def _update_pull_deadline(self) -> None:
        self._pull_deadline = min((w.deadline for w in self._active.values()), default=float("inf"))

    def tick(self, now: float) -> None:
        if self._pull_deadline <= now:
            for w in [w for w in self._active.values() if w.deadline <= now]:
                assert w.source is not None
                self.counters["pull_timeout"] += 1
                self.scores.broken_promise(w.source)
                self._control(w.source).cancel.append(w.msg_id)
                self._end_pull(w, "stalled", now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
            # A caller that fell behind runs one heartbeat, not a burst of them.
            self._next_heartbeat = max(
                self._next_heartbeat + self.config.heartbeat_interval, now + 1e-3
            )
        self._schedule_pulls(now)

    def receive(self, sender: str, message: Message, now: float) -> None:
        if sender not in self.addrs:
            self.counters["from_unknown_peer"] += 1
            return
        if self.ignores(sender):
            self.counters["graylisted_dropped"] += 1
            return
        if isinstance(message, Publish):
            self._on_publish(sender, message.wire, now)
        else:
            self._on_control(sender, message, now)
        if self._sched:
            self._schedule_pulls(now)

    def ignores(self, sender: str) -> bool:
        """Whether everything ``sender`` sends is ignored (its score is below the
        graylist threshold). A shell may ask this before decoding what the
        sender sent, so its junk costs no more than the asking."""
        return self.scores.score(sender) < self.config.graylist_threshold

    def malformed(self, sender: str, reason: str) -> None:
        """``sender`` sent gossip the shell could not decode: invalid, as if the
        machine had refused it itself (the shell decodes controls)."""
        if sender in self.addrs:
            self._invalid(sender, reason)

    # -- peers ---------------------------------------------------------------------------

    def add_peer(self, peer: str, now: float, addr: str = "") -> None:
        if peer == self.self_id:
            return
        if peer not in self.addrs:
            if len(self.addrs) >= self.config.max_peers:
                self.counters["too_many_peers"] += 1
                return
            self.addrs[peer] = addr
            self.mesh.add_peer(peer)
            self.scores.connected(peer)
        # Known already: a new link replaced the one we had (both ends dialed, or it
        # redialed). What was in flight on the old one is lost, and our subscriptions,
        # sent once per link, may be among it; without them the peer never sends us a
        # topic's messages directly (a restarted peer then reached one peer of three).
        if self.subscriptions:
            self._control(peer).subs.extend((t, True) for t in sorted(self.subscriptions))

    def remove_peer(self, peer: str, now: float) -> None:
        if self.addrs.pop(peer, None) is None:
            return
        self.mesh.remove_peer(peer)
        self.scores.disconnected(peer, now)
        self._ctrl.pop(peer, None)
        self._graylisted.discard(peer)
        for w in list(self._active.values()):
            if w.source == peer:
                self._end_pull(w, "peer_gone", now)
        for w in self._wants.values():
            w.holders.discard(peer)
            if peer in w.sources:
                w.sources.remove(peer)
                if not w.sources:
                    self._ready.pop(w.msg_id, None)
        for key in [k for k in self._serving if k[0] == peer]:
            self._serving.discard(key)
        self._serves_to.pop(peer, None)
        for mid in [m for m, (p, _) in self._promises.items() if p == peer]:
            del self._promises[mid]
        self._schedule_pulls(now)

    def peers(self) -> list[str]:
        return list(self.addrs)

    def score(self, peer: str) -> float:
        return self.scores.score(peer)

    # -- topics --------------------------------------------------------------------------

    def subscribe(self, topic: str, now: float, validator: Validator | None = None) -> None:
        if validator is not None:
            self.validators[topic] = validator
        if topic in self.subscriptions:
            return
        self.subscriptions.add(topic)
        self.mesh.join(topic)
        for peer in self.addrs:
            self._control(peer).subs.append((topic, True))
        # Graft right away rather than a heartbeat later.
        graft, _ = self.mesh.maintain(topic, self.scores.score, self.rng, now)
        for peer in graft:
            self._control(peer).graft.append(topic)

    def unsubscribe(self, topic: str, now: float) -> None:
        if topic not in self.subscriptions:
            return
        self.subscriptions.discard(topic)
        self.validators.pop(topic, None)
        backoff = self.config.unsubscribe_backoff
        for peer in sorted(self.mesh.leave(topic)):
            self.mesh.set_backoff(topic, peer, now + backoff)
            self._control(peer).prune.append(Prune(topic, int(backoff)))
        for peer in self.addrs:
            self._control(peer).subs.append((topic, False))

    # -- publishing ----------------------------------------------------------------------

    def publish(self, envelope_wire: bytes, now: float) -> bytes:
        """Publishes our own signed announcement (its body, if any, must already be
        servable). Returns the message id. Raises DecodeError for a malformed one."""
        env = self._verify(envelope_wire)
        if env.type is not MsgType.GOSSIP_PUBLISH:
            raise DecodeError("bad_field", "not a GOSSIP_PUBLISH envelope")
        ann = self._announcement(env)
        mid = message_id(envelope_wire)
        if not self.seen.add(mid, now, _ACCEPTED):
            raise DecodeError("duplicate", "this message was already published")
        if self.seqs.room(env.origin, self.self_id, now) is None:
            self.seqs.accept(env.origin, env.seq, now, self.self_id, mid)
        self.counters["published"] += 1
        self._hold(mid, ann, env, set(), now)
        c = self.config
        targets = (
            [p for p in self.mesh.subscribers(ann.topic) if self.score(p) >= c.publish_threshold]
            if c.flood_publish
            else list(self.mesh.meshes.get(ann.topic, ()))
        )
        for peer in sorted(targets):
            self._out.append(Outgoing(peer, Publish(envelope_wire)))
        return mid

    # -- body transfer reports (from the caller's data plane) ----------------------------

    def body_progress(self, peer: str, mid: bytes, verified_chunks: int, now: float) -> None:
        w = self._active.get(mid)
        if w is not None and w.source == peer:
            w.first_chunk = max(w.first_chunk, verified_chunks)
            w.deadline = now + self.config.pull_timeout
            self._update_pull_deadline()

    def body_received(self, peer: str, mid: bytes, now: float) -> bool:
        """The body pulled from ``peer`` is complete and verified. False if that pull
        was no longer wanted (the caller should then discard it)."""
        w = self._active.get(mid)
        if w is None or w.source != peer:
            self.counters["body_unexpected"] += 1
            return False
        del self._active[mid]
        self._pulls_from[peer] -= 1
        self._sched = True
        self._update_pull_deadline()
        del self._wants[mid]
        self._ready.pop(mid, None)
        self.counters["body_received"] += 1
        w.holders.add(peer)
        self._hold(mid, w.ann, w.env, w.holders, now, source=w.first_source)
        self._schedule_pulls(now)
        return True

    def body_failed(self, peer: str, mid: bytes, reason: str, now: float) -> None:
        """The pull from ``peer`` broke. ``reason`` "bad_table"/"bad_chunk"/"overrun"
        means the peer sent bytes that failed verification (invalid, penalised);
        anything else (link lost, stream aborted) is not charged."""
        w = self._active.get(mid)
        if w is None or w.source != peer:
            return
        if reason in ("bad_table", "bad_chunk", "overrun"):
            self.counters["body_invalid"] += 1
            self.scores.invalid(peer)
            w.holders.discard(peer)
            self._control(peer).cancel.append(mid)  # stop the rest of a bad stream
        self._end_pull(w, reason, now)
        self._schedule_pulls(now)

    def serve_done(self, peer: str, mid: bytes) -> None:
        key = (peer, mid)
        if key in self._serving:
            self._serving.discard(key)
            self._serves_to[peer] -= 1

    def forget_body(self, mid: bytes) -> None:
        """The caller no longer holds the body (evicted): stop offering it."""
        self._held.pop(mid, None)

    def release_body(self, mid: bytes, now: float) -> bool:
        """The caller let the body go on purpose while it may still be recent (the
        application released it): stop offering it, in IHAVE and IWANT answers too,
        and tell a peer that still pulls it RELEASED (no penalty: it asks elsewhere)
        rather than MISSING (a broken promise). False if we did not hold it."""
        if self._held.pop(mid, None) is None:
            return False
        self.mcache.discard(mid)
        self._released[mid] = now + self.config.seen_ttl
        self._released.move_to_end(mid)
        while len(self._released) > RELEASED_MAX:
            self._released.popitem(last=False)
        self.counters["bodies_released"] += 1
        return True

    def holds(self, mid: bytes) -> bool:
        return mid in self._held

    def wanted(self) -> int:
        return len(self._wants)

    # -- receiving -----------------------------------------------------------------------

    def _on_publish(self, sender: str, envelope_wire: bytes, now: float) -> None:
        try:
            mid = message_id(envelope_wire)
        except DecodeError:
            self._invalid(sender, "malformed")
            return
        self._promises.pop(mid, None)  # a promise is kept whoever delivers
        status = self.seen.get(mid)
        if status is not None:
            self.counters["duplicate"] += 1
            if status == _REJECTED:
                self.scores.invalid(sender)
            elif status == _ACCEPTED:
                self._note_holder(mid, sender)
            return
        try:
            env = self._verify(envelope_wire)
        except DecodeError as e:
            # Not remembered: a forged copy must not shadow the genuine message.
            self._invalid(sender, e.reason)
            return
        if env.type is not MsgType.GOSSIP_PUBLISH:
            self._invalid(sender, "wrong_type")
            return
        try:
            ann = self._announcement(env)
        except DecodeError as e:
            self.seen.add(mid, now, _REJECTED)
            self._invalid(sender, e.reason)
            return
        if not self._origin_admitted(sender, mid, env, ann, now):
            return
        if not self.seqs.check(env.origin, env.seq):
            tag = self.seqs.held_tag(env.origin, env.seq)
            if tag is not None and tag != message_tag(mid):
                self._seq_conflict(mid, ann, env, now)
                return
            self.seen.add(mid, now, _REJECTED)
            self._invalid(sender, "replay")
            return
        no_room = self.seqs.room(env.origin, sender, now)
        if no_room is not None:
            # Not remembered: once there is room the message can come back.
            self.counters[f"ignored.{no_room}"] += 1
            return
        if self._wall_offset is not None:
            age = now + self._wall_offset - env.ts_ms / 1000.0
            if age > self.config.max_message_age or -age > self.config.max_future_skew:
                # The origin's clock or a replay: not the relay's fault, so no penalty.
                self.seen.add(mid, now, _IGNORED)
                self.counters["ignored.stale"] += 1
                return
        if ann.topic not in self.subscriptions:
            self.seen.add(mid, now, _IGNORED)
            self.counters["ignored.not_subscribed"] += 1
            return
        if ann.inline is not None and digest_of(ann.inline, ann.chunk_size)[1] != ann.digest:
            self.seen.add(mid, now, _REJECTED)
            self._invalid(sender, "inline_digest")
            return
        validator = self.validators.get(ann.topic)
        verdict = validator(ann, env) if validator is not None else Verdict.ACCEPT
        if verdict is Verdict.REJECT:
            self.seen.add(mid, now, _REJECTED)
            self._invalid(sender, "rejected")
            return
        if verdict is Verdict.IGNORE:
            self.seen.add(mid, now, _IGNORED)
            self.counters["ignored.validator"] += 1
            return
        needs_body = ann.inline is None and ann.size > 0
        if needs_body and len(self._wants) >= self.config.max_pending_bodies:
            # Not remembered, so a later copy (or IHAVE) can bring it once we catch up.
            self.counters["body_backlog_full"] += 1
            return
        self.seen.add(mid, now, _ACCEPTED)
        self.seqs.accept(env.origin, env.seq, now, sender, mid)
        self.scores.first_delivery(sender)
        self.counters["accepted"] += 1
        if not needs_body:
            self._hold(mid, ann, env, {sender}, now, source=sender)
            return
        w = _Want(mid, ann, env, sender, now, [sender], {sender})
        self._wants[mid] = w
        self._ready[mid] = w
        self._sched = True

    def _seq_conflict(self, mid: bytes, ann: Announcement, env: Envelope, now: float) -> None:
        """A validly signed message under a sequence number already accepted from
        its origin, with another message id: only the origin's key can make that,
        so it is the origin equivocating (the same seq on two messages, each sent
        to a part of the cluster), not the relay replaying; the relay, which may
        well be honest and have accepted this version first, is not charged. The
        message is dropped like a replay, but the topic's validator sees it first,
        so that the application can hold the two signed messages as proof; its
        verdict is moot."""
        self.seen.add(mid, now, _IGNORED)
        self.counters["seq_conflict"] += 1
        validator = self.validators.get(ann.topic)
        if validator is not None and ann.topic in self.subscriptions:
            validator(ann, env)

    def _origin_admitted(
        self, sender: str, mid: bytes, env: Envelope, ann: Announcement, now: float
    ) -> bool:
        """The link's trust decision for the message's origin. A made-up or
        untrusted origin is the relay's doing (honest relays apply this same rule),
        so it is charged as invalid. A revoked or expired one is refused without
        penalty: an honest relay may not have the newest revocation list yet."""
        if self._admission is None:
            return True
        assert self._wall_offset is not None
        reason = self._admission.check(env.origin, now + self._wall_offset, ann.cert)
        if reason is None:
            return True
        self.counters[f"origin_refused.{reason}"] += 1
        if reason in ("peer_revoked", "peer_expired"):
            self.seen.add(mid, now, _IGNORED)
        else:
            self.seen.add(mid, now, _REJECTED)
            self._invalid(sender, "origin_untrusted")
        return False

    def _announcement(self, env: Envelope) -> Announcement:
        c = self.config
        return Announcement.from_obj(
            env.body, max_payload=c.max_payload, max_meta=c.max_meta, inline_max=c.inline_max
        )

    def _note_holder(self, mid: bytes, peer: str) -> None:
        w = self._wants.get(mid)
        if w is not None and peer not in w.holders and len(w.holders) < self.config.max_sources:
            w.holders.add(peer)
            w.sources.append(peer)
            if w.source is None:
                self._ready[mid] = w
                self._sched = True

    def _invalid(self, sender: str, reason: str) -> None:
        self.counters[f"invalid.{reason}"] += 1
        self.scores.invalid(sender)

    def _on_control(self, sender: str, c: Control, now: float) -> None:
        for topic, on in c.subs:
            if not self.mesh.set_subscription(sender, topic, on):
                self.counters["peer_topics_full"] += 1
        for topic in c.graft:
            self._on_graft(sender, topic, now)
        for p in c.prune:
            self._on_prune(sender, p, now)
        if c.ihave:
            self._on_ihave(sender, c.ihave, now)
        if c.iwant:
            self._on_iwant(sender, c.iwant)
        for mid, first in c.pull:
            self._on_pull(sender, mid, first)
        for mid, code in c.refuse:
            self._on_refuse(sender, mid, code, now)
        for mid in c.cancel:
            if (sender, mid) in self._serving:
                self._events.append(StopServe(sender, mid))

    def _on_graft(self, peer: str, topic: str, now: float) -> None:
        c = self.config
        if topic not in self.subscriptions:
            self._control(peer).prune.append(Prune(topic, int(c.prune_backoff)))
            return
        if self.mesh.in_mesh(topic, peer):
            return
        until = self.mesh.backoff_until(topic, peer)
        if until > now:
            self.counters["graft_in_backoff"] += 1
            self.scores.broken_promise(peer)
            if until - c.prune_backoff + c.graft_flood_threshold > now:
                self.scores.broken_promise(peer)  # a flood of GRAFTs right after PRUNE
            self._prune_to(peer, topic, now, px=False)
            return
        if self.score(peer) < 0:
            self._prune_to(peer, topic, now, px=False)
            return
        if len(self.mesh.meshes[topic]) >= c.d_hi:
            self._prune_to(peer, topic, now, px=True)
            return
        self.mesh.meshes[topic].add(peer)

    def _prune_to(self, peer: str, topic: str, now: float, *, px: bool) -> None:
        c = self.config
        self.mesh.set_backoff(topic, peer, now + c.prune_backoff)
        exchange: tuple[tuple[str, str], ...] = ()
        if px:
            others = sorted(
                p
                for p in self.mesh.subscribers(topic)
                if p != peer and self.addrs.get(p) and self.score(p) >= 0
            )
            self.rng.shuffle(others)
            exchange = tuple((p, self.addrs[p]) for p in others[: c.prune_peers])
        self._control(peer).prune.append(Prune(topic, int(c.prune_backoff), exchange))

    def _on_prune(self, peer: str, p: Prune, now: float) -> None:
        mesh = self.mesh.meshes.get(p.topic)
        if mesh is None:
            # Nothing to back off from; remembering it would let any topic name
            # leave state behind. An honest peer does this only in a race with our
            # unsubscribe, which the forgiven behaviour threshold absorbs.
            self.counters["prune_ignored.no_mesh"] += 1
            self.scores.broken_promise(peer)
            return
        mesh.discard(peer)
        backoff = max(float(p.backoff), 1.0)
        if not self.mesh.set_backoff(p.topic, peer, now + backoff, capped=True):
            self.counters["prune_ignored.backoff_full"] += 1
            self.scores.broken_promise(peer)
            return
        if p.px and self.score(peer) >= self.config.accept_px_threshold:
            fresh = tuple(
                (nid, addr) for nid, addr in p.px if nid != self.self_id and nid not in self.addrs
            )
            if fresh:
                self._events.append(PeerExchange(fresh))

    def _on_ihave(self, peer: str, ihave: list[tuple[str, list[bytes]]], now: float) -> None:
        c = self.config
        if self.score(peer) < c.gossip_threshold:
            return
        self._ihaves_in[peer] += 1
        if self._ihaves_in[peer] > c.max_ihave_messages:
            self.counters["ihave_flood"] += 1
            return
        budget = c.max_ihave_length - self._iwant_asked[peer]
        ask: list[bytes] = []
        for topic, ids in ihave:
            if topic not in self.subscriptions:
                continue
            for mid in ids:
                if mid in self.seen:
                    self._note_holder(mid, peer)
                elif len(ask) < budget and mid not in self._promises:
                    # One IWANT per id at a time: several advertisers must not all send it.
                    ask.append(mid)
        if ask:
            self._iwant_asked[peer] += len(ask)
            due = now + c.iwant_followup_time
            for mid in ask:
                self._promises[mid] = (peer, due)
            self._control(peer).iwant.extend(ask)
            self.counters["iwant_sent"] += len(ask)

    def _on_iwant(self, peer: str, ids: list[bytes]) -> None:
        c = self.config
        if self.score(peer) < c.gossip_threshold:
            return
        for mid in ids[: c.max_ihave_length]:
            env = self.mcache.get_for_iwant(mid, peer, c.gossip_retransmission)
            if env is not None:
                self._out.append(Outgoing(peer, Publish(env)))
                self.counters["iwant_served"] += 1

    def _on_pull(self, peer: str, mid: bytes, first: int) -> None:
        c = self.config
        h = self._held.get(mid)
        if h is None and mid in self._released:
            self.counters["pull_answered_released"] += 1
            self._control(peer).refuse.append((mid, RefuseCode.RELEASED))
            return
        if h is None or first > chunk_count(h.ann.size, h.ann.chunk_size) or h.ann.inline:
            self._control(peer).refuse.append((mid, RefuseCode.MISSING))
            return
        if (peer, mid) in self._serving:
            return  # already streaming it to this peer
        if len(self._serving) >= c.max_active_serves or self._serves_to[peer] >= (
            c.max_serves_per_peer
        ):
            self.counters["serve_busy"] += 1
            self._control(peer).refuse.append((mid, RefuseCode.BUSY))
            return
        self._serving.add((peer, mid))
        self._serves_to[peer] += 1
        self.counters["serve_started"] += 1
        self._events.append(ServeBody(peer, mid, first))

    def _on_refuse(self, peer: str, mid: bytes, code: int, now: float) -> None:
        w = self._active.get(mid)
        if w is None or w.source != peer:
            return
        if code == RefuseCode.MISSING:
            # It announced the message (or IHAVE'd it), which promised the body.
            self.counters["pull_refused_missing"] += 1
            self.scores.broken_promise(peer)
            w.holders.discard(peer)
            self._end_pull(w, "missing", now)
        elif code == RefuseCode.RELEASED:
            # It held the body and let it go (an owner's release): nothing was broken.
            self.counters["pull_refused_released"] += 1
            w.holders.discard(peer)
            self._end_pull(w, "released", now)
        else:
            self.counters["pull_refused_busy"] += 1
            self._end_pull(w, "busy", now, retry_later=True)

    # -- pulls ---------------------------------------------------------------------------

    def _schedule_pulls(self, now: float) -> None:
        c = self.config
        ready = self._ready
        self._sched = False
        if not ready or len(self._active) >= c.max_active_pulls:
            return
        # Bounded work per call: wants whose sources are all busy stay queued.
        pulls_from = self._pulls_from
        cap = c.max_pulls_per_source
        started: list[_Want] = []
        room = c.max_active_pulls - len(self._active)
        for w in itertools.islice(ready.values(), 64):
            if len(started) >= room:
                break
            best = None
            for p in w.sources:
                n = pulls_from[p]
                if n < cap and (best is None or n < pulls_from[best]):
                    if self.scores.score(p) < c.graylist_threshold:
                        continue  # never take bytes from a graylisted peer
                    best = p
            if best is None:
                continue
            started.append(w)
            pulls_from[best] += 1
            w.source = best
        for w in started:
            best = w.source
            assert best is not None
            del ready[w.msg_id]
            w.sources.remove(best)
            w.attempts += 1
            w.deadline = now + c.pull_timeout
            self._active[w.msg_id] = w
            self._control(best).pull.append((w.msg_id, w.first_chunk))
            self._events.append(PullStarted(best, w.msg_id, w.first_chunk, w.ann))
            if w.deadline < self._pull_deadline:
                self._pull_deadline = w.deadline

    def _end_pull(self, w: _Want, reason: str, now: float, *, retry_later: bool = False) -> None:
        peer = w.source
        assert peer is not None
        del self._active[w.msg_id]
        self._pulls_from[peer] -= 1
        w.source = None
        self._sched = True
        self._update_pull_deadline()
        self._events.append(PullEnded(peer, w.msg_id, reason))
        if retry_later and peer in w.holders:
            w.sources.append(peer)
        if not w.sources and w.attempts < self.config.max_pull_attempts:
            # Every known holder was tried once: go round again (a busy or slow
            # source may do better now), up to the attempt bound.
            w.sources = sorted(p for p in w.holders if p in self.addrs)
        if w.sources:
            self._ready[w.msg_id] = w
        elif w.attempts >= self.config.max_pull_attempts:
            self._drop_want(w, "attempts_exhausted")
        # else: idle until an announcement or IHAVE names a new holder

    def _drop_want(self, w: _Want, reason: str) -> None:
        # Stays in the seen cache: the message is lost to us, and re-pulling it from
        # the same unhelpful holders would not change that.
        del self._wants[w.msg_id]
        self._ready.pop(w.msg_id, None)
        self.counters[f"body_dropped.{reason}"] += 1
        self._events.append(BodyDropped(w.msg_id, reason))

    # -- holding and forwarding ----------------------------------------------------------

    def _hold(
        self,
        mid: bytes,
        ann: Announcement,
        env: Envelope,
        holders: set[str],
        now: float,
        *,
        source: str | None = None,
    ) -> None:
        self._held[mid] = _Held(ann, env)
        self._held_order.append((now + self.config.seen_ttl, mid))
        self.mcache.put(mid, ann.topic, env.wire)
        if source is None:
            return  # our own message: flood-published by the caller
        self._events.append(Delivered(mid, ann, env, source))
        pub = Publish(env.wire)
        for peer in sorted(self.mesh.meshes.get(ann.topic, ())):
            if peer not in holders:
                self._out.append(Outgoing(peer, pub))

    # -- heartbeat -----------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        c = self.config
        self.heartbeats += 1
        self.scores.heartbeat(now)
        score = self.scores.score
        for mid, (peer, due) in list(self._promises.items()):
            if due <= now:
                del self._promises[mid]
                self.counters["iwant_broken"] += 1
                self.scores.broken_promise(peer)
        for w in [w for w in self._wants.values() if w.source is None]:
            if now - w.created > c.seen_ttl:
                self._drop_want(w, "expired")
        for topic in sorted(self.subscriptions):
            graft, prune = self.mesh.maintain(topic, score, self.rng, now)
            for peer in graft:
                self._control(peer).graft.append(topic)
            for peer in prune:
                self._prune_to(peer, topic, now, px=score(peer) >= 0)
            ids = self.mcache.gossip_ids(topic)
            if ids:
                ids = ids[-c.max_ihave_length :]
                for peer in self.mesh.lazy_targets(topic, score, self.rng):
                    self._control(peer).ihave.append((topic, ids))
        for peer in self.addrs:
            s = score(peer)
            if s < c.graylist_threshold:
                if peer not in self._graylisted:
                    self._graylisted.add(peer)
                    self.counters["graylisted"] += 1
                    self._events.append(Graylisted(peer, s))
            else:
                self._graylisted.discard(peer)
        self.mcache.shift()
        self.seen.expire(now)
        while self._held_order and self._held_order[0][0] <= now:
            _, mid = self._held_order.popleft()
            self._held.pop(mid, None)
        released = self._released
        while released and next(iter(released.values())) <= now:
            released.popitem(last=False)
        self.mesh.expire_backoff(now)
        self._ihaves_in.clear()
        self._iwant_asked.clear()

    # -- helpers -------------------------------------------------------------------------

    def _control(self, peer: str) -> Control:
        c = self._ctrl.get(peer)
        if c is None:
            c = self._ctrl[peer] = Control()
        return c

    def graylisted(self) -> set[str]:
        return set(self._graylisted)

    def status(self) -> dict[str, Any]:
        return {
            "peers": len(self.addrs),
            "topics": sorted(self.subscriptions),
            "mesh": {t: sorted(m) for t, m in self.mesh.meshes.items()},
            "topic_peers": {t: len(self.mesh.subscribers(t)) for t in sorted(self.subscriptions)},
            "seen": len(self.seen),
            "origins": self.seqs.origins(),
            "backoffs": self.mesh.backoffs(),
            "held": len(self._held),
            "released": len(self._released),
            "wanted": len(self._wants),
            "pulling": len(self._active),
            "serving": len(self._serving),
            "graylisted": sorted(self._graylisted),
            "heartbeats": self.heartbeats,
        }
