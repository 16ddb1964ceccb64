"""bench.sim_rounds at small N: the row's fields, one digest, and the byte counts
against what all-to-all exchange must cost (simulated time only, no processes)."""

from __future__ import annotations

import json

import pytest

from bench import sim_rounds
from protocol.compression import encoded_size

FIELDS = {
    "peers",
    "rounds",
    "rounds_per_wall_s",
    "bytes_sent_per_peer_round",
    "bytes_received_per_peer_round",
    "bytes_sent_per_peer_inner_step",
    "bytes_received_per_peer_inner_step",
    "round_s_model",
    "join_s",
    "one_digest",
    "param_count",
    "compression",
    "inner_steps",
    "bandwidth_bps",
    "latency_s",
}
PARAMS = 50_000


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    return sim_rounds.wire_sizes()


@pytest.mark.parametrize("n", [10, 30])
def test_rows_with_crashes_and_joins_end_on_one_digest(n: int, sizes: dict[str, int]) -> None:
    row = sim_rounds.run_one(n, 8, param_count=PARAMS, sizes=sizes)
    assert set(row) >= FIELDS
    assert row["one_digest"] is True
    assert row["crashes"] >= 1 and row["joins"] >= 1
    assert row["joiners_contributed"] == row["joins"] and row["join_s"] > 0
    assert row["rounds_per_wall_s"] > 0 and row["round_s_model"] > row["compute_s_model"]
    # Crashed and late peers miss some bodies, never get more than N-1 a round.
    assert 0.6 * (n - 1) <= row["bodies_received_per_peer_round"] <= n - 1
    json.dumps(row)  # what --json prints


@pytest.mark.parametrize("n", [10, 30])
def test_without_faults_each_peer_receives_n_minus_1_bodies_a_round(
    n: int, sizes: dict[str, int]
) -> None:
    row = sim_rounds.run_one(n, 4, param_count=PARAMS, crashes=0, joins=0, loss=0.0, sizes=sizes)
    assert row["one_digest"] is True
    assert row["bodies_received_per_peer_round"] == n - 1
    body = encoded_size("none", PARAMS)
    assert row["body_bytes"] == body
    got = row["bytes_received_per_peer_round"]
    bodies = (n - 1) * body
    # Bodies, plus the announcements: per message, one flood copy and D = 6 mesh
    # copies of ~470 bytes, two messages (heads-up and gradient) per peer per round.
    announcements = 2 * n * 7 * (sizes["announce_bytes"] + 32)
    assert bodies < got <= bodies * 1.01 + announcements * 1.2
    assert got >= bodies + 0.5 * announcements
    assert row["bytes_sent_per_peer_round"] == pytest.approx(got)
    wire = row["wire_bytes_per_peer_round"]
    assert wire["body"] == pytest.approx((n - 1) * (body + 32 + 32 + 32), rel=1e-9)


def test_int8_and_ten_inner_steps_cost_30_times_fewer_bytes_per_step(
    sizes: dict[str, int],
) -> None:
    kw = {"param_count": 999_985, "crashes": 0, "joins": 0, "sizes": sizes}
    plain = sim_rounds.run_one(10, 4, **kw)
    outer = sim_rounds.run_one(10, 4, compression="int8", inner_steps=10, **kw)
    assert plain["one_digest"] and outer["one_digest"]
    assert outer["inner_steps"] == 10 and outer["body_bytes"] == encoded_size("int8", 999_985)
    for way in ("sent", "received"):
        a = plain[f"bytes_{way}_per_peer_inner_step"]
        b = outer[f"bytes_{way}_per_peer_inner_step"]
        assert a >= 30 * b, (way, a, b)
    # A round of H inner steps lasts about H times as long in simulated time.
    assert outer["sim_round_s"] > 5 * plain["sim_round_s"]


def test_main_prints_one_json_row_per_n(capsys: pytest.CaptureFixture[str]) -> None:
    sim_rounds.main(["--json", "--peers", "10", "--rounds", "4", "--param-count", "1000"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "sim_rounds" and [r["peers"] for r in out["results"]] == [10]
    assert out["summary"]["one_digest_everywhere"] is True
