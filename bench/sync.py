"""What serving a state transfer costs the serving peer's rounds.

A real cluster (``--peers`` spirtd, the bench.round model: an MLP of about 1M
parameters on digits) trains; after the warm-up, ``--joiners`` new peers join one
at a time, each syncing the job's state from a voucher. Every serving peer logs
the wall-clock window of each transfer it served (train status ``events``) and
each round's close time and duration (``history``).

Per transfer served, ``delay_rounds`` is the time the serving peer's rounds that
overlap the transfer took beyond that peer's median round (of the rounds that
overlap no transfer, after the warm-up), in units of that median round. The
design's bound is one round: ``meets_bound`` is ``max(delay_rounds) <= 1``.

A joiner also slows the rounds by being one more peer (one more gradient to
wait for, from its first contributed round); rounds after it synced do not
overlap the transfer, so that cost is not counted as serving.

    python -m bench.sync --json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import emit, machine, table
from bench.round import job_body
from spirtd.localcluster import LocalCluster, LocalNode, NodeError, all_see, wait_for

TARGET_DELAY_ROUNDS = 1.0


def train_status(node: LocalNode) -> dict[str, Any]:
    return node.call("GET", "/v1/train/status")


def serve_delays(status: dict[str, Any], warmup: int) -> list[dict[str, Any]]:
    """Each transfer ``status``'s node served, with the delay its overlapping rounds took."""
    rounds = [
        (h["closed_at"] - h["duration_s"], h["closed_at"], h["duration_s"], h["round"])
        for h in status["history"]
        if h["round"] > warmup
    ]
    serves = [(e["start"], e["t"], e["detail"]) for e in status["events"] if e["kind"] == "served"]

    def overlaps(r: tuple[float, float, float, int], s: tuple[float, float, str]) -> bool:
        return r[0] < s[1] and s[0] < r[1]

    quiet = [r[2] for r in rounds if not any(overlaps(r, s) for s in serves)]
    if not quiet or not serves:
        return []
    base = statistics.median(quiet)
    out = []
    for s in serves:
        hit = [r for r in rounds if overlaps(r, s)]
        extra = sum(max(0.0, r[2] - base) for r in hit)
        out.append(
            {
                "transfer_s": round(s[1] - s[0], 4),
                "detail": s[2],
                "rounds_overlapping": [r[3] for r in hit],
                "median_round_s": round(base, 4),
                "extra_s": round(extra, 4),
                "delay_rounds": round(extra / base, 3),
            }
        )
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    load_before = machine()
    root = Path(tempfile.mkdtemp(prefix="sps-"))
    cluster = LocalCluster(root, 0)
    try:
        for i in range(a.peers):
            args = ["--profile", "local", "--shard", f"{i}/{a.peers}", "--functions", "local"]
            cluster.add_node(args=args, start=False, index=i)
        cluster.start()
        peers = list(cluster.nodes)
        everyone = {n.node_id: "alive" for n in peers}
        wait_for(lambda: all_see(peers, everyone), 120, "every node to see every other alive")
        job = peers[0].call("POST", "/v1/train/start", job_body(a))["job"]
        wait_for(
            lambda: min(train_status(n)["round"] for n in peers) >= a.warmup,
            a.timeout,
            "the warm-up rounds",
        )
        joins = []
        for j in range(a.joiners):
            t0 = time.monotonic()
            joiner = cluster.add_node(args=["--profile", "local"], index=a.peers + j)

            def synced(n: LocalNode = joiner) -> bool:
                return n.status()["counters"].get("training.syncs_done", 0) >= 1

            wait_for(synced, a.timeout, f"joiner {j} to sync")
            joins.append({"joiner": joiner.node_id, "sync_s": round(time.monotonic() - t0, 2)})
            at = train_status(peers[0])["round"]
            # A few rounds between joins, so that each transfer has quiet rounds around it.
            wait_for(lambda at=at: train_status(peers[0])["round"] >= at + a.gap, a.timeout, "gap")
        statuses = {n.node_id: train_status(n) for n in peers}
        peers[0].call("POST", "/v1/train/stop", {})
        delays = {nid: serve_delays(st, a.warmup) for nid, st in statuses.items()}
        served = [d for ds in delays.values() for d in ds]
        worst = max((d["delay_rounds"] for d in served), default=None)
        return {
            "bench": "sync",
            "peers": a.peers,
            "joiners": a.joiners,
            "params": statuses[peers[0].node_id]["job"]["params"],
            "job": job,
            "joins": joins,
            "transfers_served": len(served),
            "max_delay_rounds": worst,
            "median_delay_rounds": (
                statistics.median(d["delay_rounds"] for d in served) if served else None
            ),
            "target_delay_rounds": TARGET_DELAY_ROUNDS,
            "meets_bound": worst is not None and worst <= TARGET_DELAY_ROUNDS,
            "served": delays,
            "inputs": {
                "task": "digits mlp",
                "hidden": a.hidden,
                "batch_per_peer": a.batch,
                "functions_per_round": a.functions,
                "warmup_rounds": a.warmup,
                "rounds_between_joins": a.gap,
            },
            "machine": {**machine(), "loadavg_before": load_before["loadavg"]},
        }
    except (NodeError, TimeoutError):
        for n in cluster.nodes:
            print(f"--- {n.data_dir}/spirtd.log\n{n.log_tail()}")
        raise
    finally:
        codes = cluster.stop()
        if any(c != 0 for c in codes):
            cluster.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def render(r: dict[str, Any]) -> str:
    rows = [
        {"server": nid[-12:], **{k: d[k] for k in ("transfer_s", "median_round_s", "delay_rounds")}}
        | {"rounds": len(d["rounds_overlapping"])}
        for nid, ds in r["served"].items()
        for d in ds
    ]
    head = (
        f"{r['peers']} peers, {r['params']} params, {r['joiners']} joiners: "
        f"{r['transfers_served']} transfers served, worst delay {r['max_delay_rounds']} rounds "
        f"(bound {r['target_delay_rounds']}: {'met' if r['meets_bound'] else 'NOT met'})"
    )
    cols = ["server", "transfer_s", "rounds", "median_round_s", "delay_rounds"]
    return head + "\n" + table(rows, cols)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--joiners", type=int, default=3)
    p.add_argument("--hidden", type=int, default=13333, help="digits MLP width (75*h+10 params)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--functions", type=int, default=2)
    p.add_argument("--rounds", type=int, default=100000, help="the job's rounds (stopped early)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gap", type=int, default=8, help="rounds between joins")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300.0, help="per wait")
    a = p.parse_args(argv)
    if a.peers < 1 or a.joiners < 1:
        p.error("--peers and --joiners must be positive")
    result = run(a)
    emit(result, a.json, render(result))


if __name__ == "__main__":
    main()
