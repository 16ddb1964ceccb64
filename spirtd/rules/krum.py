"""Krum and multi-Krum (Blanchard et al., 2017).

Each input is scored by its squared distances to its n - f - 2 nearest others; the m
best-scored inputs are averaged (Krum: m = 1; multi-Krum as a job runs it: m = n - f).
The score needs n - f - 2 >= 1 after removing f, hence n >= 2f + 3. Both rules run the
same command, SPIRT.KRUM, which returns the chosen input positions, best first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spirtd.checks import check, integer
from spirtd.rules.base import MAX_INPUTS, Params, Rule

if TYPE_CHECKING:
    import torch


def _check(params: Mapping[str, Any], n: int) -> Params:
    f = integer(params.get("f", 0), "F", 0, MAX_INPUTS)
    m = integer(params.get("m", 1), "M", 1, MAX_INPUTS)
    check(n > 2 * f + 2, f"too few inputs for f: Krum needs n > 2f+2 (n={n}, f={f})")
    check(m <= n - f, f"M must be at most n-f (n={n}, f={f}, M={m})")
    return {"f": f, "m": m}


def _fallback(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    from spirtd.rules import kernels

    n, f, m = len(xs), params["f"], params["m"]
    d = kernels.pairwise_sqdist(xs).tolist()
    q = n - f - 2
    scores = []
    for i in range(n):
        others = sorted(d[i][j] for j in range(n) if j != i)
        scores.append(sum(others[:q]))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return kernels.mean([xs[i] for i in chosen]), chosen


KRUM = Rule(
    name="krum",
    min_peers=lambda f: 2 * f + 3,
    bound="2f+3",
    fallback=_fallback,
    command="SPIRT.KRUM",
    accepts=frozenset({"f", "m"}),
    check=_check,
    module_args=lambda p: ["F", p["f"], "M", p["m"]],
    reply=lambda reply: [int(i) for i in reply],
    job_params=lambda f, n: {"f": f, "m": 1},
)
MULTI_KRUM = dataclasses.replace(
    KRUM, name="multi_krum", job_params=lambda f, n: {"f": f, "m": n - f}
)
