"""Prometheus metrics: the exposition of live daemons parses with
prometheus_client's own parser and carries every family operators rely on;
the message accounting is checked against a stand-in node."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spirtd import metrics
from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from tests.fixtures_cluster import FAST_TRANSPORT

ROUNDS = 3


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The value of the sample named ``sample`` with these labels."""
    for fam in families.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"no sample {sample} {labels}")


@pytest.fixture(scope="module")
def trained() -> Iterator[tuple[LocalCluster, LocalNode]]:
    """Two peers that trained a short job, and a stranger refused at the handshake."""
    root = Path(tempfile.mkdtemp(prefix="spt-"))
    c = LocalCluster(root, 2, args=["--profile", "local"], config=FAST_TRANSPORT)
    stranger: LocalNode | None = None
    try:
        c.start()
        a, b = c.nodes
        wait_for(lambda: all_see(c.nodes, {a.node_id: "alive", b.node_id: "alive"}), 60, "join")
        # It trusts the cluster's CA but has no certificate of its own (nor an
        # allowlist entry), so a refuses it at the handshake.
        (root / "stranger" / "trust").mkdir(parents=True, mode=0o700)
        shutil.copy(c.ca.pub_path, root / "stranger" / "trust" / "ca.pub")
        stranger = LocalNode(root / "stranger", bootstrap=[a.address], args=["--profile", "local"])
        stranger.start()
        wait_for(
            lambda: a.status()["counters"].get("handshake.peer_untrusted", 0) > 0,
            30,
            "the stranger's handshake to be refused",
        )
        a.call("POST", "/v1/train/start", {"task": "synthetic", "rounds": ROUNDS})
        wait_for(
            lambda: all(n.call("GET", "/v1/train/status")["state"] == "done" for n in c.nodes),
            120,
            "the job to finish",
        )
        yield c, stranger
    finally:
        if stranger is not None:
            stranger.kill()
        c.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_live_exposition_parses_and_has_every_family(trained) -> None:
    c, _ = trained
    a = c.nodes[0]
    # The HTTP endpoint a Prometheus scrape would use, over the control socket.
    text = a.call("GET", "/metrics")
    fams = parse(text)
    expected = {
        "spirt_node_info": "gauge",  # an info metric, as the text format writes one
        "spirt_members": "gauge",
        "spirt_messages_received": "counter",
        "spirt_messages_sent": "counter",
        "spirt_link_bytes": "counter",
        "spirt_handshake_failures": "counter",
        "spirt_training_round": "gauge",
        "spirt_round_duration_seconds": "histogram",
        "spirt_round_phase_duration_seconds": "histogram",
        "spirt_gradients_rejected": "counter",
        "spirt_state_syncs": "counter",
        "spirt_peers_excluded": "counter",
        "spirt_function_invocations": "counter",
        "spirt_function_cold_starts": "counter",
        "spirt_function_billed_gb_seconds": "counter",
        "spirt_function_billed_invocations": "counter",
        "spirt_redis_up": "gauge",
        "spirt_redis_module_loaded": "gauge",
        "spirt_redis_operation_duration_seconds": "histogram",
        "process_cpu_seconds": "counter",
    }
    missing = {n: t for n, t in expected.items() if n not in fams or fams[n].type != t}
    assert not missing, f"missing or mistyped families: {missing}"

    assert value(fams, "spirt_members", state="alive") == 2
    assert value(fams, "spirt_members", state="dead") == 0
    # Membership runs in both directions; every accepted envelope was signed and decoded.
    assert value(fams, "spirt_messages_received_total", type="membership", outcome="accepted") > 0
    assert value(fams, "spirt_messages_sent_total", type="membership", outcome="sent") > 0
    # The job record and every round's gradient announcement arrive as published gossip.
    assert value(fams, "spirt_messages_received_total", type="gossip_publish", outcome="accepted")
    assert value(fams, "spirt_link_bytes_total", direction="in") > 0
    assert value(fams, "spirt_link_bytes_total", direction="out") > 0
    assert value(fams, "spirt_handshake_failures_total", reason="peer_untrusted") >= 1
    assert value(fams, "spirt_training_round") == ROUNDS
    assert value(fams, "spirt_round_duration_seconds_count") == ROUNDS
    for phase in ("functions", "averaging", "publish", "aggregation", "update", "digest"):
        assert value(fams, "spirt_round_phase_duration_seconds_count", phase=phase) == ROUNDS
    for op in ("mean", "aggregate", "update", "digest"):
        assert value(fams, "spirt_redis_operation_duration_seconds_count", operation=op) == ROUNDS
    # W = 2 functions per round by default, one success each.
    assert value(fams, "spirt_function_invocations_total", outcome="ok") >= 2 * ROUNDS
    assert value(fams, "spirt_function_invocations_total", outcome="function_error") == 0
    assert value(fams, "spirt_function_cold_starts_total") >= 1
    # Every successful call was billed from its REPORT line, at 1 GB for some ms at least.
    ok = value(fams, "spirt_function_invocations_total", outcome="ok")
    assert value(fams, "spirt_function_billed_invocations_total", source="report") >= ok
    assert value(fams, "spirt_function_billed_invocations_total", source="wall_time") == 0
    assert value(fams, "spirt_function_billed_gb_seconds_total") >= ok * 0.001
    assert value(fams, "spirt_state_syncs_total", outcome="done") == 0
    assert value(fams, "spirt_peers_excluded_total", reason="nonfinite", how="evidence") == 0
    assert value(fams, "spirt_redis_up") == 1
    assert value(fams, "spirt_redis_module_loaded") == 1
    info = next(s for s in fams["spirt_node_info"].samples)
    assert info.labels["node_id"] == a.node_id


