"""Tensors survive restarts of the managed Redis (AOF), including a kill -9."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.exceptions import ResponseError

from spirtd.localcluster import async_wait_for
from spirtd.redis.store import TensorStore
from tests.fixtures_redis import RunningRedis, short_tmpdir, start_redis, stop_redis
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


def _aof_bytes(data_dir: Path) -> int:
    return sum(f.stat().st_size for f in (data_dir / "redis" / "appendonlydir").iterdir())


async def _aof_flushed(r: RunningRedis) -> bool:
    info = await r.client.info("persistence")
    return info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0


async def test_aof_holds_the_state_not_the_scratch(data_dir: Path) -> None:
    # A training round's shape: gradients and their aggregate are SCRATCH, the optimizer
    # step's results are the state. The AOF grows by the state (by value, so replaying it
    # needs no gradient), not by the gradients.
    r = await start_redis(data_dir)
    s = await TensorStore.open(r.client)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(250_000).astype(np.float32)  # 1 MB
    await s.put("w", x)
    await s.put("kept", -x)
    size0 = _aof_bytes(data_dir)
    rounds = 6
    for _ in range(rounds):
        grads = [f"g{i}" for i in range(4)]
        for g in grads:
            await s.put(g, rng.standard_normal(x.size).astype(np.float32), scratch=True)
        await s.median("agg", grads, scratch=True)
        await s.sgd("w", "agg", lr=0.01, momentum=0.9, buf="buf")
    await s.mean("avg", ["w", "kept"])  # not scratch: kept by value
    # A training job's way: the optimizer's results are scratch too (checkpoints keep them).
    await s.put("w2", x, scratch=True)
    await s.sgd("w2", "agg", lr=0.01, scratch=True)
    await s.adam("w2", "agg", m="m2", v="v2", step=1, lr=0.01, scratch=True)
    digests = {k: await s.digest(k) for k in ("w", "buf", "avg", "kept")}
    # Every write is in the AOF file (not in Redis's buffer, nor waiting to be synced).
    await async_wait_for(lambda: _aof_flushed(r), 30, "the AOF buffer on disk")
    grown = _aof_bytes(data_dir) - size0
    state_bytes = (2 * rounds + 1) * x.nbytes  # w and buf each round, avg once
    # With the gradients it would be 5 tensors more per round.
    assert state_bytes <= grown < state_bytes + 100_000, (grown, state_bytes)
    await stop_redis(r)

    r = await start_redis(data_dir)
    s = await TensorStore.open(r.client)
    assert {k: await s.digest(k) for k in digests} == digests
    for k in ("g0", "g3", "agg", "w2", "m2", "v2"):
        assert not await s.exists(k), k
    await stop_redis(r)


async def test_scratch_is_an_option_of_every_writing_command(data_dir: Path) -> None:
    r = await start_redis(data_dir)
    c, s = r.client, await TensorStore.open(r.client)
    x = np.arange(8, dtype=np.float32)
    await s.put("a", x)
    await s.put("b", x + 1)
    with pytest.raises(ResponseError, match="BOGUS"):
        await c.execute_command("SPIRT.PUT", "c", "8", x.tobytes(), "BOGUS")
    with pytest.raises(ResponseError, match="SCRATCH"):
        await c.execute_command("SPIRT.MEAN", "c", 2, "a", "b", "SCRATCH", "SCRATCH")
    assert not await s.exists("c")
    await s.trimmed_mean("t", ["a", "b", "a"], trim=1, scratch=True)
    await s.krum("k", ["a", "b", "a", "b", "a"], 1, scratch=True)
    await s.geomed("gm", ["a", "b"], scratch=True)
    await s.cclip("cc", ["a", "b"], 1.0, start="a", scratch=True)
    np.testing.assert_array_equal(await s.get("t"), x)
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
    # Not wait_ready alone: right after the kill the supervisor may not have noticed yet.
    await async_wait_for(lambda: r.server.restarts == 1, 30, "the supervisor's restart")
    await r.server.wait_ready(20)
    assert r.server.restarts == 1 and r.server.pid != pid
    # The same client object reconnects; the store works and nothing was lost.
    np.testing.assert_array_equal(await s.get("x"), x)
    np.testing.assert_array_equal(await s.get("z"), np.zeros_like(x))
    await s.mean("z2", ["x", "x"])
    np.testing.assert_array_equal(await s.get("z2"), x)
    assert await s.digest("x") == await s.digest("z2")
    await stop_redis(r)
