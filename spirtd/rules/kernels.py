"""The torch arithmetic the client-side rules share (float64 accumulation).

They follow the module's definitions (native/rules.c) step for step so both paths
agree to float32 rounding; see native/README.md for the definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spirtd.checks import StoreError

F32 = torch.float32
F64 = torch.float64
# Coordinates per block in the rank rules and distances (bounds their temporary memory).
RANK_BLOCK = 1 << 18


def mean(xs: list[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    acc = torch.zeros(xs[0].numel(), dtype=F64)
    if weights is None:
        for x in xs:
            acc += x
        return (acc / len(xs)).to(F32)
    # Normalised as the module does (rules.c): by the largest weight, then by the sum,
    # so denormal weights or ones whose sum overflows still give the weighted mean.
    wmax = max(weights)
    scaled = [w / wmax for w in weights]
    total = 0.0
    for w in scaled:
        total += w
    for x, w in zip(xs, scaled, strict=True):
        if w:
            acc.add_(x.to(F64), alpha=w / total)
    out = acc.to(F32)
    if not bool(torch.isfinite(out).all()):
        raise StoreError("non-finite result; nothing was written")
    return out


def rank_mean(xs: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Mean of the sorted ranks lo..hi at every coordinate."""
    size = xs[0].numel()
    out = torch.empty(size, dtype=F32)
    for a in range(0, size, RANK_BLOCK):
        b = min(size, a + RANK_BLOCK)
        block = torch.stack([x[a:b] for x in xs]).sort(dim=0).values
        out[a:b] = block[lo : hi + 1].to(F64).mean(dim=0).to(F32)
    return out


def pairwise_sqdist(xs: list[torch.Tensor]) -> torch.Tensor:
    n, size = len(xs), xs[0].numel()
    d = torch.zeros((n, n), dtype=F64)
    for a in range(0, size, RANK_BLOCK):
        b = min(size, a + RANK_BLOCK)
        block = torch.stack([x[a:b] for x in xs]).to(F64)
        for i in range(n):
            d[i] += ((block - block[i]) ** 2).sum(dim=1)
    d.fill_diagonal_(0.0)
    return d


def nnm(xs: list[torch.Tensor], f: int) -> list[torch.Tensor]:
    """Nearest-neighbour mixing: each input becomes the mean of its n - f nearest."""
    n = len(xs)
    d = pairwise_sqdist(xs).tolist()
    keep = n - f
    mixed = []
    for i in range(n):
        nbrs = sorted(range(n), key=lambda j, i=i: (d[i][j], j))[:keep]
        mixed.append(mean([xs[j] for j in nbrs]))
    return mixed
