"""Every bad-input class gets a clear error reply and leaves every key unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tests.fixtures_redis import RunningRedis, reset_shared
from tests.test_native_rules import put

N = 100


async def setup_keys(c: aioredis.Redis) -> None:
    rng = np.random.default_rng(0)
    for i in range(7):
        await put(c, f"g{i}", rng.standard_normal(N).astype(np.float32))
    await put(c, "short", np.ones(N // 2, np.float32))
    await put(c, "out", np.full(N, 7.0, np.float32))
    await put(c, "w", np.ones(N, np.float32))
    await put(c, "buf", np.ones(N, np.float32))
    await c.rpush("lst", "x")
    bad = np.ones(N, np.float32)
    bad[17] = np.nan
    await c.set("nan", bad.tobytes())
    await c.set("nan:shape", str(N))
    bad[17] = np.inf
    await c.set("inf", bad.tobytes())
    await c.set("inf:shape", str(N))
    await c.set("noshape", np.ones(N, np.float32).tobytes())
    await c.set("badshape", np.ones(N, np.float32).tobytes())
    await c.set("badshape:shape", "ten")
    await c.set("lenmis", np.ones(N - 1, np.float32).tobytes())
    await c.set("lenmis:shape", str(N))
    await c.set("odd", b"abc")
    await c.set("odd:shape", "1")
    await c.rpush("outlist", "x")
    await put(c, "shapelist", np.ones(N, np.float32))
    await c.delete("shapelist:shape")
    await c.rpush("shapelist:shape", "x")


async def snapshot(c: aioredis.Redis) -> dict[bytes, tuple[bytes | None, int]]:
    """Every key's serialized value and TTL, in two round trips."""
    keys = sorted(await c.keys("*"))
    async with c.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.dump(k)
            pipe.pttl(k)
        res = await pipe.execute()
    return {k: (res[2 * i], res[2 * i + 1]) for i, k in enumerate(keys)}


G = [f"g{i}" for i in range(7)]

