"""TensorStore on both paths: in-database (module) and client-side (torch fallback).

Both are checked against the numpy references of tests/test_native_rules.py and
against each other; both must refuse the same bad inputs the same way and write
nothing when they do.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch

from spirtd.redis import fallback
from spirtd.redis.store import InputChanged, StoreError, TensorNotFound, TensorStore
from tests.fixtures_redis import RunningRedis, reset_shared
from tests.test_native_errors import snapshot
from tests.test_native_rules import (
    assert_close,
    ref_cclip,
    ref_geomed,
    ref_krum,
    ref_mean,
    ref_median,
    ref_nnm,
    ref_trimmed_mean,
)
from tests.test_native_updates import ref_adam, ref_sgd

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def load(s: TensorStore, X: np.ndarray, prefix: str = "g") -> list[str]:
    keys = [f"{prefix}{i}" for i in range(len(X))]
    for k, x in zip(keys, X, strict=True):
        await s.put(k, x)
    return keys


def data(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size)).astype(np.float32)


async def test_put_get_roundtrip_copy_free(st: TensorStore) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    await st.put("t", x)
    got = await st.get("t")
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.dtype("<f4") and got.shape == (2, 3, 4)
    assert not got.flags.writeable  # a view over the reply bytes, not a copy
    assert isinstance(got.base, bytes | memoryview) or got.base is not None
    await st.put("tt", torch.arange(5, dtype=torch.float32))
    t = await st.get_torch("tt")
    assert torch.equal(t, torch.arange(5, dtype=torch.float32))
    await st.put("scalar", np.float32(3.5))
    assert (await st.get("scalar")).shape == ()
    many = await st.get_many(["t", "tt"])
    assert [a.shape for a in many] == [(2, 3, 4), (5,)]
    with pytest.raises(TensorNotFound):
        await st.get("nope")
    await st.client.rpush("lst", "x")
    with pytest.raises(StoreError, match="holds the wrong type"):
        await st.get("lst")


@pytest.mark.parametrize("n", [1, 4, 7])
async def test_rules_match_references(st: TensorStore, n: int) -> None:
    X = data(n, n, 3001)
    keys = await load(st, X)
    await st.mean("o", keys)
    assert_close(await st.get("o"), ref_mean(X), X)
    w = list(np.linspace(0.5, 2.0, n))
    await st.mean("o", keys, weights=w)
    assert_close(await st.get("o"), ref_mean(X, w), X)
    await st.median("o", keys)
    assert_close(await st.get("o"), ref_median(X), X)
    await st.trimmed_mean("o", keys, 0.3)
    assert_close(await st.get("o"), ref_trimmed_mean(X, 0.3), X)
    iters = await st.geomed("o", keys, maxiter=5, eps=0.0)
    ref, ref_iters = ref_geomed(X, 5, 0.0)
    assert iters == ref_iters
    assert_close(await st.get("o"), ref, X)
    await st.cclip("o", keys, 3.0, iters=2)
    assert_close(await st.get("o"), ref_cclip(X, 3.0, 2, None), X)
    await st.put("start", X[0] * 0.5)
    await st.cclip("o", keys, 3.0, iters=2, start="start")
    assert_close(await st.get("o"), ref_cclip(X, 3.0, 2, X[0] * 0.5), X)
    if n > 2:
        f = (n - 3) // 2
        chosen = await st.krum("o", keys, f, m=n - f)
        ref, order = ref_krum(X, f, n - f)
        assert chosen == order
        assert_close(await st.get("o"), ref, X)
        await st.median("o", keys, nnm_f=f)
        assert_close(await st.get("o"), ref_median(ref_nnm(X, f)), X)


async def test_aggregate_by_name(st: TensorStore) -> None:
    X = data(11, 5, 100)
    keys = await load(st, X)
    assert await st.aggregate("krum", "o", keys, f=1, m=2) == ref_krum(X, 1, 2)[1]
    await st.aggregate("trimmed_mean", "o", keys, beta=0.2)
    assert_close(await st.get("o"), ref_trimmed_mean(X, 0.2), X)
    with pytest.raises(StoreError, match="unknown aggregation rule"):
        await st.aggregate("average", "o", keys)


async def test_sgd_and_adam(st: TensorStore) -> None:
    rng = np.random.default_rng(5)
    p = rng.standard_normal(2000).astype(np.float32)
    await st.put("w", p)
    b = None
    for _ in range(3):
        g = rng.standard_normal(2000).astype(np.float32)
        await st.put("g", g)
        await st.sgd("w", "g", lr=0.1, momentum=0.9, buf="buf", nesterov=True, weight_decay=0.01)
        p_ref, b_ref = ref_sgd(p, g, b, 0.1, 0.9, 0.0, True, 0.01)
        assert_close(await st.get("w"), p_ref, p)
        assert_close(await st.get("buf"), b_ref, p)
        p, b = await st.get("w"), await st.get("buf")
    m = v = None
    for t in (1, 2, 3):
        g = rng.standard_normal(2000).astype(np.float32)
        await st.put("g", g)
        await st.adam("w", "g", m="m", v="v", step=t, lr=0.01, weight_decay=0.1)
        p_ref, m_ref, v_ref = ref_adam(p, g, m, v, t, 0.01, 0.9, 0.999, 1e-8, 0.1, False)
        assert_close(await st.get("w"), p_ref, p)
        p, m, v = await st.get("w"), await st.get("m"), await st.get("v")
        assert_close(m, m_ref, g)
        assert_close(v, v_ref, g * g)


async def test_norm_and_digest(st: TensorStore) -> None:
    x = np.random.default_rng(8).standard_normal(12345).astype(np.float32)
    await st.put("t", x)
    assert await st.norm("t") == pytest.approx(
        float(np.linalg.norm(x.astype(np.float64))), rel=1e-9
    )
    import hashlib

    assert await st.digest("t") == hashlib.blake2b(x.tobytes(), digest_size=32).hexdigest()


async def test_both_paths_agree(
    module_managed_redis: RunningRedis, module_plain_redis: RunningRedis
) -> None:
    mod = await TensorStore.open((await reset_shared(module_managed_redis)).client)
    cli = await TensorStore.open((await reset_shared(module_plain_redis)).client)
    X = data(21, 9, 40_000)
    X[:2] *= 20
    for s in (mod, cli):
        keys = await load(s, X)
    results = {}
    for s in (mod, cli):
        out = []
        out.append(await s.krum("o1", keys, 3, m=4, nnm_f=3))
        await s.geomed("o2", keys, maxiter=50, eps=1e-8)
        await s.cclip("o3", keys, 1.5, iters=4)
        await s.trimmed_mean("o4", keys, 0.25, nnm_f=2)
        out += [await s.get(k) for k in ("o1", "o2", "o3", "o4")]
        out.append(await s.digest("o1"))
        results[s.uses_module] = out
    a, b = results[True], results[False]
    assert a[0] == b[0]
    for x, y in zip(a[1:5], b[1:5], strict=True):
        assert_close(x, y, X)


BAD_CALLS = [
    ("missing", lambda s: s.mean("o", ["g0", "nokey"]), TensorNotFound, "missing key 'nokey'"),
    ("length", lambda s: s.median("o", ["g0", "short"]), StoreError, "length mismatch"),
    (
        "nonfinite",
        lambda s: s.mean("o", ["g0", "nan"]),
        StoreError,
        "non-finite value in 'nan' at index 3",
    ),
    (
        "nonfinite",
        lambda s: s.put("o", np.array([1, np.inf], np.float32)),
        StoreError,
        "non-finite value at index 1",
    ),
    ("type", lambda s: s.mean("lst", ["g0", "g1"]), StoreError, "holds the wrong type"),
    ("type", lambda s: s.mean("o", ["g0", "lst"]), StoreError, "key 'lst' holds the wrong type"),
    (
        "f",
        lambda s: s.krum("o", ["g0", "g1", "g2", "g0"], 1),
        StoreError,
        "too few inputs for f: Krum needs n > 2f+2 (n=4, f=1)",
    ),
    ("args", lambda s: s.trimmed_mean("o", ["g0", "g1"], 0.5), StoreError, "BETA must be in"),
    (
        "args",
        lambda s: s.mean("o", ["g0", "g1"], weights=[1.0]),
        StoreError,
        "WEIGHTS needs 2 values",
    ),
    ("args", lambda s: s.cclip("o", ["g0"], 0.0), StoreError, "TAU must be positive"),
    ("args", lambda s: s.sgd("g0", "g1", lr=0.1, momentum=0.9), StoreError, "MOMENTUM needs a BUF"),
    (
        "args",
        lambda s: s.adam("g0", "g1", m="m", v="m", step=1, lr=0.1),
        StoreError,
        "must all differ",
    ),
    (
        "missing",
        lambda s: s.adam("g0", "g1", m="m", v="v", step=2, lr=0.1),
        TensorNotFound,
        "missing key 'm'",
    ),
    (
        "nonfinite",
        lambda s: s.sgd("g0", "g1", lr=1e39),
        StoreError,
        "update produced a non-finite parameter",
    ),
    ("missing", lambda s: s.digest("nokey"), TensorNotFound, "missing key"),
]


@pytest.mark.parametrize(
    ("kind", "call", "exc", "msg"), BAD_CALLS, ids=[f"{c[0]}{i}" for i, c in enumerate(BAD_CALLS)]
)
async def test_bad_input_same_error_both_paths(st: TensorStore, kind: str, call, exc, msg) -> None:  # type: ignore[no-untyped-def]
    c = st.client
    await st.put("g0", np.ones(10, np.float32))
    await st.put("g1", np.full(10, 2.0, np.float32))
    await st.put("g2", np.full(10, 3.0, np.float32))
    await st.put("short", np.ones(5, np.float32))
    bad = np.ones(10, np.float32)
    bad[3] = np.nan
    await c.set("nan", bad.tobytes())
    await c.set("nan:shape", "10")
    await c.rpush("lst", "x")
    before = await snapshot(c)
    with pytest.raises(exc) as ei:
        await call(st)
    assert msg in str(ei.value), str(ei.value)
    assert await snapshot(c) == before


async def test_fallback_warns_once(
    module_plain_redis: RunningRedis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="spirtd.redis.store"):
        s = TensorStore(module_plain_redis.client)
        assert not await s.detect()
        assert not await s.detect()
    warnings = [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(warnings) == 1


async def test_client_side_input_changed_while_computing(
    module_plain_redis: RunningRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain_redis = await reset_shared(module_plain_redis)
    s = await TensorStore.open(plain_redis.client)
    X = data(3, 3, 100)
    keys = await load(s, X)
    meddler = redis.Redis(
        unix_socket_path=str(plain_redis.socket_path),
        username=plain_redis.username,
        password=plain_redis.server.password,
    )
    real = fallback.aggregate

    def meddling(agg, xs):  # type: ignore[no-untyped-def]
        meddler.set("g1", np.zeros(100, np.float32).tobytes())  # another writer, mid-way
        return real(agg, xs)

    monkeypatch.setattr(fallback, "aggregate", meddling)
    try:
        with pytest.raises(InputChanged, match="nothing was written"):
            await s.mean("o", keys)
        assert not await s.exists("o")
    finally:
        meddler.close()


async def test_from_url_and_health(
    module_managed_redis: RunningRedis, module_plain_redis: RunningRedis
) -> None:
    for r, module in ((module_managed_redis, True), (module_plain_redis, False)):
        await reset_shared(r)
        password = r.password_file.read_text().strip()
        # As spirtd's own user, which may use only keys under spirt:.
        url = f"unix://spirt:{password}@{r.socket_path}"
        s = await TensorStore.from_url(url)
        try:
            assert s.uses_module is module
            assert await s.health() == {"ok": True, "module": module}
            await s.put("spirt:h", np.ones(3, np.float32))
            await s.mean("spirt:hm", ["spirt:h", "spirt:h"])
            np.testing.assert_array_equal(await s.get("spirt:hm"), np.ones(3, np.float32))
        finally:
            await s.client.aclose()
    gone = aioredis.Redis(unix_socket_path=str(module_managed_redis.socket_path) + ".gone")
    try:
        s = TensorStore(gone, use_module=True)
        assert await s.health(timeout=0.5) == {"ok": False, "module": False}
    finally:
        await gone.aclose()
