"""Gradient bodies live as long as a round needs them, on real daemons.

Every daemon releases a closed round's gradient bodies ``[training] body_rounds``
rounds later (spirtd/pubsub/retention.py) instead of keeping them for
``pubsub.retain_s``: the bodies it holds stay bounded by about (body_rounds + 2)
x peers while rounds go on, and (``-m long``) its memory stays flat over a
quarter of an hour of training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from spirtd.config import BODY_ROUNDS
from spirtd.localcluster import LocalCluster, LocalNode, wait_for
from tests.test_training_integration import _assert_trained, _cluster, _status, _wait_done

pytestmark = pytest.mark.timeout(420)


def _bodies(n: LocalNode) -> tuple[int, int]:
    """(bodies in this daemon's store, bodies released so far)."""
    st = n.status()
    store = st.get("pubsub", {}).get("store", {})
    return int(store.get("bodies", 0)), int(st["counters"].get("pubsub.bodies_released", 0))


def test_gradient_bodies_held_stay_bounded_while_rounds_go_on(make_cluster: Any) -> None:
    peers, rounds = 3, 300
    c = _cluster(make_cluster, peers)
    r = c.nodes[0].call("POST", "/v1/train/start", {"task": "digits", "rounds": rounds})
    assert r["job"]
    bound = (BODY_ROUNDS + 2) * peers
    peak = {n.node_id: 0 for n in c.nodes}
    samples = 0

    def sample() -> bool:
        nonlocal samples
        for n in c.nodes:
            held, _ = _bodies(n)
            peak[n.node_id] = max(peak[n.node_id], held)
        samples += 1
        return all(_status(n)["state"] in ("done", "stopped") for n in c.nodes)

    wait_for(sample, 300, "every node to finish the job while sampling their body stores")
    statuses = _wait_done(c.nodes)
    _assert_trained(statuses, 0.9)
    assert samples >= 10, samples
    assert max(peak.values()) <= bound, (peak, bound)
    for n in c.nodes:
        held, released = _bodies(n)
        # Every peer's gradient of every round passed through this store (its own
        # and the others' pulled or relayed), and all but the last rounds' left it.
        assert released >= peers * (rounds - BODY_ROUNDS - 2), (n.node_id, released)
        assert held <= bound, (n.node_id, held)


# --- the soak (-m long) -----------------------------------------------------------------

SOAK_TRAIN_S = 15 * 60  # training measured after the warm-up
WARMUP_S = 3 * 60  # memory may grow while caches and pools fill
SAMPLE_S = 30.0
PROBE_ROUNDS = 300  # a first job that measures this machine's round rate now
MARGIN = 1.5  # the rate moves with the machine's load (it rose by half once)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _tree_rss_kb(pid: int) -> int:
    """RSS of ``pid`` and its descendants (its Redis and function workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _rss_kb(p)
        except (OSError, RuntimeError):
            continue
        todo.extend(children.get(p, ()))
    return total


def _pid(n: LocalNode) -> int:
    assert n.proc is not None
    return n.proc.pid


def _run_job(c: LocalCluster, rounds: int) -> None:
    r = c.nodes[0].call("POST", "/v1/train/start", {"task": "digits", "rounds": rounds})
    job = r["job"]
    wait_for(
        lambda: all((_status(n)["job"] or {}).get("id") == job for n in c.nodes),
        120,
        "every node to run the new job",
    )


@pytest.mark.long
@pytest.mark.timeout(3 * 3600)
def test_soak_daemon_memory_is_flat(make_cluster: Any) -> None:
    c = _cluster(make_cluster, 4)
    rounds = int(os.environ.get("SPIRT_SOAK_ROUNDS", "0"))
    if not rounds:
        # The round rate on a shared machine moves with its load: measure it now
        # (past the first rounds' cold starts), then size the soak's one job for
        # its quarter hour and a margin.
        _run_job(c, PROBE_ROUNDS)
        wait_for(lambda: _status(c.nodes[0])["round"] >= PROBE_ROUNDS // 3, 600, "probe rounds")
        t0, r0 = time.monotonic(), _status(c.nodes[0])["round"]
        _wait_done(c.nodes, 600)
        rate = (PROBE_ROUNDS - r0) / (time.monotonic() - t0)
        rounds = int(rate * (WARMUP_S + SOAK_TRAIN_S) * MARGIN)
    start = time.monotonic()
    _run_job(c, rounds)
    series: dict[str, list[dict[str, Any]]] = {n.node_id: [] for n in c.nodes}
    next_at = start

    def sample() -> bool:
        nonlocal next_at
        done = all(_status(n)["state"] in ("done", "stopped") for n in c.nodes)
        if time.monotonic() >= next_at or done:
            t = time.monotonic() - start
            for n in c.nodes:
                held, released = _bodies(n)
                series[n.node_id].append(
                    {
                        "t_s": round(t, 1),
                        "round": _status(n)["round"],
                        "rss_mb": round(_rss_kb(_pid(n)) / 1024, 1),
                        "tree_rss_mb": round(_tree_rss_kb(_pid(n)) / 1024, 1),
                        "bodies": held,
                        "released": released,
                    }
                )
            next_at += SAMPLE_S
        return done

    wait_for(sample, 3 * 3600, "the soak job to finish while sampling memory", interval=1.0)
    trained_s = time.monotonic() - start
    statuses = _wait_done(c.nodes)
    summary = {
        "rounds": rounds,
        "trained_s": round(trained_s, 1),
        "rounds_per_s": round(rounds / trained_s, 2),
        "load_1min": os.getloadavg()[0],
        "series": series,
    }
    out = os.environ.get("SPIRT_SOAK_OUT")
    if out:
        Path(out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "series"}))
    for nid, s in series.items():
        print(nid[:12], [(x["t_s"], x["rss_mb"], x["tree_rss_mb"], x["bodies"]) for x in s])
    _assert_trained(statuses, 0.95)
    assert trained_s >= WARMUP_S + SOAK_TRAIN_S, (
        f"the job trained {trained_s:.0f} s, under {WARMUP_S + SOAK_TRAIN_S} s: "
        "set SPIRT_SOAK_ROUNDS higher"
    )
    for nid, s in series.items():
        rss = [x["rss_mb"] for x in s if x["t_s"] >= WARMUP_S]
        assert len(rss) >= SOAK_TRAIN_S // SAMPLE_S, (nid, len(rss))
        assert max(rss) <= 1.10 * min(rss), (nid, min(rss), max(rss))
