"""bench.sim_scale: the membership protocol in the simulator at N = 100, 1,000, 10,000.

For each N, one seeded run of a converged cluster (every machine starts from the
same shared view, so 10,000 machines do not need 10^8 private entries), with the
chosen profile (default lan: 1 s probes, memberlist's LAN defaults):

* steady: 10 probe periods with nothing happening; messages and bytes sent per
  node per period (bytes are the exact encoded sizes of the membership messages);
* join: one new node joins through a random member; periods until every member
  holds it alive (exact, from the machines' events), next to log2 N;
* crash: a random member is killed; seconds until every survivor marks it dead,
  next to the suspicion formula's minimum (the timer once k confirmations are in)
  and the bound from its maximum;
* overall: messages and bytes per node per period over the whole run.

The summary states the ratios the issue asks about, measured in this run:
steady messages per node per period at the largest N over the smallest (flat
means ~1), and join periods over log2 N (growing like log N means roughly constant).
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import time
from typing import Any

from protocol.membership import profile
from protocol.sim.membership_cluster import MembershipCluster, node_name
from protocol.sim.scenarios import detection_bound

from ._util import emit, machine, table


def _per_node_period(count: int, n: int, seconds: float, period: float) -> float:
    return count / n / (seconds / period)


def run_one(n: int, prof: str, seed: int, steady_periods: int) -> dict[str, Any]:
    config = profile(prof)
    period = config.probe_interval
    t_wall = time.perf_counter()
    # n members in the shared view, plus one more that starts outside and joins.
    c = MembershipCluster(n + 1, config, seed=seed, converged=True, view_size=n)
    setup_s = time.perf_counter() - t_wall
    rng = random.Random(f"sim_scale/{seed}/{n}")
    net = c.net

    c.run_for(3 * period)  # let the staggered probe schedules settle
    sent0, bytes0, t0 = net.sent, net.bytes_sent, c.now
    c.run_for(steady_periods * period)
    steady_msgs = net.sent - sent0
    steady_bytes = net.bytes_sent - bytes0
    steady_s = c.now - t0

    joiner = n
    joiner_id = node_name(joiner)
    c.obs.watch.add(joiner_id)
    join_at = c.now
    c.join(joiner, [rng.randrange(n)])
    limit = join_at + 60 * period
    while c.now < limit and len(c.obs.joined_at.get(joiner_id, {})) < n:
        c.run_for(config.gossip_interval)
    seen = c.obs.joined_at.get(joiner_id, {})
    join_s = max(seen.values()) - join_at if len(seen) == n else None

    victim = rng.randrange(n)
    crash_at = c.now
    c.crash(victim)
    limit = crash_at + 2 * detection_bound(config, n + 1)
    while c.now < limit and not c.dead_everywhere(victim):
        c.run_for(config.gossip_interval)
    dead = c.obs.dead_at.get(node_name(victim), {})
    detect_s = max(dead.values()) - crash_at if c.dead_everywhere(victim) else None

    total_s = c.now
    return {
        "n": n,
        "setup_s": round(setup_s, 3),
        "steady": {
            "periods": steady_periods,
            "msgs_per_node_per_period": _per_node_period(steady_msgs, n, steady_s, period),
            "bytes_per_node_per_period": _per_node_period(steady_bytes, n, steady_s, period),
        },
        "join_periods": None if join_s is None else join_s / period,
        "join_s": join_s,
        "log2_n": math.log2(n),
        "detect_s": detect_s,
        "detect_periods": None if detect_s is None else detect_s / period,
        "first_dead_s": min(dead.values()) - crash_at if dead else None,
        "suspicion_min_s": config.suspicion_min_timeout(n),
        "suspicion_max_s": config.suspicion_max_timeout(n),
        "detect_bound_s": detection_bound(config, n + 1),
        "overall": {
            "simulated_s": total_s,
            "msgs_per_node_per_period": _per_node_period(net.sent, n + 1, total_s, period),
            "bytes_per_node_per_period": _per_node_period(net.bytes_sent, n + 1, total_s, period),
            "by_kind": dict(net.sent_by_kind),
        },
        "false_dead": len(c.obs.false_dead),
        "events_run": c.loop.events_run,
        "wall_s": round(time.perf_counter() - t_wall, 2),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_scale", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated N")
    ap.add_argument("--profile", default="lan", choices=["local", "lan", "wan"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steady-periods", type=int, default=10)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        row = run_one(n, args.profile, args.seed, args.steady_periods)
        rows.append(row)
        if not args.json:
            print(f"n={n}: {row['wall_s']} s wall", flush=True)
    small, large = rows[0], rows[-1]
    steady_ratio = (
        large["steady"]["msgs_per_node_per_period"] / small["steady"]["msgs_per_node_per_period"]
    )
    join_per_log = [
        None if r["join_periods"] is None else r["join_periods"] / r["log2_n"] for r in rows
    ]
    result = {
        "bench": "sim_scale",
        "inputs": {
            "sizes": sizes,
            "profile": args.profile,
            "seed": args.seed,
            "steady_periods": args.steady_periods,
            "probe_interval_s": profile(args.profile).probe_interval,
        },
        "machine": machine(),
        "results": rows,
        "ratios": {
            "steady_msgs_per_node_per_period_largest_over_smallest": steady_ratio,
            "overall_msgs_per_node_per_period_largest_over_smallest": (
                large["overall"]["msgs_per_node_per_period"]
                / small["overall"]["msgs_per_node_per_period"]
            ),
            "join_periods_over_log2_n": join_per_log,
            "log2_n_largest_over_smallest": large["log2_n"] / small["log2_n"],
            "join_periods_largest_over_smallest": (
                None
                if large["join_periods"] is None or not small["join_periods"]
                else large["join_periods"] / small["join_periods"]
            ),
        },
    }
    flat = [
        {
            "n": r["n"],
            "steady_msgs": r["steady"]["msgs_per_node_per_period"],
            "steady_bytes": r["steady"]["bytes_per_node_per_period"],
            "overall_msgs": r["overall"]["msgs_per_node_per_period"],
            "overall_bytes": r["overall"]["bytes_per_node_per_period"],
            "join_periods": r["join_periods"],
            "log2_n": r["log2_n"],
            "detect_s": r["detect_s"],
            "susp_min_s": r["suspicion_min_s"],
            "wall_s": r["wall_s"],
        }
        for r in rows
    ]
    columns = list(flat[0])
    emit(result, args.json, table(flat, columns))


if __name__ == "__main__":
    main()
