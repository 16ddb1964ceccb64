"""bench.cost: what training costs with the functions priced as AWS Lambda, against
an IaaS instance running PyTorch DDP to the same accuracy.

For each (task, per-peer batch B, inner steps H), one job on a cluster of P real
spirtd peers (default 2; LocalCluster, ``--profile local``, each ``--shard i/P``,
local functions, [invoke] memory_mb 1024), Adam at the task's learning rate,
evaluated every round, stopped once the model reaches the task's stated accuracy
(digits 0.95) or after --max-rounds:

* serverless: every invocation's billed duration (the REPORT line's: rounded up
  to 1 ms, a cold start's init included) x the configured memory, summed over all
  peers, priced at Lambda's published prices (spirtd/functions/cost.py; x86_64
  by default). The figures come from the history rows' ``cost`` objects when the
  trainer reports them, else from what each node's embedded runtime billed during
  the job (``functions.billed`` in its status), at its mean per invocation for
  the W x H invocations of each round (``cost_source`` says which).
  ``usd_to_target`` covers the rounds up to the first one whose evaluation
  reached the target; ``*_per_1000_samples`` divide the job's cost by the
  samples its functions computed (P x B x H per round).
* IaaS: one on-demand instance (default c6i.large, 2 vCPUs like this machine,
  us-east-1 Linux at $0.085 per hour as listed in 2025) for the wall time of a
  DDP run to the same accuracy: DDP's step count to the target is that of the
  same synchronous data-parallel Adam on the same global batch P x B, run here in
  one process (the arithmetic DDP does, evaluated after every step); its step
  time is bench.round's DDP gloo baseline (P processes, per-process batch B, each
  with cores/P threads; its SGD step: Adam's extra element-wise work on a few
  thousand parameters is noise). Per-second billing of a running instance
  (``iaas_usd_to_target``); ``iaas_usd_to_target_60s_minimum`` is the same run on
  an instance started for it alone (EC2 bills at least 60 s). The instance's and
  the processes' start and the evaluation are not counted.

``cheaper`` names the cheaper side per row. The functions here run on this
machine's cores, not on Lambda's (a 1,024 MB Lambda gets about 0.6 vCPU), so the
billed durations are what this code takes on these cores, priced as Lambda.

``--mnist-dir DIR`` adds MNIST (IDX files in DIR; never downloaded) at
``--mnist-target``; its IaaS column is empty (bench.round's DDP baseline is
digits-only).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench._util import emit, machine, table
from spirtd.functions.cost import LAMBDA_PRICES, MB_PER_GB, Prices
from spirtd.localcluster import LocalCluster, LocalNode, NodeError, all_see, wait_for

TARGETS = {"digits": 0.95}
DEFAULT_INSTANCE = ("c6i.large", 0.085, "2 vCPU, 4 GiB; us-east-1 Linux on-demand, 2025")
# EC2 bills Linux instances per second, but at least 60 s per start.
EC2_MINIMUM_S = 60.0
LIVE = {"pending", "running", "syncing"}


# --- serverless: a real cluster ----------------------------------------------------------


@contextlib.contextmanager
def cluster(peers: int, extra_args: list[str]) -> Iterator[list[LocalNode]]:
    root = Path(tempfile.mkdtemp(prefix="spc-"))
    c = LocalCluster(root, 0)
    try:
        for i in range(peers):
            args = ["--profile", "local", "--shard", f"{i}/{peers}", "--functions", "local"]
            c.add_node(args=[*args, *extra_args], start=False, index=i)
        c.start()
        everyone = {n.node_id: "alive" for n in c.nodes}
        wait_for(lambda: all_see(c.nodes, everyone), 120, "every node to see every other alive")
        yield c.nodes
    except (NodeError, TimeoutError, RuntimeError):
        for n in c.nodes:
            print(f"--- {n.data_dir}/spirtd.log\n{n.log_tail()}", file=sys.stderr)
        raise
    finally:
        if any(code != 0 for code in c.stop()):
            c.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def billed(node: LocalNode) -> dict[str, int]:
    """What the node's embedded runtime has billed since it started."""
    got = node.call("GET", "/v1/status").get("functions", {}).get("billed")
    if not isinstance(got, dict):
        raise RuntimeError("the node's status has no functions.billed (not --functions local?)")
    return got


