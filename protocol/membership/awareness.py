"""Lifeguard local health awareness.

When this node is the slow one (starved CPU, long pauses, a bad link), its probes
fail for reasons that have nothing to do with the targets. Evidence of that —
missed nacks from relays, probes that fail without any nack to judge by, having
to refute a suspicion of itself, or noticing its own timers ran late — raises a
score; successful probes lower it. Probe interval and probe timeout are both
stretched by (score + 1), so a sick node probes less often and waits longer
before accusing anyone, which is what stops flapping under CPU load.
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("awareness max multiplier must be >= 1")
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> int:
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)
        return self.score

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
