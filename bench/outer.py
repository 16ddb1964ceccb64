"""bench.outer: outer rounds (H inner steps per round) and compressed pseudo-gradients
against synchronous rounds and a torch DDP step, in one run (issue 23).

Modes (``--mode``), each on one cluster of P real spirtd peers (default 4; bench.round's
cluster: ``--profile local``, each ``--shard i/P``, local functions, the managed Redis
with the SPIRT module), one job after another:

``matrix`` (default): the digits MLP at ``hidden`` 13333 (75*h+10 = ~1.0M parameters),
  per-peer batch 64, W = 2 functions per inner step, the mean rule, the digits task's
  inner optimizer (adam, lr 0.01) and outer optimizer (the task's outer_lr and
  outer_momentum), for every H in --inner-steps (1, 10, 50) and every format in
  --compression (none, fp16, int8). Every job runs the same number of inner steps per
  peer (--steps, default 500: 500 rounds at H = 1, 50 at H = 10, 10 at H = 50), so the
  same samples per peer. The model is evaluated after the last round only. Per row:

  - ``step_s``: wall time per inner step after the warm-up (the first ceil(--warmup-steps
    / H) rounds, at least one): from the history's ``closed_at`` of the last warm-up
    round to that of the last round, over the inner steps between; median across peers.
  - ``ddp_step_s``: bench.round's DDP step (gloo, P processes, the same model, per-process
    batch and optimizer), measured once in the same run; ``step_ddp_ratio`` = step_s /
    ddp_step_s.
  - ``bytes_sent_per_step``, ``bytes_received_per_step``: the history rows' wire bytes
    (this node's peer-link counters between round closes: bodies and every other
    message, heartbeats included) of the measured rounds, per inner step; median across
    peers. ``bytes_ratio_to_h1_none``: this row's sent + received per step over H = 1
    none's. ``body_bytes``: one published body's exact size in this format.
  - ``cpu_s_per_step``: CPU seconds of every process of the cluster (spirtd, Redis,
    function workers) per inner step after the warm-up (bench.round.tree_cpu_s).
  - ``accuracy``: the final test accuracy (the lowest across peers; with ``same_model``
    true they are one model), ``accuracy_delta``: minus H = 1 none's.

  ``targets``: H = 10 int8 step_ddp_ratio <= 1.0; H = 10 int8 wire bytes per step <=
  1/30 of H = 1 none's (sent + received); every row's accuracy at most 1 point below
  H = 1 none's; int8 at most 0.5 point below none at the same H. A target that is
  missed reads false; a row that is absent (its format failed) makes its targets null.

``tune``: the outer optimizer at H = --tune-h (10), compression none, a smaller run
  (--tune-steps inner steps, the task's default hidden size unless --hidden is given):
  outer_lr in --outer-lrs (0.5, 0.7, 1.0) x outer_momentum in --outer-momenta (0.0, 0.9).
  Evaluated every round; per row the final accuracy, the final round's training loss
  and the steps and seconds to --target.

``time_to``: the digits task as `spirtctl train start --task digits` runs it (its
  default hidden size and job settings), with H in --inner-steps (default 1, 5, 10) x
  --compression (default none, int8), up to --max-steps inner steps each, evaluated
  every --eval-steps inner steps: ``time_to_target_s`` is from the start request to the
  close of the first evaluated round at which every peer's accuracy is >= --target
  (0.95), ``steps_to_target`` its inner steps; null when not reached.

A job in which some node's trainer fails is stopped everywhere and run again on the
same cluster (up to --attempts jobs); a format whose jobs keep failing is reported in
``failed`` and left out of the rows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench._util import emit, machine, table
from bench.round import Cluster, JobFailed, ddp_steps, run_job_retrying, spirt_cluster
from protocol.compression import encoded_size
from spirtd.tasks.digits import DigitsTask

MATRIX_HIDDEN = 13333
TARGET_STEP_DDP_RATIO = 1.0
TARGET_BYTES_FRACTION = 1 / 30
TARGET_ACCURACY_POINTS = 0.01
TARGET_INT8_POINTS = 0.005


@dataclass(frozen=True)
class Setting:
    """What changes from one job of a run to the next."""

    inner_steps: int
    compression: str
    outer_lr: float
    outer_momentum: float

    def label(self) -> str:
        return (
            f"H={self.inner_steps} {self.compression} outer {self.outer_lr}/{self.outer_momentum}"
        )


def job_body(a: argparse.Namespace, s: Setting, rounds: int, eval_every: int) -> dict[str, Any]:
    """The job as the control API takes it; what is None here is left to the task's
    defaults (as `spirtctl train start --task digits` would)."""
    body: dict[str, Any] = {
        "task": "digits",
        "rounds": rounds,
        "inner_steps": s.inner_steps,
        "compression": s.compression,
        "eval_every": eval_every,
        "aggregator": "mean",
        "seed": a.seed,
    }
    if s.inner_steps > 1:  # a plain job has no outer step (and refuses its settings)
        body |= {"outer_lr": s.outer_lr, "outer_momentum": s.outer_momentum}
    if a.hidden is not None:
        body["task_options"] = {"hidden": a.hidden}
    for k in ("batch_size", "functions_per_round", "optimizer", "lr"):
        v = getattr(a, k)
        if v is not None:
            body[k] = v
    return body


def _median_per_peer(statuses: list[dict[str, Any]], fn: Any) -> float | None:
    """The median over the peers that ran the measured rounds (``fn`` says None for a
    peer that synced past one of them, under load); None if none did."""
    values = [v for v in (fn(s["history"]) for s in statuses) if v is not None]
    return statistics.median(values) if values else None


def accuracy_trace(statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every evaluated round: inner steps, the lowest accuracy across peers and the
    latest close across peers (wall clock)."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for s in statuses:
        for h in s["history"]:
            if h["accuracy"] is not None:
                by_round.setdefault(h["round"], []).append(h)
    return [
        {
            "round": r,
            "steps": r * hs[0]["inner_steps"],
            "accuracy": min(h["accuracy"] for h in hs),
            "closed_at": max(h["closed_at"] for h in hs),
            "peers": len(hs),
        }
        for r, hs in sorted(by_round.items())
    ]


def run_setting(
    a: argparse.Namespace,
    c: Cluster,
    s: Setting,
    steps: int,
    eval_steps: int | None,
) -> dict[str, Any]:
    """One job of ``steps`` inner steps per peer at ``s``; its row."""
    h = s.inner_steps
    rounds = max(1, steps // h)
    eval_every = rounds if eval_steps is None else max(1, eval_steps // h)
    warmup = min(rounds - 1, max(1, math.ceil(a.warmup_steps / h)))
    body = job_body(a, s, rounds, eval_every)
    print(f"[bench.outer] {s.label()}: {rounds} rounds", file=sys.stderr)
    t_start = time.time()
    job, failed = run_job_retrying(c, body, warmup, a.timeout, a.attempts, "bench.outer")
    statuses = job["statuses"]
    measured = (rounds - warmup) * h

    def step_s(hist: list[dict[str, Any]]) -> float | None:
        at = {x["round"]: x["closed_at"] for x in hist}
        if rounds not in at or warmup not in at:
            return None  # it took a state past one of them: it did not run that span
        return (at[rounds] - at[warmup]) / measured

    def per_step(field: str) -> Any:
        def of(hist: list[dict[str, Any]]) -> float | None:
            span = [x[field] for x in hist if warmup < x["round"] <= rounds]
            return sum(span) / measured if len(span) == rounds - warmup else None

        return of

    trace = accuracy_trace(statuses)
    reached = next((t for t in trace if t["accuracy"] >= a.target and t["peers"] == a.peers), None)
    accs = [st["accuracy"] for st in statuses]
    last = [st["history"][-1] for st in statuses]
    row: dict[str, Any] = {
        "inner_steps": h,
        "compression": s.compression,
        "outer_lr": s.outer_lr,
        "outer_momentum": s.outer_momentum,
        "rounds": rounds,
        "inner_steps_per_peer": rounds * h,
        "warmup_rounds": warmup,
        "params": statuses[0]["job"]["params"],
        "body_bytes": encoded_size(s.compression, statuses[0]["job"]["params"]),
        "job_wall_s": round(job["wall_s"], 2),
        "failed_jobs": failed,
        "same_model": len({st["model_digest"] for st in statuses}) == 1,
        "accuracy": None if None in accs else min(accs),
        "final_loss": statistics.median(x["loss"] for x in last if x["loss"] is not None)
        if any(x["loss"] is not None for x in last)
        else None,
        "rounds_not_complete": sum(
            1 for st in statuses for x in st["history"] if x["closed_by"] != "complete"
        ),
    }
    if warmup >= 1:  # the measured window starts at a round's close
        row |= {
            "step_s": _median_per_peer(statuses, step_s),
            "bytes_sent_per_step": _median_per_peer(statuses, per_step("bytes_sent")),
            "bytes_received_per_step": _median_per_peer(statuses, per_step("bytes_received")),
            "cpu_s_per_step": job["cpu_s_per_round"] / h if "cpu_s_per_round" in job else None,
            "machine_busy": job.get("machine_busy"),
        }
    if eval_steps is not None:
        row |= {
            "time_to_target_s": None if reached is None else reached["closed_at"] - t_start,
            "steps_to_target": None if reached is None else reached["steps"],
            "trace": [
                {"steps": t["steps"], "accuracy": t["accuracy"], "s": t["closed_at"] - t_start}
                for t in trace
            ],
        }
    return row


def run_settings(
    a: argparse.Namespace, settings: list[Setting], steps: int, eval_steps: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Every setting on one cluster: (rows, failures, cluster facts). A setting whose
    jobs keep failing is a failure, and the others still run."""
    rows, failures = [], []
    with spirt_cluster(a.peers) as c:
        for s in settings:
            try:
                rows.append(run_setting(a, c, s, steps, eval_steps))
            except (JobFailed, TimeoutError) as e:
                failures.append({"setting": s.label(), "error": str(e)})
                print(f"[bench.outer] {s.label()} failed: {e}", file=sys.stderr)
        return rows, failures, {"cluster_start_s": round(c.start_s, 2), "module": c.module}


