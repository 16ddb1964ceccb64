"""SPIRT module aggregation rules against independent numpy references.

Every rule runs on both module paths: in the main thread (small inputs) and on a worker
thread with a blocked client (``SPIRT.CONFIG SET ASYNC_MIN_BYTES 0`` forces it). The
reference implementations below are written from the papers' definitions in float64
numpy; they are also what tests/test_store.py checks the client-side fallback against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from scipy import stats

from tests.fixtures_redis import RunningRedis, reset_shared

RTOL = 1e-5

# ---- references (float64 numpy, written from the definitions) ------------------------


def ref_mean(X: np.ndarray, w: Sequence[float] | None = None) -> np.ndarray:
    X = X.astype(np.float64)
    if w is None:
        return X.mean(axis=0)
    wa = np.asarray(w, dtype=np.float64)
    return (wa[:, None] * X).sum(axis=0) / wa.sum()


def ref_median(X: np.ndarray) -> np.ndarray:
    return np.median(X.astype(np.float64), axis=0)


def ref_trimmed_mean(X: np.ndarray, beta: float) -> np.ndarray:
    n = X.shape[0]
    b = math.floor(beta * n)
    return np.sort(X.astype(np.float64), axis=0)[b : n - b].mean(axis=0)


def ref_sqdist(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    return ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=2)


def ref_krum(X: np.ndarray, f: int, m: int = 1) -> tuple[np.ndarray, list[int]]:
    n = X.shape[0]
    D = ref_sqdist(X)
    scores = []
    for i in range(n):
        others = np.sort(np.delete(D[i], i))
        scores.append(others[: n - f - 2].sum())
    order = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return X[order].astype(np.float64).mean(axis=0), order


def ref_nnm(X: np.ndarray, f: int) -> np.ndarray:
    n = X.shape[0]
    D = ref_sqdist(X)
    out = np.empty_like(X, dtype=np.float32)
    for i in range(n):
        nbrs = sorted(range(n), key=lambda j: (D[i, j], j))[: n - f]
        out[i] = X[nbrs].astype(np.float64).mean(axis=0).astype(np.float32)
    return out


def ref_geomed(X: np.ndarray, maxiter: int, eps: float) -> tuple[np.ndarray, int]:
    X = X.astype(np.float64)
    z = X.mean(axis=0)
    it = 0
    while it < maxiter:
        d = np.linalg.norm(X - z, axis=1)
        if d.max() == 0:
            break
        w = 1.0 / np.maximum(d, d.max() * 1e-12)
        znew = (w[:, None] * X).sum(axis=0) / w.sum()
        diff, nrm = np.linalg.norm(znew - z), np.linalg.norm(znew)
        z = znew
        it += 1
        if diff <= eps * nrm:
            break
    return z, it


def ref_cclip(X: np.ndarray, tau: float, iters: int, v0: np.ndarray | None) -> np.ndarray:
    X = X.astype(np.float64)
    v = np.zeros(X.shape[1]) if v0 is None else v0.astype(np.float64)
    for _ in range(iters):
        diff = X - v
        d = np.linalg.norm(diff, axis=1)
        c = np.where((d > 0) & (tau < d), tau / np.where(d > 0, d, 1.0), 1.0)
        v = v + (c[:, None] * diff).mean(axis=0)
    return v


def assert_close(got: np.ndarray, ref: np.ndarray, inputs: np.ndarray) -> None:
    """1e-5 relative, with an absolute floor scaled to the inputs (results near zero)."""
    scale = float(np.abs(inputs).max()) if inputs.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * 0.1 * scale)


# ---- helpers ---------------------------------------------------------------------------


async def put(c: aioredis.Redis, key: str, x: np.ndarray) -> None:
    x = np.require(x, dtype="<f4", requirements="C")  # keeps 0-d arrays 0-d
    await c.execute_command("SPIRT.PUT", key, ",".join(map(str, x.shape)), x.tobytes())


async def get(c: aioredis.Redis, key: str) -> np.ndarray:
    shape, values = await c.execute_command("SPIRT.GET", key)
    dims = tuple(int(d) for d in shape.decode().split(",")) if shape else ()
    return np.frombuffer(values, dtype="<f4").reshape(dims)


async def load(c: aioredis.Redis, X: np.ndarray, prefix: str = "g") -> list[str]:
    keys = [f"{prefix}{i}" for i in range(X.shape[0])]
    for k, x in zip(keys, X, strict=True):
        await put(c, k, x)
    return keys


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(params=["main", "worker"], loop_scope="module")
async def r(request: pytest.FixtureRequest, module_managed_redis: RunningRedis) -> RunningRedis:
    return await reset_shared(module_managed_redis, worker=request.param == "worker")


async def jobs(c: aioredis.Redis) -> dict[str, int]:
    info = await c.execute_command("SPIRT.INFO")
    return {info[i].decode(): info[i + 1] for i in range(0, len(info), 2)}


def data(rng: np.random.Generator, n: int, size: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal((n, size)) * scale).astype(np.float32)


# ---- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16])
async def test_mean_and_weighted_mean(r: RunningRedis, n: int) -> None:
    c = r.client
    rng = np.random.default_rng(n)
    size = int(rng.integers(1, 5000))
    X = data(rng, n, size)
    keys = await load(c, X)
    assert await c.execute_command("SPIRT.MEAN", "out", n, *keys) == b"OK"
    assert_close(await get(c, "out"), ref_mean(X), X)
    w = rng.uniform(0, 3, n)
    w[0] = 0.0 if n > 1 else 1.0
    await c.execute_command("SPIRT.MEAN", "wout", n, *keys, "WEIGHTS", *w.tolist())
    assert_close(await get(c, "wout"), ref_mean(X, w), X)
    # The output keeps the first input's shape and is a proper tensor.
    assert await c.get("out:shape") == str(size).encode()


async def test_worker_path_is_really_used(r: RunningRedis) -> None:
    c = r.client
    X = data(np.random.default_rng(0), 3, 100)
    keys = await load(c, X)
    before = await jobs(c)
    await c.execute_command("SPIRT.MEAN", "out", 3, *keys)
    after = await jobs(c)
    forced = (await c.execute_command("SPIRT.CONFIG", "GET", "ASYNC_MIN_BYTES")) == 0
    key = "jobs_async" if forced else "jobs_sync"
    assert after[key] == before[key] + 1


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 9, 16, 33])
async def test_median(r: RunningRedis, n: int) -> None:
    c = r.client
    rng = np.random.default_rng(100 + n)
    size = int(rng.integers(1, 3000))
    X = data(rng, n, size)
    # Ties: repeated values across inputs at some coordinates.
    X[:, ::7] = np.round(X[:, ::7])
    keys = await load(c, X)
    await c.execute_command("SPIRT.MEDIAN", "out", n, *keys)
    assert_close(await get(c, "out"), ref_median(X), X)


@pytest.mark.parametrize(
    ("n", "beta"), [(1, 0.0), (4, 0.25), (5, 0.2), (10, 0.1), (10, 0.49), (17, 0.3)]
)
async def test_trimmed_mean(r: RunningRedis, n: int, beta: float) -> None:
    c = r.client
    rng = np.random.default_rng(200 + n)
    X = data(rng, n, int(rng.integers(1, 3000)))
    keys = await load(c, X)
    await c.execute_command("SPIRT.TRIMMEAN", "out", n, *keys, "BETA", beta)
    got = await get(c, "out")
    assert_close(got, ref_trimmed_mean(X, beta), X)
    # scipy's trim_mean cuts the same int(beta * n) from each end.
    assert_close(got, stats.trim_mean(X.astype(np.float64), beta, axis=0), X)


@pytest.mark.parametrize(
    ("n", "f", "m"),
    [(3, 0, 1), (5, 1, 1), (7, 2, 1), (7, 2, 5), (8, 2, 3), (11, 4, 1), (16, 3, 13)],
)
async def test_krum(r: RunningRedis, n: int, f: int, m: int) -> None:
    c = r.client
    rng = np.random.default_rng(300 + n * 10 + f)
    X = data(rng, n, int(rng.integers(2, 2000)))
    X[:f] += 50.0  # f Byzantine inputs far away
    keys = await load(c, X)
    chosen = await c.execute_command("SPIRT.KRUM", "out", n, *keys, "F", f, "M", m)
    ref, order = ref_krum(X, f, m)
    assert [int(i) for i in chosen] == order
    assert not set(order) & set(range(f)) or m > n - 2 * f
    assert_close(await get(c, "out"), ref, X)


async def test_krum_ties_choose_lower_index(r: RunningRedis) -> None:
    c = r.client
    base = data(np.random.default_rng(5), 1, 64)[0]
    X = np.stack([base, base, base + 1, base - 1, base + 3]).astype(np.float32)
    keys = await load(c, X)
    chosen = await c.execute_command("SPIRT.KRUM", "out", 5, *keys, "F", 1, "M", 2)
    assert [int(i) for i in chosen] == ref_krum(X, 1, 2)[1] == [0, 1]


@pytest.mark.parametrize(("n", "f"), [(1, 0), (4, 1), (7, 3), (9, 2)])
async def test_nnm_before_mean_median_krum(r: RunningRedis, n: int, f: int) -> None:
    c = r.client
    rng = np.random.default_rng(400 + n)
    X = data(rng, n, int(rng.integers(1, 1500)))
    keys = await load(c, X)
    mixed = ref_nnm(X, f)
    await c.execute_command("SPIRT.MEAN", "o1", n, *keys, "NNM", f)
    assert_close(await get(c, "o1"), ref_mean(mixed), X)
    await c.execute_command("SPIRT.MEDIAN", "o2", n, *keys, "NNM", f)
    assert_close(await get(c, "o2"), ref_median(mixed), X)
    if n > 2 * f + 2:
        chosen = await c.execute_command("SPIRT.KRUM", "o3", n, *keys, "F", f, "NNM", f)
        ref, order = ref_krum(mixed, f)
        assert [int(i) for i in chosen] == order
        assert_close(await get(c, "o3"), ref, X)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 11])
async def test_geometric_median_fixed_iterations(r: RunningRedis, n: int) -> None:
    c = r.client
    rng = np.random.default_rng(500 + n)
    X = data(rng, n, int(rng.integers(2, 800)))
    keys = await load(c, X)
    iters = await c.execute_command("SPIRT.GEOMED", "out", n, *keys, "MAXITER", 6, "EPS", 0)
    ref, ref_iters = ref_geomed(X, 6, 0.0)
    if n != 2:
        # With two inputs the mean is an exact fixed point, and whether a rounding
        # difference makes one more (no-op) step differs between implementations.
        assert iters == ref_iters
    assert_close(await get(c, "out"), ref, X)


async def test_geometric_median_converges_to_the_minimiser(r: RunningRedis) -> None:
    c = r.client
    rng = np.random.default_rng(7)
    X = data(rng, 9, 50)
    X[:2] += 30.0
    keys = await load(c, X)
    iters = await c.execute_command("SPIRT.GEOMED", "out", 9, *keys, "MAXITER", 1000, "EPS", 1e-9)
    assert 1 < iters < 1000
    z = (await get(c, "out")).astype(np.float64)
    X64 = X.astype(np.float64)

    def cost(p: np.ndarray) -> float:
        return float(np.linalg.norm(X64 - p, axis=1).sum())

    # The geometric median minimises the sum of distances: no other candidate does
    # better, and it is robust to the two far-away inputs (unlike the mean).
    assert cost(z) <= cost(X64.mean(axis=0))
    assert cost(z) <= cost(np.median(X64, axis=0))
    for _ in range(20):
        assert cost(z) <= cost(z + rng.standard_normal(50) * 1e-3) + 1e-9
    assert np.linalg.norm(z - X64[2:].mean(axis=0)) < np.linalg.norm(X64.mean(0) - X64[2:].mean(0))


@pytest.mark.parametrize(
    ("n", "iters", "with_start"), [(1, 1, False), (4, 1, True), (7, 3, False), (8, 5, True)]
)
async def test_centered_clipping(r: RunningRedis, n: int, iters: int, with_start: bool) -> None:
    c = r.client
    rng = np.random.default_rng(600 + n)
    size = int(rng.integers(1, 2000))
    X = data(rng, n, size)
    keys = await load(c, X)
    args: list[object] = ["TAU", 2.5, "ITERS", iters]
    v0 = None
    if with_start:
        v0 = data(rng, 1, size)[0] * 0.1
        await put(c, "start", v0)
        args += ["START", "start"]
    await c.execute_command("SPIRT.CCLIP", "out", n, *keys, *args)
    assert_close(await get(c, "out"), ref_cclip(X, 2.5, iters, v0), X)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e6, 1e30])
async def test_huge_and_tiny_magnitudes(r: RunningRedis, scale: float) -> None:
    c = r.client
    rng = np.random.default_rng(int(abs(math.log10(scale))) + 1)
    X = data(rng, 7, 257, scale)
    keys = await load(c, X)
    await c.execute_command("SPIRT.MEAN", "o", 7, *keys)
    assert_close(await get(c, "o"), ref_mean(X), X)
    await c.execute_command("SPIRT.MEDIAN", "o", 7, *keys)
    assert_close(await get(c, "o"), ref_median(X), X)
    await c.execute_command("SPIRT.TRIMMEAN", "o", 7, *keys, "BETA", 0.2)
    assert_close(await get(c, "o"), ref_trimmed_mean(X, 0.2), X)
    chosen = await c.execute_command("SPIRT.KRUM", "o", 7, *keys, "F", 2, "M", 2)
    ref, order = ref_krum(X, 2, 2)
    assert [int(i) for i in chosen] == order
    assert_close(await get(c, "o"), ref, X)
    await c.execute_command("SPIRT.GEOMED", "o", 7, *keys, "MAXITER", 10, "EPS", 0)
    assert_close(await get(c, "o"), ref_geomed(X, 10, 0.0)[0], X)
    await c.execute_command("SPIRT.CCLIP", "o", 7, *keys, "TAU", scale, "ITERS", 2)
    assert_close(await get(c, "o"), ref_cclip(X, scale, 2, None), X)


async def test_zero_vectors(r: RunningRedis) -> None:
    c = r.client
    X = np.zeros((6, 100), dtype=np.float32)
    keys = await load(c, X)
    for cmd in (
        ["SPIRT.MEAN", "o", 6, *keys],
        ["SPIRT.MEDIAN", "o", 6, *keys],
        ["SPIRT.TRIMMEAN", "o", 6, *keys, "BETA", 0.3],
        ["SPIRT.KRUM", "o", 6, *keys, "F", 1, "M", 3],
        ["SPIRT.CCLIP", "o", 6, *keys, "TAU", 1.0, "ITERS", 3],
        ["SPIRT.MEAN", "o", 6, *keys, "NNM", 2],
    ):
        await c.delete("o")
        await c.execute_command(*cmd)
        assert np.array_equal(await get(c, "o"), np.zeros(100, np.float32)), cmd
    # All inputs equal: Weiszfeld stops at once, at that point.
    assert await c.execute_command("SPIRT.GEOMED", "o", 6, *keys) == 0
    assert np.array_equal(await get(c, "o"), np.zeros(100, np.float32))
    assert float(await c.execute_command("SPIRT.NORM", "g0")) == 0.0


async def test_empty_and_scalar_tensors(r: RunningRedis) -> None:
    c = r.client
    for k in ("e0", "e1"):
        await c.execute_command("SPIRT.PUT", k, "0", b"")
    await c.execute_command("SPIRT.MEAN", "eo", 2, "e0", "e1")
    assert await c.execute_command("SPIRT.GET", "eo") == [b"0", b""]
    await c.execute_command("SPIRT.PUT", "s0", "", np.float32(2.0).tobytes())
    await c.execute_command("SPIRT.PUT", "s1", "", np.float32(4.0).tobytes())
    await c.execute_command("SPIRT.MEDIAN", "so", 2, "s0", "s1")
    shape, val = await c.execute_command("SPIRT.GET", "so")
    assert shape == b"" and np.frombuffer(val, "<f4")[0] == 3.0


async def test_output_may_be_an_input(r: RunningRedis) -> None:
    c = r.client
    X = data(np.random.default_rng(9), 3, 500)
    keys = await load(c, X)
    await c.execute_command("SPIRT.MEAN", keys[0], 3, *keys)
    assert_close(await get(c, keys[0]), ref_mean(X), X)


async def test_existing_output_is_replaced_like_set(r: RunningRedis) -> None:
    c = r.client
    X = data(np.random.default_rng(10), 3, 600)
    keys = await load(c, X)
    for old in (np.ones(600, np.float32), np.ones(7, np.float32)):  # same size, other size
        await put(c, "out", old)
        await c.expire("out", 1000)
        await c.execute_command("SPIRT.MEAN", "out", 3, *keys)
        assert await c.ttl("out") == -1
        assert await c.get("out:shape") == b"600"
        assert_close(await get(c, "out"), ref_mean(X), X)


async def test_random_sizes_all_rules(r: RunningRedis) -> None:
    c = r.client
    rng = np.random.default_rng(1234)
    for trial in range(6):
        n = int(rng.integers(5, 20))
        size = int(rng.integers(1, 70000))  # crosses several fetch chunks
        X = data(rng, n, size, float(10 ** rng.uniform(-3, 3)))
        keys = await load(c, X, prefix=f"t{trial}_")
        f = int(rng.integers(0, (n - 3) // 2 + 1))
        await c.execute_command("SPIRT.MEAN", "o", n, *keys)
        assert_close(await get(c, "o"), ref_mean(X), X)
        await c.execute_command("SPIRT.MEDIAN", "o", n, *keys)
        assert_close(await get(c, "o"), ref_median(X), X)
        chosen = await c.execute_command("SPIRT.KRUM", "o", n, *keys, "F", f)
        ref, order = ref_krum(X, f)
        assert [int(i) for i in chosen] == order
        assert_close(await get(c, "o"), ref, X)