def job_body(task: str, batch: int, inner: int, functions: int, a: argparse.Namespace) -> dict:
    body: dict[str, Any] = {
        "task": task,
        "rounds": a.max_rounds,
        "batch_size": batch,
        "functions_per_round": functions,
        "aggregator": "mean",
        "eval_every": 1,
        "seed": 0,
    }
    if inner > 1:
        body["inner_steps"] = inner
    return body


def first_at_target(history: list[dict[str, Any]], target: float) -> int | None:
    for h in history:
        if h.get("accuracy") is not None and h["accuracy"] >= target:
            return int(h["round"])
    return None


def run_job(nodes: list[LocalNode], body: dict, target: float, timeout: float) -> dict[str, Any]:
    """Starts the job, follows it until some node's evaluation reaches ``target`` (or the
    job ends), stops it everywhere and returns every node's final status and billing."""
    before = [billed(n) for n in nodes]
    t0 = time.monotonic()
    job_id = nodes[0].call("POST", "/v1/train/start", body)["job"]

    def statuses() -> list[dict[str, Any]]:
        return [n.call("GET", "/v1/train/status") for n in nodes]

    def state(s: dict[str, Any]) -> str:
        return s["state"] if (s.get("job") or {}).get("id") == job_id else "pending"

    while True:
        st = statuses()
        if any(first_at_target(s["history"], target) for s in st if state(s) != "pending"):
            break
        if all(state(s) not in LIVE for s in st):
            break
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the job did not reach {target} in {timeout:.0f}s")
        time.sleep(0.2)
    wall = time.monotonic() - t0
    for n, s in zip(nodes, st, strict=True):
        if state(s) in LIVE:
            with contextlib.suppress(Exception):
                n.call("POST", "/v1/train/stop", {})
    wait_for(lambda: all(state(s) not in LIVE for s in statuses()), 60, "the job to stop")
    st = statuses()
    after = [billed(n) for n in nodes]
    return {"statuses": st, "before": before, "after": after, "wall_s": wall}


def serverless_row(
    task: str,
    batch: int,
    inner: int,
    peers: int,
    job: dict[str, Any],
    target: float,
    p: Prices,
    functions: int = 1,
) -> dict[str, Any]:
    """The job's cost to the target and per 1,000 samples, over all peers."""
    statuses = job["statuses"]
    reached = [first_at_target(s["history"], target) for s in statuses]
    at = min((r for r in reached if r is not None), default=None)
    rounds = max((len(s["history"]) for s in statuses), default=0)
    rows_with_cost = all("cost" in h for s in statuses for h in s["history"])
    mb_ms_total = mb_ms_target = 0.0
    requests_total = requests_target = 0.0
    for s, b0, b1 in zip(statuses, job["before"], job["after"], strict=True):
        hist = s["history"]
        if rows_with_cost and hist:
            for h in hist:
                mb_ms = h["cost"]["gb_s"] * MB_PER_GB * 1000
                mb_ms_total += mb_ms
                requests_total += h["cost"]["requests"]
                if at is not None and h["round"] <= at:
                    mb_ms_target += mb_ms
                    requests_target += h["cost"]["requests"]
            continue
        # Not reported per round: what the runtime billed over the job, at its mean
        # per invocation for the W x H invocations of each round this node computed
        # up to the target (the job is stopped a little after it: a round's worth of
        # invocations may follow).
        mb_ms = (b1["billed_ms"] - b0["billed_ms"]) * b1["memory_mb"]
        req = b1["invocations"] - b0["invocations"]
        mb_ms_total += mb_ms
        requests_total += req
        if at is not None and req > 0:
            calls = min(req, sum(1 for h in hist if h["round"] <= at) * functions * inner)
            mb_ms_target += mb_ms * calls / req
            requests_target += calls
    samples = rounds * peers * batch * inner
    gb_s = mb_ms_total / MB_PER_GB / 1000

    def usd(mb_ms: float, req: float) -> float:
        return (
            mb_ms / MB_PER_GB / 1000 * p.usd_per_gb_s + req * p.usd_per_million_requests / 1_000_000
        )

    return {
        "task": task,
        "batch": batch,
        "inner_steps": inner,
        "peers": peers,
        "rounds_run": rounds,
        "rounds_to_target": at,
        "accuracy_at_stop": max((s.get("accuracy") or 0.0) for s in statuses),
        "job_wall_s": round(job["wall_s"], 2),
        "requests": int(requests_total),
        "gb_s": round(gb_s, 4),
        "samples": samples,
        "gb_s_per_1000_samples": gb_s / samples * 1000 if samples else None,
        "usd_per_1000_samples": usd(mb_ms_total, requests_total) / samples * 1000
        if samples
        else None,
        "gb_s_to_target": mb_ms_target / MB_PER_GB / 1000 if at is not None else None,
        "usd_to_target": usd(mb_ms_target, requests_target) if at is not None else None,
        "cost_source": "trainer history rows"
        if rows_with_cost
        else "runtime billing, mean per invocation",
    }


