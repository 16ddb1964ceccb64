"""bench.compression: SPIRT.PACK / SPIRT.UNPACK time and the bytes they save.

For S float32 (default 1M and 10M) and each format (fp16, int8), against one managed
redis-server with the SPIRT module, AOF off, every command SCRATCH (what spirtd does):

* pack_s            SPIRT.PACK of a tensor (round trip included), no residual;
* pack_feedback_s   SPIRT.PACK with BASE and RESIDUAL (an outer round's Δ = θ_r − θ
                    with error feedback: two more inputs read, the residual written);
* unpack_s          SPIRT.UNPACK of the body into a tensor;
* fallback_pack_s, fallback_unpack_s: the same through TensorStore's client-side path
                    (numpy, protocol.compression), for comparison;
* bytes_ratio       body bytes / float32 bytes (fp16: 0.5; int8: 0.25 plus 8 bytes
                    of header per 4096 values).

Times are the best of --repeat runs (medians in "median"). Each row also checks that
the module's and the fallback's decoded bits agree. No targets: figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from bench._util import abest_of, emit, machine, table
from protocol import compression
from spirtd.redis.process import ManagedRedis
from spirtd.redis.store import TensorStore

SIZES = (1_000_000, 10_000_000)
QUICK_SIZES = (100_000,)
FORMATS = ("fp16", "int8")
SOCKET_TIMEOUT_S = 300.0

COLUMNS = [
    "S",
    "format",
    "pack_s",
    "pack_feedback_s",
    "unpack_s",
    "fallback_pack_s",
    "fallback_unpack_s",
    "bytes_ratio",
]


async def bench_row(
    c: aioredis.Redis, module: TensorStore, fallback: TensorStore, S: int, fmt: str, reps: int
) -> dict[str, Any]:
    t: dict[str, dict[str, float]] = {}
    t["pack_s"] = await abest_of(lambda: module.pack("b:d", "b:src", fmt=fmt, scratch=True), reps)
    await c.delete("b:res", "b:res:shape")
    t["pack_feedback_s"] = await abest_of(
        lambda: module.pack("b:d", "b:src", fmt=fmt, base="b:base", residual="b:res", scratch=True),
        reps,
    )
    t["unpack_s"] = await abest_of(
        lambda: module.unpack("b:u", "b:d", fmt=fmt, count=S, scratch=True), reps
    )
    t["fallback_pack_s"] = await abest_of(lambda: fallback.pack("b:fd", "b:src", fmt=fmt), reps)
    t["fallback_unpack_s"] = await abest_of(
        lambda: fallback.unpack("b:fu", "b:d", fmt=fmt, count=S), reps
    )
    agree = (await c.get("b:u")) == (await c.get("b:fu"))
    body = await c.get("b:d")
    row: dict[str, Any] = {"S": S, "format": fmt}
    row.update({k: v["min"] for k, v in t.items()})
    row["bytes_ratio"] = len(body) / (4 * S)
    row["decoded_bits_agree"] = agree
    row["median"] = {k: v["median"] for k, v in t.items()}
    return row


async def run(sizes: tuple[int, ...], repeat: int) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="spirt-bench-", dir="/tmp"))
    server = ManagedRedis(d, logger=logging.getLogger("bench.redis"), admin=True)
    await server.start()
    c = await server.client(socket_timeout=SOCKET_TIMEOUT_S)
    rows: list[dict[str, Any]] = []
    try:
        await c.config_set("appendonly", "no")
        quiet = logging.getLogger("bench.store")
        quiet.setLevel(logging.ERROR)
        module = await TensorStore.open(c)
        assert module.uses_module, "the SPIRT module is not loaded"
        fallback = TensorStore(c, use_module=False, logger=quiet)
        rng = np.random.default_rng(0)
        for S in sizes:
            base = rng.standard_normal(S, dtype=np.float32)
            await module.put("b:base", base, scratch=True)
            delta = rng.standard_normal(S, dtype=np.float32) * np.float32(1e-2)
            await module.put("b:src", base - delta, scratch=True)
            del base, delta
            for fmt in FORMATS:
                reps = max(repeat, 10) if S <= 1_000_000 else repeat
                rows.append(await bench_row(c, module, fallback, S, fmt, reps))
            await c.flushall()
    finally:
        await c.aclose()
        await server.stop()
        shutil.rmtree(d, ignore_errors=True)
    return {
        "bench": "compression",
        "inputs": {
            "S": list(sizes),
            "formats": list(FORMATS),
            "int8_block": compression.BLOCK,
            "repeat": repeat,
            "stat": "min over repeats (median in row.median)",
            "aof": False,
            "scratch": True,
        },
        "rows": rows,
        "machine": machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.compression",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="S = 100k only, for a smoke run")
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement (best is kept)")
    a = p.parse_args()
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    result = asyncio.run(run(QUICK_SIZES if a.quick else SIZES, a.repeat))
    emit(result, a.json, table(result["rows"], COLUMNS))


if __name__ == "__main__":
    main()