CASES: list[tuple[str, list[object], str]] = [
    # missing keys
    ("missing", ["SPIRT.MEAN", "o", 2, "g0", "nokey"], "missing key 'nokey'"),
    ("missing", ["SPIRT.MEDIAN", "o", 3, "nokey", "g0", "g1"], "missing key 'nokey'"),
    ("missing", ["SPIRT.KRUM", "o", 7, *G[:6], "nokey", "F", 1], "missing key 'nokey'"),
    (
        "missing",
        ["SPIRT.CCLIP", "o", 2, "g0", "g1", "TAU", 1, "START", "nokey"],
        "missing key 'nokey'",
    ),
    ("missing", ["SPIRT.SGD", "w", "nokey", "LR", 0.1], "missing key 'nokey'"),
    ("missing", ["SPIRT.SGD", "nokey", "g0", "LR", 0.1], "missing key 'nokey'"),
    (
        "missing",
        ["SPIRT.ADAM", "w", "g0", "M", "nom", "V", "nov", "STEP", 2, "LR", 0.1],
        "missing key 'nom'",
    ),
    ("missing", ["SPIRT.NORM", "nokey"], "missing key 'nokey'"),
    ("missing", ["SPIRT.DIGEST", "nokey"], "missing key 'nokey'"),
    ("missing", ["SPIRT.GET", "nokey"], "missing key 'nokey'"),
    ("missing", ["SPIRT.MEAN", "o", 2, "g0", "noshape"], "missing shape key 'noshape:shape'"),
    # wrong types
    ("type", ["SPIRT.MEAN", "o", 2, "g0", "lst"], "key 'lst' holds the wrong type"),
    ("type", ["SPIRT.MEAN", "outlist", 2, "g0", "g1"], "output key 'outlist' holds the wrong"),
    ("type", ["SPIRT.MEAN", "shapelist", 2, "g0", "g1"], "output key 'shapelist:shape'"),
    ("type", ["SPIRT.MEAN", "o", 2, "g0", "shapelist"], "wrong type at shape key"),
    (
        "type",
        ["SPIRT.SGD", "w", "g0", "LR", 0.1, "MOMENTUM", 0.9, "BUF", "lst"],
        "key 'lst' holds the wrong type",
    ),
    ("type", ["SPIRT.PUT", "lst", "1", b"\0\0\0\0"], "output key 'lst' holds the wrong type"),
    ("type", ["SPIRT.NORM", "lst"], "holds the wrong type"),
    # lengths and shapes
    ("length", ["SPIRT.MEAN", "o", 2, "g0", "short"], "length mismatch: 'short' has 50"),
    ("length", ["SPIRT.MEDIAN", "o", 3, "short", "g0", "g1"], "length mismatch: 'g0' has 100"),
    ("length", ["SPIRT.SGD", "w", "short", "LR", 0.1], "length mismatch"),
    ("length", ["SPIRT.CCLIP", "o", 2, "g0", "g1", "TAU", 1, "START", "short"], "length mismatch"),
    (
        "length",
        ["SPIRT.ADAM", "w", "g0", "M", "short", "V", "buf", "STEP", 2, "LR", 0.1],
        "length mismatch",
    ),
    ("length", ["SPIRT.MEAN", "o", 1, "lenmis"], "length mismatch: 'lenmis' has 396 bytes"),
    ("length", ["SPIRT.NORM", "odd"], "length mismatch: 'odd' has 3 bytes"),
    ("length", ["SPIRT.PUT", "o", "3", b"\0" * 8], "length mismatch: 8 value bytes"),
    ("shape", ["SPIRT.MEAN", "o", 1, "badshape"], "bad shape 'ten'"),
    ("shape", ["SPIRT.PUT", "o", "2,,2", b"\0" * 16], "bad shape"),
    ("shape", ["SPIRT.PUT", "o", "1,1,1,1,1,1,1,1,1", b"\0" * 4], "more than 8 dimensions"),
    ("shape", ["SPIRT.PUT", "o", "99999999,99999999", b""], "tensor too large"),
    # non-finite values
    ("nonfinite", ["SPIRT.MEAN", "o", 2, "g0", "nan"], "non-finite value in 'nan' at index 17"),
    ("nonfinite", ["SPIRT.MEDIAN", "o", 2, "inf", "g0"], "non-finite value in 'inf' at index 17"),
    ("nonfinite", ["SPIRT.KRUM", "o", 5, "g0", "g1", "g2", "g3", "nan", "F", 1], "non-finite"),
    ("nonfinite", ["SPIRT.GEOMED", "o", 2, "g0", "nan"], "non-finite"),
    ("nonfinite", ["SPIRT.SGD", "w", "nan", "LR", 0.1], "non-finite value in 'nan'"),
    (
        "nonfinite",
        ["SPIRT.ADAM", "w", "inf", "M", "m", "V", "v", "STEP", 1, "LR", 0.1],
        "non-finite value in 'inf'",
    ),
    ("nonfinite", ["SPIRT.NORM", "nan"], "non-finite"),
    (
        "nonfinite",
        ["SPIRT.PUT", "o", "2", np.array([1, np.nan], "<f4").tobytes()],
        "non-finite value at index 1",
    ),
    ("nonfinite", ["SPIRT.SGD", "w", "g0", "LR", 1e39], "update produced a non-finite"),
    (
        "nonfinite",
        ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", 1, "inf"],
        "weight must be a finite number",
    ),
    ("nonfinite", ["SPIRT.CCLIP", "o", 2, "g0", "g1", "TAU", "nan"], "TAU must be a finite"),
    # bad or missing arguments
    ("args", ["SPIRT.MEAN", "o", 0, "g0"], "numkeys must be in [1, 1024]"),
    ("args", ["SPIRT.MEAN", "o", "x", "g0"], "numkeys must be an integer"),
    ("args", ["SPIRT.MEAN", "o", 5, "g0", "g1"], "numkeys is 5 but only 2 keys follow"),
    ("args", ["SPIRT.MEAN", "o"], "wrong number of arguments"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "BOGUS", 1], "unknown option 'BOGUS'"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", 1], "WEIGHTS needs 2 values"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", 0, 0], "positive sum"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", 0, "-0.0"], "positive sum"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", 1, "-1e-320"], "weight must be in"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", 1, "nan"], "weight must be a finite"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", "-inf", 1], "weight must be a finite"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "WEIGHTS", -1, 2], "weight must be in"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "NNM", 2], "NNM f must be in [0, 1]"),
    ("args", ["SPIRT.MEAN", "o", 2, "g0", "g1", "NNM", 0, "NNM", 0], "NNM given twice"),
    ("args", ["SPIRT.TRIMMEAN", "o", 2, "g0", "g1"], "TRIMMEAN needs TRIM or BETA"),
    ("args", ["SPIRT.TRIMMEAN", "o", 5, *G[:5], "TRIM", 3], "TRIM must be in [0, 2]"),
    ("args", ["SPIRT.TRIMMEAN", "o", 4, *G[:4], "TRIM", 2], "TRIM must be in [0, 1]"),
    ("args", ["SPIRT.TRIMMEAN", "o", 2, "g0", "g1", "TRIM", 0.5], "TRIM must be an integer"),
    ("args", ["SPIRT.TRIMMEAN", "o", 2, "g0", "g1", "TRIM", -1], "TRIM must be in"),
    (
        "args",
        ["SPIRT.TRIMMEAN", "o", 3, *G[:3], "TRIM", 1, "BETA", 0.3],
        "BETA or TRIM, not both",
    ),
    ("args", ["SPIRT.TRIMMEAN", "o", 2, "g0", "g1", "BETA", 0.5], "BETA must be in [0, 0.5)"),
    ("args", ["SPIRT.TRIMMEAN", "o", 2, "g0", "g1", "BETA"], "option BETA needs 1 value"),
    ("args", ["SPIRT.KRUM", "o", 5, *G[:5]], "KRUM needs F"),
    ("args", ["SPIRT.KRUM", "o", 5, *G[:5], "F", 1, "M", 5], "M must be at most n-f"),
    ("args", ["SPIRT.KRUM", "o", 5, *G[:5], "F", 1, "M", 0], "M must be in [1, 1024]"),
    ("args", ["SPIRT.GEOMED", "o", 2, "g0", "g1", "MAXITER", 0], "MAXITER must be in"),
    ("args", ["SPIRT.GEOMED", "o", 2, "g0", "g1", "EPS", -1], "EPS must be in"),
    ("args", ["SPIRT.CCLIP", "o", 2, "g0", "g1"], "CCLIP needs TAU"),
    ("args", ["SPIRT.CCLIP", "o", 2, "g0", "g1", "TAU", 0], "TAU must be positive"),
    ("args", ["SPIRT.CCLIP", "o", 2, "g0", "g1", "TAU", 1, "ITERS", 0], "ITERS must be in"),
    ("args", ["SPIRT.SGD", "w", "g0"], "wrong number of arguments"),
    ("args", ["SPIRT.SGD", "w", "g0", "MOMENTUM", 0.9], "SGD needs LR"),
    ("args", ["SPIRT.SGD", "w", "g0", "LR", 0.1, "MOMENTUM", 0.9], "MOMENTUM needs a BUF"),
    ("args", ["SPIRT.SGD", "w", "g0", "LR", -0.1], "LR must be in"),
    ("args", ["SPIRT.SGD", "w", "g0", "LR", 0.1, "NESTEROV"], "NESTEROV needs MOMENTUM > 0"),
    ("args", ["SPIRT.SGD", "w", "g0", "LR", 0.1, "MOMENTUM", 0.9, "BUF", "w"], "BUF must differ"),
    ("args", ["SPIRT.SGD", "w", "g0", "LR", 0.1, "DAMPENING", 2], "DAMPENING must be in"),
    (
        "args",
        ["SPIRT.ADAM", "w", "g0", "M", "m", "V", "m", "STEP", 1, "LR", 0.1],
        "must all differ",
    ),
    (
        "args",
        ["SPIRT.ADAM", "w", "g0", "M", "m", "V", "v", "STEP", 0, "LR", 0.1],
        "STEP must be in",
    ),
    ("args", ["SPIRT.ADAM", "w", "g0", "M", "m", "V", "v", "LR", 0.1, "EPS", 1], "ADAM needs STEP"),
    ("args", ["SPIRT.ADAM", "w", "g0", "M", "m", "V", "v"], "wrong number of arguments"),
    (
        "args",
        ["SPIRT.ADAM", "w", "g0", "M", "m", "V", "v", "STEP", 1, "LR", 0.1, "BETAS", 1, 0.9],
        "beta1 must be in [0, 1)",
    ),
    ("args", ["SPIRT.NORM", "g0", "g1"], "wrong number of arguments"),
    ("args", ["SPIRT.CONFIG", "SET", "THREADS", 4], "unknown setting 'THREADS'"),
    ("args", ["SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", -5], "value must be in"),
    # too few inputs for f
    (
        "f",
        ["SPIRT.KRUM", "o", 4, *G[:4], "F", 1],
        "too few inputs for f: Krum needs n > 2f+2 (n=4, f=1)",
    ),
    ("f", ["SPIRT.KRUM", "o", 6, *G[:6], "F", 2], "Krum needs n > 2f+2 (n=6, f=2)"),
    ("f", ["SPIRT.KRUM", "o", 1, "g0", "F", 0], "Krum needs n > 2f+2 (n=1, f=0)"),
]


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(params=["main", "worker"], loop_scope="module")
async def r(request: pytest.FixtureRequest, module_managed_redis: RunningRedis) -> RunningRedis:
    await reset_shared(module_managed_redis, worker=request.param == "worker")
    await setup_keys(module_managed_redis.client)
    return module_managed_redis


