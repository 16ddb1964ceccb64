"""The Lifeguard suspicion timer and the awareness score."""

from __future__ import annotations

import math

import pytest

from protocol.membership.awareness import Awareness
from protocol.membership.suspicion import Suspicion, suspicion_timeout


def test_timeout_shrinks_on_a_log_scale() -> None:
    # k=3, min 2 s, max 30 s: 30, 30 - 28*log2/log4 = 16, 30 - 28*log3/log4, then 2.
    assert suspicion_timeout(0, 3, 2.0, 30.0) == 30.0
    assert suspicion_timeout(1, 3, 2.0, 30.0) == pytest.approx(16.0)
    assert suspicion_timeout(2, 3, 2.0, 30.0) == pytest.approx(30 - 28 * math.log(3) / math.log(4))
    assert suspicion_timeout(3, 3, 2.0, 30.0) == 2.0
    assert suspicion_timeout(9, 3, 2.0, 30.0) == 2.0
    assert suspicion_timeout(0, 0, 2.0, 30.0) == 2.0  # nobody to confirm: minimum at once


def test_only_independent_confirmations_count() -> None:
    s = Suspicion("x", 4, "a", start=100.0, k=2, min_timeout=10.0, max_timeout=60.0)
    assert s.deadline == 160.0
    assert not s.confirm("a")  # the originator does not confirm itself
    assert s.deadline == 160.0
    assert s.confirm("b")
    after_one = s.deadline
    assert 110.0 < after_one < 160.0
    assert not s.confirm("b")  # twice from the same member counts once
    assert s.deadline == after_one
    assert s.confirm("c")
    assert s.deadline == 110.0
    assert not s.wants("d")  # k reached: more confirmations change nothing
    assert not s.confirm("d")
    assert s.confirmations == 2


def test_max_below_min_is_clamped() -> None:
    s = Suspicion("x", 0, "a", start=0.0, k=2, min_timeout=5.0, max_timeout=1.0)
    assert s.deadline == 5.0


def test_awareness_clamps_and_scales() -> None:
    a = Awareness(8)
    assert a.scale(0.5) == 0.5
    assert a.apply(3) == 3
    assert a.scale(0.5) == 2.0
    assert a.apply(100) == 7
    assert a.scale(1.0) == 8.0
    assert a.apply(-100) == 0
    with pytest.raises(ValueError):
        Awareness(0)