def _find(rows: list[dict[str, Any]], h: int, comp: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["inner_steps"] == h and r["compression"] == comp), None)


def _wire(r: dict[str, Any]) -> float | None:
    sent, received = r.get("bytes_sent_per_step"), r.get("bytes_received_per_step")
    return None if sent is None or received is None else sent + received


def matrix_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = _find(rows, 1, "none")
    h10 = _find(rows, 10, "int8")
    out: dict[str, Any] = {
        "step_ddp_ratio_h10_int8": TARGET_STEP_DDP_RATIO,
        "bytes_fraction_h10_int8": TARGET_BYTES_FRACTION,
        "accuracy_points_below_h1_none": TARGET_ACCURACY_POINTS * 100,
        "int8_points_below_none": TARGET_INT8_POINTS * 100,
        "h10_int8_step_ddp_ratio_met": None,
        "h10_int8_bytes_met": None,
        "accuracy_within_1pt_met": None,
        "int8_within_half_pt_met": None,
    }
    if h10 is not None and "step_ddp_ratio" in h10:
        out["h10_int8_step_ddp_ratio_met"] = h10["step_ddp_ratio"] <= TARGET_STEP_DDP_RATIO
    if base is not None and h10 is not None and "bytes_ratio_to_h1_none" in h10:
        out["h10_int8_bytes_met"] = h10["bytes_ratio_to_h1_none"] <= TARGET_BYTES_FRACTION
    if base is not None and base["accuracy"] is not None:
        accs = [r["accuracy"] for r in rows]
        out["accuracy_within_1pt_met"] = None not in accs and all(
            x >= base["accuracy"] - TARGET_ACCURACY_POINTS for x in accs
        )
    pairs = [(_find(rows, r["inner_steps"], "none"), r) for r in rows if r["compression"] == "int8"]
    if pairs and all(n is not None and n["accuracy"] is not None for n, _ in pairs):
        out["int8_within_half_pt_met"] = all(
            q["accuracy"] is not None and q["accuracy"] >= n["accuracy"] - TARGET_INT8_POINTS  # type: ignore[index]
            for n, q in pairs
        )
    return out


