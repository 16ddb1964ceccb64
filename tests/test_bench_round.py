"""bench.round end to end, tiny: 2 peers, a 64-wide digits MLP, 4 rounds (1 discarded),
2 DDP processes with 2 steps, and a sweep point at batch 8. It checks the output's
shape, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Bounds for a shared, loaded 2-core machine; the run takes about a minute when idle.
pytestmark = pytest.mark.timeout(420)

ROOT = Path(__file__).resolve().parent.parent
PHASES = {"functions", "averaging", "publish", "dissemination", "aggregation", "update", "digest"}
KEYS = {
    "peers",
    "params",
    "batch_per_peer",
    "functions_per_round",
    "rounds",
    "warmup_rounds",
    "round_s",
    "phases",
    "client_side_round_s",
    "client_side_phases",
    "in_db_reduction",
    "ddp_step_s",
    "ddp_ratio",
    "single_process_step_s",
    "overhead_ratio",
    "meets_targets",
    "time_split",
}


def _positive(x: object) -> bool:
    return isinstance(x, float | int) and not isinstance(x, bool) and x > 0


def test_bench_round_tiny() -> None:
    cmd = [sys.executable, "-m", "bench.round", "--json", "--peers", "2", "--hidden", "64"]
    cmd += ["--rounds", "4", "--warmup", "1", "--batch", "16", "--sweep", "8,16"]
    cmd += ["--ddp-procs", "2", "--ddp-steps", "2", "--ddp-warmup", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=360, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])

    assert set(r) >= KEYS, KEYS - set(r)
    assert (r["peers"], r["batch_per_peer"], r["functions_per_round"]) == (2, 16, 2)
    assert (r["rounds"], r["warmup_rounds"]) == (4, 1)
    assert r["params"] == 75 * 64 + 10
    for k in ("round_s", "client_side_round_s", "ddp_step_s", "single_process_step_s"):
        assert _positive(r[k]), (k, r[k])
    for k in ("ddp_ratio", "overhead_ratio"):
        assert _positive(r[k]), (k, r[k])
    for k in ("phases", "client_side_phases"):
        assert set(r[k]) >= PHASES, r[k]
        assert all(isinstance(v, float | int) and v >= 0 for v in r[k].values()), r[k]
        for p in ("functions", "averaging", "aggregation", "update"):
            assert r[k][p] > 0, (k, p, r[k])
    assert isinstance(r["in_db_reduction"], float) and r["in_db_reduction"] < 1.0
    assert set(r["time_split"]) >= PHASES | {"rest"}
    assert abs(sum(r["time_split"].values()) - 1.0) < 1e-3
    assert set(r["meets_targets"]) == {"in_db_reduction", "ddp_ratio"}
    assert all(isinstance(v, bool) for v in r["meets_targets"].values())
    # Both runs really ran on the Redis they claim, and every peer ended with one model.
    assert r["in_db"]["redis_module"] is True and r["client_side"]["redis_module"] is False
    assert r["in_db"]["same_model"] and r["client_side"]["same_model"]
    assert len(r["in_db"]["per_round"]) == 3
    assert r["ddp"]["procs"] == 2 and len(r["ddp"]["steps_s"]) == 2
    # The sweep: the headline batch once, in batch order, each with its own ratio.
    assert [x["batch_per_peer"] for x in r["by_batch"]] == [8, 16]
    head = r["by_batch"][1]
    assert head["ddp_ratio"] == r["ddp_ratio"] and head["round_s"] == r["round_s"]
    for x in r["by_batch"]:
        assert x["ddp_ratio"] == pytest.approx(x["round_s"] / x["ddp_step_s"])
        assert x["same_model"] is True
    met = [x["batch_per_peer"] for x in r["by_batch"] if x["ddp_ratio"] <= 3.0]
    want = r["ddp_ratio_met_from_batch"]
    assert want is None or (want in met and all(b in met for b in (8, 16) if b >= want))
