"""What serving a state transfer costs the serving peer's rounds.

A real cluster (``--peers`` spirtd, the bench.round model: an MLP of about 1M
parameters on digits) trains; after the warm-up, ``--joiners`` new peers join one
at a time, each syncing the job's state from a voucher and leaving once measured
(unless ``--keep-joiners``), so that every case runs on ``--peers`` peers plus at
most one. Every serving peer logs the wall-clock window of each transfer it served
(train status ``events``) and each round's close time and duration (``history``).

Per transfer served, ``delay_rounds`` is the time the serving peer's rounds that
overlap the transfer took beyond that peer's median round (of the rounds that
overlap no transfer, after the warm-up), in units of that median round. The
design's bound is one round: ``meets_bound`` is ``max(delay_rounds) <= 1``.

A joiner also slows the rounds by being one more peer (one more gradient to
wait for, from its first contributed round); rounds after it synced do not
overlap the transfer, so that cost is not counted as serving.

Back to work (``--cases``): how long a node takes to contribute again after it
joins (each joiner, from its process start), after a restart (SIGTERM, a few
rounds, started again: from the new process's start), and after a partition heals
(every link of one peer cut by proxies, bench.netsplit, until both sides hold the
other dead and a few rounds passed: from the heal). Every node logs JSON; the
breakdown (``back``) is the time of each step after the start (``at_s``) and since
the step before (``steps_s``): daemon up, first member seen alive, job record known,
sync started (a joiner's or restarted node's trainer starts syncing; a healed
node decides it must), first state request, state loaded, functions answering
(a cold worker pool), caught up, and the first round closed with the node among
the contributors (as a peer that never left saw it); ``zygote`` says when the node's
function zygote started and was ready, and its imports' time (it starts with the
process and imports torch alongside the daemon). ``back_to_work_s`` has the
worst total of each case; the target is ``TARGET_BACK_S``. ``from_up_s`` leaves out
the process's own start (imports, Redis), which no protocol setting changes.

    python -m bench.sync --json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._util import emit, machine, table
from bench.netsplit import NetSplit, free_port
from bench.round import job_body
from spirtd.localcluster import (
    LocalCluster,
    LocalNode,
    NodeError,
    all_see,
    member_states,
    wait_for,
)

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


# The steps of coming back to work, in order, each the first log line (JSON logs) of
# the returning node at or after the case's start that matches. A step that did
# not happen in a case (a restart has its job record already) is null.
STEPS: tuple[tuple[str, str], ...] = (
    ("process_up", r"^spirtd \S+ up: node "),
    ("membership", r"^member \S+ (joined|alive) at "),
    ("job_record", r"^job \S+ record from |^resuming job |^known job "),
    # The trainer starts in sync after a join or a restart; after a heal, the node
    # decides here that it must sync.
    ("sync_started", r"^job \S+: syncing state \("),
    ("sync_decision", r"^asking \S+ for job \S+ state"),
    ("state_loaded", r"^synced job |^state from checkpoint"),
    ("functions_warm", r"^functions answering: "),
    ("caught_up", r"^caught up at round |no one is computing it; computing it here"),
)
TARGET_BACK_S = 5.0
# The function zygote's ready line: how long after its start, and its own imports.
ZYGOTE_READY = re.compile(r"zygote \d+ ready in (\d+) ms \(its imports: (\d+) ms\)")


def _epoch(ts: str) -> float:
    """A log line's ``ts`` (UTC, milliseconds) as a Unix time."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def read_log(path: Path) -> list[tuple[float, str]]:
    """(time, message) of each JSON line of a node's log; other lines are skipped."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
            out.append((_epoch(doc["ts"]), str(doc["msg"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def first_contribution(history: list[dict[str, Any]], who: str, after: float) -> dict | None:
    """The first round closed after ``after`` (wall clock) that ``who`` contributed to."""
    for h in history:
        if h["closed_at"] > after and who in h["contributors"]:
            return h
    return None


def timeline(
    lines: list[tuple[float, str]], t0: float, contributed: float | None
) -> dict[str, Any]:
    """Where the time between ``t0`` and ``contributed`` went: each step's time after
    ``t0`` (``at_s``), the time since the step before it that happened (``steps_s``),
    and the total against the target."""
    at: dict[str, float | None] = {}
    for name, pattern in STEPS:
        rx = re.compile(pattern)
        hit = next((t for t, msg in lines if t >= t0 and rx.search(msg)), None)
        at[name] = None if hit is None else round(hit - t0, 3)
    at["contributed"] = None if contributed is None else round(contributed - t0, 3)
    steps: dict[str, float] = {}
    before = 0.0
    # In the order they happened, not always STEPS' (a restarted node knows its job
    # record before it is up): no step is negative.
    for name, t in sorted(((n, t) for n, t in at.items() if t is not None), key=lambda x: x[1]):
        steps[name] = round(t - before, 3)
        before = t
    total = at["contributed"]
    up = at["process_up"]
    # Beside the steps, not one of them: it starts with the process and runs alongside.
    zygote = None
    for t, msg in lines:
        m = ZYGOTE_READY.search(msg) if t >= t0 else None
        if m:
            ready_in, imports = int(m[1]) / 1000, int(m[2]) / 1000
            zygote = {
                "started_at_s": round(t - ready_in - t0, 3),
                "ready_at_s": round(t - t0, 3),
                "imports_s": imports,
            }
            break
    return {
        "at_s": at,
        "steps_s": steps,
        "zygote": zygote,
        "total_s": total,
        "from_up_s": None if total is None else round(total - (up or 0.0), 3),
        "target_s": TARGET_BACK_S,
        "meets_target": total is not None and total <= TARGET_BACK_S,
    }


class _Cluster:
    """The bench's cluster: JSON logs, and (with ``split``) a proxy in front of every
    node so that one can be cut off and healed (bench.netsplit)."""

    def __init__(self, root: Path, split: bool) -> None:
        self.c = LocalCluster(root, 0)
        self.split = NetSplit() if split else None
        self.proxies: dict[str, Any] = {}  # data dir -> its proxy

    def add(self, i: int, args: list[str], *, start: bool) -> LocalNode:
        node = self.c.add_node(
            args=[*args, "--log-format", "json"], start=False, index=i, enroll=True
        )
        if self.split is not None:
            port = free_port()
            proxy = self.split.proxy(port)
            node.listen = f"127.0.0.1:{port}"
            node.args += ["--advertise", proxy.address]
            self.proxies[str(node.data_dir)] = proxy
        first = self.c.nodes[0]
        node.bootstrap = [] if node is first else [self.dial_address(first)]
        if start:
            self.start(node)
        return node

    def dial_address(self, node: LocalNode) -> str:
        proxy = self.proxies.get(str(node.data_dir))
        return proxy.address if proxy is not None else node.listen

    def spawn(self, node: LocalNode) -> None:
        node.spawn()
        proxy = self.proxies.get(str(node.data_dir))
        if proxy is not None:
            assert node.proc is not None
            proxy.pid = node.proc.pid

    def start(self, node: LocalNode) -> None:
        self.spawn(node)
        node.wait_started(timeout=60)

    def close(self) -> None:
        codes = self.c.stop()
        if any(c != 0 for c in codes):
            self.c.kill_all()
        if self.split is not None:
            self.split.close()


def back_to_work(
    a: argparse.Namespace, node: LocalNode, watcher: LocalNode, t0: float, what: str
) -> dict[str, Any]:
    """Waits until ``node`` contributes to a round ``watcher`` closed after ``t0``,
    and returns where the time went."""
    found: dict[str, Any] = {}

    def back() -> bool:
        h = first_contribution(train_status(watcher)["history"], node.node_id, t0)
        if h is not None:
            found.update(h)
        return h is not None

    wait_for(back, a.timeout, f"{what} to contribute again")
    out = timeline(read_log(node.log_path), t0, found["closed_at"])
    out["round"] = found["round"]
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    load_before = machine()
    root = Path(tempfile.mkdtemp(prefix="sps-"))
    cl = _Cluster(root, "partition" in a.cases)
    try:
        peers = []
        for i in range(a.peers):
            args = ["--profile", "local", "--shard", f"{i}/{a.peers}", "--functions", "local"]
            peers.append(cl.add(i, args, start=i == 0))
        # The rest start side by side: each spends seconds importing torch.
        for n in peers[1:]:
            cl.spawn(n)
        for n in peers[1:]:
            n.wait_started(timeout=60)
        everyone = {n.node_id: "alive" for n in peers}
        wait_for(lambda: all_see(peers, everyone), 120, "every node to see every other alive")
        # f = 1: a peer cut off alone cannot go on by itself (the mean then wants 3
        # contributors), and a state needs 2 vouchers, as in a real deployment.
        job = peers[0].call("POST", "/v1/train/start", {**job_body(a), "f": a.f})["job"]
        wait_for(
            lambda: min(train_status(n)["round"] for n in peers) >= a.warmup,
            a.timeout,
            "the warm-up rounds",
        )

        def gap() -> None:
            # A few rounds between events, so that each has quiet rounds around it.
            at = train_status(peers[0])["round"]
            wait_for(lambda: train_status(peers[0])["round"] >= at + a.gap, a.timeout, "gap")

        joins = []
        back: dict[str, list[dict[str, Any]]] = {"join": [], "restart": [], "partition": []}
        for j in range(a.joiners if "join" in a.cases else 0):
            t0 = time.time()
            joiner = cl.add(a.peers + j, ["--profile", "local"], start=True)

            def synced(n: LocalNode = joiner) -> bool:
                return n.status()["counters"].get("training.syncs_done", 0) >= 1

            wait_for(synced, a.timeout, f"joiner {j} to sync")
            joins.append({"joiner": joiner.node_id, "sync_s": round(time.time() - t0, 2)})
            back["join"].append(back_to_work(a, joiner, peers[0], t0, f"joiner {j}"))
            if not a.keep_joiners:
                # Each joiner joins the same --peers cluster, as the target was set
                # for; kept, each would make every later case one daemon heavier.
                joiner.stop()
                wait_for(
                    lambda n=joiner: member_states(peers[0]).get(n.node_id) in ("left", "dead"),
                    a.timeout,
                    f"joiner {j} to be seen gone",
                )
            gap()
        if "restart" in a.cases:
            victim = peers[1]
            victim.stop()
            gap()
            t0 = time.time()
            cl.start(victim)
            back["restart"].append(back_to_work(a, victim, peers[0], t0, "the restarted peer"))
            gap()
        if "partition" in a.cases:
            assert cl.split is not None
            victim = peers[2 % len(peers)]
            assert victim.proc is not None
            cl.split.isolate(victim.proc.pid)
            others = [n for n in peers if n is not victim]
            wait_for(
                lambda: (
                    member_states(others[0]).get(victim.node_id) == "dead"
                    and all(member_states(victim).get(n.node_id) == "dead" for n in others)
                ),
                a.timeout,
                "both sides of the partition to see the other dead",
            )
            gap()
            cl.split.heal()
            t0 = time.time()
            back["partition"].append(back_to_work(a, victim, peers[0], t0, "the cut-off peer"))
        statuses = {n.node_id: train_status(n) for n in peers}
        peers[0].call("POST", "/v1/train/stop", {})
        delays = {nid: serve_delays(st, a.warmup) for nid, st in statuses.items()}
        served = [d for ds in delays.values() for d in ds]
        worst = max((d["delay_rounds"] for d in served), default=None)
        totals = {
            case: max((x["total_s"] for x in runs), default=None) for case, runs in back.items()
        }
        from_up = {
            case: max((x["from_up_s"] for x in runs), default=None) for case, runs in back.items()
        }
        measured = [t for case, t in totals.items() if case in a.cases]
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
            # Back to work: start (or heal) to first contribution, worst of each case.
            "back_to_work_s": totals,
            "back_to_work_from_up_s": from_up,
            "back_target_s": TARGET_BACK_S,
            "meets_back_target": bool(measured)
            and all(t is not None and t <= TARGET_BACK_S for t in measured),
            "back": back,
            "inputs": {
                "task": "digits mlp",
                "hidden": a.hidden,
                "batch_per_peer": a.batch,
                "functions_per_round": a.functions,
                "warmup_rounds": a.warmup,
                "f": a.f,
                "rounds_between_joins": a.gap,
                "joiners_stay": a.keep_joiners,
                "cases": sorted(a.cases),
                "restart": "SIGTERM, then started again",
                "partition": "proxies cut every link of one peer until both sides see the "
                "other dead, then a gap, then let them through",
            },
            "machine": {**machine(), "loadavg_before": load_before["loadavg"]},
        }
    except (NodeError, TimeoutError):
        for n in cl.c.nodes:
            print(f"--- {n.data_dir}/spirtd.log\n{n.log_tail()}")
        raise
    finally:
        cl.close()
        if a.keep:
            print(f"node data dirs and logs kept in {root}")
        else:
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
    steps = [name for name, _ in STEPS] + ["contributed"]
    back_rows = [
        {"case": case, **x["steps_s"], "total": x["total_s"], "from_up": x["from_up_s"]}
        for case, runs in r["back"].items()
        for x in runs
    ]
    back_head = (
        f"back to work (s from start or heal; target {r['back_target_s']}: "
        f"{'met' if r['meets_back_target'] else 'NOT met'}), time of each step since the last:"
    )
    return "\n".join(
        [
            head,
            table(rows, cols) if rows else "(no transfer served)",
            back_head,
            table(back_rows, ["case", *steps, "total", "from_up"]) if back_rows else "(none run)",
        ]
    )


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
    p.add_argument("--f", type=int, default=1, help="the job's Byzantine bound f")
    p.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    p.add_argument(
        "--keep-joiners",
        action="store_true",
        help="joiners stay in the cluster (by default each leaves once measured, so every "
        "case runs on --peers peers plus at most one)",
    )
    p.add_argument(
        "--cases",
        default="join,restart,partition",
        help="back-to-work cases to run, comma-separated: join, restart, partition",
    )
    a = p.parse_args(argv)
    a.cases = set(filter(None, a.cases.split(",")))
    if a.cases - {"join", "restart", "partition"}:
        p.error(f"unknown cases: {sorted(a.cases - {'join', 'restart', 'partition'})}")
    if a.peers < 1 or a.joiners < 1:
        p.error("--peers and --joiners must be positive")
    result = run(a)
    emit(result, a.json, render(result))


if __name__ == "__main__":
    main()
