"""The Lifeguard suspicion timer: starts long, shrinks with independent confirmations.

A single node's failed probe may say more about that node (overloaded, partly
partitioned) than about the target. So a suspicion first waits ``max_timeout``;
each *independent* confirmation (a suspect record signed by another member)
shortens the wait on a log scale, reaching ``min_timeout`` after ``k`` of them:

    timeout(c) = max(min, max - log(c + 1) / log(k + 1) * (max - min))

This is memberlist's formula (suspicion.go), so the bound is comparable.
"""

from __future__ import annotations

import math


def suspicion_timeout(confirmations: int, k: int, min_timeout: float, max_timeout: float) -> float:
    if k < 1:
        return min_timeout
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(min_timeout, max_timeout - frac * (max_timeout - min_timeout))


class Suspicion:
    """One running suspicion of ``node_id`` in ``incarnation``, started at ``start``."""

    __slots__ = (
        "confirmations",
        "confirmers",
        "deadline",
        "graced",
        "incarnation",
        "k",
        "max_timeout",
        "min_timeout",
        "node_id",
        "start",
    )

    def __init__(
        self,
        node_id: str,
        incarnation: int,
        from_id: str,
        start: float,
        k: int,
        min_timeout: float,
        max_timeout: float,
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.start = start
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max(max_timeout, min_timeout)
        # The originator does not count as a confirmation of itself.
        self.confirmers = {from_id}
        self.confirmations = 0
        self.graced = False  # re-armed once because our own timer ran late
        self.deadline = start + suspicion_timeout(0, k, min_timeout, self.max_timeout)

    def wants(self, from_id: str) -> bool:
        """Would a suspect record from ``from_id`` be a new confirmation?"""
        return self.confirmations < self.k and from_id not in self.confirmers

    def confirm(self, from_id: str) -> bool:
        """Counts an independent confirmation; True if it was new (and shortened the timer)."""
        if not self.wants(from_id):
            return False
        self.confirmers.add(from_id)
        self.confirmations += 1
        self.deadline = self.start + suspicion_timeout(
            self.confirmations, self.k, self.min_timeout, self.max_timeout
        )
        return True
