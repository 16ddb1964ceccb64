"""bench.cost's arithmetic on made-up job results (the cluster run itself is the bench's
own; `python -m bench.cost --json` takes minutes): cost to the target from the
history rows' cost objects or from the runtime's billing, per 1,000 samples, the
IaaS columns and the summary."""

from __future__ import annotations

import argparse

import pytest

from bench.cost import iaas_columns, serverless_row, summary
from spirtd.functions.cost import LAMBDA_PRICES

X86 = LAMBDA_PRICES["x86_64"]


def history(rounds: int, reached_at: int, cost: dict[str, float] | None) -> list[dict]:
    rows = []
    for r in range(1, rounds + 1):
        row: dict = {"round": r, "accuracy": 0.96 if r >= reached_at else 0.5}
        if cost is not None:
            row["cost"] = cost
        rows.append(row)
    return rows


def job(statuses: list[dict], billed: list[tuple[int, int]]) -> dict:
    zero = {"invocations": 0, "billed_ms": 0, "memory_mb": 1024}
    return {
        "statuses": statuses,
        "before": [zero for _ in statuses],
        "after": [{"invocations": n, "billed_ms": ms, "memory_mb": 1024} for n, ms in billed],
        "wall_s": 3.0,
    }


def test_cost_from_the_history_rows() -> None:
    per_round = {"gb_s": 0.5, "requests": 2, "usd": 0.0}
    st = [{"history": history(10, 4, per_round), "accuracy": 0.96} for _ in range(2)]
    row = serverless_row("digits", 32, 1, 2, job(st, [(0, 0), (0, 0)]), 0.95, X86)
    assert row["cost_source"] == "trainer history rows"
    assert row["rounds_to_target"] == 4 and row["rounds_run"] == 10
    assert row["gb_s"] == pytest.approx(10.0) and row["requests"] == 40
    assert row["gb_s_to_target"] == pytest.approx(4.0)
    assert row["usd_to_target"] == pytest.approx(4.0 * X86.usd_per_gb_s + 16 * 0.2 / 1e6)
    assert row["samples"] == 10 * 2 * 32
    assert row["gb_s_per_1000_samples"] == pytest.approx(10.0 / 640 * 1000)


def test_cost_from_the_runtime_billing_per_invocation() -> None:
    st = [{"history": history(8, 2, None), "accuracy": 0.96} for _ in range(2)]
    # 8 rounds of W = 2 and H = 10 each, plus 10 calls of a round cut short by the
    # stop: 170 calls of 1 s at 1 GB per node.
    billed = [(170, 170_000), (170, 170_000)]
    row = serverless_row("digits", 64, 10, 2, job(st, billed), 0.95, X86, functions=2)
    assert row["cost_source"] == "runtime billing, mean per invocation"
    assert row["gb_s"] == pytest.approx(340.0) and row["requests"] == 340
    # To the target: rounds 1 and 2, 2 x 2 x 10 calls on each node.
    assert row["gb_s_to_target"] == pytest.approx(2 * 40.0)
    assert row["samples"] == 8 * 2 * 64 * 10
    never = [{"history": history(8, 99, None), "accuracy": 0.5}]
    row = serverless_row("digits", 64, 1, 1, job(never, [(8, 8000)]), 0.95, X86)
    assert row["rounds_to_target"] is None and row["usd_to_target"] is None


def test_iaas_columns_and_the_summary() -> None:
    a = argparse.Namespace(instance_usd_per_hour=3.6)  # $0.001 per second
    row = {"peers": 2, "batch": 50, "usd_to_target": 0.002, "task": "digits", "inner_steps": 1}
    cols = iaas_columns(row, a, {"step_s": 0.01}, 100)
    assert cols["iaas_usd_to_target"] == pytest.approx(0.001)
    assert cols["iaas_usd_to_target_60s_minimum"] == pytest.approx(0.06)
    assert cols["iaas_usd_per_1000_samples"] == pytest.approx(0.001 * 0.01 / 100 * 1000)
    assert cols["cheaper"] == "iaas" and cols["serverless_over_iaas"] == pytest.approx(2.0)
    text = summary([row | cols], "c6i.large")
    assert text.startswith("Serverless is not cheaper") and "2.0x" in text
    assert "60 s minimum" in text
    cheap = row | {"usd_to_target": 0.0005}
    text = summary([cheap | iaas_columns(cheap, a, {"step_s": 0.01}, 100)], "c6i.large")
    assert text.startswith("Serverless is cheaper at digits B=50 H=1")
    assert summary([], "x").startswith("No row")
