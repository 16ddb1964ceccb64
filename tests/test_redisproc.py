"""ManagedRedis: a real redis-server, its security settings, supervision and persistence."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from spirtd.localcluster import async_wait_for
from spirtd.redis.process import ManagedRedis, RedisStartError
from spirtd.redis.store import module_loaded
from tests.fixtures_redis import RunningRedis, short_tmpdir, start_redis, stop_redis


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_serves_on_unix_socket_with_acl(managed_redis: RunningRedis) -> None:
    r = managed_redis
    assert await r.client.ping()
    assert r.url == f"unix://{r.socket_path}"
    assert r.socket_path.is_socket()
    assert _mode(r.password_file) == 0o600
    assert _mode(r.server.config_file) == 0o600
    # Tests log in as the admin user; the daemon has its own (tests/test_redis_acl.py).
    assert await r.client.acl_whoami() in ("spirt-admin", b"spirt-admin")
    daemon = r.daemon_client()
    try:
        assert await daemon.ping()
        with pytest.raises(ResponseError, match="no permissions"):
            await daemon.acl_whoami()
    finally:
        await daemon.aclose()
    # No TCP listener unless configured.
    assert (await r.client.config_get("port"))["port"] == "0"
    assert r.server.tcp_url is None
    with pytest.raises(RuntimeError, match="no TCP port"):
        r.server.connection_info(tcp=True)
    # AOF persistence inside the data dir.
    cfg = await r.client.config_get("appendonly")
    assert cfg["appendonly"] == "yes"
    assert (await r.client.config_get("dir"))["dir"] == str(r.server.dir)
    # The passwords are not in the config file, only their hashes.
    conf = r.server.config_file.read_text()
    for f in (r.password_file, r.server.function_password_file, r.server.admin_password_file):
        assert _mode(f) == 0o600
        assert f.read_text().strip() not in conf


async def test_default_user_and_wrong_password_rejected(managed_redis: RunningRedis) -> None:
    no_retry = Retry(NoBackoff(), 0)
    anon = aioredis.Redis(unix_socket_path=str(managed_redis.socket_path), retry=no_retry)
    try:
        with pytest.raises((AuthenticationError, ResponseError, RedisConnectionError)) as ei:
            await anon.set("x", "1")
        assert "auth" in str(ei.value).lower()
    finally:
        await anon.aclose()
    bad = aioredis.Redis(
        unix_socket_path=str(managed_redis.socket_path),
        username="spirt",
        password="nope" * 8,
        retry=no_retry,
    )
    try:
        with pytest.raises((AuthenticationError, RedisConnectionError), match="invalid username"):
            await bad.ping()
    finally:
        await bad.aclose()


async def test_default_user_cannot_log_in(managed_redis: RunningRedis) -> None:
    anon = aioredis.Redis(
        unix_socket_path=str(managed_redis.socket_path), retry=Retry(NoBackoff(), 0)
    )
    try:
        for password in ("", "x", managed_redis.server.password):
            with pytest.raises((AuthenticationError, ResponseError, RedisConnectionError)):
                await anon.execute_command("AUTH", "default", password)
    finally:
        await anon.aclose()


async def test_transactions_in_the_aof_replay_after_restart() -> None:
    # Redis 7.0 replays an AOF's MULTI/EXEC as the (log-in-disabled) default user.
    d = short_tmpdir()
    try:
        r = await start_redis(d, load_module=False)
        async with r.client.pipeline(transaction=True) as pipe:
            pipe.set("a", b"1")
            pipe.set("b", b"2")
            await pipe.execute()
        await stop_redis(r)
        r = await start_redis(d, load_module=False)
        assert await r.client.mget("a", "b") == [b"1", b"2"]
        assert "CRITICAL" not in r.server.log_file.read_text()
        await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_connection_info_lets_another_client_in(managed_redis: RunningRedis) -> None:
    info = managed_redis.server.connection_info().to_dict()
    password = Path(info["password_file"]).read_text().strip()
    c = aioredis.Redis.from_url(info["url"], username=info["username"], password=password)
    try:
        assert info["username"] == "spirt-fn"
        await c.set("spirt:j:fn:1:0:nonce", b"v")
        assert await managed_redis.client.get("spirt:j:fn:1:0:nonce") == b"v"
    finally:
        await c.aclose()


async def test_module_detection(managed_redis: RunningRedis, plain_redis: RunningRedis) -> None:
    assert await module_loaded(managed_redis.client)
    assert not await module_loaded(plain_redis.client)


async def test_password_is_kept_across_restarts() -> None:
    d = short_tmpdir()
    try:
        r = await start_redis(d, load_module=False)
        first = r.server.password
        await stop_redis(r)
        r = await start_redis(d, load_module=False)
        assert r.server.password == first
        assert await r.client.ping()
        await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_missing_redis_server_is_one_clear_line(tmp_path: Path) -> None:
    m = ManagedRedis(tmp_path, load_module=False, redis_server="/nonexistent/redis-server")
    with pytest.raises(RedisStartError) as ei:
        await m.start()
    msg = str(ei.value)
    assert "redis-server not found" in msg and "\n" not in msg


async def test_bad_config_reports_why() -> None:
    d = short_tmpdir()
    try:
        m = ManagedRedis(
            d, load_module=False, extra_config=["no-such-directive yes"], start_timeout=5
        )
        with pytest.raises(RedisStartError) as ei:
            await m.start()
        assert "during startup" in str(ei.value)
        assert "no-such-directive" in str(ei.value) or "Bad directive" in str(ei.value)
        assert m.pid is None
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_too_long_socket_path_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    with pytest.raises(RedisStartError, match="too long"):
        await ManagedRedis(deep, load_module=False).start()


async def test_second_server_on_same_dir_refused(managed_redis: RunningRedis) -> None:
    other = ManagedRedis(managed_redis.data_dir, load_module=False)
    with pytest.raises(RedisStartError, match="already serving"):
        await other.start()
    assert await managed_redis.client.ping()


async def test_tcp_port_when_configured() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = short_tmpdir()
    try:
        r = await start_redis(d, load_module=False, port=port)
        assert r.server.tcp_url == f"redis://127.0.0.1:{port}/0"
        assert (await r.client.config_get("port"))["port"] == str(port)
        assert (await r.client.config_get("bind"))["bind"] == "127.0.0.1"
        info = r.server.connection_info(tcp=True)
        tcp = aioredis.Redis.from_url(
            info.url, username=info.username, password=Path(info.password_file).read_text().strip()
        )
        try:
            assert await tcp.ping()
        finally:
            await tcp.aclose()
        assert r.socket_path.is_socket()  # the unix socket stays
        await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_kill9_is_restarted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    d = short_tmpdir()
    try:
        r = await start_redis(d, load_module=True, min_backoff=0.05)
        await r.client.set("before", b"1")
        await r.client.execute_command("CONFIG", "SET", "appendfsync", "always")
        await r.client.set("durable", b"yes")
        old_pid = r.server.pid
        assert old_pid is not None
        with caplog.at_level(logging.WARNING, logger="spirtd.redis"):
            os.kill(old_pid, signal.SIGKILL)
            await async_wait_for(
                lambda: r.server.restarts >= 1 and r.server.running, 30, "the restart"
            )
        assert r.server.restarts == 1
        assert r.server.pid not in (None, old_pid)
        assert "killed by signal SIGKILL" in caplog.text
        assert await r.client.get("durable") == b"yes"  # AOF replay after the crash
        assert await module_loaded(r.client)
        await stop_redis(r)
        assert r.server.pid is None
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_clean_stop_then_restart_keeps_data() -> None:
    d = short_tmpdir()
    try:
        r = await start_redis(d, load_module=False)
        await r.client.set("t", b"\x00\x01" * 1000)
        proc_pid = r.server.pid
        await stop_redis(r)
        assert proc_pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(proc_pid, 0)
        r = await start_redis(d, load_module=False)
        assert await r.client.get("t") == b"\x00\x01" * 1000
        await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)
