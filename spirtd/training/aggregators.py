"""Aggregation rules by name, with the job's f, and the membership each one needs.

Every rule takes f exactly. The bounds are the usual ones: the Krum family
needs n >= 2f + 3 (Blanchard et al. score each input over its n - f - 2 nearest
neighbours, which needs n - f - 2 >= 1 after removing f); median, trimmed mean,
geometric median and centered clipping need an honest majority, n >= 2f + 1.
``nnm+RULE`` first replaces each input by the mean of its n - f nearest inputs
(Allouah et al., 2023) and then runs RULE; it needs what RULE needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spirtd.redis.store import TensorStore

BASE_RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed", "cclip")
# Centered clipping: radius and iterations; it starts from the previous round's
# aggregate, which every honest peer holds identically.
CCLIP_TAU = 1.0
CCLIP_ITERS = 3


class AggregatorError(ValueError):
    pass


@dataclass(frozen=True)
class Aggregator:
    rule: str
    f: int
    nnm: bool = False

    @classmethod
    def parse(cls, name: str, f: int) -> Aggregator:
        if not isinstance(name, str):
            raise AggregatorError("aggregator: a name is required")
        nnm = name.startswith("nnm+")
        rule = name[4:] if nnm else name
        if rule not in BASE_RULES:
            known = ", ".join([*BASE_RULES, "nnm+RULE"])
            raise AggregatorError(f"aggregator: unknown rule {name!r} (known: {known})")
        return cls(rule, f, nnm)

    @property
    def name(self) -> str:
        return f"nnm+{self.rule}" if self.nnm else self.rule

    def min_peers(self) -> int:
        """The fewest contributors a round may aggregate with this rule and f."""
        if self.rule in ("krum", "multi_krum"):
            return 2 * self.f + 3
        if self.rule == "mean":
            return max(1, self.f + 1) if self.nnm else 1
        return 2 * self.f + 1

    def check_membership(self, n: int) -> None:
        need = self.min_peers()
        if n < need:
            bound = "2f+3" if self.rule in ("krum", "multi_krum") else "2f+1"
            raise AggregatorError(
                f"aggregator {self.name} with f={self.f} needs at least {need} peers "
                f"(n >= {bound}), but the cluster has {n} live member{'s' if n != 1 else ''}"
            )

    async def run(
        self,
        store: TensorStore,
        out: str,
        keys: Sequence[str],
        *,
        previous: str | None,
        scratch: bool = False,
    ) -> Any:
        """Aggregates ``keys`` (already in node-id order) into ``out`` (``scratch``: see
        TensorStore.put)."""
        n = len(keys)
        self.check_membership(n)
        kw: dict[str, Any] = {"scratch": scratch}
        if self.nnm and self.f:
            kw["nnm_f"] = self.f
        if self.rule == "mean":
            return await store.mean(out, keys, **kw)
        if self.rule == "median":
            return await store.median(out, keys, **kw)
        if self.rule == "trimmed_mean":
            # An exact count: a fraction f/n can floor to f - 1 in floating point.
            return await store.trimmed_mean(out, keys, trim=self.f, **kw)
        if self.rule == "krum":
            return await store.krum(out, keys, self.f, m=1, **kw)
        if self.rule == "multi_krum":
            return await store.krum(out, keys, self.f, m=n - self.f, **kw)
        if self.rule == "geomed":
            return await store.geomed(out, keys, **kw)
        assert self.rule == "cclip"
        return await store.cclip(out, keys, CCLIP_TAU, iters=CCLIP_ITERS, start=previous, **kw)
