"""The adaptive round deadline: a multiple of the median of recent round durations,
clamped, so it follows the cluster's pace without being dragged by one outlier."""

from __future__ import annotations

import math
import statistics
from collections import deque

from .config import RoundConfig


class AdaptiveDeadline:
    __slots__ = ("_cfg", "_durations")

    def __init__(self, config: RoundConfig) -> None:
        self._cfg = config
        self._durations: deque[float] = deque(maxlen=config.history)

    def record(self, duration_s: float) -> None:
        """One round's begin-to-close duration. Negative or non-finite values (a
        caller's clock gone backwards) are not evidence of anything: dropped."""
        if math.isfinite(duration_s) and duration_s >= 0:
            self._durations.append(duration_s)

    def current(self) -> float:
        """The deadline (seconds after begin) for a round starting now."""
        c = self._cfg
        if not self._durations:
            return c.initial_deadline_s
        d = c.deadline_factor * statistics.median(self._durations)
        return min(c.deadline_ceiling_s, max(c.deadline_floor_s, d))

    def samples(self) -> tuple[float, ...]:
        return tuple(self._durations)
