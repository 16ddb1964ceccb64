"""Gossip machines on the deterministic simulator (protocol.sim), with a
simulated body data plane.

``SimGossipNode`` adapts a GossipMachine to protocol.sim's Host and plays the
daemon's part for bodies: a ServeBody event sends the whole body stream (chunk
table + chunks) as one ``SimBody`` message, subject to the network's delay and
loss like everything else; the receiver checks it with the real BodyReceiver and
reports to the machine, exactly as the daemon's stream sink does. Envelopes are
real Ed25519-signed wire envelopes, checked by the machine with wire.decode.

The node records what a test needs to judge the protocol: when each message
was delivered, and how many *full* bodies of each message arrived (a duplicate
body is a second complete, verified copy of the same message).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .. import wire
from ..errors import DecodeError
from ..identity import NodeKey
from ..sim.host import Host
from ..sim.loop import EventLoop
from ..sim.network import Network
from ..wire import Envelope
from .config import GossipConfig
from .machine import (
    Delivered,
    GossipMachine,
    PullEnded,
    PullStarted,
    ServeBody,
)
from .messages import Announcement, Message, Publish
from .transfer import BodyReceiver, TransferError, digest_of, stream_size


@dataclass(frozen=True, slots=True)
class SimBody:
    """A whole body stream from ``first_chunk`` on, as one simulated message."""

    msg_id: bytes
    first_chunk: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Out:
    node_id: str
    addr: str
    message: Any


class SimGossipNode:
    """One simulated peer. Its address on the sim network is its node id."""

    def __init__(self, key: NodeKey, machine: GossipMachine) -> None:
        self.key = key
        self.node_id = key.node_id
        self.machine = machine
        self._seq = 0
        self.bodies: dict[bytes, tuple[bytes, bytes]] = {}  # id -> (table, body)
        self._pulls: dict[tuple[str, bytes], tuple[int, Announcement]] = {}
        self._extra: list[_Out] = []
        self.delivered: dict[bytes, float] = {}  # id -> time
        self.full_bodies: Counter[bytes] = Counter()  # complete bodies that arrived
        self.sent_publish: Counter[bytes] = Counter()  # envelopes this node sent, by bytes
        self.body_bytes_in = 0
        self.events: list[Any] = []
        self.now = 0.0
        self.keep_events = False

    # -- publishing ----------------------------------------------------------------------

    def sign(self, ann: Announcement, *, seq: int | None = None, ts_ms: int = 0) -> bytes:
        if seq is None:
            self._seq += 1
            seq = self._seq
        return wire.seal(self.key, wire.MsgType.GOSSIP_PUBLISH, seq, ts_ms, ann.to_obj())

    def publish(self, topic: str, payload: bytes, now: float, meta: bytes = b"") -> bytes:
        c = self.machine.config
        table, digest = digest_of(payload, c.chunk_size)
        inline = payload if len(payload) <= c.inline_max else None
        ann = Announcement(topic, len(payload), digest, c.chunk_size, meta, inline)
        envelope = self.sign(ann)
        mid = self.machine.publish(envelope, now)
        self.bodies[mid] = (table, payload)
        return mid

    # -- the protocol.sim Machine shape --------------------------------------------------

    def receive(self, sender_id: str, sender_addr: str, message: Any, now: float) -> None:
        self.now = now
        if isinstance(message, SimBody):
            self._on_body(sender_id, message, now)
        else:
            self.machine.receive(sender_id, message, now)

    def tick(self, now: float) -> None:
        self.now = now
        self.machine.tick(now)

    def next_deadline(self) -> float | None:
        return self.machine.next_deadline()

    def drain_outgoing(self) -> list[_Out]:
        m = self.machine
        for ev in m.drain_events():
            if self.keep_events:
                self.events.append(ev)
            if isinstance(ev, Delivered):
                self.delivered[ev.msg_id] = self.now
            elif isinstance(ev, PullStarted):
                self._pulls[(ev.peer_id, ev.msg_id)] = (ev.first_chunk, ev.announcement)
            elif isinstance(ev, PullEnded):
                self._pulls.pop((ev.peer_id, ev.msg_id), None)
            elif isinstance(ev, ServeBody):
                self._serve(ev)
        out = []
        for o in m.drain_outgoing():
            if isinstance(o.message, Publish):
                self.sent_publish[o.message.wire] += 1
            out.append(_Out(o.peer_id, o.peer_id, o.message))
        if self._extra:
            out.extend(self._extra)
            self._extra = []
        return out

    # -- the body data plane -------------------------------------------------------------

    def _serve(self, ev: ServeBody) -> None:
        held = self.bodies.get(ev.msg_id)
        if held is not None:
            table, body = held
            cs = self.machine.config.chunk_size
            data = table + body[ev.first_chunk * cs :]
            self._extra.append(
                _Out(ev.peer_id, ev.peer_id, SimBody(ev.msg_id, ev.first_chunk, data))
            )
        self.machine.serve_done(ev.peer_id, ev.msg_id)

    def _on_body(self, peer: str, b: SimBody, now: float) -> None:
        self.body_bytes_in += len(b.data)
        if b.first_chunk == 0:
            self.full_bodies[b.msg_id] += 1  # counted whether still wanted or not
        expected = self._pulls.pop((peer, b.msg_id), None)
        if expected is None or expected[0] != b.first_chunk:
            return  # not (or no longer) asked for: discarded, like a refused stream
        ann = expected[1]
        rx = BodyReceiver(ann.size, ann.chunk_size, ann.digest, b.first_chunk)
        if len(b.data) != stream_size(ann.size, ann.chunk_size, b.first_chunk):
            self.machine.body_failed(peer, b.msg_id, "overrun", now)
            return
        body = bytearray(ann.size)

        def write(off: int, piece: memoryview) -> None:
            body[off : off + len(piece)] = piece

        try:
            rx.feed(b.data, write)
        except TransferError as e:
            self.machine.body_failed(peer, b.msg_id, e.reason, now)
            return
        if self.machine.body_received(peer, b.msg_id, now):
            self.bodies[b.msg_id] = (rx.table, bytes(body))


class SharedVerifier:
    """wire.decode memoised across all simulated nodes.

    Verification is a pure function of the bytes, so every node that checks the
    same envelope gets the same answer whether it computes it or looks it up; the
    memo only spares the simulation 40,000 Ed25519 checks when 200 nodes each
    check 200 messages. Failures are memoised too and raised again each time.
    """

    def __init__(self) -> None:
        self._memo: dict[bytes, Envelope | DecodeError] = {}
        self.computed = 0

    def __call__(self, data: bytes) -> Envelope:
        r = self._memo.get(data)
        if r is None:
            self.computed += 1
            try:
                r = wire.decode(data)
            except DecodeError as e:
                r = e
            self._memo[data] = r
        if isinstance(r, DecodeError):
            raise DecodeError(r.reason, r.detail)
        return r


class GossipSim:
    """N simulated peers on one network. Topology: each node links to ``degree``
    random others (plus a ring, so the graph is connected), or to all if
    ``degree`` is None. With ``shared_verify`` the nodes share a SharedVerifier."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 1,
        config: GossipConfig | None = None,
        degree: int | None = None,
        latency: float = 0.005,
        jitter: float = 0.005,
        loss: float = 0.0,
        codec: Any = None,
        shared_verify: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config or GossipConfig.fast()
        self.loop = EventLoop()
        self.net = Network(
            self.loop,
            random.Random(seed + 1),
            latency=latency,
            jitter=jitter,
            loss=loss,
            codec=codec,
        )
        self.verifier = SharedVerifier()
        self.nodes: list[SimGossipNode] = []
        self.hosts: list[Host] = []
        for i in range(n):
            key = NodeKey(random.Random(seed * 1_000_003 + i).randbytes(32))
            m = GossipMachine(
                key.node_id,
                self.config,
                random.Random(self.rng.random()),
                0.0,
                verify=self.verifier if shared_verify else wire.decode,
            )
            node = SimGossipNode(key, m)
            self.nodes.append(node)
            self.hosts.append(Host(self.net, node.node_id, node.node_id, node))
        self.edges: set[tuple[int, int]] = set()
        if degree is None:
            self.edges = {(i, j) for i in range(n) for j in range(i + 1, n)}
        else:
            for i in range(n):
                self.edges.add(tuple(sorted((i, (i + 1) % n))))  # type: ignore[arg-type]
                for j in self.rng.sample(range(n), min(degree, n - 1)):
                    if j != i:
                        self.edges.add(tuple(sorted((i, j))))  # type: ignore[arg-type]
        for i, j in sorted(self.edges):
            self.link(i, j)

    def link(self, i: int, j: int) -> None:
        a, b = self.nodes[i], self.nodes[j]
        a.machine.add_peer(b.node_id, self.loop.now, b.node_id)
        b.machine.add_peer(a.node_id, self.loop.now, a.node_id)

    def flush(self, i: int) -> None:
        """Sends what node ``i``'s machine queued outside a delivery (publish, subscribe)."""
        self.hosts[i]._flush()

    def subscribe_all(self, topic: str) -> None:
        for i, node in enumerate(self.nodes):
            node.machine.subscribe(topic, self.loop.now)
            self.flush(i)

    def publish(self, i: int, topic: str, payload: bytes) -> bytes:
        mid = self.nodes[i].publish(topic, payload, self.loop.now)
        self.flush(i)
        return mid

    def inject(self, i: int, sender: str, message: Message) -> None:
        """Delivers ``message`` to node ``i`` as if ``sender`` had sent it."""
        node = self.nodes[i]
        node.receive(sender, sender, message, self.loop.now)
        self.flush(i)

    def run(self, until: float) -> None:
        for h in self.hosts:
            h.start()
        self.loop.run(until)

    def decode_counts(self) -> Counter[str]:
        return Counter(self.net.dropped)


def envelope_origin_seq(envelope: bytes) -> tuple[bytes, int]:
    """(origin key, seq) of an envelope, without checking its signature (for tests
    that build replays and forgeries)."""
    try:
        env = wire.decode(envelope, verify_signature=False)
    except DecodeError as e:  # pragma: no cover - tests pass well-formed envelopes
        raise ValueError(str(e)) from None
    return env.origin, env.seq