def test_counters_only_grow_between_scrapes(trained) -> None:
    c, _ = trained
    a = c.nodes[0]
    first = parse(a.call("GET", "/v1/metrics"))
    wait_for(
        lambda: (
            value(
                parse(a.call("GET", "/v1/metrics")),
                "spirt_messages_sent_total",
                type="membership",
                outcome="sent",
            )
            > value(first, "spirt_messages_sent_total", type="membership", outcome="sent")
        ),
        30,
        "membership probes to go on",
    )
    second = parse(a.call("GET", "/v1/metrics"))
    for name, fam in first.items():
        if fam.type != "counter":
            continue
        for s in fam.samples:
            later = next(
                (x.value for x in second[name].samples if (x.name, x.labels) == (s.name, s.labels)),
                None,
            )
            assert later is not None and later >= s.value, (s.name, s.labels, s.value, later)


def spirtctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_spirtctl_metrics_text_and_json(trained) -> None:
    c, _ = trained
    b = c.nodes[1]
    r = spirtctl("metrics", "--data-dir", str(b.data_dir))
    assert r.returncode == 0, r.stderr
    assert value(parse(r.stdout), "spirt_training_round") == ROUNDS
    r = spirtctl("metrics", "--json", "--data-dir", str(b.data_dir))
    assert r.returncode == 0, r.stderr
    families = {f["name"]: f for f in json.loads(r.stdout)["families"]}
    assert families["spirt_round_duration_seconds"]["type"] == "histogram"
    rounds = [
        s["value"]
        for s in families["spirt_training_round"]["samples"]
        if s["name"] == "spirt_training_round"
    ]
    assert rounds == [ROUNDS]


class _Node:
    """A stand-in node: just the counters and status the collector reads."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self.services: list[Any] = []
        self.transport = None

    def status(self) -> dict[str, Any]:
        return {
            "node_id": "n",
            "counters": dict(self.counters),
            "training": {"round": 0, "state": "idle"},
            "redis": {"ok": False, "module": False},
            "functions": {},
        }

    def members(self) -> list[dict[str, Any]]:
        return [{"state": "alive"}, {"state": "suspect"}]


def test_message_outcomes_split_accepted_from_each_rejection() -> None:
    counters: Counter[str] = Counter(
        {
            "wire.in.membership": 10,
            "membership.decode.truncated": 2,
            "membership.origin_mismatch": 1,
            "wire.in.gossip": 4,
            "gossip.decode.bad_field": 1,
            "wire.bad_signature": 3,
            "wire.out.gossip_publish": 5,
            "gossip.send_dropped": 2,
            "handshake.peer_revoked": 1,
        }
    )
    m = metrics.NodeMetrics(_Node(counters), "stand-in")
    fams = parse(m.render().decode())
    got = {
        (s.labels["type"], s.labels["outcome"]): s.value
        for s in fams["spirt_messages_received"].samples
    }
    assert got[("membership", "accepted")] == 7
    assert got[("membership", "truncated")] == 2
    assert got[("membership", "origin_mismatch")] == 1
    assert got[("gossip", "accepted")] == 3
    assert got[("gossip", "bad_field")] == 1
    assert got[("unknown", "bad_signature")] == 3
    assert value(fams, "spirt_messages_sent_total", type="gossip_publish", outcome="sent") == 5
    assert value(fams, "spirt_messages_sent_total", type="gossip", outcome="dropped") == 2
    assert value(fams, "spirt_handshake_failures_total", reason="peer_revoked") == 1
    assert value(fams, "spirt_members", state="suspect") == 1
    assert value(fams, "spirt_redis_up") == 0


def test_round_histograms_are_per_node() -> None:
    metrics.for_node("node-a").observe_round(0.3, {"functions_s": 0.2, "digest_s": 0.001})
    a = parse(metrics.NodeMetrics(_Node(Counter()), "node-a").render().decode())
    b = parse(metrics.NodeMetrics(_Node(Counter()), "node-b").render().decode())
    assert value(a, "spirt_round_duration_seconds_count") == 1
    assert value(a, "spirt_round_phase_duration_seconds_count", phase="functions") == 1
    assert value(a, "spirt_redis_operation_duration_seconds_count", operation="digest") == 1
    assert value(b, "spirt_round_duration_seconds_count") == 0
