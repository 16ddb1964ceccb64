"""Peer scores in the style of gossipsub v1.1, reduced to the parts this system
needs, with one topic weight:

* P2, first message deliveries: a small, capped reward for being the first to
  bring a valid message;
* P4, invalid messages: ``invalid_weight`` times the squared count of invalid
  messages (bad signature, malformed, replayed, rejected by the application, a
  body chunk that failed verification);
* P7, behaviour: ``behaviour_weight`` times the squared count of broken promises
  above ``behaviour_threshold`` (an IHAVE or announcement whose message or body
  was not delivered, a GRAFT during backoff).

Counters decay every heartbeat. A score below 0 gets the peer pruned from every
mesh at the next heartbeat; below ``graylist_threshold`` everything it sends is
ignored. Records outlive disconnection for ``retain_score`` so reconnecting does
not launder a bad score.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import GossipConfig


@dataclass(slots=True)
class PeerScore:
    first_deliveries: float = 0.0
    invalid: float = 0.0
    behaviour: float = 0.0
    disconnected_at: float | None = None

    def value(self, c: GossipConfig) -> float:
        s = c.first_delivery_weight * self.first_deliveries
        s += c.invalid_weight * self.invalid * self.invalid
        excess = self.behaviour - c.behaviour_threshold
        if excess > 0:
            s += c.behaviour_weight * excess * excess
        return s

    def decay(self, c: GossipConfig) -> None:
        self.first_deliveries = _decayed(self.first_deliveries, c.first_delivery_decay, c)
        self.invalid = _decayed(self.invalid, c.invalid_decay, c)
        self.behaviour = _decayed(self.behaviour, c.behaviour_decay, c)

    def idle(self) -> bool:
        return not (self.first_deliveries or self.invalid or self.behaviour)


def _decayed(v: float, factor: float, c: GossipConfig) -> float:
    v *= factor
    return 0.0 if v < c.decay_to_zero else v


class Scoreboard:
    __slots__ = ("_c", "_peers")

    def __init__(self, config: GossipConfig) -> None:
        self._c = config
        self._peers: dict[str, PeerScore] = {}

    def get(self, peer: str) -> PeerScore:
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = PeerScore()
        return rec

    def score(self, peer: str) -> float:
        rec = self._peers.get(peer)
        return 0.0 if rec is None else rec.value(self._c)

    def first_delivery(self, peer: str) -> None:
        rec = self.get(peer)
        rec.first_deliveries = min(rec.first_deliveries + 1.0, self._c.first_delivery_cap)

    def invalid(self, peer: str) -> None:
        self.get(peer).invalid += 1.0

    def broken_promise(self, peer: str, weight: float = 1.0) -> None:
        self.get(peer).behaviour += weight

    def connected(self, peer: str) -> None:
        self.get(peer).disconnected_at = None

    def disconnected(self, peer: str, now: float) -> None:
        rec = self._peers.get(peer)
        if rec is not None:
            rec.disconnected_at = now

    def heartbeat(self, now: float) -> None:
        c = self._c
        gone: list[str] = []
        for peer, rec in self._peers.items():
            rec.decay(c)
            if rec.disconnected_at is not None and (
                rec.idle() or now - rec.disconnected_at > c.retain_score
            ):
                gone.append(peer)
        for peer in gone:
            del self._peers[peer]
        excess = len(self._peers) - c.max_scored_peers
        if excess > 0:
            # Forget the disconnected peers with the least to remember first.
            old = sorted(
                (p for p, r in self._peers.items() if r.disconnected_at is not None),
                key=lambda p: -self._peers[p].value(c),
            )
            for peer in old[:excess]:
                del self._peers[peer]

    def snapshot(self) -> dict[str, float]:
        return {p: round(r.value(self._c), 3) for p, r in self._peers.items()}
