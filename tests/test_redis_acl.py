"""The managed Redis's ACL users, on a real redis-server: the daemon and the
functions each get only what they need, and neither can administer the server.
A loose password file is refused."""

from __future__ import annotations

import secrets
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
from spirtd.training.state import StateKeys
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


async def test_function_user_writes_only_its_invocation_output(
    managed_redis: RunningRedis, users: dict[str, aioredis.Redis]
) -> None:
    """Issue 21, finding 2: the functions' user could write every ``spirt:*:g:*`` key,
    i.e. the peers' verified gradients and this node's own before it is signed."""
    fn, admin = users["function"], managed_redis.client
    keys = StateKeys("j")
    params = np.arange(4, dtype=np.float32)
    held = {
        keys.theta: params,
        keys.peer(3, "12D3KooWPeer"): np.full(4, 7, dtype=np.float32),
        keys.local(3): np.full(4, 5, dtype=np.float32),
        keys.buf: np.full(4, 2, dtype=np.float32),
        keys.agg: np.full(4, 3, dtype=np.float32),
    }
    for key, x in held.items():
        await put(admin, key, x)
    out = keys.fn_output(3, 0, secrets.token_hex(16))
    values, shape = tensorfmt.encode(params * 2)

    # What the gradient function does: STRLEN and GET the parameters, then write its
    # output with SPIRT.PUT, or with SET and SET in one MULTI where that is refused.
    assert await fn.strlen(keys.theta) == 16
    assert await fn.get(tensorfmt.shape_key(keys.theta)) == b"4"
    await fn.execute_command("SPIRT.PUT", out, shape, values, "SCRATCH", "EX", 60)
    assert await admin.get(out) == values
    async with fn.pipeline(transaction=True) as pipe:
        pipe.set(out, values, ex=60)
        pipe.set(tensorfmt.shape_key(out), shape, ex=60)
        await pipe.execute()
    assert await admin.get(tensorfmt.shape_key(out)) == shape

    # No other key: not a peer's verified gradient, not the local gradient, not the
    # model or the optimizer's state, by any write command it has.
    for key in held:
        for target in (key, tensorfmt.shape_key(key)):
            with pytest.raises(NoPermissionError):
                await fn.set(target, b"evil")
        with pytest.raises(NoPermissionError):
            await fn.execute_command("SPIRT.PUT", key, shape, values, "SCRATCH", "EX", 60)
    # Nor read anything but the model, delete, or run the daemon's commands.
    for attempt in (
        fn.get(keys.peer(3, "12D3KooWPeer")),
        fn.get(keys.local(3)),
        fn.get("other:key"),
        fn.set("other:key", b"x"),
        fn.delete(out),
        fn.execute_command("SPIRT.MEAN", keys.local(3), 1, out),
        fn.execute_command("SPIRT.GET", keys.theta),
    ):
        with pytest.raises(NoPermissionError):
            await attempt
    for key, x in held.items():
        assert await admin.get(key) == x.astype("<f4").tobytes(), key


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