# --- IaaS: DDP on one instance -------------------------------------------------------------


def steps_to_target(
    task_name: str, global_batch: int, lr: float, target: float, max_steps: int
) -> int | None:
    """Synchronous data-parallel Adam on a global batch, as DDP computes it, in one
    process: the first step after which the test accuracy reaches ``target``."""
    import torch

    from spirtd.tasks import load_task, minibatch

    task = load_task(task_name)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    train, test = task.train, task.test
    for step in range(1, max_steps + 1):
        b = train.take(minibatch(len(train), int(rng.integers(2**62)), global_batch))
        opt.zero_grad(set_to_none=True)
        task.loss(model(b.x), b.y).backward()
        opt.step()
        with torch.no_grad():
            acc = float((model(test.x).argmax(dim=1) == test.y).float().mean())
        if acc >= target:
            return step
    return None


def ddp_step_s(peers: int, batch: int, timeout: float) -> dict[str, Any]:
    """bench.round's DDP gloo step at this per-process batch (digits MLP, default width)."""
    from bench.round import ddp_steps

    ns = argparse.Namespace(
        ddp_procs=peers,
        hidden=64,
        batch=batch,
        ddp_steps=50,
        ddp_warmup=5,
        lr=0.01,
        momentum=0.0,
        timeout=timeout,
    )
    return ddp_steps(ns)


def iaas_columns(
    row: dict[str, Any], a: argparse.Namespace, ddp: dict[str, Any], steps: int | None
) -> dict[str, Any]:
    per_s = a.instance_usd_per_hour / 3600
    step_s = ddp["step_s"]
    out: dict[str, Any] = {
        "ddp_step_s": round(step_s, 5),
        "ddp_steps_to_target": steps,
        "iaas_usd_per_1000_samples": per_s * step_s / (row["peers"] * row["batch"]) * 1000,
        "iaas_wall_s_to_target": steps * step_s if steps is not None else None,
        "iaas_usd_to_target": per_s * steps * step_s if steps is not None else None,
        # An instance started for this run alone pays EC2's 60 s minimum.
        "iaas_usd_to_target_60s_minimum": per_s * max(EC2_MINIMUM_S, steps * step_s)
        if steps is not None
        else None,
    }
    s, i = row["usd_to_target"], out["iaas_usd_to_target"]
    out["cheaper"] = None if s is None or i is None else ("serverless" if s < i else "iaas")
    out["serverless_over_iaas"] = s / i if s is not None and i else None
    return out


def summary(rows: list[dict[str, Any]], instance: str) -> str:
    judged = [r for r in rows if r.get("cheaper")]
    if not judged:
        return "No row reached the target on both sides: nothing to compare."
    wins = [r for r in judged if r["cheaper"] == "serverless"]
    ratios = ", ".join(
        f"{r['task']} B={r['batch']} H={r['inner_steps']}: {r['serverless_over_iaas']:.1f}x"
        for r in judged
    )
    minimum = [
        r
        for r in judged
        if r.get("iaas_usd_to_target_60s_minimum") is not None
        and r["usd_to_target"] < r["iaas_usd_to_target_60s_minimum"]
    ]
    caveat = (
        f" Only if the instance is started for the run alone (EC2's 60 s minimum charge) is "
        f"serverless cheaper ({len(minimum)} of {len(judged)} rows): these jobs take seconds."
        if minimum
        else ""
    )
    if not wins:
        return (
            f"Serverless is not cheaper than DDP on a running {instance} at any measured "
            f"point: its cost to the target is {ratios} the instance's.{caveat}"
        )
    where = ", ".join(f"{r['task']} B={r['batch']} H={r['inner_steps']}" for r in wins)
    return f"Serverless is cheaper at {where}; serverless/IaaS cost to target: {ratios}.{caveat}"