def run_matrix(a: argparse.Namespace) -> dict[str, Any]:
    settings = [
        Setting(h, comp, a.outer_lr, a.outer_momentum)
        for h in a.inner_steps
        for comp in a.compression
    ]
    rows, failures, facts = run_settings(a, settings, a.steps, None)
    ddp = ddp_steps(
        argparse.Namespace(
            hidden=a.hidden,
            batch=a.batch_size,
            ddp_steps=a.ddp_steps,
            ddp_warmup=a.ddp_warmup,
            lr=a.lr,
            momentum=0.0,
            optimizer=a.optimizer,
            ddp_procs=a.peers,
            timeout=a.timeout,
        )
    )
    base = _find(rows, 1, "none")
    for r in rows:
        if r.get("step_s") is not None:
            r["ddp_step_s"] = ddp["step_s"]
            r["step_ddp_ratio"] = r["step_s"] / ddp["step_s"]
        wire, base_wire = _wire(r), (_wire(base) if base is not None else None)
        if wire is not None and base_wire:
            r["bytes_ratio_to_h1_none"] = wire / base_wire
        ok = base is not None and None not in (r["accuracy"], base["accuracy"])
        r["accuracy_delta"] = r["accuracy"] - base["accuracy"] if ok else None  # type: ignore[index]
    return {
        "ddp": ddp,
        "rows": rows,
        "targets": matrix_targets(rows),
        "failed": failures,
        **facts,
    }


