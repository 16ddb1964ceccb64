"""The geometric median by Weiszfeld's iteration (returns the iterations run)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spirtd.checks import integer, number
from spirtd.rules.base import MAX_ITERS, Params, Rule

if TYPE_CHECKING:
    import torch


def _check(params: Mapping[str, Any], n: int) -> Params:
    return {
        "maxiter": integer(params.get("maxiter", 100), "MAXITER", 1, MAX_ITERS),
        "eps": number(params.get("eps", 1e-6), "EPS", 0.0, 1.0),
    }


def _fallback(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    import torch

    from spirtd.rules.kernels import F32, F64

    maxiter, eps = params["maxiter"], params["eps"]
    x64 = [x.to(F64) for x in xs]
    z = sum(x64[1:], x64[0].clone()) / len(xs)
    d = [float(torch.linalg.vector_norm(x - z)) for x in x64]
    iters = 0
    while iters < maxiter:
        dmax = max(d)
        if dmax == 0.0:
            break
        floor_d = dmax * 1e-12
        w = [1.0 / max(di, floor_d) for di in d]
        total = sum(w)
        znew = torch.zeros_like(z)
        for x, wi in zip(x64, w, strict=True):
            znew.add_(x, alpha=wi / total)
        diff = float(torch.linalg.vector_norm(znew - z))
        nrm = float(torch.linalg.vector_norm(znew))
        z = znew
        d = [float(torch.linalg.vector_norm(x - z)) for x in x64]
        iters += 1
        if diff <= eps * nrm:
            break
    return z.to(F32), iters


RULE = Rule(
    name="geomed",
    min_peers=lambda f: 2 * f + 1,
    bound="2f+1",
    fallback=_fallback,
    command="SPIRT.GEOMED",
    accepts=frozenset({"maxiter", "eps"}),
    check=_check,
    module_args=lambda p: ["MAXITER", p["maxiter"], "EPS", float(p["eps"])],
    reply=int,
)
