"""The node's Redis: a managed redis-server with the SPIRT module (default), or
an external one given by --redis-url; and the tensor store over it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from spirtd.config import ConfigError
from spirtd.keyfiles import write_secret
from spirtd.redis.binding import CredentialRef, RedisBinding, RedisTarget, check_url
from spirtd.redis.process import ManagedRedis, RedisStartError, RedisTls, default_tls_files
from spirtd.redis.store import TensorStore

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi

log = logging.getLogger("spirtd.redis")

HEALTH_INTERVAL_S = 2.0
PING_TIMEOUT_S = 2.0
# The module bounds each command itself (JOB_TIMEOUT_MS, 600 s by default); the
# client waits a little longer so a slow aggregation is not cut off client-side.
COMMAND_TIMEOUT_S = 660.0


class RedisService:
    name = "redis"

    def __init__(self, node: NodeApi) -> None:
        self.node = node
        self.managed: ManagedRedis | None = None
        self.client: aioredis.Redis | None = None
        self.store: TensorStore | None = None
        self.ok = False
        self.detail = "not started"
        self._health: asyncio.Task[None] | None = None

    async def start(self) -> None:
        url = self.node.config.redis_url
        if url:
            self.client = aioredis.from_url(
                url, socket_connect_timeout=5.0, socket_timeout=COMMAND_TIMEOUT_S
            )
            try:
                async with asyncio.timeout(PING_TIMEOUT_S * 3):
                    await self.client.ping()
            except (RedisError, OSError, TimeoutError) as e:
                raise ConfigError(f"redis_url: cannot reach {url}: {e}") from None
        else:
            self.managed = ManagedRedis(self.node.data.root, logger=log, tls=self._tls())
            try:
                await self.managed.start()
            except RedisStartError as e:
                raise ConfigError(f"redis: {e}") from None
            self.client = await self.managed.client(socket_timeout=COMMAND_TIMEOUT_S)
        self.store = await TensorStore.open(self.client, logger=log)
        self.ok = True
        self.detail = "ok"
        self._health = asyncio.create_task(self._watch(), name="redis-health")

    def _tls(self) -> RedisTls | None:
        """The TLS listener [redis] asks for; missing files are named at start."""
        rd = self.node.config.redis
        if not rd.tls_port:
            return None
        cert, key, ca = default_tls_files(self.node.data.root)
        return RedisTls(
            port=rd.tls_port,
            cert=Path(rd.tls_cert) if rd.tls_cert else cert,
            key=Path(rd.tls_key) if rd.tls_key else key,
            ca=Path(rd.tls_ca) if rd.tls_ca else ca,
            bind=rd.tls_bind,
            client_certs=rd.tls_client_certs,
        )

    async def _watch(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                async with asyncio.timeout(PING_TIMEOUT_S):
                    await self.client.ping()
                if not self.ok:
                    log.info("redis answers again")
                self.ok, self.detail = True, "ok"
            except (RedisError, OSError, TimeoutError) as e:
                if self.ok:
                    log.warning("redis is not answering: %s", e)
                self.ok, self.detail = False, str(e)[:200]

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
        if self.client is not None:
            await self.client.aclose()
        if self.managed is not None:
            await self.managed.stop()

    def function_target(self) -> RedisTarget:
        """What a gradient event says about Redis: only which one, by URL. On AWS
        Lambda the function's own configuration names its Redis, so nothing."""
        if self.node.config.functions == "lambda":
            return RedisTarget()
        return RedisTarget(self.function_binding().url)

    def function_binding(self) -> RedisBinding:
        """This Redis as the local functions' configuration binds it: its URL and a
        0600 password file (the functions' own ACL user for the managed Redis).
        Raises CredentialError for a plain redis:// URL off this machine."""
        if self.managed is not None:
            return self.managed.function_binding()
        url = self.node.config.redis_url or ""
        parts = urlsplit(url)
        # Credentials may be in the userinfo or (redis-py's form for unix sockets) the
        # query; the binding's URL keeps neither.
        query = parse_qsl(parts.query, keep_blank_values=True)
        q_user = next((v for k, v in query if k == "username"), None)
        q_password = next((v for k, v in query if k == "password"), None)
        rest = urlencode([(k, v) for k, v in query if k not in ("username", "password")])
        if parts.scheme == "unix":
            # urlunsplit would write "unix:/path", which redis-py refuses.
            bare = f"unix://{parts.path}" + (f"?{rest}" if rest else "")
        else:
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            netloc += f":{parts.port}" if parts.port else ""
            bare = urlunsplit((parts.scheme, netloc, parts.path, rest, parts.fragment))
        user = unquote(parts.username) if parts.username else q_user
        password = unquote(parts.password) if parts.password is not None else q_password
        if password is None:
            return RedisBinding(bare, user, CredentialRef("none"))
        check_url(bare)  # before the password is written anywhere
        secret = self.node.data.root / "redis-url.secret"
        write_secret(secret, password.encode())
        return RedisBinding(bare, user, CredentialRef("file", str(secret)))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "module": bool(self.store is not None and self.store.uses_module),
            "managed": self.managed is not None,
            "detail": self.detail,
        }
        if self.managed is not None:
            out["url"] = self.managed.url
            if self.managed.tls is not None:
                out["tls"] = {
                    "bind": self.managed.tls.bind,
                    "port": self.managed.tls.port,
                    "client_certs": self.managed.tls.client_certs,
                }
            out["restarts"] = self.managed.restarts
            out["pid"] = self.managed.pid
        return {"redis": out}