# --- the run --------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict[str, Any]:
    prices = LAMBDA_PRICES[a.architecture]
    load_before = machine()
    t0 = time.monotonic()
    tasks: list[tuple[str, list[str], float]] = [("digits", [], TARGETS["digits"])]
    if a.mnist_dir:
        tasks.append(("mnist", ["--dataset", f"mnist={a.mnist_dir}"], a.mnist_target))
    rows: list[dict[str, Any]] = []
    for task, extra, target in tasks:
        with cluster(a.peers, extra) as nodes:
            for batch in a.batches:
                for inner in a.inner_steps:
                    print(f"[bench.cost] {task} B={batch} H={inner}", file=sys.stderr)
                    body = job_body(task, batch, inner, a.functions, a)
                    job = run_job(nodes, body, target, a.timeout)
                    rows.append(
                        serverless_row(
                            task, batch, inner, a.peers, job, target, prices, a.functions
                        )
                    )
    ddp_by_batch = {b: ddp_step_s(a.peers, b, a.timeout) for b in a.batches}
    for row in rows:
        if row["task"] == "digits":
            steps = steps_to_target(
                "digits", a.peers * row["batch"], a.lr, TARGETS["digits"], a.max_steps
            )
            row |= iaas_columns(row, a, ddp_by_batch[row["batch"]], steps)
        else:
            row |= {"iaas_usd_to_target": None, "cheaper": None}
    return {
        "bench": "cost",
        "peers": a.peers,
        "functions_per_round": a.functions,
        "prices": prices.to_json(),
        "instance": {
            "type": a.instance,
            "usd_per_hour": a.instance_usd_per_hour,
            "note": a.instance_note,
        },
        "targets": {t: tg for t, _, tg in tasks},
        "rows": rows,
        "summary": summary(rows, a.instance),
        "bench_s": round(time.monotonic() - t0, 1),
        "machine": {**machine(), "loadavg_before": load_before["loadavg"]},
    }


COLUMNS = [
    "task",
    "batch",
    "inner_steps",
    "rounds_to_target",
    "gb_s_per_1000_samples",
    "usd_per_1000_samples",
    "usd_to_target",
    "iaas_usd_to_target",
    "iaas_usd_to_target_60s_minimum",
    "cheaper",
]


def render(r: dict[str, Any]) -> str:
    p = r["prices"]
    head = (
        f"{r['peers']} peers, W={r['functions_per_round']}; Lambda {p['architecture']} "
        f"${p['usd_per_gb_s']}/GB-s + ${p['usd_per_million_requests']}/1M requests; "
        f"IaaS {r['instance']['type']} ${r['instance']['usd_per_hour']}/h\n"
    )
    return head + table(r["rows"], COLUMNS) + f"\n{r['summary']}\n({r['bench_s']} s)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--batches", default="32,64,128", help="per-peer batch sizes")
    p.add_argument("--inner-steps", default="1,10", help="H values (outer rounds)")
    p.add_argument("--functions", type=int, default=1, help="W: functions per inner step")
    p.add_argument("--max-rounds", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=3000, help="DDP steps before giving up")
    p.add_argument("--lr", type=float, default=0.01, help="Adam's (the digits task's default)")
    p.add_argument("--architecture", choices=sorted(LAMBDA_PRICES), default="x86_64")
    p.add_argument("--instance", default=DEFAULT_INSTANCE[0])
    p.add_argument("--instance-usd-per-hour", type=float, default=DEFAULT_INSTANCE[1])
    p.add_argument("--instance-note", default=DEFAULT_INSTANCE[2])
    p.add_argument("--mnist-dir", help="a directory with MNIST's IDX files (never downloaded)")
    p.add_argument("--mnist-target", type=float, default=0.97)
    p.add_argument("--timeout", type=float, default=300.0, help="per job / DDP run")
    a = p.parse_args(argv)
    try:
        a.batches = [int(x) for x in a.batches.split(",") if x.strip()]
        a.inner_steps = [int(x) for x in a.inner_steps.split(",") if x.strip()]
    except ValueError:
        p.error("--batches and --inner-steps are comma-separated integers")
    if not a.batches or min(a.batches) < 1 or not a.inner_steps or min(a.inner_steps) < 1:
        p.error("--batches and --inner-steps must be positive")
    if a.peers < 1 or a.functions < 1 or a.max_rounds < 1:
        p.error("--peers, --functions and --max-rounds must be positive")
    result = run(a)
    emit(result, a.json, render(result))


if __name__ == "__main__":
    main()
