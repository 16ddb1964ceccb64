"""bench.detection: failure detection with 8 real spirtd processes (local profile).

1. Over N trials, kill -9 one node and time until every survivor shows it
   `dead`; then restart it (same data dir) and wait until it is alive everywhere.
2. Separately, run for --load-s seconds with every CPU core saturated by
   busy-loop processes, and count live nodes marked `dead` by anyone (from each
   node's membership.event.dead counter, so no event can slip between polls).

Prints {"peers", "trials", "detect_p50_s", "detect_max_s", "false_dead_under_load"}
plus the raw per-trial times. Targets: detect_max_s <= 3.0, false_dead_under_load = 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spirtd.localcluster import LocalCluster, LocalNode, all_see, member_states, wait_for


def detection_trial(cluster: LocalCluster, victim: LocalNode, poll_s: float) -> float:
    survivors = [n for n in cluster.nodes if n is not victim]
    pending = {n.node_id for n in survivors}
    victim.kill()
    t0 = time.monotonic()
    deadline = t0 + 60
    while pending and time.monotonic() < deadline:
        for n in survivors:
            if n.node_id in pending and member_states(n).get(victim.node_id) == "dead":
                pending.discard(n.node_id)
        if pending:
            time.sleep(poll_s)
    if pending:
        raise RuntimeError(f"{len(pending)} survivors never marked the victim dead")
    return time.monotonic() - t0


def dead_events(nodes: list[LocalNode]) -> int:
    return sum(n.status()["counters"].get("membership.event.dead", 0) for n in nodes)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.detection", description=__doc__)
    p.add_argument("--json", action="store_true")
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--load-s", type=float, default=60.0)
    p.add_argument("--poll-s", type=float, default=0.02)
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="spt-det-") as tmp:
        cluster = LocalCluster(Path(tmp), a.peers, args=["--profile", "local"])
        try:
            cluster.start()
            everyone = {n.node_id: "alive" for n in cluster.nodes}
            wait_for(lambda: all_see(cluster.nodes, everyone), 120, "the cluster to form")
            times = []
            for t in range(a.trials):
                victim = cluster.nodes[1 + t % (a.peers - 1)]
                dt = detection_trial(cluster, victim, a.poll_s)
                times.append(round(dt, 3))
                print(f"trial {t + 1}: detected in {dt:.2f}s", file=sys.stderr, flush=True)
                victim.start()
                wait_for(lambda: all_see(cluster.nodes, everyone), 60, "the victim to rejoin")
                time.sleep(1.0)

            before = dead_events(cluster.nodes)
            burners = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 2)
            ]
            print(f"saturating {len(burners)} cores for {a.load_s:.0f}s", file=sys.stderr)
            try:
                end = time.monotonic() + a.load_s
                while time.monotonic() < end:
                    time.sleep(1.0)
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            time.sleep(2.0)  # let any in-flight suspicion resolve either way
            false_dead = dead_events(cluster.nodes) - before
            still_alive = all_see(cluster.nodes, everyone)
        finally:
            codes = cluster.stop()

    result = {
        "bench": "detection",
        "peers": a.peers,
        "profile": "local",
        "trials": a.trials,
        "detect_times_s": times,
        "detect_p50_s": round(statistics.median(times), 3),
        "detect_max_s": round(max(times), 3),
        "load_s": a.load_s,
        "load_processes": os.cpu_count() or 2,
        "false_dead_under_load": false_dead,
        "all_alive_after_load": still_alive,
        "exit_codes": codes,
        "targets": {"detect_max_s": 3.0, "false_dead_under_load": 0},
    }
    if not a.json:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
