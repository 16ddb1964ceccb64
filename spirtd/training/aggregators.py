"""A training job's aggregation: a registered rule (spirtd.rules), the job's f, and
whether nearest-neighbour mixing runs first.

Every rule takes f exactly and says the n it needs for it (spirtd/rules/). ``nnm+RULE``
first replaces each input by the mean of its n - f nearest inputs (Allouah et al.,
2023) and then runs RULE: it needs what RULE needs, and at least f + 1 inputs so that
n - f >= 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spirtd import rules
from spirtd.redis.store import TensorStore
from spirtd.rules.base import Rule

NNM_PREFIX = "nnm+"


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
        nnm = name.startswith(NNM_PREFIX)
        rule = name[len(NNM_PREFIX) :] if nnm else name
        if rule not in rules.names():
            known = ", ".join([*rules.names(), f"{NNM_PREFIX}RULE"])
            raise AggregatorError(f"aggregator: unknown rule {name!r} (known: {known})")
        return cls(rule, f, nnm)

    @property
    def name(self) -> str:
        return f"{NNM_PREFIX}{self.rule}" if self.nnm else self.rule

    @property
    def spec(self) -> Rule:
        return rules.get(self.rule)

    @property
    def keeps_previous(self) -> bool:
        """The job keeps the previous round's aggregate in its state (and checkpoints)."""
        return self.spec.keeps_previous

    def min_peers(self) -> int:
        """The fewest contributors a round may aggregate with this rule and f."""
        need = self.spec.min_peers(self.f)
        return max(need, self.f + 1) if self.nnm else need

    def check_membership(self, n: int) -> None:
        need = self.min_peers()
        if n < need:
            spec = self.spec
            bound = "f+1" if self.nnm and need > spec.min_peers(self.f) else spec.bound
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
        TensorStore.put); ``previous`` is the last aggregate, for a rule that keeps it."""
        n = len(keys)
        self.check_membership(n)
        spec = self.spec
        kw: dict[str, Any] = {"scratch": scratch, **spec.job_params(self.f, n)}
        if self.nnm and self.f:
            kw["nnm_f"] = self.f
        if spec.keeps_previous:
            kw["start"] = previous
        return await store.aggregate(spec.name, out, keys, **kw)
