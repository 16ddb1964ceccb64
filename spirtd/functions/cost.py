"""What a job's function invocations cost: billed GB-seconds, requests and dollars.

Lambda bills each invocation for its duration rounded up to the next millisecond
times the function's configured memory (GB-seconds, with 1 GB = 1024 MB), plus a
price per request. It reports that duration in the ``REPORT`` line of the
invocation's log (``LogType=Tail``); the local runtime writes the same line. The
invoker reads it (``parse_report``) and falls back to the call's wall time when
it is missing, counting that fallback.

Default prices (``LAMBDA_PRICES``): AWS Lambda's published on-demand prices in
us-east-1, first tier (the first 6 billion x86 / 7.5 billion arm64 GB-seconds of
a month): x86_64 $0.0000166667 per GB-second, arm64 $0.0000133334 per
GB-second, both $0.20 per million requests. These are the prices as listed in
2024-2025 (``PRICES_AS_OF``; unchanged since arm64 arrived in September 2021),
not fetched from AWS by this code; the free tier and Savings Plans are ignored.
Other regions, tiers or a function host of one's own: set ``[invoke]
price_gb_s`` and ``price_per_million_requests``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from spirtd.functions.runtime.lambda_errors import LOG_TAIL_BYTES

PRICES_AS_OF = "2025 (AWS Lambda pricing page, us-east-1, first tier)"
ARCHITECTURES = ("x86_64", "arm64")
MB_PER_GB = 1024
# A REPORT's values past these are not Lambda's (15 min runs, 10 GB memory, and
# since August 2025 a cold start's init billed on top): the line is ignored.
MAX_BILLED_MS = 2 * 900_000
MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 10_240
# The log tail Lambda returns is at most 4 KB; its base64 is about 5.5 KB.
MAX_LOG_RESULT_CHARS = 8192
# Rounds whose cost a meter keeps (a job's history is bounded the same way).
MAX_ROUNDS_KEPT = 4096


@dataclass(frozen=True)
class Prices:
    architecture: str
    usd_per_gb_s: float
    usd_per_million_requests: float
    source: str = PRICES_AS_OF

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "usd_per_gb_s": self.usd_per_gb_s,
            "usd_per_million_requests": self.usd_per_million_requests,
            "source": self.source,
        }


LAMBDA_PRICES: dict[str, Prices] = {
    "x86_64": Prices("x86_64", 0.0000166667, 0.20),
    "arm64": Prices("arm64", 0.0000133334, 0.20),
}


def prices_for(
    architecture: str = "x86_64",
    usd_per_gb_s: float | None = None,
    usd_per_million_requests: float | None = None,
) -> Prices:
    """Lambda's published prices for ``architecture``, with either price replaced
    when given (the source then says so)."""
    if architecture not in LAMBDA_PRICES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}")
    base = LAMBDA_PRICES[architecture]
    for name, v in (("price_gb_s", usd_per_gb_s), ("requests", usd_per_million_requests)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: a price must be a finite number >= 0, not {v!r}")
    if usd_per_gb_s is None and usd_per_million_requests is None:
        return base
    return Prices(
        architecture,
        base.usd_per_gb_s if usd_per_gb_s is None else usd_per_gb_s,
        base.usd_per_million_requests
        if usd_per_million_requests is None
        else usd_per_million_requests,
        "configured ([invoke] price_gb_s / price_per_million_requests)",
    )


@dataclass(frozen=True)
class Billed:
    """One invocation as billed: ``reported`` False when the REPORT line was missing
    and ``billed_ms`` is the call's wall time instead."""

    billed_ms: int
    memory_mb: int
    reported: bool = True

    @property
    def mb_ms(self) -> int:
        return self.billed_ms * self.memory_mb


def billed_ms_of(seconds: float) -> int:
    """A duration as Lambda bills it: whole milliseconds, rounded up."""
    return max(0, math.ceil(seconds * 1000 - 1e-9))


_FIELD = re.compile(r"^([A-Za-z ]{1,32}): ([0-9]{1,12}(?:\.[0-9]{1,6})?) (ms|MB)$")


def parse_report(tail: bytes, request_id: str | None = None) -> Billed | None:
    """The billed duration and memory of the last ``REPORT`` line of an invocation's
    log tail (``LogType=Tail``), or None when there is none that makes sense.

    The tail is the function's own output followed by the runtime's lines, so only
    the last REPORT counts (a handler printing one cannot come after it), and with
    ``request_id`` it must name that invocation."""
    text = tail[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")
    start = text.rfind("REPORT RequestId: ")
    if start < 0:
        return None
    line = text[start:].split("\n", 1)[0]
    parts = [p.strip() for p in line.split("\t") if p.strip()]
    rid = parts[0].removeprefix("REPORT RequestId: ").strip()
    if request_id is not None and rid != request_id:
        return None
    values: dict[str, float] = {}
    for p in parts[1:]:
        m = _FIELD.match(p)
        if m:
            values[m.group(1)] = float(m.group(2))
    billed, memory = values.get("Billed Duration"), values.get("Memory Size")
    if billed is None or memory is None:
        return None
    if not (0 <= billed <= MAX_BILLED_MS and MIN_MEMORY_MB <= memory <= MAX_MEMORY_MB):
        return None
    return Billed(int(billed), int(memory))


@dataclass
class Usage:
    """Requests and billed memory-time, kept exact as integer MB-milliseconds."""

    requests: int = 0
    mb_ms: int = 0
    fallbacks: int = 0  # invocations billed by wall time: their REPORT was missing

    def add(self, b: Billed) -> None:
        self.requests += 1
        self.mb_ms += b.mb_ms
        self.fallbacks += not b.reported

    @property
    def gb_s(self) -> float:
        return self.mb_ms / MB_PER_GB / 1000

    def usd(self, prices: Prices) -> float:
        return (
            self.gb_s * prices.usd_per_gb_s
            + self.requests * prices.usd_per_million_requests / 1_000_000
        )

    def to_json(self, prices: Prices) -> dict[str, Any]:
        return {
            "gb_s": round(self.gb_s, 9),
            "requests": self.requests,
            "usd": round(self.usd(prices), 12),
            "prices": prices.to_json(),
            "billed_by_wall_time": self.fallbacks,
        }


class CostMeter:
    """A job's invocations on this peer, per round and in total.

    ``meter.record(r, billed)`` after each ``invoke_round`` (``RoundResult.billed``);
    ``meter.round_json(r)`` for round r's history row, ``meter.total_json()`` for
    the job. Every billed attempt counts, retries and warm-up calls included."""

    def __init__(self, prices: Prices | None = None, max_rounds: int = MAX_ROUNDS_KEPT) -> None:
        self.prices = prices or LAMBDA_PRICES["x86_64"]
        self.total = Usage()
        self._rounds: OrderedDict[int, Usage] = OrderedDict()
        self._max_rounds = max_rounds

    def record(self, round: int | None, billed: Iterable[Billed]) -> None:
        """Adds invocations to the total, and to ``round``'s when given."""
        usage = None
        if round is not None:
            usage = self._rounds.get(round)
            if usage is None:
                usage = self._rounds[round] = Usage()
                while len(self._rounds) > self._max_rounds:
                    self._rounds.popitem(last=False)
        for b in billed:
            self.total.add(b)
            if usage is not None:
                usage.add(b)

    def round_usage(self, round: int) -> Usage:
        return self._rounds.get(round) or Usage()

    def round_json(self, round: int) -> dict[str, Any]:
        return self.round_usage(round).to_json(self.prices)

    def total_json(self) -> dict[str, Any]:
        return self.total.to_json(self.prices)
