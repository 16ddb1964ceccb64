"""The optimal attacks' search: the factor that moves the job's own aggregate furthest.

A Byzantine peer knows the job's rule (its record names it) and, having waited for
them, the round's honest gradients. For a family of attack vectors ``v(factor)``
(ALIE: mean - factor x std; IPM: -factor x mean) it runs the rule on the honest
gradients plus f copies of ``v(factor)`` and keeps the factor that maximises
||aggregate - honest mean||_2, ByzFL's definition of the optimal attack.

The rule runs through the store's client-side path (:func:`spirtd.redis.fallback.
aggregate` on the :class:`_Agg` that :meth:`TensorStore.aggregate` builds for a
training job), so the attacker scores candidates with the same code the peers run
without the SPIRT module, and with the module's definitions to float32 rounding.

The search: ``points`` factors on a log grid over [lo, hi], then a golden-section
refinement (in log space) between the best grid point's neighbours. The rules'
damage is not unimodal in the factor (the rank rules saturate, Krum switches
selection), so the refinement only ever replaces the grid's best by a strictly
better point. Ties keep the smallest factor. Everything is deterministic in its
inputs: colluders holding the same honest gradients in the same order pick the
same factor and publish the same vector.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from spirtd.training.aggregators import Aggregator

# Golden-section steps after the grid: each shrinks the bracket by 0.618, so 12
# narrow one grid cell (a factor of (hi/lo)^(1/(points-1))) about 300-fold.
REFINE_STEPS = 12
_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0

log = logging.getLogger("spirtd.byzantine")


def rule_aggregate(
    rule: str,
    f: int,
    inputs: Sequence[np.ndarray],
    previous: np.ndarray | None = None,
) -> np.ndarray:
    """The job's aggregate of ``inputs`` (float32, in the order given): its rule with
    nnm+ if named, f lowered as the round machine lowers it when too few inputs are
    left, the job's parameters for (f, n), and ``previous`` as START for a rule that
    keeps one."""
    import torch

    from spirtd.redis import fallback
    from spirtd.redis.store import _Agg

    n = len(inputs)
    agg = Aggregator.parse(rule, f)
    while agg.f > 0 and agg.min_peers() > n:
        agg = Aggregator(agg.rule, agg.f - 1, agg.nnm)
    spec = agg.spec
    start = previous is not None and spec.keeps_previous
    call = _Agg(
        spec,
        tuple(str(i) for i in range(n)),
        spec.job_params(agg.f, n),
        nnm_f=agg.f if agg.nnm and agg.f else None,
        start="previous" if start else None,
    ).validate()
    xs: list[torch.Tensor | None] = [
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in inputs
    ]
    if start:
        assert previous is not None
        xs.append(torch.from_numpy(np.ascontiguousarray(previous, dtype=np.float32)))
    (out,), _ = fallback.aggregate(call, xs)
    return out.numpy()


def damage(
    rule: str,
    f: int,
    honest: Sequence[np.ndarray],
    candidate: np.ndarray,
    previous: np.ndarray | None = None,
) -> float:
    """||aggregate(honest + f copies of candidate) - honest mean||_2; inf when the
    rule's result is not finite (the attack broke it outright)."""
    mean = np.mean(np.stack(honest).astype(np.float64), axis=0)
    out = rule_aggregate(rule, f, [*honest, *([candidate] * f)], previous)
    d = float(np.linalg.norm(out.astype(np.float64) - mean))
    return d if math.isfinite(d) else math.inf


def log_grid(lo: float, hi: float, points: int) -> list[float]:
    if not (0.0 < lo < hi) or points < 2:
        raise ValueError("the search range needs 0 < lo < hi and at least 2 points")
    a, b = math.log(lo), math.log(hi)
    return [math.exp(a + (b - a) * i / (points - 1)) for i in range(points)]


def best_factor(
    score: Callable[[float], float], lo: float, hi: float, points: int
) -> tuple[float, float]:
    """(factor, score) maximising ``score`` over [lo, hi] as the module docstring says."""
    grid = log_grid(lo, hi, points)
    scores = [score(x) for x in grid]
    i = max(range(len(grid)), key=lambda j: (scores[j], -j))
    best, best_s = grid[i], scores[i]
    a = math.log(grid[max(0, i - 1)])
    b = math.log(grid[min(len(grid) - 1, i + 1)])
    c, d = b - _INVPHI * (b - a), a + _INVPHI * (b - a)
    sc, sd = score(math.exp(c)), score(math.exp(d))
    for _ in range(REFINE_STEPS):
        for x, s in ((c, sc), (d, sd)):
            if s > best_s:
                best, best_s = math.exp(x), s
        if sc >= sd:
            b, d, sd = d, c, sc
            c = b - _INVPHI * (b - a)
            sc = score(math.exp(c))
        else:
            a, c, sc = c, d, sd
            d = a + _INVPHI * (b - a)
            sd = score(math.exp(d))
    for x, s in ((c, sc), (d, sd)):
        if s > best_s:
            best, best_s = math.exp(x), s
    return min(max(best, lo), hi), best_s


def alie_vector(pool: np.ndarray, z: float) -> np.ndarray:
    return (pool.mean(axis=0) - z * pool.std(axis=0)).astype(np.float32)


def ipm_vector(pool: np.ndarray, eps: float) -> np.ndarray:
    return (-eps * pool.mean(axis=0)).astype(np.float32)


FAMILIES: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "alie": alie_vector,
    "ipm": ipm_vector,
}


def optimal(
    family: str,
    honest: Sequence[np.ndarray],
    *,
    rule: str,
    f: int,
    lo: float,
    hi: float,
    points: int,
    previous: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """(vector, factor, damage) of the family's most damaging member against ``rule``."""
    make = FAMILIES[family]
    pool = np.stack([np.asarray(h, dtype=np.float32) for h in honest])
    if f < 1:  # nothing of ours is aggregated: any factor does the same (none)
        return make(pool, lo), lo, 0.0

    evals = 0
    t0 = time.perf_counter()

    def score(x: float) -> float:
        nonlocal evals
        evals += 1
        return damage(rule, f, list(pool), make(pool, x), previous)

    factor, dmg = best_factor(score, lo, hi, points)
    log.info(
        "%s_opt against %s (f=%d, %d honest): factor %.4g, distance %.4g (%d evaluations, %.2fs)",
        family,
        rule,
        f,
        len(pool),
        factor,
        dmg,
        evals,
        time.perf_counter() - t0,
    )
    return make(pool, factor), factor, dmg
