"""Redis fixtures: real redis-server processes started by ManagedRedis.

* ``managed_redis``  a redis-server with the SPIRT module loaded;
* ``plain_redis``    the same without the module (the client-side fallback path);
* ``module_managed_redis`` / ``module_plain_redis``: one server per test module, for
  modules with many tests (start-up dominates otherwise). Tests using them must run in
  the module's event loop: ``pytestmark = pytest.mark.asyncio(loop_scope="module")``;
  they share the data, so flush what you need clean.

All yield a :class:`RunningRedis` with ``.url``, ``.username``, ``.password_file``,
``.socket_path``, ``.client`` (an open ``redis.asyncio.Redis``) and ``.server`` (the
``ManagedRedis``). Tests flush and reconfigure these servers, so ``.client`` logs in as
the admin user (``admin=True``); ``daemon_client()`` gives a client as spirtd's own,
least-privileged user. Each test gets a fresh server in a short temp dir (unix socket
paths are limited to 107 bytes, which pytest's tmp_path can exceed).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from spirtd.redis.module import ModuleNotBuilt, module_path
from spirtd.redis.process import USERNAME, ManagedRedis
from spirtd.redis.store import TensorStore


@dataclass
class RunningRedis:
    server: ManagedRedis
    client: aioredis.Redis

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def username(self) -> str:
        return self.server.username

    @property
    def password_file(self) -> Path:
        return self.server.password_file

    @property
    def socket_path(self) -> Path:
        return self.server.socket_path

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    def daemon_client(self) -> aioredis.Redis:
        """A client as the daemon's ACL user (the caller closes it)."""
        return aioredis.Redis(
            unix_socket_path=str(self.server.socket_path),
            username=USERNAME,
            password=self.server.daemon_password,
        )


def require_module() -> Path:
    """The built module's path; fails the test with the fix if it is not built."""
    try:
        path = module_path()
    except ModuleNotBuilt as e:
        pytest.fail(f"{e}", pytrace=False)
    if not path.exists():
        pytest.fail(f"SPIRT Redis module missing at {path}; run `pip install -e .`", pytrace=False)
    return path


def short_tmpdir(prefix: str = "spirt-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


async def start_redis(
    data_dir: Path, *, load_module: bool = True, module_args: Sequence[str] = (), **kw: object
) -> RunningRedis:
    """Starts a ManagedRedis in ``data_dir`` and opens a client; for tests needing options."""
    if load_module:
        require_module()
    kw.setdefault("admin", True)
    server = ManagedRedis(data_dir, load_module=load_module, module_args=module_args, **kw)  # type: ignore[arg-type]
    await server.start()
    # redis-py 8 gives a client a 5 s socket timeout by default; a 16 x 10M rule on a
    # loaded machine takes longer, and the module's own job timeout bounds it anyway.
    return RunningRedis(server=server, client=await server.client(socket_timeout=120))


async def stop_redis(r: RunningRedis) -> None:
    await r.client.aclose()
    await r.server.stop()


async def _running(load_module: bool) -> AsyncIterator[RunningRedis]:
    d = short_tmpdir()
    try:
        r = await start_redis(d, load_module=load_module)
        try:
            yield r
        finally:
            await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def managed_redis() -> AsyncIterator[RunningRedis]:
    """A real redis-server with the SPIRT module, on a unix socket with ACL auth."""
    async for r in _running(load_module=True):
        yield r


@pytest.fixture
async def plain_redis() -> AsyncIterator[RunningRedis]:
    """A real redis-server without the module."""
    async for r in _running(load_module=False):
        yield r


async def reset_shared(r: RunningRedis, *, worker: bool = False) -> RunningRedis:
    """Empties a shared server and restores the module's runtime settings (worker=True
    sends every command to the worker threads)."""
    await r.client.flushall()
    if r.server.load_module:
        await r.client.execute_command(
            "SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 0 if worker else 4 << 20
        )
        await r.client.execute_command("SPIRT.CONFIG", "SET", "JOB_TIMEOUT_MS", 600000)
    return r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_managed_redis() -> AsyncIterator[RunningRedis]:
    """One redis-server with the module for a whole test module."""
    async for r in _running(load_module=True):
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_plain_redis() -> AsyncIterator[RunningRedis]:
    """One redis-server without the module for a whole test module."""
    async for r in _running(load_module=False):
        yield r


@pytest.fixture(params=["module", "client"])
def st_redis(request: pytest.FixtureRequest) -> RunningRedis:
    """A module-scoped server with the module, then one without: the store's two paths."""
    name = "module_managed_redis" if request.param == "module" else "module_plain_redis"
    return request.getfixturevalue(name)


@pytest_asyncio.fixture(loop_scope="module")
async def st(st_redis: RunningRedis) -> AsyncIterator[TensorStore]:
    """A TensorStore on a clean st_redis, using the module exactly when it is loaded."""
    await reset_shared(st_redis)
    s = await TensorStore.open(st_redis.client)
    assert s.uses_module is st_redis.server.load_module
    yield s
