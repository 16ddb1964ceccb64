"""The (weighted) mean: no Byzantine tolerance at all, so any n >= 1 will do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spirtd.checks import check, number
from spirtd.rules.base import Params, Rule

if TYPE_CHECKING:
    import torch


def _check(params: Mapping[str, Any], n: int) -> Params:
    weights = params.get("weights")
    if weights is None:
        return {}
    weights = tuple(weights)
    check(len(weights) == n, f"WEIGHTS needs {n} values, got {len(weights)}")
    out = tuple(number(w, "weight", 0.0) for w in weights)
    check(max(out) > 0, "weights must have a positive sum")
    return {"weights": out}


def _module_args(params: Mapping[str, Any]) -> list[Any]:
    weights = params.get("weights")
    return [] if weights is None else ["WEIGHTS", *weights]


def _fallback(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    from spirtd.rules import kernels

    return kernels.mean(xs, params.get("weights")), None


RULE = Rule(
    name="mean",
    min_peers=lambda f: 1,
    bound="1",
    fallback=_fallback,
    command="SPIRT.MEAN",
    accepts=frozenset({"weights"}),
    check=_check,
    module_args=_module_args,
    robust=False,
)
