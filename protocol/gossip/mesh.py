"""Topic membership of peers, the per-topic meshes, and GRAFT/PRUNE backoff.

Pure bookkeeping plus the heartbeat's mesh policy (gossipsub v1.1): drop peers
with a negative score, fill a mesh below D_lo up to D, trim one above D_hi down
to D keeping the best ``d_score`` by score. Sending GRAFT/PRUNE is the
machine's job; this only says to whom.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from .config import GossipConfig


class Mesh:
    __slots__ = ("_backoff", "_backoffs_of", "_c", "meshes", "peer_topics", "topic_peers")

    def __init__(self, config: GossipConfig) -> None:
        self._c = config
        self.peer_topics: dict[str, set[str]] = {}  # connected peer -> its subscriptions
        self.topic_peers: dict[str, set[str]] = {}  # topic -> connected subscribers
        self.meshes: dict[str, set[str]] = {}  # topics we are subscribed to -> mesh
        self._backoff: dict[tuple[str, str], float] = {}  # (topic, peer) -> until
        self._backoffs_of: Counter[str] = Counter()  # peer -> its entries in _backoff

    # -- peers and their subscriptions -------------------------------------------------

    def add_peer(self, peer: str) -> None:
        self.peer_topics.setdefault(peer, set())

    def remove_peer(self, peer: str) -> None:
        for topic in self.peer_topics.pop(peer, set()):
            self._unlink(topic, peer)
        for m in self.meshes.values():
            m.discard(peer)

    def set_subscription(self, peer: str, topic: str, on: bool) -> bool:
        """Records a peer's (un)subscription; False if its topic bound is reached."""
        topics = self.peer_topics.get(peer)
        if topics is None:
            return True
        if on:
            if topic not in topics and len(topics) >= self._c.max_topics:
                return False
            topics.add(topic)
            self.topic_peers.setdefault(topic, set()).add(peer)
        else:
            topics.discard(topic)
            self._unlink(topic, peer)
            mesh = self.meshes.get(topic)
            if mesh is not None:
                mesh.discard(peer)
        return True

    def _unlink(self, topic: str, peer: str) -> None:
        peers = self.topic_peers.get(topic)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self.topic_peers[topic]

    def subscribers(self, topic: str) -> set[str]:
        return self.topic_peers.get(topic, set())

    # -- our own meshes ----------------------------------------------------------------

    def join(self, topic: str) -> None:
        self.meshes.setdefault(topic, set())

    def leave(self, topic: str) -> set[str]:
        """Leaves ``topic``; returns the mesh peers to PRUNE."""
        return self.meshes.pop(topic, set())

    def in_mesh(self, topic: str, peer: str) -> bool:
        m = self.meshes.get(topic)
        return m is not None and peer in m

    # -- backoff -----------------------------------------------------------------------

    def set_backoff(self, topic: str, peer: str, until: float, *, capped: bool = False) -> bool:
        """Records (or extends) a backoff. ``capped`` (the peer asked for it): False,
        and nothing recorded, if it would be a new entry past the peer's
        ``max_backoffs_per_peer``. Our own backoffs are bounded by our meshes."""
        key = (topic, peer)
        held = self._backoff.get(key)
        if held is None:
            if capped and self._backoffs_of[peer] >= self._c.max_backoffs_per_peer:
                return False
            self._backoffs_of[peer] += 1
            self._backoff[key] = until
        elif held < until:
            self._backoff[key] = until
        return True

    def backoffs(self, peer: str | None = None) -> int:
        """Backoff entries held, for one peer or in all."""
        return len(self._backoff) if peer is None else self._backoffs_of[peer]

    def backoff_until(self, topic: str, peer: str) -> float:
        return self._backoff.get((topic, peer), 0.0)

    def in_backoff(self, topic: str, peer: str, now: float) -> bool:
        return self._backoff.get((topic, peer), 0.0) > now

    def expire_backoff(self, now: float) -> None:
        for key in [k for k, until in self._backoff.items() if until <= now]:
            del self._backoff[key]
            peer = key[1]
            self._backoffs_of[peer] -= 1
            if not self._backoffs_of[peer]:
                del self._backoffs_of[peer]

    # -- the heartbeat's mesh policy ---------------------------------------------------

    def maintain(
        self, topic: str, score: Callable[[str], float], rng: random.Random, now: float
    ) -> tuple[list[str], list[str]]:
        """Returns (peers to GRAFT, peers to PRUNE) for ``topic`` and applies them."""
        c = self._c
        mesh = self.meshes[topic]
        prune = sorted(p for p in mesh if score(p) < 0)
        for p in prune:
            mesh.discard(p)
        graft: list[str] = []
        if len(mesh) < c.d_lo:
            candidates = sorted(
                p
                for p in self.subscribers(topic)
                if p not in mesh and not self.in_backoff(topic, p, now) and score(p) >= 0
            )
            rng.shuffle(candidates)
            graft = candidates[: c.d - len(mesh)]
            mesh.update(graft)
        elif len(mesh) > c.d_hi:
            ordered = sorted(mesh)
            rng.shuffle(ordered)
            # Keep the best d_score by score, fill the rest of D at random.
            by_score = sorted(ordered, key=score, reverse=True)
            keep = by_score[: c.d_score]
            rest = [p for p in ordered if p not in keep]
            keep += rest[: c.d - len(keep)]
            dropped = [p for p in ordered if p not in keep]
            for p in dropped:
                mesh.discard(p)
            prune += dropped
        return graft, prune

    def lazy_targets(
        self, topic: str, score: Callable[[str], float], rng: random.Random
    ) -> list[str]:
        """Non-mesh subscribers that receive IHAVE for ``topic`` this heartbeat."""
        c = self._c
        mesh = self.meshes.get(topic, set())
        candidates = sorted(
            p for p in self.subscribers(topic) if p not in mesh and score(p) >= c.gossip_threshold
        )
        n = max(c.d_lazy, int(c.gossip_factor * len(candidates)))
        rng.shuffle(candidates)
        return candidates[:n]
