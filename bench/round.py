"""bench.round: one SPIRT training round, phase by phase, against PyTorch DDP.

All figures come from one run, measured side by side on this machine:

1. in-DB: P real spirtd peers (default 4; LocalCluster, ``--profile local``, each
   ``--shard i/P``), each with its managed redis-server with the SPIRT module and
   local functions, train a digits MLP (``hidden`` 13333: 75*h+10 = ~1.0M
   parameters) for R rounds (default 30): per-peer batch B (default 512; a batch
   larger than the peer's shard of digits' 1,437 training images is drawn with
   replacement) split over W = 2 functions per round, mean aggregator, SGD. The job
   is started through the control API; every node's ``GET /v1/train/status`` history
   is read at the end.
   The first --warmup rounds (default 5: function workers start cold, body pages are
   touched for the first time) are discarded. For every later round we take the
   median across nodes of ``duration_s`` and of each phase, then report the median
   across rounds of those per-round medians (``round_s``, ``phases``).
2. client-side: the same P peers and the same job again, but each spirtd is given
   ``--redis-url`` to a plain redis-server of its own (no module; one per peer, on
   a unix socket, with the managed server's persistence settings: AOF everysec, no
   RDB), so averaging, aggregation and the update run in torch inside spirtd and
   every tensor crosses the socket. ``spirtctl status`` must report
   ``redis.module`` false there (true in run 1).
   in_db_reduction = 1 - (averaging + aggregation + update)_in-DB
                         / (averaging + aggregation + update)_client-side
   (per-phase medians as above; target >= 0.90, the paper reports 0.82).
3. DDP: one step of torch DistributedDataParallel (gloo, P processes, MASTER_ADDR
   127.0.0.1, each with cpus/P torch threads like the functions' one thread each)
   on the same model and the same per-process batch of digits: forward, backward
   (with the allreduce) and the optimizer step, timed from a barrier; a step's time
   is the slowest rank's, and ``ddp_step_s`` the median over steps after warm-up.
   ``single_process_step_s``: the same step in one process on the whole batch (P*B).
   Each also reports its fastest step (``step_s_min``): on a shared machine the
   median of a 30 ms step moves with whatever else runs.
   ddp_ratio = round_s / ddp_step_s (target <= 3),
   overhead_ratio = round_s / single_process_step_s.

4. The batch sweep (``--sweep``, default 64, 256 and 1024): steps 1 (a job each on
   step 1's cluster, after its own) and 3 again at each of those per-peer batches, in
   the same run (``by_batch``, with the headline
   batch too, in batch order). A SPIRT round has a cost that does not grow with the batch
   (moving, encrypting, digesting and storing P gradients of the model's size) and
   DDP's step has little, so ddp_ratio falls as the batch grows: the sweep shows
   where the target is met and where it is not.

``time_split``: where a round's time goes, as shares of the in-DB round. The shares
use means over all measured (node, round) pairs so that they add up to 1; ``rest``
is what no phase covers (scheduling between the steps, the wait before the round's
close is seen; negative when phases overlap, e.g. the last peer's publish runs
beside its aggregation). ``dissemination`` is the wait from this peer's gradient
going out to the round closing (the others' gradients arriving, so it includes the
other peers' slower functions), not the bytes' transfer alone. A ``checkpoint``
phase (every [training] checkpoint_every rounds) runs after ``duration_s`` ends and
counts on top of it. Any other phase a history reports is passed through.

CPU: ``cpu_s_per_round`` is the CPU time (user + system) all of the cluster's
processes (spirtd, redis-server, function workers; ``cpu_s_per_round_by_process``)
used per round after the warm-up, and ``cpu_share_of_cores`` that over the cores'
capacity in the same wall time: near 1, the round is bound by the cores, not by a
wait. ``machine_busy`` and ``others_cpu_s_per_round`` say how much the rest of the
(shared) machine took at the same time.

A job in which some node's trainer fails is stopped everywhere and run again on the
same cluster (up to --attempts jobs); the reasons are in ``failed_jobs``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench._util import emit, machine, table
from spirtd.control import ctl
from spirtd.localcluster import LocalCluster, LocalNode, NodeError, all_see, wait_for

PHASES = (
    "functions_s",
    "averaging_s",
    "publish_s",
    "dissemination_s",
    "aggregation_s",
    "update_s",
    "digest_s",
)
# Phases the trainer runs after a round's duration_s ends, before the next round begins
# (a state checkpoint every [training] checkpoint_every rounds).
AFTER_ROUND = ("checkpoint_s",)
# The phases the module moves into the database (in_db_reduction).
IN_DB_PHASES = ("averaging_s", "aggregation_s", "update_s")
# A node's job states while it trains (or has not seen the job yet).
LIVE = {"pending", "running", "syncing"}
# Wall and CPU figures of the rounds after the warm-up (run_job).
JOB_FIGURES = ("wall_round_s", "cpu_s_per_round", "machine_busy", "others_cpu_s_per_round")
TARGET_REDUCTION = 0.90
PAPER_REDUCTION = 0.82
TARGET_DDP_RATIO = 3.0
_PR_SET_PDEATHSIG = 1


# --- SPIRT: a real cluster and one job -------------------------------------------------


def _die_with_parent() -> None:
    # A plain redis-server must not outlive the bench if it is killed hard.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class PlainRedis:
    """A redis-server without the SPIRT module on a unix socket in ``d``, configured
    like spirtd's managed server (AOF everysec, no RDB snapshots) minus the module and
    the ACL user (the socket is mode 0700 in a private temp dir)."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.sock = d / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 15.0) -> PlainRedis:
        import redis

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "daemonize no",
                    f'dir "{self.dir}"',
                    f'logfile "{self.dir / "redis.log"}"',
                    'pidfile ""',
                    "port 0",
                    f'unixsocket "{self.sock}"',
                    "unixsocketperm 700",
                    "appendonly yes",
                    'appendfilename "appendonly.aof"',
                    'appenddirname "appendonlydir"',
                    "appendfsync everysec",
                    'save ""',
                    "auto-aof-rewrite-min-size 1gb",
                ]
            )
            + "\n"
        )
        self.proc = subprocess.Popen(
            ["redis-server", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server in {self.dir} exited with {self.proc.returncode}")
            try:
                c = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1.0)
                c.ping()
                c.close()
                return self
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server in {self.dir} did not answer") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spirtctl_status(node: LocalNode) -> dict[str, Any]:
    """`spirtctl status --json` of a node, through the real CLI."""
    cmd = [sys.executable, "-m", "spirtd.control.ctl", "status", "--json"]
    out = subprocess.run(
        [*cmd, "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def job_body(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "task": "digits",
        "task_options": {"hidden": a.hidden},
        "rounds": a.rounds,
        "batch_size": a.batch,
        "functions_per_round": a.functions,
        "aggregator": "mean",
        "optimizer": "sgd",
        "lr": a.lr,
        "momentum": a.momentum,
        # Evaluation runs on a thread of the daemon: only after the last round, so it
        # never overlaps a measured round.
        "eval_every": a.rounds,
        "seed": 0,
    }


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "other"
    if b"redis-server" in cmd:
        return "redis"
    if b"spirtd.functions.runtime.worker" in cmd:
        return "functions"
    return "spirtd" if b"spirtd" in cmd else "other"


def tree_cpu_s(roots: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of these processes and all their descendants
    that are still running, by kind: spirtd, redis (redis-server) and functions (the
    local runtime's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        kind = _kind(pid)
        out[kind] = out.get(kind, 0.0) + procs[pid][1] / tick
        todo += children.get(pid, [])
    return out


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, sum(v) / tick


class JobFailed(RuntimeError):
    """A node's trainer stopped before the last round (its status says why)."""


def run_job(
    nodes: list[LocalNode], body: dict[str, Any], warmup: int, timeout: float, roots: list[int]
) -> dict:
    """Starts the job on node 0 and follows it to the end; returns every node's status,
    and the wall time and CPU time (of the ``roots`` process trees, and of the whole
    machine) of the rounds after the warm-up (polled, so +- the poll interval)."""
    t0 = time.monotonic()
    started = nodes[0].call("POST", "/v1/train/start", body)
    job_id = started["job"]

    def states() -> tuple[list[dict[str, Any]], list[str]]:
        statuses = [n.call("GET", "/v1/train/status") for n in nodes]
        # A node that has not seen this job yet still shows the previous one.
        return statuses, [
            s["state"] if (s.get("job") or {}).get("id") == job_id else "pending" for s in statuses
        ]

    t_warm: float | None = None
    cpu_warm: dict[str, float] = {}
    mach_warm = (0.0, 0.0)
    while True:
        statuses, st = states()
        if t_warm is None and min(s["round"] for s in statuses) >= warmup and "pending" not in st:
            t_warm = time.monotonic()
            cpu_warm, mach_warm = tree_cpu_s(roots), machine_cpu_s()
        if all(x == "done" for x in st):
            break
        if any(x not in LIVE and x != "done" for x in st):
            # A node's trainer stopped mid-job. It tells nobody, so the others would wait
            # for its gradients (and, below a quorum, forever): stop the job everywhere.
            why = "; ".join(
                f"{n.node_id[-12:]} stopped at round {s['round']}: {s['detail']}"
                for n, s, x in zip(nodes, statuses, st, strict=True)
                if x not in LIVE and x != "done"
            )
            for n, x in zip(nodes, st, strict=True):
                if x in LIVE:
                    with contextlib.suppress(ctl.DaemonError):
                        n.call("POST", "/v1/train/stop", {})
            wait_for(
                lambda: not set(states()[1]) & LIVE - {"pending"}, 60, "the failed job to stop"
            )
            raise JobFailed(why)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the job did not finish in {timeout:.0f}s")
        time.sleep(0.2)
    t_end = time.monotonic()
    cpu_end, mach_end = tree_cpu_s(roots), machine_cpu_s()
    out: dict[str, Any] = {"job": job_id, "statuses": statuses, "wall_s": t_end - t0}
    measured = body["rounds"] - warmup
    # A tiny job can end within one clock tick of its warm-up: then no figures.
    if t_warm is not None and measured > 0 and mach_end[1] > mach_warm[1]:
        busy = mach_end[0] - mach_warm[0]
        by_kind = {k: (v - cpu_warm.get(k, 0.0)) / measured for k, v in cpu_end.items()}
        ours = sum(by_kind.values())
        out |= {
            "wall_round_s": (t_end - t_warm) / measured,
            "cpu_s_per_round": ours,
            "cpu_s_per_round_by_process": {k: round(v, 4) for k, v in sorted(by_kind.items())},
            "machine_busy": busy / (mach_end[1] - mach_warm[1]),
            "others_cpu_s_per_round": max(0.0, busy / measured - ours),
        }
    return out


def phase_names(statuses: list[dict[str, Any]]) -> list[str]:
    """PHASES, then any other phase a history reports (e.g. checkpoint_s, in the rounds
    that write a checkpoint); a round without a phase counts it as 0."""
    seen = {p for s in statuses for h in s["history"] for p in h["phases"]}
    return [*PHASES, *sorted(seen - set(PHASES))]


def per_round(statuses: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """For every round after the warm-up: the median across nodes of duration and phases."""
    names = phase_names(statuses)
    by_round: dict[int, list[dict[str, Any]]] = {}
    for s in statuses:
        for h in s["history"]:
            if h["round"] > warmup:
                by_round.setdefault(h["round"], []).append(h)
    rows = []
    for r in sorted(by_round):
        hs = by_round[r]
        row: dict[str, Any] = {
            "round": r,
            "nodes": len(hs),
            "duration_s": statistics.median(h["duration_s"] for h in hs),
            "wait_s": statistics.median(h["wait_s"] for h in hs),
            "closed_by": sorted({h["closed_by"] for h in hs}),
            "contributors": min(len(h["contributors"]) for h in hs),
        }
        for p in names:
            row[p] = statistics.median(h["phases"].get(p, 0.0) for h in hs)
        rows.append(row)
    return rows


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median across rounds of the per-round medians across nodes."""
    names = [k for k in rows[0] if k.endswith("_s") and k not in ("duration_s", "wait_s")]
    out = {p: statistics.median(r[p] for r in rows) for p in names}
    out["round_s"] = statistics.median(r["duration_s"] for r in rows)
    out["wait_s"] = statistics.median(r["wait_s"] for r in rows)
    return out


def time_split(statuses: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Each phase's share of the round: means over every measured (node, round) pair;
    phases in AFTER_ROUND count on top of duration_s."""
    hs = [h for s in statuses for h in s["history"] if h["round"] > warmup]
    # A phase run after the round's duration ends (before the next round begins) is
    # added to the total, so the shares still add up to 1.
    total = sum(h["duration_s"] + sum(h["phases"].get(p, 0.0) for p in AFTER_ROUND) for h in hs)
    split = {
        p.removesuffix("_s"): sum(h["phases"].get(p, 0.0) for h in hs) / total
        for p in phase_names(statuses)
    }
    split["rest"] = 1.0 - sum(split.values())
    return {k: round(v, 4) for k, v in split.items()}


@dataclass
class Cluster:
    """A started cluster of real peers (see ``spirt_cluster``)."""

    nodes: list[LocalNode]
    servers: list[PlainRedis]
    module: bool  # spirtctl status reports the SPIRT module loaded
    start_s: float

    @property
    def roots(self) -> list[int]:
        """The process trees whose CPU time counts (tree_cpu_s)."""
        return [n.proc.pid for n in self.nodes if n.proc] + [
            r.proc.pid for r in self.servers if r.proc
        ]


@contextlib.contextmanager
def spirt_cluster(peers: int, *, plain_redis: bool = False) -> Iterator[Cluster]:
    """P real spirtd peers (``--profile local``, each ``--shard i/P``, local functions)
    that all see each other alive; with ``plain_redis`` each uses a plain
    redis-server of its own instead of its managed one. Their logs are printed when
    the body fails with a cluster's error; everything is stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="spr-"))
    cluster = LocalCluster(root, 0)
    servers: list[PlainRedis] = []
    try:
        for i in range(peers):
            args = ["--profile", "local", "--shard", f"{i}/{peers}", "--functions", "local"]
            if plain_redis:
                srv = PlainRedis(root / f"redis{i}").start()
                servers.append(srv)
                args += ["--redis-url", srv.url]
            cluster.add_node(args=args, start=False, index=i)
        t0 = time.monotonic()
        cluster.start()
        nodes = cluster.nodes
        everyone = {n.node_id: "alive" for n in nodes}
        wait_for(lambda: all_see(nodes, everyone), 120, "every node to see every other alive")
        start_s = time.monotonic() - t0
        module = [bool(spirtctl_status(n)["redis"]["module"]) for n in nodes]
        if any(module) == plain_redis or len(set(module)) != 1:
            raise RuntimeError(f"spirtctl status reports redis.module {module}")
        yield Cluster(nodes, servers, module[0], start_s)
    except (NodeError, TimeoutError, RuntimeError, subprocess.CalledProcessError):
        for n in cluster.nodes:
            print(f"--- {n.data_dir}/spirtd.log\n{n.log_tail()}", file=sys.stderr)
        raise
    finally:
        codes = cluster.stop()
        if any(c != 0 for c in codes):
            cluster.kill_all()
        for srv in servers:
            srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_job_retrying(
    c: Cluster, body: dict[str, Any], warmup: int, timeout: float, attempts: int, who: str
) -> tuple[dict[str, Any], list[str]]:
    """run_job; a job some node's trainer fails is stopped everywhere and a new one
    is started on the same cluster (rounds without a peer, closed at the deadline,
    would not measure the same thing), up to ``attempts`` jobs. Returns the job and
    the failures' reasons."""
    failed: list[str] = []
    while True:
        try:
            return run_job(c.nodes, body, warmup, timeout, c.roots), failed
        except JobFailed as e:
            failed.append(str(e))
            print(f"[{who}] job failed, running it again: {e}", file=sys.stderr)
            if len(failed) >= attempts:
                raise


def run_spirt(
    a: argparse.Namespace, *, plain_redis: bool, batches: Sequence[int] = ()
) -> list[dict[str, Any]]:
    """One job at --batch and then one at each of ``batches``, one after another on one
    cluster (a cluster start costs more than a tiny job); a result per job, in order."""
    with spirt_cluster(a.peers, plain_redis=plain_redis) as c:
        out = []
        for b in [a.batch, *batches]:
            if b != a.batch:
                print(f"[bench.round] sweep: batch {b} per peer", file=sys.stderr)
            at = argparse.Namespace(**{**vars(a), "batch": b})
            out.append(_measure(at, c, plain_redis))
        return out


def _measure(a: argparse.Namespace, c: Cluster, plain_redis: bool) -> dict[str, Any]:
    """Runs one job of ``a`` on the cluster and reads its figures."""
    job, failed = run_job_retrying(c, job_body(a), a.warmup, a.timeout, a.attempts, "bench.round")
    statuses = job["statuses"]
    rows = per_round(statuses, a.warmup)
    if not rows:
        raise RuntimeError("no rounds after the warm-up")
    med = medians(rows)
    return {
        "redis": "plain redis-server, no module" if plain_redis else "managed, SPIRT module",
        "redis_module": c.module,
        "job": job["job"],
        "params": statuses[0]["job"]["params"],
        "cluster_start_s": round(c.start_s, 2),
        "cpu_s_per_round_by_process": job.get("cpu_s_per_round_by_process"),
        "failed_jobs": failed,
        "job_wall_s": round(job["wall_s"], 2),
        **{k: round(job[k], 4) for k in JOB_FIGURES if k in job},
        "round_s": med["round_s"],
        "wait_s": med["wait_s"],
        "phases": {p.removesuffix("_s"): med[p] for p in med if p not in ("round_s", "wait_s")},
        "time_split": time_split(statuses, a.warmup),
        # Checkpoints run every [training] checkpoint_every rounds: their cost spread
        # over all measured rounds (the median phase above is 0 on most rounds).
        "checkpoint_s_per_round": statistics.mean(r.get("checkpoint_s", 0.0) for r in rows),
        "rounds_not_complete": sum(1 for r in rows if r["closed_by"] != ["complete"]),
        "min_contributors": min(r["contributors"] for r in rows),
        "final_accuracy": [s["accuracy"] for s in statuses],
        "same_model": len({s["model_digest"] for s in statuses}) == 1,
        "per_round": [
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
    }


# --- DDP and one process ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, cfg: dict[str, Any], q: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS=str(cfg["threads"]),
    )
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from spirtd.tasks import Shard, load_task, minibatch

    torch.set_num_threads(cfg["threads"])
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        task = load_task("digits", Shard(rank, world), hidden=cfg["hidden"])
        torch.manual_seed(0)
        model = DistributedDataParallel(task.build_model())  # broadcasts rank 0's params
        if cfg.get("optimizer") == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        else:
            opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
        train = task.train
        rng = np.random.default_rng(rank)
        times = []
        for _ in range(cfg["warmup"] + cfg["steps"]):
            b = train.take(minibatch(len(train), int(rng.integers(2**62)), cfg["batch"]))
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            task.loss(model(b.x), b.y).backward()  # the allreduce overlaps the backward
            opt.step()
            times.append(time.perf_counter() - t0)
        dist.barrier()
        q.put((rank, times, None))
    except Exception as e:  # reported to the parent, which raises
        q.put((rank, [], f"{type(e).__name__}: {e}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def ddp_steps(a: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    world = a.ddp_procs
    threads = max(1, (os.cpu_count() or 1) // world)
    cfg = {
        "hidden": a.hidden,
        "batch": a.batch,
        "steps": a.ddp_steps,
        "warmup": a.ddp_warmup,
        "lr": a.lr,
        "momentum": a.momentum,
        # bench.outer compares with the job's own optimizer (bench.round has none: sgd).
        "optimizer": getattr(a, "optimizer", "sgd"),
        "threads": threads,
    }
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, cfg, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, list[float]] = {}
    try:
        for _ in range(world):
            rank, times, err = q.get(timeout=a.timeout)
            if err is not None:
                raise RuntimeError(f"DDP rank {rank}: {err}")
            results[rank] = times
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    # A step ends when its slowest rank ends (they meet in the allreduce anyway).
    steps = [max(results[r][i] for r in range(world)) for i in range(len(results[0]))]
    measured = steps[a.ddp_warmup :]
    return {
        "procs": world,
        "threads_per_proc": threads,
        "backend": "gloo",
        "optimizer": cfg["optimizer"],
        "step_s": statistics.median(measured),
        "step_s_min": min(measured),
        "steps_s": [round(x, 5) for x in measured],
    }


def single_process_steps(a: argparse.Namespace) -> dict[str, Any]:
    """One process, the whole batch (P*B). Timed with torch's default thread count (one
    per core) and with one thread; on a busy machine the default's threads wait on each
    other, so the faster median is the figure (both are reported)."""
    import torch

    from spirtd.tasks import load_task, minibatch

    task = load_task("digits", hidden=a.hidden)
    train = task.train
    batch = a.batch * a.ddp_procs
    default = torch.get_num_threads()
    by_threads: dict[int, list[float]] = {}
    try:
        for threads in sorted({default, 1}, reverse=True):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = task.build_model()
            opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
            rng = np.random.default_rng(0)
            times = []
            for _ in range(a.ddp_warmup + a.ddp_steps):
                b = train.take(minibatch(len(train), int(rng.integers(2**62)), batch))
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                task.loss(model(b.x), b.y).backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            by_threads[threads] = times[a.ddp_warmup :]
    finally:
        torch.set_num_threads(default)
    med = {t: statistics.median(v) for t, v in by_threads.items()}
    best = min(med, key=lambda t: med[t])
    return {
        "batch": batch,
        "threads": best,
        "step_s": med[best],
        "step_s_min": min(by_threads[best]),
        "step_s_by_threads": {str(t): m for t, m in med.items()},
        "steps_s": [round(x, 5) for x in by_threads[best]],
    }


# --- the run ------------------------------------------------------------------------------


def sweep_point(
    a: argparse.Namespace, in_db: dict[str, Any], ddp: dict[str, Any], single: dict[str, Any]
) -> dict[str, Any]:
    return {
        "batch_per_peer": a.batch,
        "round_s": in_db["round_s"],
        "phases": in_db["phases"],
        "cpu_s_per_round": in_db.get("cpu_s_per_round"),
        "ddp_step_s": ddp["step_s"],
        "ddp_step_s_min": ddp["step_s_min"],
        "ddp_ratio": in_db["round_s"] / ddp["step_s"],
        "single_process_step_s": single["step_s"],
        "overhead_ratio": in_db["round_s"] / single["step_s"],
        "same_model": in_db["same_model"],
        "rounds_not_complete": in_db["rounds_not_complete"],
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    load_before = machine()
    sweep = [b for b in a.sweep if b != a.batch]
    in_db, *points = run_spirt(a, plain_redis=False, batches=sweep)
    (client,) = run_spirt(a, plain_redis=True)
    runs = {"in_db": in_db, "client_side": client}
    ddp = ddp_steps(a)
    single = single_process_steps(a)
    by_batch = [sweep_point(a, in_db, ddp, single)]
    for b, point in zip(sweep, points, strict=True):
        at = argparse.Namespace(**{**vars(a), "batch": b})
        by_batch.append(sweep_point(at, point, ddp_steps(at), single_process_steps(at)))
    by_batch.sort(key=lambda x: x["batch_per_peer"])

    def in_db_sum(ph: dict[str, float]) -> float:
        return sum(ph[p.removesuffix("_s")] for p in IN_DB_PHASES)

    reduction = 1 - in_db_sum(in_db["phases"]) / in_db_sum(client["phases"])
    round_s = in_db["round_s"]
    ddp_ratio = round_s / ddp["step_s"]
    return {
        "bench": "round",
        "peers": a.peers,
        "params": in_db["params"],
        "batch_per_peer": a.batch,
        "functions_per_round": a.functions,
        "rounds": a.rounds,
        "warmup_rounds": a.warmup,
        "stat": "median across rounds (after warmup_rounds) of per-round medians across nodes",
        "round_s": round_s,
        "phases": in_db["phases"],
        "time_split": in_db["time_split"],
        "checkpoint_s_per_round": in_db["checkpoint_s_per_round"],
        # CPU seconds every process of the cluster used per round (after the warm-up),
        # against the cores' capacity per round: near 1 means the round is CPU-bound.
        "cpu_s_per_round": in_db.get("cpu_s_per_round"),
        "cpu_share_of_cores": _share(in_db),
        # Jobs run again because a node's trainer failed (the reasons are in each run).
        "failed_jobs": {k: len(v["failed_jobs"]) for k, v in runs.items()},
        "client_side_round_s": client["round_s"],
        "client_side_cpu_s_per_round": client.get("cpu_s_per_round"),
        "client_side_phases": client["phases"],
        "in_db_phases_sum_s": in_db_sum(in_db["phases"]),
        "client_side_phases_sum_s": in_db_sum(client["phases"]),
        "in_db_reduction": reduction,
        "in_db_reduction_phases": [p.removesuffix("_s") for p in IN_DB_PHASES],
        "ddp_step_s": ddp["step_s"],
        "ddp_ratio": ddp_ratio,
        "single_process_step_s": single["step_s"],
        "overhead_ratio": round_s / single["step_s"],
        "meets_targets": {
            "in_db_reduction": reduction >= TARGET_REDUCTION,
            "ddp_ratio": ddp_ratio <= TARGET_DDP_RATIO,
        },
        # ddp_ratio at every per-peer batch of the sweep (the headline batch included).
        "by_batch": by_batch,
        "ddp_ratio_met_from_batch": next(
            (
                x["batch_per_peer"]
                for i, x in enumerate(by_batch)
                if all(y["ddp_ratio"] <= TARGET_DDP_RATIO for y in by_batch[i:])
            ),
            None,
        ),
        "targets": {
            "in_db_reduction": TARGET_REDUCTION,
            "in_db_reduction_paper": PAPER_REDUCTION,
            "ddp_ratio": TARGET_DDP_RATIO,
        },
        "inputs": {
            "task": "digits mlp",
            "hidden": a.hidden,
            "aggregator": "mean",
            "optimizer": {"name": "sgd", "lr": a.lr, "momentum": a.momentum},
            "functions": "local",
            "profile": "local",
            "eval": "after the last round only",
            "ddp_procs": a.ddp_procs,
            "ddp_steps": a.ddp_steps,
            "ddp_warmup_steps": a.ddp_warmup,
        },
        "in_db": in_db,
        "client_side": client,
        "ddp": ddp,
        "single_process": single,
        "machine": {**machine(), "loadavg_before": load_before["loadavg"]},
    }


def _share(run: dict[str, Any]) -> float | None:
    if "cpu_s_per_round" not in run or run["wall_round_s"] <= 0:
        return None
    return round(run["cpu_s_per_round"] / (run["wall_round_s"] * (os.cpu_count() or 1)), 3)


def render(r: dict[str, Any]) -> str:
    rows = [
        {
            "phase": name,
            "in_db_s": r["phases"][name],
            "client_side_s": r["client_side_phases"].get(name, ""),
            "share_of_round": r["time_split"].get(name, ""),
        }
        for name in r["phases"]
    ]
    rows.append({"phase": "rest", "share_of_round": r["time_split"]["rest"]})
    rows.append(
        {"phase": "round", "in_db_s": r["round_s"], "client_side_s": r["client_side_round_s"]}
    )
    head = (
        f"{r['peers']} peers, {r['params']:,} parameters, batch {r['batch_per_peer']}/peer, "
        f"W={r['functions_per_round']}, {r['rounds']} rounds ({r['warmup_rounds']} discarded); "
        f"{r['stat']}\n"
    )
    tail = (
        f"\nin_db_reduction {r['in_db_reduction']:.3f} (target {TARGET_REDUCTION}, paper "
        f"{PAPER_REDUCTION})\nDDP step {r['ddp_step_s']:.4f}s ({r['ddp']['procs']} procs, gloo): "
        f"ddp_ratio {r['ddp_ratio']:.2f} (target <= {TARGET_DDP_RATIO})\n"
        f"single-process step {r['single_process_step_s']:.4f}s "
        f"(batch {r['single_process']['batch']}): overhead_ratio {r['overhead_ratio']:.1f}\n"
        f"cluster CPU per round {r['cpu_s_per_round']} s in-DB, "
        f"{r['client_side_cpu_s_per_round']} s client-side "
        f"(in-DB: {r['cpu_share_of_cores']} of the {os.cpu_count()} cores' time)\n"
        f"meets_targets {r['meets_targets']}\n"
        "by per-peer batch (same run):\n"
        + table(
            [
                {
                    "batch_per_peer": x["batch_per_peer"],
                    "round_s": x["round_s"],
                    "ddp_step_s": x["ddp_step_s"],
                    "ddp_ratio": round(x["ddp_ratio"], 2),
                    "overhead_ratio": round(x["overhead_ratio"], 2),
                }
                for x in r["by_batch"]
            ],
            ["batch_per_peer", "round_s", "ddp_step_s", "ddp_ratio", "overhead_ratio"],
        )
    )
    return head + table(rows, ["phase", "in_db_s", "client_side_s", "share_of_round"]) + tail


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.round",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=13333, help="digits MLP width (75*h+10 params)")
    p.add_argument("--batch", type=int, default=512, help="per-peer (and per-DDP-process) batch")
    p.add_argument(
        "--sweep",
        default="64,256,1024",
        help="more per-peer batches, comma separated, for by_batch ('' for none)",
    )
    p.add_argument("--functions", type=int, default=2, help="W: functions per round")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first rounds discarded")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--ddp-procs", type=int, help="default: --peers")
    p.add_argument("--ddp-steps", type=int, default=20, help="measured steps (DDP and single)")
    p.add_argument("--ddp-warmup", type=int, default=5, help="steps discarded before those")
    p.add_argument("--timeout", type=float, default=600.0, help="per training job / DDP run")
    p.add_argument(
        "--attempts", type=int, default=5, help="jobs per cluster before a node's failure is fatal"
    )
    a = p.parse_args(argv)
    a.ddp_procs = a.ddp_procs or a.peers
    try:
        a.sweep = sorted({int(x) for x in a.sweep.split(",") if x.strip()})
    except ValueError:
        p.error(f"--sweep must be comma-separated batch sizes, got {a.sweep!r}")
    if a.batch < 1 or any(b < 1 for b in a.sweep):
        p.error("--batch and --sweep batches must be positive")
    if a.peers < 1 or a.ddp_procs < 1 or a.ddp_steps < 1 or a.ddp_warmup < 0:
        p.error("--peers, --ddp-procs and --ddp-steps must be positive")
    if not 0 <= a.warmup < a.rounds:
        p.error("--warmup must be in 0..rounds-1")
    result = run(a)
    emit(result, a.json, render(result))


if __name__ == "__main__":
    main()
