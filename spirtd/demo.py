"""The main job: a local multi-peer SPIRT cluster on 127.0.0.1 that trains a model.

Creates a throwaway CA, enrolls N nodes, starts N real spirtd processes (each with
its own managed Redis, its local Lambda-compatible function runtime and its own
shard of the dataset), waits until every node sees every other alive, starts a
training job with `spirtctl train start` on one member, prints progress while
it trains, and ends with each peer's test accuracy and model digest, and a
training report (loss and accuracy against round and wall time, per peer, as
a PNG; see `spirtctl train report`). It exits 0
only if every peer finished with the same digest and at least the target
accuracy, and every daemon exited 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spirtd.control import report
from spirtd.control.ctl import render_status, table
from spirtd.localcluster import LocalCluster, NodeError, all_see, wait_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spirtd.demo", description=__doc__)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--task", default="digits")
    p.add_argument("--rounds", type=int, help="default: the task's own")
    p.add_argument("--aggregator", default=None, help="default: mean")
    p.add_argument("--inner-steps", type=int, help="local steps per round (default: the task's)")
    p.add_argument("--compression", choices=["none", "fp16", "int8"], help="default: the task's")
    p.add_argument("--target", type=float, default=0.95, help="accuracy every peer must reach")
    p.add_argument("--dir", type=Path, help="keep the nodes' data dirs here (default: temp)")
    p.add_argument("--timeout", type=float, default=600.0, help="for the whole training job")
    p.add_argument(
        "--report",
        type=Path,
        default=Path("spirt-demo-report.png"),
        help="where to write the training report PNG (default: ./spirt-demo-report.png)",
    )
    a = p.parse_args(argv)
    if a.peers < 1:
        p.error("--peers must be at least 1")

    with tempfile.TemporaryDirectory(prefix="spirt-demo-") as tmp:
        root = a.dir or Path(tmp)
        print(f"[demo] {a.peers} peers under {root}", flush=True)
        cluster = LocalCluster(root, 0)
        for i in range(a.peers):
            args = ["--profile", "local", "--shard", f"{i}/{a.peers}"]
            cluster.add_node(args=args, start=False, index=i)
        try:
            ok = _run(cluster, a)
        except (NodeError, TimeoutError, subprocess.CalledProcessError) as e:
            print(f"[demo] FAILED: {e}", file=sys.stderr)
            for n in cluster.nodes:
                print(f"--- {n.data_dir}/spirtd.log\n{n.log_tail()}", file=sys.stderr)
            cluster.kill_all()
            return 1
        codes = cluster.stop()
        print(f"[demo] shut down with SIGTERM; exit codes {codes}", flush=True)
        return 0 if ok and all(c == 0 for c in codes) else 1


def _per_step(status: dict[str, Any], field: str) -> str:
    """A peer's wire bytes per inner step over the rounds its history holds."""
    rows = [h for h in status.get("history", []) if field in h]
    steps = sum(h.get("inner_steps", 1) for h in rows)
    if not steps:
        return "-"
    return f"{sum(h[field] for h in rows) / steps / 1e3:,.1f} kB"


def _run(cluster: LocalCluster, a: argparse.Namespace) -> bool:
    t0 = time.monotonic()
    cluster.start()
    nodes = cluster.nodes
    everyone = {n.node_id: "alive" for n in nodes}
    wait_for(lambda: all_see(nodes, everyone), 60.0, "every node to see every other alive")
    print(f"[demo] cluster formed in {time.monotonic() - t0:.1f}s; status of node 0:\n")
    print(render_status(nodes[0].status()), flush=True)

    # Start the job on the last member, through the real CLI, as an operator would.
    starter = nodes[-1]
    cmd = [sys.executable, "-m", "spirtd.control.ctl", "train", "start", "--task", a.task]
    cmd += ["--data-dir", str(starter.data_dir)]
    if a.rounds:
        cmd += ["--rounds", str(a.rounds)]
    if a.aggregator:
        cmd += ["--aggregator", a.aggregator]
    if a.inner_steps:
        cmd += ["--inner-steps", str(a.inner_steps)]
    if a.compression:
        cmd += ["--compression", a.compression]
    shown = " ".join(cmd[cmd.index("start") + 1 :])
    print(f"\n$ spirtctl train start {shown}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    print(out.stdout.strip() or out.stderr.strip(), flush=True)
    if out.returncode != 0:
        return False

    t1 = time.monotonic()
    last_shown = -1
    statuses: list[dict[str, Any]] = []
    while True:
        statuses = [n.call("GET", "/v1/train/status") for n in nodes]
        lead = max(statuses, key=lambda s: s["round"])
        total = (lead.get("job") or {}).get("rounds") or 0
        evaluated = [h for h in lead["history"] if h.get("accuracy") is not None]
        if (
            total
            and lead["round"] != last_shown
            and (not evaluated or evaluated[-1]["round"] > last_shown or lead["round"] == total)
        ):
            acc = evaluated[-1]["accuracy"] if evaluated else None
            loss = lead["history"][-1]["loss"] if lead["history"] else None
            bar = _bar(lead["round"], total)
            print(
                f"[demo] {bar} round {lead['round']:>4}/{total}  "
                f"loss {_num(loss)}  test accuracy {_num(acc)}  "
                f"{time.monotonic() - t1:6.1f}s",
                flush=True,
            )
            last_shown = lead["round"]
        if all(s["state"] in ("done", "stopped") for s in statuses):
            break
        if time.monotonic() - t1 > a.timeout:
            raise TimeoutError(f"training did not finish within {a.timeout:.0f}s")
        time.sleep(0.5)

    rows = []
    for n, s in zip(nodes, statuses, strict=True):
        rows.append(
            {
                "node": n.node_id[-12:],
                "state": s["state"],
                "rounds": s["round"],
                "accuracy": s["accuracy"],
                "sent/step": _per_step(s, "bytes_sent"),
                "received/step": _per_step(s, "bytes_received"),
                "model_digest": (s["model_digest"] or "-")[:24],
            }
        )
    print(f"\n[demo] trained in {time.monotonic() - t1:.1f}s:\n")
    cols = ["node", "state", "rounds", "accuracy", "sent/step", "received/step", "model_digest"]
    print(table(rows, cols), flush=True)
    for n, s in zip(nodes, statuses, strict=True):
        s["node_id"] = n.node_id
    job = statuses[0].get("job") or {}
    try:
        out = report.render(statuses, a.report, title=f"SPIRT demo: {job.get('task')}")
        print(f"\n[demo] training report: {out.resolve()}", flush=True)
    except (report.ReportError, OSError) as e:
        print(f"\n[demo] no training report: {e}", flush=True)
    digests = {s["model_digest"] for s in statuses}
    accs = [s["accuracy"] for s in statuses]
    same = len(digests) == 1
    good = all(x is not None and x >= a.target for x in accs)
    done = all(s["state"] == "done" for s in statuses)
    print(
        f"\n[demo] every peer done: {done}; equal model digests: {same}; "
        f"accuracy >= {a.target}: {good}",
        flush=True,
    )
    return same and good and done


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
