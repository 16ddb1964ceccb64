"""The managed Redis's ACL users, on a real redis-server: the daemon and the
functions each get only what they need, and neither can administer the server.
A loose password file is refused."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from spirtd.redis import tensorfmt
from spirtd.redis.process import FUNCTION_USERNAME, ManagedRedis, RedisStartError
from spirtd.redis.store import StoreError, TensorStore
from tests.fixtures_redis import RunningRedis, short_tmpdir

# What no user but the admin may run: each would let a function (or anyone holding
# its password) wipe, stop or reconfigure the server, or grant itself more.
ADMIN_ONLY: list[list[object]] = [
    ["FLUSHALL"],
    ["FLUSHDB"],
    ["SHUTDOWN", "NOSAVE"],
    ["ACL", "SETUSER", FUNCTION_USERNAME, "+@all"],
    ["ACL", "LIST"],
    ["CONFIG", "SET", "appendonly", "no"],
    ["CONFIG", "GET", "*"],
    ["MODULE", "LIST"],
    ["KEYS", "*"],
    ["SPIRT.CONFIG", "SET", "JOB_TIMEOUT_MS", "1"],
]


@pytest_asyncio.fixture
async def users(managed_redis: RunningRedis) -> AsyncIterator[dict[str, aioredis.Redis]]:
    info = managed_redis.server.connection_info()
    fn = aioredis.Redis.from_url(
        info.url, username=info.username, password=Path(info.password_file).read_text().strip()
    )
    daemon = managed_redis.daemon_client()
    try:
        yield {"function": fn, "daemon": daemon}
    finally:
        await fn.aclose()
        await daemon.aclose()


async def put(c: aioredis.Redis, key: str, x: np.ndarray) -> None:
    values, shape = tensorfmt.encode(x)
    await c.set(key, values)
    await c.set(tensorfmt.shape_key(key), shape)


@pytest.mark.parametrize("who", ["function", "daemon"])
async def test_admin_commands_are_refused(
    managed_redis: RunningRedis, users: dict[str, aioredis.Redis], who: str
) -> None:
    c = users[who]
    await managed_redis.client.set("spirt:j:theta", b"keep")
    for cmd in ADMIN_ONLY:
        with pytest.raises(NoPermissionError):
            await c.execute_command(*cmd)
    # Nothing happened: the data is there and the server still answers.
    assert await managed_redis.client.get("spirt:j:theta") == b"keep"
    assert await managed_redis.client.execute_command("SPIRT.CONFIG", "GET", "JOB_TIMEOUT_MS")
    assert await c.ping()


async def test_function_user_reads_params_and_writes_only_gradients(
    managed_redis: RunningRedis, users: dict[str, aioredis.Redis]
) -> None:
    fn = users["function"]
    await put(managed_redis.client, "spirt:j:theta", np.arange(4, dtype=np.float32))
    # What the gradient function does: STRLEN and GET the parameters, then SET its
    # slice's gradient and shape in one MULTI.
    assert await fn.strlen("spirt:j:theta") == 16
    assert await fn.get("spirt:j:theta:shape") == b"4"
    async with fn.pipeline(transaction=True) as pipe:
        pipe.set("spirt:j:g:3:s:0", b"grad", ex=60)
        pipe.set("spirt:j:g:3:s:0:shape", b"1", ex=60)
        await pipe.execute()
    assert await managed_redis.client.get("spirt:j:g:3:s:0") == b"grad"
    # It cannot overwrite the model, delete, or touch keys outside spirt:.
    for attempt in (
        fn.set("spirt:j:theta", b"evil"),
        fn.delete("spirt:j:g:3:s:0"),
        fn.get("other:key"),
        fn.set("other:key", b"x"),
        fn.execute_command("SPIRT.MEAN", "spirt:j:g:9:s:0", 1, "spirt:j:theta"),
        fn.execute_command("SPIRT.GET", "spirt:j:theta"),
    ):
        with pytest.raises(NoPermissionError):
            await attempt
    assert await managed_redis.client.get("spirt:j:theta") == np.arange(4, dtype="<f4").tobytes()


async def test_daemon_user_runs_the_store_on_its_keys(
    managed_redis: RunningRedis, users: dict[str, aioredis.Redis]
) -> None:
    daemon = users["daemon"]
    st = await TensorStore.open(daemon)
    assert st.uses_module  # found through SPIRT.INFO: MODULE LIST is refused
    x = np.arange(6, dtype=np.float32)
    await st.put("spirt:j:g:1:s:0", x)
    await st.put("spirt:j:g:1:s:1", x * 3)
    await st.mean("spirt:j:agg", ["spirt:j:g:1:s:0", "spirt:j:g:1:s:1"])
    np.testing.assert_array_equal(await st.get("spirt:j:agg"), x * 2)
    await st.sgd("spirt:j:agg", "spirt:j:g:1:s:0", lr=1.0)
    assert len(await st.digest("spirt:j:agg")) == 64
    await st.delete("spirt:j:g:1:s:0")
    with pytest.raises(StoreError, match="no permissions"):
        await st.put("elsewhere", x)
    with pytest.raises(NoPermissionError):
        await daemon.get("elsewhere")


async def test_loose_password_file_is_refused_not_repaired() -> None:
    d = short_tmpdir()
    try:
        first = ManagedRedis(d, load_module=False)
        await first.start()
        await first.stop()
        for f in (first.password_file, first.function_password_file):
            f.chmod(0o644)
            with pytest.raises(RedisStartError, match="readable by others"):
                await ManagedRedis(d, load_module=False).start()
            assert f.stat().st_mode & 0o777 == 0o644  # left as found, for the operator
            f.chmod(0o600)
        again = ManagedRedis(d, load_module=False)
        await again.start()
        await again.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_password_file_symlink_is_refused() -> None:
    d = short_tmpdir()
    try:
        target = d / "elsewhere"
        target.write_text("x" * 40)
        target.chmod(0o600)
        (d / "redis").mkdir()
        (d / "redis" / "password").symlink_to(target)
        with pytest.raises(RedisStartError, match="cannot open"):
            await ManagedRedis(d, load_module=False).start()
    finally:
        shutil.rmtree(d, ignore_errors=True)
