"""The coordinate-wise trimmed mean: drops the ``trim`` smallest and largest values
per coordinate (or ``floor(beta * n)``; exactly one of the two) and averages the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spirtd.checks import check, integer, number
from spirtd.rules.base import Params, Rule

if TYPE_CHECKING:
    import torch


def _check(params: Mapping[str, Any], n: int) -> Params:
    beta, trim = params.get("beta"), params.get("trim")
    check((beta is None) != (trim is None), "TRIMMEAN needs TRIM or BETA, not both")
    if trim is not None:
        return {"trim": integer(trim, "TRIM", 0, (n - 1) // 2)}
    return {"beta": number(beta, "BETA", 0.0, 0.5, hi_open=True)}


def _module_args(params: Mapping[str, Any]) -> list[Any]:
    if params.get("trim") is not None:
        return ["TRIM", params["trim"]]
    return ["BETA", float(params["beta"])]


def _fallback(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    from spirtd.rules import kernels

    n = len(xs)
    trim = params.get("trim")
    b = trim if trim is not None else math.floor((params.get("beta") or 0.0) * n)
    return kernels.rank_mean(xs, b, n - b - 1), None


RULE = Rule(
    name="trimmed_mean",
    min_peers=lambda f: 2 * f + 1,
    bound="2f+1",
    fallback=_fallback,
    command="SPIRT.TRIMMEAN",
    accepts=frozenset({"beta", "trim"}),
    check=_check,
    module_args=_module_args,
    # An exact count: a fraction f/n can floor to f - 1 in floating point.
    job_params=lambda f, n: {"trim": f},
)
