"""What replicas and RDB save points see of the module's results.

A command's outputs propagate by value (a SET of each output and its shape), so a
replica holds them even though the inputs were SCRATCH and never reached it. The module
skips that copy when nothing would receive it (AOF off, no replica, no backlog), so
these tests run with AOF off: a replica, or a backlog that outlives its replica, must
still get every result, and a result must still count as a change for RDB save points.
(With AOF on, tests/test_store_persistence.py checks the AOF.)
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest_asyncio
import redis.asyncio as aioredis

from spirtd.localcluster import async_wait_for
from spirtd.redis.process import ADMIN_USERNAME
from tests.fixtures_redis import RunningRedis, short_tmpdir, start_redis, stop_redis
from tests.test_native_rules import put

S = 100_003  # an odd length; 400 KB a tensor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[RunningRedis, RunningRedis]]:
    """A master with the module and AOF off, and a replica without the module (it
    only ever receives SETs), not yet attached."""
    d = short_tmpdir("spirt-repl-")
    started: list[RunningRedis] = []
    try:
        master = await start_redis(d / "m", port=free_port())
        started.append(master)
        replica = await start_redis(d / "r", load_module=False, port=free_port())
        started.append(replica)
        await master.client.config_set("appendonly", "no")
        # Its default waits 5 s for more replicas before each full sync.
        await master.client.config_set("repl-diskless-sync-delay", 0)
        await replica.client.config_set("masteruser", ADMIN_USERNAME)
        await replica.client.config_set(
            "masterauth", master.server.admin_password_file.read_text().strip()
        )
        yield master, replica
    finally:
        # A replica still attached sat out its SIGTERM until the SIGKILL 30 s
        # later (a teardown of 30 s): detach it first.
        if len(started) == 2:
            with contextlib.suppress(Exception):
                await started[1].client.replicaof("NO", "ONE")
        for r in reversed(started):
            await stop_redis(r)
        shutil.rmtree(d, ignore_errors=True)


async def attach(master: RunningRedis, replica: RunningRedis) -> None:
    port = (await master.client.config_get("port"))["port"]
    await replica.client.replicaof("127.0.0.1", port)

    async def up() -> bool:
        return (await replica.client.info("replication")).get("master_link_status") == "up"

    await async_wait_for(up, 30, "the replica's link to the master")


async def replicated(master: aioredis.Redis) -> None:
    """Waits until the replica has acknowledged everything the master sent so far."""
    assert await master.execute_command("WAIT", 1, 30_000) == 1


async def assert_same(master: aioredis.Redis, replica: aioredis.Redis, key: str) -> None:
    value = await master.get(key)
    assert value is not None and len(value) == 4 * S, key
    assert await replica.get(key) == value, key
    assert await replica.get(f"{key}:shape") == await master.get(f"{key}:shape") == str(S).encode()


async def scratch_inputs(c: aioredis.Redis, X: np.ndarray) -> list[str]:
    keys = [f"g{i}" for i in range(len(X))]
    for k, x in zip(keys, X, strict=True):
        await c.execute_command("SPIRT.PUT", k, str(S), x.tobytes(), "SCRATCH")
    return keys


async def test_a_replica_gets_every_result_by_value(
    pair: tuple[RunningRedis, RunningRedis],
) -> None:
    master, replica = pair
    m, r = master.client, replica.client
    await attach(master, replica)
    X = np.random.default_rng(5).standard_normal((4, S)).astype(np.float32)
    keys = await scratch_inputs(m, X)
    await put(m, "w", X[0])  # not scratch: SPIRT.PUT propagates itself
    await m.execute_command("SPIRT.MEAN", "avg", 4, *keys)  # inline
    await m.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 0)
    await m.execute_command("SPIRT.MEDIAN", "med", 4, *keys)  # on a worker
    await m.execute_command(
        "SPIRT.SGD", "w", "g1", "LR", 0.1, "MOMENTUM", 0.9, "BUF", "buf"
    )  # two outputs
    await m.execute_command("SPIRT.MEAN", "skipped", 4, *keys, "SCRATCH")
    await replicated(m)
    for key in ("avg", "med", "w", "buf"):
        await assert_same(m, r, key)
    # The inputs never reached the replica: what it holds came by value.
    for key in (*keys, "skipped"):
        assert not await r.exists(key), key


async def test_a_backlog_without_replicas_still_gets_the_results(
    pair: tuple[RunningRedis, RunningRedis],
) -> None:
    master, replica = pair
    m, r = master.client, replica.client
    await attach(master, replica)
    await r.replicaof("NO", "ONE")

    async def detached() -> bool:
        return (await m.info("replication"))["connected_slaves"] == 0

    await async_wait_for(detached, 30, "the master to see its replica leave")
    info = await m.info("replication")
    assert info["repl_backlog_active"] == 1  # kept for repl-backlog-ttl, so it can resume
    X = np.random.default_rng(6).standard_normal((3, S)).astype(np.float32)
    keys = await scratch_inputs(m, X)
    offset = info["master_repl_offset"]
    await m.execute_command("SPIRT.MEAN", "late", 3, *keys)
    # The result went into the backlog (scratch inputs add nothing to it).
    assert (await m.info("replication"))["master_repl_offset"] >= offset + 4 * S
    await attach(master, replica)
    await replicated(m)
    await assert_same(m, r, "late")


async def test_results_count_as_changes_for_rdb_save_points() -> None:
    d = short_tmpdir("spirt-dirty-")
    try:
        r = await start_redis(d)
        try:
            c = r.client
            await c.config_set("appendonly", "no")
            info = await c.info("replication")
            assert info["connected_slaves"] == 0 and info["repl_backlog_active"] == 0
            X = np.random.default_rng(7).standard_normal((2, S)).astype(np.float32)
            keys = await scratch_inputs(c, X)

            async def changes() -> int:
                return int((await c.info("persistence"))["rdb_changes_since_last_save"])

            before = await changes()
            await c.execute_command("SPIRT.MEAN", "scratch", 2, *keys, "SCRATCH")
            assert await changes() == before  # SCRATCH: not persisted, not counted
            await c.execute_command("SPIRT.MEAN", "inline", 2, *keys)
            after_inline = await changes()
            assert after_inline > before
            await c.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 0)
            await c.execute_command("SPIRT.MEAN", "worker", 2, *keys)
            assert await changes() > after_inline
        finally:
            await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)
