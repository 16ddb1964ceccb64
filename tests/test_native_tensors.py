"""SPIRT.PUT / GET / NORM / DIGEST and their agreement with spirtd.redis.tensorfmt."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import pytest_asyncio

from spirtd.redis import tensorfmt
from tests.fixtures_redis import RunningRedis, reset_shared
from tests.test_native_rules import get, put

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(params=["main", "worker"], loop_scope="module")
async def r(request: pytest.FixtureRequest, module_managed_redis: RunningRedis) -> RunningRedis:
    return await reset_shared(module_managed_redis, worker=request.param == "worker")


@pytest.mark.parametrize(
    "shape", [(), (0,), (1,), (7,), (3, 4), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 1)]
)
async def test_put_get_roundtrip_in_the_tensorfmt_layout(
    r: RunningRedis, shape: tuple[int, ...]
) -> None:
    c = r.client
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    await put(c, "t", x)
    # The plain keys follow tensorfmt exactly...
    values, shp = await c.get("t"), await c.get("t:shape")
    assert shp == tensorfmt.encode_shape(x.shape)
    np.testing.assert_array_equal(tensorfmt.decode(values, shp), x)
    # ...and GET returns the same.
    np.testing.assert_array_equal(await get(c, "t"), x)


async def test_tensors_written_with_plain_set_are_read_by_the_module(r: RunningRedis) -> None:
    c = r.client
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    v, s = tensorfmt.encode(x)
    await c.set("plain", v)
    await c.set(tensorfmt.shape_key("plain"), s)
    np.testing.assert_array_equal(await get(c, "plain"), x)
    assert float(await c.execute_command("SPIRT.NORM", "plain")) == pytest.approx(
        float(np.linalg.norm(x.astype(np.float64))), rel=1e-12
    )


async def test_put_replaces_like_set(r: RunningRedis) -> None:
    c = r.client
    await put(c, "t", np.ones(3, np.float32))
    await c.expire("t", 1000)
    await put(c, "t", np.zeros(5, np.float32))
    assert await c.ttl("t") == -1
    np.testing.assert_array_equal(await get(c, "t"), np.zeros(5, np.float32))


# 128-byte BLAKE2b blocks hold 32 floats: cover sizes around block boundaries.
@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 64, 65, 1000, 32768, 100_003])
async def test_digest_is_blake2b_256_of_the_values(r: RunningRedis, size: int) -> None:
    c = r.client
    x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    await put(c, "t", x)
    want = hashlib.blake2b(x.tobytes(), digest_size=32).hexdigest()
    assert (await c.execute_command("SPIRT.DIGEST", "t")).decode() == want


async def test_equal_parameters_equal_digests(r: RunningRedis) -> None:
    c = r.client
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    await put(c, "peer_a", x)
    await put(c, "peer_b", x.copy())
    y = x.copy()
    y[4321] = np.nextafter(y[4321], np.float32(np.inf))  # one ulp apart
    await put(c, "peer_c", y)
    da, db, dc = [
        await c.execute_command("SPIRT.DIGEST", k) for k in ("peer_a", "peer_b", "peer_c")
    ]
    assert da == db != dc


async def test_digest_does_not_care_about_float_values(r: RunningRedis) -> None:
    # A digest is of bytes: it works on non-finite values, which other commands refuse.
    c = r.client
    raw = np.array([np.nan, np.inf, -0.0, 1.0], np.float32).tobytes()
    await c.set("weird", raw)
    await c.set("weird:shape", "4")
    want = hashlib.blake2b(raw, digest_size=32).hexdigest()
    assert (await c.execute_command("SPIRT.DIGEST", "weird")).decode() == want


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
async def test_norm(r: RunningRedis, scale: float) -> None:
    c = r.client
    x = (np.random.default_rng(2).standard_normal(70_001) * scale).astype(np.float32)
    await put(c, "t", x)
    got = float(await c.execute_command("SPIRT.NORM", "t"))
    assert got == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-9)


async def test_large_tensor_digest_on_the_worker(module_managed_redis: RunningRedis) -> None:
    c = (await reset_shared(module_managed_redis)).client
    x = np.random.default_rng(3).random(10_000_000, dtype=np.float32)
    await put(c, "big", x)
    info = await c.execute_command("SPIRT.INFO")
    before = dict(zip(info[::2], info[1::2], strict=True))[b"jobs_async"]
    got = (await c.execute_command("SPIRT.DIGEST", "big")).decode()
    assert got == hashlib.blake2b(x.tobytes(), digest_size=32).hexdigest()
    info = await c.execute_command("SPIRT.INFO")
    assert dict(zip(info[::2], info[1::2], strict=True))[b"jobs_async"] == before + 1
