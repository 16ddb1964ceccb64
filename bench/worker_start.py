"""bench.worker_start: how long the local runtime takes to have gradient workers ready.

Measured side by side in one run, rounds of each alternating:

* fresh_ms      two workers started as fresh processes (``python -m ...worker``: each
                imports torch and the handler), from nothing to both ready;
* zygote_ms     the same two workers forked from the function's zygote, from nothing
                (the zygote's own start, which imports torch once, included);
* replace_ms    one more worker forked from a zygote that is already up (what a
                crashed or timed-out worker's replacement costs).

A worker counts as ready when it has run its handler's init (gradient.py's first
torch backward) and said so. Two workers per node, as a node's runtime warms them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench._util import machine, summary
from spirtd.functions.runtime.config import GRADIENT_FUNCTION, FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.pool import FunctionPool


async def _two_workers(zygote: bool) -> tuple[float, float | None]:
    spec = FunctionSpec()
    pool = FunctionPool(GRADIENT_FUNCTION, spec, RuntimeConfig(functions={GRADIENT_FUNCTION: spec}))
    pool.zygote.disabled = not zygote
    try:
        t0 = time.perf_counter()
        await pool.prewarm(2)
        both = time.perf_counter() - t0
        if zygote and pool.zygote.starts != 1:
            raise RuntimeError("the workers were not forked from a zygote")
        replace = None
        if zygote:
            t0 = time.perf_counter()
            await pool.prewarm(1)
            replace = time.perf_counter() - t0
        return both, replace
    finally:
        await pool.close()


async def run(rounds: int) -> dict[str, Any]:
    fresh: list[float] = []
    forked: list[float] = []
    replace: list[float] = []
    for _ in range(rounds):
        t, _r = await _two_workers(zygote=False)
        fresh.append(t * 1000)
        t, r = await _two_workers(zygote=True)
        forked.append(t * 1000)
        assert r is not None
        replace.append(r * 1000)
    return {
        "bench": "worker_start",
        "fresh_ms": summary(fresh),
        "zygote_ms": summary(forked),
        "replace_ms": summary(replace),
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.worker_start")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each way")
    args = ap.parse_args()
    result = asyncio.run(run(args.rounds))
    if not args.json:
        for key in ("fresh_ms", "zygote_ms", "replace_ms"):
            s = result[key]
            print(f"{key:12} min {s['min']:8.0f}  median {s['median']:8.0f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