async def test_every_bad_input_is_refused_and_changes_nothing(r: RunningRedis) -> None:
    c = r.client
    seen: set[str] = set()
    for kind, cmd, expected in CASES:
        before = await snapshot(c)
        with pytest.raises(ResponseError) as ei:
            await c.execute_command(*cmd)
        msg = str(ei.value)
        assert expected in msg, (cmd, msg)
        assert "\n" not in msg
        assert await snapshot(c) == before, cmd
        seen.add(kind)
    assert seen == {"missing", "type", "length", "shape", "nonfinite", "args", "f"}
    assert await c.ping()


async def test_module_error_names_the_spirt_namespace(r: RunningRedis) -> None:
    with pytest.raises(ResponseError, match=r"^SPIRT missing key 'x'$"):
        await r.client.execute_command("SPIRT.NORM", "x")


async def test_commands_inside_multi_run_without_blocking(r: RunningRedis) -> None:
    c = r.client
    async with c.pipeline(transaction=True) as pipe:
        pipe.execute_command("SPIRT.MEAN", "o", 2, "g0", "g1")
        pipe.execute_command("SPIRT.NORM", "o")
        res = await pipe.execute()
    assert res[0] == b"OK" and float(res[1]) > 0


async def test_getkeys_reports_every_key(r: RunningRedis) -> None:
    c = r.client
    got = await c.command_getkeys("SPIRT.CCLIP", "o", 2, "a", "b", "TAU", 1, "START", "s")
    assert [g.decode() if isinstance(g, bytes) else g for g in got] == ["o", "a", "b", "s"]
    # SCRATCH takes no value: the walk must not take the next option's name for one.
    got = await c.command_getkeys(
        "SPIRT.CCLIP", "o", 2, "a", "b", "SCRATCH", "START", "s", "TAU", 1
    )
    assert [g.decode() if isinstance(g, bytes) else g for g in got] == ["o", "a", "b", "s"]
    got = await c.command_getkeys("SPIRT.ADAM", "p", "g", "M", "m", "V", "v", "STEP", 1, "LR", 1)
    assert [g.decode() if isinstance(g, bytes) else g for g in got] == ["p", "g", "m", "v"]
