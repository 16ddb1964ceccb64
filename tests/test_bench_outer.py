"""bench.outer's matrix, tiny: 2 peers, a 64-wide digits MLP, 8 inner steps per peer at
H = 1 and H = 4 (none, and int8 where the store packs), 2 DDP processes with 2 steps.
It checks the rows' fields and agreement, and that an outer round of 4 inner steps
puts about a quarter of H = 1's bytes per inner step on the wire: the bytes come from
the daemons' link counters, so a trainer that published every inner step fails it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spirtd.redis.store import TensorStore

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {
    "inner_steps",
    "compression",
    "step_s",
    "ddp_step_s",
    "step_ddp_ratio",
    "bytes_sent_per_step",
    "bytes_received_per_step",
    "bytes_ratio_to_h1_none",
    "cpu_s_per_step",
    "accuracy",
    "accuracy_delta",
    "same_model",
}
TARGETS = {
    "h10_int8_step_ddp_ratio_met",
    "h10_int8_bytes_met",
    "accuracy_within_1pt_met",
    "int8_within_half_pt_met",
}


def test_bench_outer_tiny() -> None:
    formats = ["none", "int8"] if hasattr(TensorStore, "pack") else ["none"]
    cmd = [sys.executable, "-m", "bench.outer", "--json", "--peers", "2", "--hidden", "64"]
    cmd += ["--steps", "8", "--inner-steps", "1,4", "--compression", ",".join(formats)]
    cmd += ["--warmup-steps", "2", "--ddp-steps", "2", "--ddp-warmup", "1", "--attempts", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])

    assert r["failed"] == [], r["failed"]
    assert r["module"] is True
    rows = {(x["inner_steps"], x["compression"]): x for x in r["rows"]}
    assert set(rows) == {(h, c) for h in (1, 4) for c in formats}
    for (h, _), x in rows.items():
        assert set(x) >= ROW_KEYS, ROW_KEYS - set(x)
        assert x["same_model"] is True
        assert x["rounds_not_complete"] == 0
        assert x["inner_steps_per_peer"] == 8 and x["rounds"] == 8 // h
        for k in ("step_s", "ddp_step_s", "step_ddp_ratio"):
            assert x[k] > 0, (k, x[k])
        # Two measured rounds of a tiny job can end within one CPU clock tick (then
        # there is no figure: bench.round's run_job gives none).
        assert x["cpu_s_per_step"] is None or x["cpu_s_per_step"] >= 0, x["cpu_s_per_step"]
        assert x["step_ddp_ratio"] == pytest.approx(x["step_s"] / x["ddp_step_s"])
        assert 0.0 <= x["accuracy"] <= 1.0
    base = rows[(1, "none")]
    assert base["accuracy_delta"] == 0.0 and base["bytes_ratio_to_h1_none"] == 1.0
    # Peers exchange the model's size per round, so per inner step H = 4 puts about
    # a quarter of H = 1's bytes on the wire (heartbeats and envelopes add a little).
    # A round's bytes are the links' between two closes: a body that comes while the
    # previous round is still being aggregated counts in that round, so the measured
    # window can hold a little less than one body per round (0.99 of it in one run).
    # H = 4 has only two rounds here, so one body landing outside them weighs a lot:
    # a clean-clone run measured 0.14 of H = 1's received bytes per step (0.56 of a
    # body per round). The lower bound leaves room for that; "no saving" reads ~1.
    for c in formats:
        one, four = rows[(1, c)], rows[(4, c)]
        for k in ("bytes_sent_per_step", "bytes_received_per_step"):
            assert one[k] >= 0.9 * one["body_bytes"], (c, k, one)
            assert 0.10 < four[k] / one[k] < 0.40, (c, k, four[k], one[k])
    if "int8" in formats:
        # 1 byte per value against 4: well under half of none's bytes.
        assert rows[(1, "int8")]["bytes_ratio_to_h1_none"] < 0.5
    assert set(r["targets"]) >= TARGETS
    # No H = 10 row here: those two targets cannot be judged.
    assert r["targets"]["h10_int8_step_ddp_ratio_met"] is None
    assert isinstance(r["targets"]["accuracy_within_1pt_met"], bool)
