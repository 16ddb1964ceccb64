"""bench.aggregate: aggregation and model updates inside Redis versus inside spirtd.

For each K gradients of S float32 (default K in {4, 8, 16}, S in {1M, 10M}), against
one managed redis-server with the SPIRT module, measured side by side in one run:

* in_db_mean_s      SPIRT.MEAN over the K keys (round trip included; the result is
                    written back to Redis like any output);
* client_mean_s     fetch the K tensors into this process (one MGET), mean them with
                    torch (in-place adds on a thread), store the result (MULTI/EXEC);
* store_fallback_mean_s  the same through TensorStore's client-side path (what spirtd
                    does without the module: WATCH, validation, float64 accumulation);
* numpy_mean_s      the mean of arrays already in memory (numpy; the faster of
                    ``X.mean(0)`` and in-place adds): the memory-bandwidth bound;
* median_s, trimmed_mean_s (beta 0.25), krum_s (f = (K-3)//2, m = 1),
  cclip_s (tau 1, 3 iterations): the robust rules in the database;
* in_db_update_s    SPIRT.SGD with momentum 0.9 on an S-element parameter;
* client_update_s   the same update client-side (fetch param, grad, buffer; torch;
                    store both) and store_fallback_update_s through TensorStore;
* reduction = 1 - in_db_mean_s / client_mean_s (target >= 0.90 at K=8, S=10M, against
  the 82% published for SPIRT), in_db_vs_numpy = in_db_mean_s / numpy_mean_s (target
  <= 2), update_reduction = 1 - in_db_update_s / client_update_s.

Times are the best of --repeat runs (at least 30 for rows of up to 16M floats in
all, where one command is a few ms) (medians are in "median"). AOF is off by default
so disk writes and AOF-rewrite forks do not blur the comparison (--aof turns it on).
Each row also checks that the in-database and client means agree.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import torch

from bench._util import abest_of, best_of, emit, machine, table
from spirtd.redis import tensorfmt
from spirtd.redis.process import ManagedRedis
from spirtd.redis.store import TensorStore

KS = (4, 8, 16)
SIZES = (1_000_000, 10_000_000)
QUICK_KS = (4, 8)
QUICK_SIZES = (100_000, 1_000_000)
LR, MOMENTUM = 0.01, 0.9
SOCKET_TIMEOUT_S = 300.0

COLUMNS = [
    "K",
    "S",
    "in_db_mean_s",
    "client_mean_s",
    "numpy_mean_s",
    "reduction",
    "in_db_vs_numpy",
    "median_s",
    "trimmed_mean_s",
    "krum_s",
    "cclip_s",
    "in_db_update_s",
    "client_update_s",
]


async def put(c: aioredis.Redis, key: str, x: np.ndarray) -> None:
    await c.execute_command(
        "SPIRT.PUT", key, tensorfmt.encode_shape(x.shape), memoryview(x).cast("B")
    )


def _views(raw: list[bytes]) -> list[torch.Tensor]:
    """Tensors over the reply bytes, no copy (nothing here writes into them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [torch.frombuffer(b, dtype=torch.float32) for b in raw]


async def client_mean(c: aioredis.Redis, keys: list[str], out: str) -> torch.Tensor:
    xs = _views(await c.mget(keys))

    def mean() -> torch.Tensor:
        acc = xs[0].clone()
        for x in xs[1:]:
            acc.add_(x)
        return acc.div_(len(xs))

    m = await asyncio.to_thread(mean)
    async with c.pipeline(transaction=True) as p:
        p.set(out, memoryview(m.numpy()).cast("B"))
        p.set(tensorfmt.shape_key(out), str(m.numel()))
        await p.execute()
    return m


async def client_sgd(c: aioredis.Redis, param: str, grad: str, buf: str) -> None:
    raw = await c.mget([param, grad, buf])
    p, g, b = (torch.frombuffer(bytearray(x), dtype=torch.float32) for x in raw)

    def step() -> None:
        b.mul_(MOMENTUM).add_(g)
        p.add_(b, alpha=-LR)

    await asyncio.to_thread(step)
    shape = str(p.numel())
    async with c.pipeline(transaction=True) as pipe:
        pipe.set(param, memoryview(p.numpy()).cast("B"))
        pipe.set(tensorfmt.shape_key(param), shape)
        pipe.set(buf, memoryview(b.numpy()).cast("B"))
        pipe.set(tensorfmt.shape_key(buf), shape)
        await pipe.execute()


def numpy_mean(X: np.ndarray, repeat: int) -> dict[str, float]:
    def loop() -> np.ndarray:
        acc = X[0].copy()
        for x in X[1:]:
            acc += x
        acc /= len(X)
        return acc

    a = best_of(lambda: X.mean(axis=0), repeat)
    b = best_of(loop, repeat)
    return a if a["min"] <= b["min"] else b


async def bench_row(
    c: aioredis.Redis, fallback: TensorStore, X: np.ndarray, K: int, S: int, repeat: int
) -> dict[str, Any]:
    keys = [f"bench:g{i}" for i in range(K)]
    f = (K - 3) // 2
    t: dict[str, dict[str, float]] = {}
    t["in_db_mean_s"] = await abest_of(
        lambda: c.execute_command("SPIRT.MEAN", "bench:db", K, *keys), repeat
    )
    t["client_mean_s"] = await abest_of(lambda: client_mean(c, keys, "bench:cl"), repeat)
    t["store_fallback_mean_s"] = await abest_of(
        lambda: fallback.mean("bench:fb", keys), max(1, repeat // 2)
    )
    t["numpy_mean_s"] = numpy_mean(X[:K], repeat)
    t["median_s"] = await abest_of(
        lambda: c.execute_command("SPIRT.MEDIAN", "bench:r", K, *keys), repeat
    )
    t["trimmed_mean_s"] = await abest_of(
        lambda: c.execute_command("SPIRT.TRIMMEAN", "bench:r", K, *keys, "BETA", 0.25), repeat
    )
    t["krum_s"] = await abest_of(
        lambda: c.execute_command("SPIRT.KRUM", "bench:r", K, *keys, "F", f), repeat
    )
    t["cclip_s"] = await abest_of(
        lambda: c.execute_command("SPIRT.CCLIP", "bench:r", K, *keys, "TAU", 1.0, "ITERS", 3),
        repeat,
    )

    # The in-database and client means must agree, or the timings mean nothing.
    db = np.frombuffer(await c.get("bench:db"), dtype="<f4")
    cl = np.frombuffer(await c.get("bench:cl"), dtype="<f4")
    agree = bool(np.allclose(db, cl, rtol=1e-5, atol=1e-6))

    await put(c, "bench:p", X[0])
    await put(c, "bench:grad", X[1])
    await put(c, "bench:buf", X[2])
    t["in_db_update_s"] = await abest_of(
        lambda: c.execute_command(
            "SPIRT.SGD", "bench:p", "bench:grad", "LR", LR, "MOMENTUM", MOMENTUM, "BUF", "bench:buf"
        ),
        repeat,
    )
    t["client_update_s"] = await abest_of(
        lambda: client_sgd(c, "bench:p", "bench:grad", "bench:buf"), repeat
    )
    t["store_fallback_update_s"] = await abest_of(
        lambda: fallback.sgd("bench:p", "bench:grad", lr=LR, momentum=MOMENTUM, buf="bench:buf"),
        max(1, repeat // 2),
    )

    row: dict[str, Any] = {"K": K, "S": S}
    row.update({k: v["min"] for k, v in t.items()})
    row["reduction"] = 1 - row["in_db_mean_s"] / row["client_mean_s"]
    row["reduction_vs_store_fallback"] = 1 - row["in_db_mean_s"] / row["store_fallback_mean_s"]
    row["in_db_vs_numpy"] = row["in_db_mean_s"] / row["numpy_mean_s"]
    row["update_reduction"] = 1 - row["in_db_update_s"] / row["client_update_s"]
    row["means_agree"] = agree
    row["median"] = {k: v["median"] for k, v in t.items()}
    return row


async def run(
    ks: tuple[int, ...], sizes: tuple[int, ...], repeat: int, aof: bool, threads: int
) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="spirt-bench-", dir="/tmp"))
    server = ManagedRedis(
        d,
        module_args=["THREADS", str(threads)],
        logger=logging.getLogger("bench.redis"),
        admin=True,  # it reconfigures and flushes the server, which spirtd's user may not
    )
    await server.start()
    # redis-py's default 5 s socket timeout is shorter than a 16 x 10M-float round trip
    # (640 MB through one MGET) on a loaded machine; still bounded, far above any step.
    c = await server.client(socket_timeout=SOCKET_TIMEOUT_S)
    rows: list[dict[str, Any]] = []
    try:
        await c.config_set("appendonly", "yes" if aof else "no")
        info = await c.execute_command("SPIRT.INFO")
        module = {
            info[i].decode(): info[i + 1].decode()
            if isinstance(info[i + 1], bytes)
            else info[i + 1]
            for i in range(0, len(info), 2)
        }
        quiet = logging.getLogger("bench.store")
        quiet.setLevel(logging.ERROR)
        fallback = TensorStore(c, use_module=False, logger=quiet)
        rng = np.random.default_rng(0)
        for S in sizes:
            X = rng.random((max(ks), S), dtype=np.float32) - np.float32(0.5)
            for i in range(max(ks)):
                await put(c, f"bench:g{i}", X[i])
            for K in ks:
                # A 1M-float command takes ~2 ms, so one scheduling hiccup lands in
                # every one of a handful of samples: small rows get more repeats
                # (the same number for every figure in the row).
                reps = max(repeat, 30) if K * S <= 16_000_000 else repeat
                rows.append(await bench_row(c, fallback, X, K, S, reps))
            del X
            await c.flushall()
    finally:
        await c.aclose()
        await server.stop()
        shutil.rmtree(d, ignore_errors=True)

    def at(k: int, s: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["K"] == k and r["S"] == s), None)

    key_row = at(8, 10_000_000)
    targets: dict[str, Any] = {
        "reduction_at_K8_S10M": None if key_row is None else key_row["reduction"],
        "reduction_target": 0.90,
        "in_db_vs_numpy_max": max(r["in_db_vs_numpy"] for r in rows),
        "in_db_vs_numpy_target": 2.0,
    }
    if key_row is not None:
        targets["reduction_met"] = key_row["reduction"] >= 0.90
    targets["in_db_vs_numpy_met"] = targets["in_db_vs_numpy_max"] <= 2.0
    return {
        "bench": "aggregate",
        "inputs": {
            "K": list(ks),
            "S": list(sizes),
            "dtype": "float32",
            "repeat": repeat,
            "stat": "min over repeats (median in row.median)",
            "aof": aof,
            "module_threads": threads,
            "module_isa": module.get("isa"),
            "trimmed_beta": 0.25,
            "krum_f": "(K-3)//2",
            "cclip": {"tau": 1.0, "iters": 3},
            "sgd": {"lr": LR, "momentum": MOMENTUM},
        },
        "rows": rows,
        "targets": targets,
        "machine": machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.aggregate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument(
        "--quick", action="store_true", help="small grid (K 4,8; S 100k,1M) for a smoke run"
    )
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement (best is kept)")
    p.add_argument("--aof", action="store_true", help="keep AOF persistence on while measuring")
    p.add_argument("--threads", type=int, default=2, help="module worker threads")
    a = p.parse_args()
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    ks, sizes = (QUICK_KS, QUICK_SIZES) if a.quick else (KS, SIZES)
    result = asyncio.run(run(ks, sizes, a.repeat, a.aof, a.threads))
    emit(result, a.json, table(result["rows"], COLUMNS) + "\n" + str(result["targets"]))


if __name__ == "__main__":
    main()
