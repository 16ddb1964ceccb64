"""Aggregation parameters taken exactly: weighted-mean weights at their edges, the
trimmed mean's integer trim count, and Krum's neighbour count (Blanchard et al.).

Each runs on the module's main-thread and worker paths, and through TensorStore
(the training aggregators' path) on both the module and the client-side fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio
from redis.exceptions import ResponseError

from spirtd.redis.store import StoreError, TensorStore
from spirtd.training.aggregators import Aggregator
from tests.fixtures_redis import RunningRedis, reset_shared
from tests.test_native_errors import snapshot
from tests.test_native_rules import assert_close, get, load, ref_mean, ref_sqdist

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(params=["main", "worker"], loop_scope="module")
async def r(request: pytest.FixtureRequest, module_managed_redis: RunningRedis) -> RunningRedis:
    return await reset_shared(module_managed_redis, worker=request.param == "worker")


def data(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size)).astype(np.float32)


# ---- weighted mean ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "effective"),
    [
        # 1e-320 is denormal: its plain sum's reciprocal is inf, which gave (nan, inf).
        (["1e-320", "1e-320", "1e-320"], [1, 1, 1]),
        (["1e-320", "0", "0"], [1, 0, 0]),
        (["5e-324", "1e-323", "0"], [1, 2, 0]),
        # The plain sum overflows to inf.
        (["1e308", "1e308", "1e308"], [1, 1, 1]),
        (["1.7e308", "0", "1.7e308"], [1, 0, 1]),
    ],
)
async def test_weighted_mean_extreme_weights_give_the_weighted_mean(
    r: RunningRedis, weights: list[str], effective: list[float]
) -> None:
    c = r.client
    X = data(1, 3, 257)
    keys = await load(c, X)
    assert await c.execute_command("SPIRT.MEAN", "o", 3, *keys, "WEIGHTS", *weights) == b"OK"
    got = await get(c, "o")
    assert np.isfinite(got).all()
    assert_close(got, ref_mean(X, effective), X)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (["0", "0", "0"], "positive sum"),
        (["0", "-0.0", "0"], "positive sum"),
        (["1", "-1", "1"], "weight must be in"),
        (["1", "-1e-320", "1"], "weight must be in"),
        (["1", "inf", "1"], "weight must be a finite number"),
        (["-inf", "1", "1"], "weight must be a finite number"),
        (["1", "nan", "1"], "weight must be a finite number"),
        (["1", "1e309", "1"], "weight must be a finite number"),
    ],
)
async def test_weighted_mean_bad_weights_refused_and_nothing_written(
    r: RunningRedis, weights: list[str], message: str
) -> None:
    c = r.client
    keys = await load(c, data(2, 3, 64))
    await load(c, np.full((1, 64), 7.0, np.float32), prefix="dest")
    before = await snapshot(c)
    with pytest.raises(ResponseError, match=message):
        await c.execute_command("SPIRT.MEAN", "dest0", 3, *keys, "WEIGHTS", *weights)
    assert await snapshot(c) == before


async def test_store_weighted_mean_edges_on_both_paths(st: TensorStore) -> None:
    X = data(3, 3, 100)
    keys = [f"g{i}" for i in range(3)]
    for k, x in zip(keys, X, strict=True):
        await st.put(k, x)
    await st.mean("o", keys, weights=[1e-320, 1e-320, 0.0])
    assert_close(await st.get("o"), ref_mean(X, [1, 1, 0]), X)
    await st.mean("o", keys, weights=[1e308, 1e308, 1e308])
    assert_close(await st.get("o"), ref_mean(X), X)
    await st.put("dest", np.full(100, 7.0, np.float32))
    for bad in ([0.0, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, float("inf"), 1.0]):
        with pytest.raises(StoreError, match="weight"):
            await st.mean("dest", keys, weights=bad)
    np.testing.assert_array_equal(await st.get("dest"), np.full(100, 7.0, np.float32))


# ---- trimmed mean: an exact trim count ----------------------------------------------------


def ref_trim(X: np.ndarray, b: int) -> np.ndarray:
    n = X.shape[0]
    return np.sort(X.astype(np.float64), axis=0)[b : n - b].mean(axis=0)


async def test_trim_count_is_exact_where_a_fraction_floors_short(r: RunningRedis) -> None:
    c = r.client
    n, f = 47, 3
    X = data(4, n, 300)
    X[:f] = 1e3  # f outliers on the high side, f on the low side
    X[f : 2 * f] = -1e3
    keys = await load(c, X)
    # The fraction f/n, as a float, times n floors to f - 1: one outlier survives.
    assert (f / n) * n < f
    await c.execute_command("SPIRT.TRIMMEAN", "beta", n, *keys, "BETA", f / n)
    assert_close(await get(c, "beta"), ref_trim(X, f - 1), X)
    await c.execute_command("SPIRT.TRIMMEAN", "trim", n, *keys, "TRIM", f)
    got = await get(c, "trim")
    assert_close(got, ref_trim(X, f), X)
    assert np.abs(got).max() < 10.0  # no outlier left


@pytest.mark.parametrize(("n", "b"), [(1, 0), (2, 0), (3, 1), (5, 2), (10, 4), (33, 16)])
async def test_trim_count_bounds(r: RunningRedis, n: int, b: int) -> None:
    c = r.client
    X = data(5 + n, n, 123)
    keys = await load(c, X)
    await c.execute_command("SPIRT.TRIMMEAN", "o", n, *keys, "TRIM", b)
    assert_close(await get(c, "o"), ref_trim(X, b), X)


@pytest.mark.parametrize(("n", "f"), [(47, 3), (7, 2), (5, 2), (10, 3), (49, 3)])
async def test_aggregator_trims_exactly_f(st: TensorStore, n: int, f: int) -> None:
    X = data(6 + n, n, 200)
    keys = [f"g{i}" for i in range(n)]
    for k, x in zip(keys, X, strict=True):
        await st.put(k, x)
    await Aggregator.parse("trimmed_mean", f).run(st, "agg", keys, previous=None)
    assert_close(await st.get("agg"), ref_trim(X, f), X)


async def test_store_trim_and_beta_are_exclusive(st: TensorStore) -> None:
    keys = [f"g{i}" for i in range(5)]
    for k, x in zip(keys, data(7, 5, 10), strict=True):
        await st.put(k, x)
    with pytest.raises(StoreError, match="TRIM or BETA"):
        await st.trimmed_mean("o", keys, 0.2, trim=1)
    with pytest.raises(StoreError, match="TRIM or BETA"):
        await st.trimmed_mean("o", keys)
    with pytest.raises(StoreError, match="TRIM must be in"):
        await st.trimmed_mean("o", keys, trim=3)


# ---- Krum: n - f - 2 neighbours ------------------------------------------------------------


def krum_choice(X: np.ndarray, neighbours: int, m: int) -> list[int]:
    n = X.shape[0]
    D = ref_sqdist(X)
    scores = [np.sort(np.delete(D[i], i))[:neighbours].sum() for i in range(n)]
    return sorted(range(n), key=lambda i: (scores[i], i))[:m]


async def test_krum_scores_over_n_minus_f_minus_2_neighbours(r: RunningRedis) -> None:
    c = r.client
    # Points on a line where scoring over n-f-2 = 2 and n-f-1 = 3 neighbours (ByzFL's
    # count) choose different inputs, so this fails if the count is off by one.
    X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]], np.float32) * np.ones((1, 8), np.float32)
    n, f = 5, 1
    blanchard, byzfl = krum_choice(X, n - f - 2, 1), krum_choice(X, n - f - 1, 1)
    assert blanchard != byzfl
    keys = await load(c, X)
    chosen = await c.execute_command("SPIRT.KRUM", "o", n, *keys, "F", f)
    assert [int(i) for i in chosen] == blanchard == [1]
    # ByzFL's Krum(f) is reproduced with F f-1 (native/README.md).
    chosen = await c.execute_command("SPIRT.KRUM", "o", n, *keys, "F", f - 1)
    assert [int(i) for i in chosen] == byzfl


@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
async def test_aggregator_krum_uses_the_jobs_f(st: TensorStore, rule: str) -> None:
    n, f = 7, 2
    rng = np.random.default_rng(8)
    X = (rng.standard_normal((n, 50)) * np.arange(1, n + 1)[:, None]).astype(np.float32)
    keys = [f"g{i}" for i in range(n)]
    for k, x in zip(keys, X, strict=True):
        await st.put(k, x)
    chosen = await Aggregator.parse(rule, f).run(st, "agg", keys, previous=None)
    m = 1 if rule == "krum" else n - f
    assert chosen == krum_choice(X, n - f - 2, m)
    assert_close(await st.get("agg"), X[chosen].astype(np.float64).mean(axis=0), X)