def run_tune(a: argparse.Namespace) -> dict[str, Any]:
    settings = [Setting(a.tune_h, "none", lr, m) for lr in a.outer_lrs for m in a.outer_momenta]
    rows, failures, facts = run_settings(a, settings, a.tune_steps, a.tune_h)
    ranked = sorted(
        (r for r in rows if r["accuracy"] is not None and r["same_model"]),
        key=lambda r: (-r["accuracy"], r["final_loss"] if r["final_loss"] is not None else 1e9),
    )
    best = ranked[0] if ranked else None
    return {
        "rows": rows,
        "best": None
        if best is None
        else {"outer_lr": best["outer_lr"], "outer_momentum": best["outer_momentum"]},
        "rank_by": "final accuracy (lowest across peers), then final training loss",
        "failed": failures,
        **facts,
    }


def run_time_to(a: argparse.Namespace) -> dict[str, Any]:
    settings = [
        Setting(h, comp, a.outer_lr, a.outer_momentum)
        for h in a.inner_steps
        for comp in a.compression
    ]
    rows, failures, facts = run_settings(a, settings, a.max_steps, a.eval_steps)
    done = [r for r in rows if r["time_to_target_s"] is not None and r["same_model"]]
    fastest = min(done, key=lambda r: r["time_to_target_s"]) if done else None
    return {
        "rows": rows,
        "fastest": None
        if fastest is None
        else {"inner_steps": fastest["inner_steps"], "compression": fastest["compression"]},
        "failed": failures,
        **facts,
    }


MATRIX_COLUMNS = [
    "inner_steps",
    "compression",
    "step_s",
    "step_ddp_ratio",
    "bytes_sent_per_step",
    "bytes_received_per_step",
    "bytes_ratio_to_h1_none",
    "cpu_s_per_step",
    "accuracy",
    "accuracy_delta",
    "same_model",
]
TUNE_COLUMNS = [
    "outer_lr",
    "outer_momentum",
    "accuracy",
    "final_loss",
    "steps_to_target",
    "time_to_target_s",
    "step_s",
    "same_model",
]
TIME_TO_COLUMNS = [
    "inner_steps",
    "compression",
    "time_to_target_s",
    "steps_to_target",
    "accuracy",
    "step_s",
    "bytes_sent_per_step",
    "same_model",
]


def render(r: dict[str, Any]) -> str:
    cols = {"matrix": MATRIX_COLUMNS, "tune": TUNE_COLUMNS, "time_to": TIME_TO_COLUMNS}[r["mode"]]
    head = (
        f"{r['mode']}: {r['peers']} peers, hidden {r['inputs']['hidden']}, "
        f"batch {r['inputs']['batch_size']}/peer, load before {r['machine']['loadavg_before']}\n"
    )
    text = head + (table(r["rows"], cols) if r["rows"] else "no rows: every setting failed")
    if "ddp" in r:
        text += f"\nDDP step {r['ddp']['step_s']:.4f}s ({r['ddp']['procs']} procs, gloo)"
    for k in ("targets", "best", "fastest", "failed"):
        if r.get(k):
            text += f"\n{k}: {r[k]}"
    return text


