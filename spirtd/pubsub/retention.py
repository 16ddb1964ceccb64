"""Releasing a topic's bodies by round rather than by age.

The body store keeps what it receives for ``retain_s``, whatever it is. A
training round's gradient bodies are needed for less: while the round is open,
and after it while a peer a few rounds behind may still follow from them. At a
few rounds a second, ``retain_s`` holds hundreds of rounds of gradients per
daemon. ``RoundBodies`` remembers which message ids belong to which round and
releases a round's bodies once it is ``keep`` rounds behind the newest closed
one; ``retain_s`` still bounds everything it does not track.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# Released ids of rounds past this many tracked ones are let go oldest first:
# tracking is bounded even when rounds stop closing (a stalled or stopped job).
MAX_ROUNDS_TRACKED = 256


class RoundBodies:
    """Message ids per round, released ``keep`` rounds after each close.

    ``release`` is PubSub.release (or anything that takes ids and frees them)."""

    __slots__ = ("_ids", "_release", "keep", "max_rounds")

    def __init__(
        self,
        release: Callable[[Iterable[bytes]], int],
        keep: int,
        max_rounds: int = MAX_ROUNDS_TRACKED,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self._release = release
        self.keep = keep
        self.max_rounds = max(max_rounds, keep + 1)
        self._ids: dict[int, list[bytes]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._ids.values())

    def rounds(self) -> list[int]:
        return sorted(self._ids)

    def add(self, round: int, msg_id: bytes) -> None:
        self._ids.setdefault(round, []).append(msg_id)
        if len(self._ids) > self.max_rounds:
            self._release(self._ids.pop(min(self._ids)))

    def closed(self, round: int) -> int:
        """``round`` is aggregated: the bodies of rounds <= round - keep go (also
        older rounds this node skipped, e.g. by a state sync). Returns how many
        bodies the store let go."""
        cut = round - self.keep
        old = [r for r in self._ids if r <= cut]
        if not old:
            return 0
        return self._release([mid for r in sorted(old) for mid in self._ids.pop(r)])
