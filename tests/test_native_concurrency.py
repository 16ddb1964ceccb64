"""Worker-thread jobs versus everything else that can happen meanwhile.

A job reads its inputs chunk by chunk while Redis serves other clients, so: an input
modified, deleted or flushed meanwhile fails the job with nothing written; a client
that leaves or times out stops the job; the queue is bounded; other keys may change.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from spirtd.localcluster import async_wait_for
from tests.fixtures_redis import RunningRedis, short_tmpdir, start_redis, stop_redis
from tests.test_native_rules import assert_close, get, jobs, load, ref_cclip

N, S = 6, 1_000_000
# CCLIP with this many iterations makes thousands of passes: it only ends when stopped.
ENDLESS = ["TAU", 1.0, "ITERS", 100000]


async def started(c: aioredis.Redis, before: dict[str, int], timeout: float = 10.0) -> None:
    async def more_running() -> bool:
        return (await jobs(c))["jobs_running"] != before["jobs_running"]

    await async_wait_for(more_running, timeout, "the worker job to start", interval=0.005)


async def drained(c: aioredis.Redis, timeout: float = 10.0) -> dict[str, int]:
    last: dict[str, int] = {}

    async def idle() -> bool:
        last.update(await jobs(c))
        return last["jobs_running"] == 0 and last["jobs_queued"] == 0

    await async_wait_for(idle, timeout, "the workers to be idle")
    return last


async def cancelled_reaches(c: aioredis.Redis, n: int, timeout: float = 10.0) -> None:
    """The count moves when Redis frees the blocked client on its main thread, a
    moment after the worker stops: wait for it rather than read it once."""

    async def reached() -> bool:
        return (await jobs(c))["jobs_cancelled"] >= n

    await async_wait_for(reached, timeout, f"jobs_cancelled to reach {n}")
    assert (await jobs(c))["jobs_cancelled"] == n


@pytest.fixture
async def big(managed_redis: RunningRedis) -> AsyncIterator[tuple[RunningRedis, list[str]]]:
    c = managed_redis.client
    await c.config_set("appendonly", "no")  # keeps the test about the module, not disk
    # These tests are about worker-thread jobs: make 24 MB of input one explicitly.
    await c.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 4 << 20)
    rng = np.random.default_rng(0)
    keys = await load(c, rng.standard_normal((N, S), dtype=np.float32))
    yield managed_redis, keys


@pytest.mark.parametrize("change", ["set", "del", "setrange", "shape", "expire", "flushall"])
async def test_input_changed_during_job_fails_and_writes_nothing(
    big: tuple[RunningRedis, list[str]], change: str
) -> None:
    r, keys = big
    c = r.client
    other = await r.server.client()
    try:
        before = await jobs(c)
        task = asyncio.create_task(c.execute_command("SPIRT.CCLIP", "out", N, *keys, *ENDLESS))
        await started(other, before)
        if change == "set":
            await other.set(keys[3], np.zeros(S, np.float32).tobytes())
        elif change == "del":
            await other.delete(keys[3])
        elif change == "setrange":
            await other.setrange(keys[3], 8, b"\0\0\0\0")
        elif change == "shape":
            await other.set(keys[3] + ":shape", "1000,1000")
        elif change == "expire":
            await other.pexpire(keys[3], 1)
            await asyncio.sleep(0.01)
            await other.exists(keys[3])  # makes the lazy expiry happen now
        else:
            await other.flushall()
        with pytest.raises(ResponseError) as ei:
            await asyncio.wait_for(task, 30)
        msg = str(ei.value)
        assert "during the command" in msg and msg.endswith("nothing was written"), msg
        assert not await other.exists("out")
        assert (await drained(other))["jobs_aborted"] == before["jobs_aborted"] + 1
    finally:
        await other.aclose()


async def test_unrelated_writes_do_not_disturb_a_job(big: tuple[RunningRedis, list[str]]) -> None:
    r, keys = big
    c = r.client
    other = await r.server.client()
    try:
        before = await jobs(c)
        task = asyncio.create_task(
            c.execute_command("SPIRT.CCLIP", "out", N, *keys, "TAU", 1.0, "ITERS", 40)
        )
        await started(other, before)
        for i in range(50):
            await other.set(f"unrelated{i}", b"x" * 100)
            await other.set(keys[0] + "x", b"similar name")
        assert await asyncio.wait_for(task, 60) == b"OK"
        X = np.stack([await get(c, k) for k in keys])
        assert_close(await get(c, "out"), ref_cclip(X, 1.0, 40, None), X)
    finally:
        await other.aclose()


async def test_client_that_leaves_stops_its_job(big: tuple[RunningRedis, list[str]]) -> None:
    r, keys = big
    quitter = await r.server.client()
    before = await jobs(r.client)
    task = asyncio.create_task(quitter.execute_command("SPIRT.CCLIP", "out", N, *keys, *ENDLESS))
    await started(r.client, before)
    task.cancel()
    await quitter.aclose()
    await drained(r.client)
    await cancelled_reaches(r.client, before["jobs_cancelled"] + 1)
    assert not await r.client.exists("out")


async def test_job_timeout(big: tuple[RunningRedis, list[str]]) -> None:
    r, keys = big
    c = r.client
    await c.execute_command("SPIRT.CONFIG", "SET", "JOB_TIMEOUT_MS", 300)
    before = await jobs(c)
    t0 = time.monotonic()
    with pytest.raises(ResponseError, match="timed out after 300 ms; nothing was written"):
        await c.execute_command("SPIRT.CCLIP", "out", N, *keys, *ENDLESS)
    assert time.monotonic() - t0 < 5
    await drained(c)
    await cancelled_reaches(c, before["jobs_cancelled"] + 1)
    assert not await c.exists("out")


async def test_queue_is_bounded() -> None:
    d = short_tmpdir()
    try:
        r = await start_redis(
            d, module_args=["THREADS", "1", "MAX_QUEUE", "1", "ASYNC_MIN_BYTES", "0"]
        )
        keys = await load(r.client, np.ones((3, 50_000), np.float32))
        clients = [await r.server.client() for _ in range(3)]
        running = asyncio.create_task(
            clients[0].execute_command("SPIRT.CCLIP", "o1", 3, *keys, *ENDLESS)
        )
        await started(r.client, {"jobs_running": 0})
        queued = asyncio.create_task(
            clients[1].execute_command("SPIRT.CCLIP", "o2", 3, *keys, *ENDLESS)
        )
        for _ in range(500):
            if (await jobs(r.client))["jobs_queued"] == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ResponseError, match="busy: 1 jobs already queued"):
            await clients[2].execute_command("SPIRT.MEAN", "o3", 3, *keys)
        assert await r.client.ping()
        for t, cl in zip((running, queued), clients, strict=False):
            t.cancel()
            await cl.aclose()
        await clients[2].aclose()
        await drained(r.client)
        await cancelled_reaches(r.client, 2)
        await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_many_concurrent_jobs_all_correct(managed_redis: RunningRedis) -> None:
    c = managed_redis.client
    await c.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 0)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5, 20_000)).astype(np.float32)
    keys = await load(c, X)
    clients = [await managed_redis.server.client() for _ in range(8)]
    try:
        replies = await asyncio.gather(
            *(cl.execute_command("SPIRT.MEAN", f"out{i}", 5, *keys) for i, cl in enumerate(clients))
        )
        assert replies == [b"OK"] * 8
        for i in range(8):
            assert_close(await get(c, f"out{i}"), X.astype(np.float64).mean(0), X)
    finally:
        for cl in clients:
            await cl.aclose()