def run(a: argparse.Namespace) -> dict[str, Any]:
    load_before = machine()
    t0 = time.monotonic()
    body = {"matrix": run_matrix, "tune": run_tune, "time_to": run_time_to}[a.mode](a)
    defaults = DigitsTask.job_defaults()
    return {
        "bench": "outer",
        "mode": a.mode,
        "peers": a.peers,
        "stat": "per row: median across peers; step_s after warm-up rounds",
        "inputs": {
            "task": "digits mlp",
            "hidden": a.hidden if a.hidden is not None else "task default (64)",
            "batch_size": a.batch_size or defaults["batch_size"],
            "functions_per_round": a.functions_per_round or defaults["functions_per_round"],
            "optimizer": a.optimizer or defaults["optimizer"],
            "lr": a.lr or defaults["lr"],
            "aggregator": "mean",
            "functions": "local",
            "steps": {"matrix": a.steps, "tune": a.tune_steps, "time_to": a.max_steps}[a.mode],
            "warmup_steps": a.warmup_steps,
            "target_accuracy": a.target,
            "seed": a.seed,
        },
        **body,
        "bench_wall_s": round(time.monotonic() - t0, 1),
        "machine": {**machine(), "loadavg_before": load_before["loadavg"]},
    }


def _list(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.outer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DigitsTask.job_defaults()
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--mode", choices=("matrix", "tune", "time_to"), default="matrix")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument(
        "--hidden", type=int, help=f"digits MLP width (matrix: {MATRIX_HIDDEN}; else the task's)"
    )
    p.add_argument("--batch", dest="batch_size", type=int, help="per-peer batch (matrix: 64)")
    p.add_argument("--functions", dest="functions_per_round", type=int, help="W (matrix: 2)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="inner (default: the task's)")
    p.add_argument("--lr", type=float, help="inner lr (default: the task's)")
    p.add_argument("--outer-lr", type=float, default=d["outer_lr"])
    p.add_argument("--outer-momentum", type=float, default=d["outer_momentum"])
    p.add_argument("--inner-steps", default=None, help="H values (matrix 1,10,50; time_to 1,5,10)")
    p.add_argument("--compression", default=None, help="formats (matrix none,fp16,int8)")
    p.add_argument("--steps", type=int, default=500, help="matrix: inner steps per peer")
    p.add_argument("--warmup-steps", type=int, default=5, help="inner steps discarded (>= 1 round)")
    p.add_argument("--seed", type=int, default=0, help="the jobs' seed (init and minibatches)")
    p.add_argument("--target", type=float, default=0.95, help="accuracy for *_to_target")
    p.add_argument("--tune-h", type=int, default=10)
    p.add_argument("--tune-steps", type=int, default=300)
    p.add_argument("--outer-lrs", default="0.5,0.7,1.0")
    p.add_argument("--outer-momenta", default="0.0,0.9")
    p.add_argument("--max-steps", type=int, default=400, help="time_to: inner steps per job")
    p.add_argument("--eval-steps", type=int, default=10, help="time_to: evaluate every N steps")
    p.add_argument("--ddp-steps", type=int, default=20)
    p.add_argument("--ddp-warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900.0, help="per training job / DDP run")
    p.add_argument("--attempts", type=int, default=3, help="jobs per setting before it fails")
    a = p.parse_args(argv)
    if a.mode == "matrix":
        a.hidden = a.hidden or MATRIX_HIDDEN
        a.batch_size = a.batch_size or 64
        a.functions_per_round = a.functions_per_round or 2
        a.optimizer = a.optimizer or d["optimizer"]
        a.lr = a.lr or d["lr"]
    default_h = {"matrix": "1,10,50", "tune": "10", "time_to": "1,5,10"}[a.mode]
    default_c = {"matrix": "none,fp16,int8", "tune": "none", "time_to": "none,int8"}[a.mode]
    try:
        a.inner_steps = _list(int, a.inner_steps or default_h)
        a.compression = _list(str, a.compression or default_c)
        a.outer_lrs = _list(float, a.outer_lrs)
        a.outer_momenta = _list(float, a.outer_momenta)
    except ValueError as e:
        p.error(f"a comma-separated list does not parse: {e}")
    if a.peers < 1 or min(a.inner_steps) < 1 or a.steps < max(a.inner_steps):
        p.error("--peers, --inner-steps must be positive and --steps >= the largest H")
    result = run(a)
    emit(result, a.json, "" if a.json else render(result))


if __name__ == "__main__":
    main()
