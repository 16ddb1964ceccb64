"""bench.sync's arithmetic: which rounds a transfer overlaps, and what they cost."""

from __future__ import annotations

from typing import Any

import pytest

from bench.sync import serve_delays


def status(durations: list[float], serves: list[tuple[float, float]]) -> dict[str, Any]:
    t, history = 100.0, []
    for i, d in enumerate(durations, start=1):
        t += d
        history.append({"round": i, "closed_at": t, "duration_s": d})
    events = [
        {"kind": "served", "start": a, "t": b, "detail": "x bytes to y"} for a, b in serves
    ] + [{"kind": "member_joined", "t": 101.0, "detail": "z"}]
    return {"history": history, "events": events}


def test_a_transfer_inside_one_slow_round_costs_its_excess() -> None:
    # Rounds of 1 s but round 5 (104.0-105.5, 1.5 s), which holds the transfer.
    st = status([1, 1, 1, 1, 1.5, 1, 1, 1], [(104.6, 104.9)])
    (d,) = serve_delays(st, warmup=0)
    assert d["rounds_overlapping"] == [5]
    assert d["median_round_s"] == 1.0
    assert d["delay_rounds"] == pytest.approx(0.5)


def test_a_transfer_across_two_rounds_counts_both_and_rounds_in_the_warmup_do_not() -> None:
    st = status([5, 1, 1, 2, 2, 1, 1], [(108.5, 109.5)])
    (d,) = serve_delays(st, warmup=1)
    assert d["rounds_overlapping"] == [4, 5]
    assert d["delay_rounds"] == pytest.approx(2.0)


def test_no_transfer_served_means_no_rows() -> None:
    assert serve_delays(status([1, 1, 1], []), warmup=0) == []
