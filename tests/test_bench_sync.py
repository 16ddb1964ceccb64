"""bench.sync's arithmetic: which rounds a transfer overlaps, and what they cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.sync import TARGET_BACK_S, first_contribution, read_log, serve_delays, timeline


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


def test_timeline_takes_each_step_once_after_the_start_and_sums_to_the_total() -> None:
    t0 = 1000.0
    lines = [
        (990.0, "member X alive at 127.0.0.1:1 (incarnation 1)"),  # before the start: not it
        (1001.0, "spirtd 0.1.0 up: node X listening on 127.0.0.1:1"),
        (1001.2, "member Y joined at 127.0.0.1:2 (incarnation 1)"),
        (1001.3, "job abc record from Y"),
        (1002.0, "job abc: syncing state (joining a running job)"),
        (1002.5, "asking Y for job abc state (round 30)"),
        (1003.0, "synced job abc state from Y: round 30, digest 00"),
        (1003.5, "caught up at round 31; contributing from round 32"),
        (1004.0, "functions answering: first round 2 of 2 slices in 1.00 s"),
        (1004.1, "member Z alive at 127.0.0.1:3 (incarnation 2)"),  # a second sighting
    ]
    tl = timeline(lines, t0, contributed=1004.5)
    assert tl["at_s"]["membership"] == 1.2
    assert tl["at_s"]["caught_up"] == 3.5 and tl["at_s"]["functions_warm"] == 4.0
    assert sum(tl["steps_s"].values()) == pytest.approx(tl["total_s"]) == 4.5
    # Caught up before the functions first answered: each step from the one before it.
    assert tl["steps_s"]["caught_up"] == 0.5 and tl["steps_s"]["functions_warm"] == 0.5
    assert tl["meets_target"] is True
    slow = timeline(lines, t0, contributed=1005.5)
    assert slow["meets_target"] is False and slow["target_s"] == TARGET_BACK_S


def test_steps_that_did_not_happen_are_null_and_a_missing_contribution_fails() -> None:
    tl = timeline([(1000.5, "member Y alive at a (incarnation 3)")], 1000.0, contributed=None)
    assert tl["at_s"]["process_up"] is None and tl["at_s"]["contributed"] is None
    assert tl["steps_s"] == {"membership": 0.5}
    assert tl["meets_target"] is False


def test_timeline_says_when_the_zygote_started_and_was_ready() -> None:
    ready = "function spirt-gradient: zygote 42 ready in 2500 ms (its imports: 2000 ms)"
    lines = [(990.0, ready), (1003.0, ready + ", started with the process")]
    tl = timeline(lines, 1000.0, contributed=1004.0)
    assert tl["zygote"] == {"started_at_s": 0.5, "ready_at_s": 3.0, "imports_s": 2.0}
    assert timeline(lines[:1], 1000.0, contributed=1004.0)["zygote"] is None


def test_read_log_reads_json_lines_and_skips_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "spirtd.log"
    log.write_text(
        '{"ts":"2026-12-07T02:50:51.179Z","level":"info","msg":"membership up"}\n'
        "Traceback (most recent call last):\n"
        '{"ts":"bad","msg":"x"}\n'
    )
    ((t, msg),) = read_log(log)
    assert msg == "membership up"
    assert t == pytest.approx(1796611851.179)


def test_first_contribution_is_the_first_round_after_the_start_with_the_node() -> None:
    history = [
        {"round": 1, "closed_at": 5.0, "contributors": ["a", "b"]},
        {"round": 2, "closed_at": 11.0, "contributors": ["a"]},
        {"round": 3, "closed_at": 12.0, "contributors": ["a", "b"]},
    ]
    assert first_contribution(history, "b", after=10.0)["round"] == 3  # type: ignore[index]
    assert first_contribution(history, "c", after=0.0) is None
