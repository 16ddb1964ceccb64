"""The simulated network: per-message latency with jitter, random loss, and
partitions that heal. Independent of any protocol: it moves opaque messages
between hosts addressed by "host:port".

Each message is delayed independently, so two messages on the same link may be
reordered. The real transport is TCP (ordered), so this is harsher than reality,
which is the right direction for a test.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from .loop import EventLoop


class Endpoint(Protocol):
    """What the network needs of a host: where it is, who it is, and a way in.
    (``sim.host.Host`` is one; the network never imports it.)"""

    addr: str
    node_id: str

    def deliver(self, item: tuple[str, str, Any]) -> None: ...


class Codec:
    """Optional wire round-trip: every message is encoded at send and decoded at
    delivery, so the real decoder sees every message and sizes are exact."""

    __slots__ = ("decode", "encode")

    def __init__(self, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> None:
        self.encode = encode
        self.decode = decode


class Network:
    def __init__(
        self,
        loop: EventLoop,
        rng: random.Random,
        *,
        latency: float = 0.001,
        jitter: float = 0.0005,
        loss: float = 0.0,
        codec: Codec | None = None,
        size_of: Callable[[Any], int] | None = None,
    ) -> None:
        if latency < 0 or jitter < 0 or not 0.0 <= loss <= 1.0:
            raise ValueError("latency and jitter must be >= 0, loss in [0, 1]")
        self.loop = loop
        self.rng = rng
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.codec = codec
        self.size_of = size_of
        self.hosts: dict[str, Endpoint] = {}  # by address
        self.sent = 0
        self.bytes_sent = 0
        self.sent_by_kind: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._group: dict[str, int] = {}  # node id -> partition side; absent = 0

    # --- topology ---------------------------------------------------------------------

    def attach(self, host: Endpoint) -> None:
        self.hosts[host.addr] = host

    def detach(self, host: Endpoint) -> None:
        if self.hosts.get(host.addr) is host:
            del self.hosts[host.addr]

    def partition(self, groups: list[list[str]], heal_after: float | None = None) -> None:
        """Splits the network: nodes (by id) in different groups cannot exchange
        messages; nodes not listed form one more group with each other."""
        self._group = {nid: i + 1 for i, g in enumerate(groups) for nid in g}
        if heal_after is not None:
            self.loop.call_later(heal_after, lambda _: self.heal())

    def heal(self) -> None:
        self._group = {}

    def partitioned(self, a: str, b: str) -> bool:
        g = self._group
        return bool(g) and g.get(a, 0) != g.get(b, 0)

    # --- traffic ----------------------------------------------------------------------

    def send(self, src: Endpoint, dst_id: str | None, dst_addr: str, message: Any) -> None:
        self.sent += 1
        self.sent_by_kind[type(message).__name__] += 1
        payload: Any = message
        if self.codec is not None:
            payload = self.codec.encode(message)
            self.bytes_sent += len(payload)
        elif self.size_of is not None:
            self.bytes_sent += self.size_of(message)
        dst = self.hosts.get(dst_addr)
        if dst is None:
            self.dropped["no_host"] += 1
            return
        if dst_id is not None and dst.node_id != dst_id:
            # The real link's handshake would find a different identity there.
            self.dropped["wrong_identity"] += 1
            return
        if self._group and self._group.get(src.node_id, 0) != self._group.get(dst.node_id, 0):
            self.dropped["partition"] += 1
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            self.dropped["loss"] += 1
            return
        delay = self.latency + rng.random() * self.jitter
        self.loop.schedule(self.loop.now + delay, dst.deliver, (src.node_id, src.addr, payload))
