"""Centered clipping (Karimireddy et al., 2021): from a start point (the previous
round's aggregate, which every honest peer holds identically), ``iters`` steps of the
mean of the inputs' differences, each clipped to radius ``tau``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spirtd.checks import check, integer, number
from spirtd.rules.base import MAX_ITERS, Params, Rule

if TYPE_CHECKING:
    import torch

# What a training job runs it with.
JOB_TAU = 1.0
JOB_ITERS = 3


def _check(params: Mapping[str, Any], n: int) -> Params:
    tau = number(params.get("tau", 0.0), "TAU", 0.0)
    check(tau > 0, "TAU must be positive")
    return {"tau": tau, "iters": integer(params.get("iters", 1), "ITERS", 1, MAX_ITERS)}


def _fallback(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    import torch

    from spirtd.rules.kernels import F32, F64

    tau, iters = params["tau"], params["iters"]
    x64 = [x.to(F64) for x in xs]
    n = len(xs)
    v = start.to(F64) if start is not None else torch.zeros(xs[0].numel(), dtype=F64)
    for _ in range(iters):
        step = torch.zeros_like(v)
        for x in x64:
            diff = x - v
            dist = float(torch.linalg.vector_norm(diff))
            c = tau / dist if dist > 0.0 and tau < dist else 1.0
            step.add_(diff, alpha=c / n)
        v = v + step
    return v.to(F32), None


RULE = Rule(
    name="cclip",
    min_peers=lambda f: 2 * f + 1,
    bound="2f+1",
    fallback=_fallback,
    command="SPIRT.CCLIP",
    accepts=frozenset({"tau", "iters"}),
    check=_check,
    module_args=lambda p: ["TAU", float(p["tau"]), "ITERS", p["iters"]],
    job_params=lambda f, n: {"tau": JOB_TAU, "iters": JOB_ITERS},
    keeps_previous=True,
)
