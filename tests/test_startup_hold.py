"""Envelopes that come before their service starts are held, within a bound."""

from __future__ import annotations

from spirtd.net.startup_hold import StartupHold


def test_held_in_order_until_released_then_never_again() -> None:
    h: StartupHold[str] = StartupHold(max_bytes=10)
    assert h.holding
    assert h.hold("a", 4) and h.hold("b", 6)
    assert not h.hold("c", 1)  # over the bound: the caller counts it unhandled
    assert h.dropped == 1
    assert h.release() == ["a", "b"]
    assert not h.holding
    assert not h.hold("d", 1)  # up and running: nothing is held any more
    assert h.release() == []
