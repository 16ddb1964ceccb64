"""spirtd's own Redis, seen through the daemon: managed with the module, restarted
after kill -9, and an external --redis-url without the module."""

from __future__ import annotations

import asyncio
import os
import signal

from spirtd.localcluster import LocalNode, wait_for
from spirtd.redis.process import ManagedRedis


def test_managed_redis_with_module_survives_kill_9(short_tmp):
    n = LocalNode(short_tmp / "n").start()
    try:
        r = n.status()["redis"]
        assert r["ok"] and r["module"] and r["managed"]
        assert (short_tmp / "n" / "redis" / "password").stat().st_mode & 0o777 == 0o600
        os.kill(r["pid"], signal.SIGKILL)
        wait_for(lambda: n.status()["redis"]["restarts"] >= 1, 30, "spirtd to restart redis")
        wait_for(lambda: n.status()["redis"]["ok"], 30, "redis to answer again")
        assert n.status()["redis"]["pid"] != r["pid"]
        assert "redis-server" in n.log_tail(100) and n.running
    finally:
        assert n.stop() == 0
    # A clean stop takes redis-server down with it.
    try:
        os.kill(r["pid"], 0)
        raise AssertionError("old redis-server still alive")
    except ProcessLookupError:
        pass


def test_external_redis_without_module_falls_back_with_warning(short_tmp):
    async def start_plain() -> ManagedRedis:
        m = ManagedRedis(short_tmp / "ext", load_module=False)
        await m.start()
        return m

    loop = asyncio.new_event_loop()
    m = loop.run_until_complete(start_plain())
    try:
        url = f"unix://{m.socket_path}?username={m.username}&password={m.password}"
        n = LocalNode(short_tmp / "n", args=["--redis-url", url]).start()
        try:
            r = n.status()["redis"]
            assert r["ok"] and not r["module"] and not r["managed"]
            assert "module is not loaded" in n.log_tail()
        finally:
            assert n.stop() == 0
    finally:
        loop.run_until_complete(m.stop())
        loop.close()


def test_unreachable_redis_url_is_fatal_and_named(short_tmp):
    n = LocalNode(short_tmp / "n", args=["--redis-url", f"unix://{short_tmp}/nope.sock"])
    try:
        n.start(timeout=20)
        raise AssertionError("spirtd started with an unreachable redis")
    except Exception as e:
        assert "exited with 78" in str(e) and "redis_url" in str(e)
