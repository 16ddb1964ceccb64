"""Small helpers shared by the benchmarks: timing, machine facts, output.

Every bench prints one JSON object as its last line with ``--json``; timings are taken
side by side in one run. On a shared, noisy machine the best of several runs is the
best estimate of a step's own cost, so ``best_of`` reports the minimum and the median.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def machine() -> dict[str, Any]:
    """Facts to print beside the numbers: the cores and how busy they were."""
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def summary(times: Sequence[float]) -> dict[str, float]:
    return {"min": min(times), "median": statistics.median(times), "runs": len(times)}


def best_of(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Times a synchronous call ``repeat`` times."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


async def abest_of(fn: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    """Times an awaitable factory ``repeat`` times."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table of the given columns, numbers to 4 significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def emit(result: dict[str, Any], as_json: bool, text: str = "") -> None:
    """Prints the human-readable text, or the JSON object as the last line."""
    if as_json:
        print(json.dumps(result))
    else:
        print(text or json.dumps(result, indent=2))
