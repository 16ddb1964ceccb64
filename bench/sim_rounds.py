"""bench.sim_rounds: training rounds on the simulator at N = 10, 100, 1,000 peers.

Each row is one seeded run of ``protocol.rounds.sim`` (the daemon's JobMachine and
RoundMachine on simulated time) with one-hop delays drawn around the stated latency,
1% loss repaired by gossip, some peers crashing in the first rounds and some joining
after the start. A round is an outer round: H inner steps of the functions' drawn
delay (1.0-1.5 s each), then one exchange of the compressed Δ
(``protocol.compression.encoded_size``; H = 1 and ``none`` is today's float32
gradient). The default model is bench.round's digits MLP: 75 x 13,333 + 10 =
999,985 parameters.

Bytes are those of the simulator's model of spirtd's pub/sub (see
protocol/rounds/sim.py): every announcement flood-published to every peer and
forwarded to D = 6 mesh peers, every body pulled once by every other peer from
its origin, with the envelope sizes measured here with the real encoders. Per
peer and round, over every peer that took part (crashed and late ones included,
so a little under the steady state).

``round_s_model`` is a round under a link model: the H inner steps (the drawn
mean), three one-hop latencies (announcement, pull request, body) and the bytes
of the busier direction of one peer's link at the stated bandwidth (full duplex;
each peer uploads its own body to the N-1 others and downloads theirs). The
event timing of the run itself does not depend on sizes.

What this shows is the cost of all-to-all exchange: every peer receives N-1
bodies per round. With 1M float32 parameters that is ~4 MB x 999 = ~4 GB per
peer per round at N = 1,000 (about 32 s at 1 Gbit/s); int8 (1.002 MB a body)
with H = 10 brings it to ~100 MB per inner step, still ~0.8 s of a 1 Gbit/s
link per inner step. At N = 100 the same is ~400 MB per round (none, H = 1) and
~10 MB per inner step (int8, H = 10). Cutting the N-1 factor needs something
other than all-to-all (a tree, or a subset of peers per round), which SPIRT
does not do.

``join_s`` is, for each joiner, the simulated time from its start to the
publication of its first gradient that a peer aggregated; ``one_digest`` is true
when every live peer is done and all hold one final digest (there are no
Byzantine peers in these runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from protocol import wire
from protocol.compression import FORMATS, encoded_size
from protocol.gossip.messages import Announcement
from protocol.identity import Certificate, NodeKey
from protocol.rounds.config import RoundConfig
from protocol.rounds.sim import CHUNK, RoundSim, SimParams
from protocol.wire import MsgType
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, StateMeta

from ._util import emit, machine, table

DIGITS_PARAMS = 75 * 13333 + 10  # bench.round's digits MLP (hidden 13,333)
DEFAULT_ROUNDS = {10: 12, 100: 8, 1000: 6}
FN_DELAY = (1.0, 1.5)  # one inner step's functions, drawn per peer per round
LATENCY_HOPS = 3  # announcement, pull request, first body byte


def wire_sizes() -> dict[str, int]:
    """The signed envelopes of a gradient announcement and a heads-up, encoded by the
    real code (a 16-character job id, a CA-issued node certificate)."""
    key, ca = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    cert = Certificate.issue(ca, "cluster", key.public_key, now=time.time(), days=365, serial=1)
    now_ms = int(time.time() * 1000)

    def envelope(meta: bytes, size: int) -> int:
        ann = Announcement(
            TRAIN_TOPIC, size, b"\0" * 32, CHUNK, meta, None if size else b"", cert.encode()
        )
        return len(wire.seal(key, MsgType.GOSSIP_PUBLISH, 1 << 40, now_ms, ann.to_obj()))

    job = "j" * 16
    return {
        "announce_bytes": envelope(GradientMeta(job, 10**5, b"\0" * 32, 64, 0.5).encode(), 1 << 30),
        "heads_up_bytes": envelope(StateMeta(job, 10**5, b"\0" * 32, True).encode(), 0),
    }


def params_for(
    n: int,
    rounds: int,
    *,
    param_count: int,
    compression: str,
    inner_steps: int,
    latency_s: float,
    seed: int,
    crashes: int | None = None,
    joins: int | None = None,
    loss: float = 0.01,
    sizes: dict[str, int] | None = None,
) -> SimParams:
    crashes = max(1, n // 50) if crashes is None else crashes
    joins = max(1, n // 50) if joins is None else joins
    step = sum(FN_DELAY) / 2 * inner_steps
    return SimParams(
        n=n,
        rounds=rounds,
        seed=seed,
        f=1,
        loss=loss,
        config=RoundConfig(initial_deadline_s=6.0, deadline_floor_s=2.0, deadline_ceiling_s=15.0),
        fn_delay=FN_DELAY,
        msg_delay=(latency_s, 2 * latency_s),
        crashes=crashes,
        crash_rounds=(1, 3),
        late=joins,
        # Joiners arrive during the second round, so that they can sync and
        # contribute within a short job.
        late_at=(1.2 * step, 2.0 * step),
        until=60.0 * rounds * inner_steps + 600.0,
        param_count=param_count,
        compression=compression,
        inner_steps=inner_steps,
        truth=False,
        **(sizes or {}),
    )


def run_one(
    n: int,
    rounds: int,
    *,
    param_count: int = DIGITS_PARAMS,
    compression: str = "none",
    inner_steps: int = 1,
    bandwidth_bps: float = 1e9,
    latency_s: float = 0.02,
    seed: int = 1,
    crashes: int | None = None,
    joins: int | None = None,
    loss: float = 0.01,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    p = params_for(
        n,
        rounds,
        param_count=param_count,
        compression=compression,
        inner_steps=inner_steps,
        latency_s=latency_s,
        seed=seed,
        crashes=crashes,
        joins=joins,
        loss=loss,
        sizes=sizes,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    sim = RoundSim(p)
    sim_s = sim.run()
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0

    peer_rounds = n * rounds
    sent = sum(x.sent for x in sim.lives)
    received = sum(x.received for x in sim.lives)
    by_id: dict[str, list[int]] = {}
    for x in sim.lives:
        s = by_id.setdefault(x.id, [0, 0])
        s[0] += x.sent
        s[1] += x.received
    busiest = max(max(s) for s in by_id.values()) / rounds
    sent_pr, received_pr = sent / peer_rounds, received / peer_rounds

    live = sim.live_peers()
    finals = {x.final_digest for x in live}
    one_digest = bool(live) and all(x.done for x in live) and len(finals) == 1

    contributed: dict[str, set[int]] = {}
    for x in sim.lives:
        for c in x.closes:
            for who in c.contributors:
                contributed.setdefault(who, set()).add(c.round)
    join_times: list[float | None] = []
    for j in sim.late_ids:
        x = sim.by_id[j]
        if x.joined_at is None:
            join_times.append(None)
            continue
        mine = contributed.get(j, set())
        firsts = [t for r, t in x.published if r in mine and t >= x.joined_at]
        join_times.append(min(firsts) - x.joined_at if firsts else None)
    joined = [t for t in join_times if t is not None]

    h = inner_steps
    compute_s = sum(FN_DELAY) / 2 * h
    transfer_s = max(sent_pr, received_pr) * 8 / bandwidth_bps
    round_s = compute_s + LATENCY_HOPS * latency_s + transfer_s
    closed = [len({c.round for c in x.closes}) for x in live]
    return {
        "peers": n,
        "rounds": rounds,
        "param_count": param_count,
        "compression": compression,
        "inner_steps": h,
        "bandwidth_bps": bandwidth_bps,
        "latency_s": latency_s,
        "loss": loss,
        "crashes": len(sim.victims),
        "joins": len(sim.late_ids),
        "body_bytes": p.body_size,
        "wall_s": round(wall_s, 2),
        "sim_s": round(sim_s, 2),
        "events": sim.loop.events_run,
        "rounds_per_wall_s": rounds / wall_s,
        # On a shared machine the wall clock counts other work; CPU time does not.
        "cpu_s": round(cpu_s, 2),
        "rounds_per_cpu_s": rounds / cpu_s,
        "bytes_sent_per_peer_round": sent_pr,
        "bytes_received_per_peer_round": received_pr,
        "bytes_sent_per_peer_inner_step": sent_pr / h,
        "bytes_received_per_peer_inner_step": received_pr / h,
        "busiest_peer_bytes_per_round": busiest,
        "bodies_received_per_peer_round": sim.pulls / peer_rounds,
        "wire_bytes_per_peer_round": {
            k: v / peer_rounds for k, v in sorted(sim.wire_bytes().items())
        },
        "compute_s_model": compute_s,
        "transfer_s_model": transfer_s,
        "round_s_model": round_s,
        "inner_step_s_model": round_s / h,
        "exchange_share_model": (round_s - compute_s) / round_s,
        "sim_round_s": sim_s / rounds,
        "join_s": statistics.mean(joined) if joined else None,
        "join_s_max": max(joined) if len(joined) == len(join_times) and joined else None,
        "joiners_contributed": len(joined),
        "rounds_closed_min": min(closed, default=0),
        "syncs": sim.counters["syncs_done"],
        "lost": sim.counters["lost"],
        "one_digest": one_digest,
        "live_peers": len(live),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_rounds", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--peers", default="10,100,1000", help="comma-separated N")
    ap.add_argument("--param-count", type=int, default=DIGITS_PARAMS)
    ap.add_argument("--compression", default="none", choices=FORMATS)
    ap.add_argument("--inner-steps", type=int, default=1, help="H")
    ap.add_argument(
        "--rounds", type=int, default=None, help=f"outer rounds per run (default {DEFAULT_ROUNDS})"
    )
    ap.add_argument("--bandwidth", type=float, default=1e9, help="link bits/s, full duplex")
    ap.add_argument("--latency", type=float, default=0.02, help="one-hop latency, s")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.inner_steps < 1 or args.param_count < 1:
        ap.error("--inner-steps and --param-count must be >= 1")
    sizes = wire_sizes()
    rows = []
    for n in (int(s) for s in args.peers.split(",")):
        rounds = args.rounds or DEFAULT_ROUNDS.get(n, 8)
        row = run_one(
            n,
            rounds,
            param_count=args.param_count,
            compression=args.compression,
            inner_steps=args.inner_steps,
            bandwidth_bps=args.bandwidth,
            latency_s=args.latency,
            seed=args.seed,
            sizes=sizes,
        )
        rows.append(row)
        if not args.json:
            print(f"n={n}: {row['wall_s']} s wall", flush=True)
    body = encoded_size(args.compression, args.param_count)
    result = {
        "bench": "sim_rounds",
        "inputs": {
            "peers": [r["peers"] for r in rows],
            "param_count": args.param_count,
            "compression": args.compression,
            "inner_steps": args.inner_steps,
            "bandwidth_bps": args.bandwidth,
            "latency_s": args.latency,
            "seed": args.seed,
            **sizes,
        },
        "machine": machine(),
        "results": rows,
        "summary": {
            "all_to_all": (
                f"each peer receives N-1 bodies of {body:,} bytes per round: "
                + ", ".join(
                    f"N={r['peers']}: {r['bytes_received_per_peer_round'] / 1e6:,.1f} MB "
                    f"per round, {r['bytes_received_per_peer_inner_step'] / 1e6:,.1f} MB "
                    f"per inner step, {r['round_s_model']:.2f} s per round at "
                    f"{args.bandwidth / 1e9:g} Gbit/s"
                    for r in rows
                )
            ),
            "one_digest_everywhere": all(r["one_digest"] for r in rows),
            "wall_s_total": round(sum(r["wall_s"] for r in rows), 1),
        },
    }
    columns = [
        "peers",
        "rounds",
        "wall_s",
        "rounds_per_wall_s",
        "bytes_sent_per_peer_round",
        "bytes_received_per_peer_inner_step",
        "round_s_model",
        "join_s",
        "one_digest",
    ]
    emit(result, args.json, table(rows, columns) + "\n" + result["summary"]["all_to_all"])


if __name__ == "__main__":
    main()
