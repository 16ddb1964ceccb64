"""Tensors survive restarts of the managed Redis (AOF), including a kill -9."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from spirtd.redis.store import TensorStore
from tests.fixtures_redis import short_tmpdir, start_redis, stop_redis
from tests.test_native_rules import assert_close, ref_mean
from tests.test_native_updates import ref_sgd


@pytest.fixture
def data_dir() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_tensors_survive_a_clean_restart(data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 300_000)).astype(np.float32)  # the mean runs on a worker
    r = await start_redis(data_dir)
    await r.client.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 0)
    s = await TensorStore.open(r.client)
    keys = [f"g{i}" for i in range(4)]
    for k, x in zip(keys, X, strict=True):
        await s.put(k, x)
    await s.mean("avg", keys)
    await s.put("w", X[0])
    await s.sgd("w", "g1", lr=0.5, momentum=0.9, buf="buf")
    digest = await s.digest("avg")
    await stop_redis(r)

    r = await start_redis(data_dir)
    s = await TensorStore.open(r.client)
    for k, x in zip(keys, X, strict=True):
        np.testing.assert_array_equal(await s.get(k), x)
    assert_close(await s.get("avg"), ref_mean(X), X)
    assert await s.digest("avg") == digest
    p_ref, b_ref = ref_sgd(X[0], X[1], None, 0.5, 0.9, 0.0, False, 0.0)
    assert_close(await s.get("w"), p_ref, X)
    assert_close(await s.get("buf"), b_ref, X)
    await stop_redis(r)


async def test_aof_holds_commands_not_megabytes(data_dir: Path) -> None:
    # Module commands replicate themselves verbatim: replaying them on the same inputs
    # gives the same bytes, and the AOF does not grow by a full tensor per command.
    r = await start_redis(data_dir)
    s = await TensorStore.open(r.client)
    x = np.random.default_rng(2).standard_normal(250_000).astype(np.float32)  # 1 MB
    await s.put("a", x)
    await s.put("b", -x)
    aof = data_dir / "redis" / "appendonlydir"
    size0 = sum(f.stat().st_size for f in aof.iterdir())
    for _ in range(10):
        await s.median("m", ["a", "b", "a"])
        await s.sgd("a", "b", lr=0.001)
    await r.client.execute_command("SPIRT.MEAN", "z", 2, "a", "b")
    digests = {k: await s.digest(k) for k in ("a", "m", "z")}
    await asyncio.sleep(1.2)  # appendfsync everysec
    grown = sum(f.stat().st_size for f in aof.iterdir()) - size0
    assert grown < 10_000, grown
    await stop_redis(r)
    r = await start_redis(data_dir)
    s = await TensorStore.open(r.client)
    assert {k: await s.digest(k) for k in digests} == digests
    await stop_redis(r)


async def test_kill9_restart_and_store_works_again(data_dir: Path) -> None:
    r = await start_redis(data_dir, min_backoff=0.05)
    c = r.client
    await c.config_set("appendfsync", "always")  # kill -9 must not lose the last second
    s = await TensorStore.open(c)
    x = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
    await s.put("x", x)
    await s.put("y", -x)
    await s.mean("z", ["x", "y"])
    pid = r.server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.05)
    await r.server.wait_ready(20)
    assert r.server.restarts == 1 and r.server.pid != pid
    # The same client object reconnects; the store works and nothing was lost.
    np.testing.assert_array_equal(await s.get("x"), x)
    np.testing.assert_array_equal(await s.get("z"), np.zeros_like(x))
    await s.mean("z2", ["x", "x"])
    np.testing.assert_array_equal(await s.get("z2"), x)
    assert await s.digest("x") == await s.digest("z2")
    await stop_redis(r)
