"""The control API: HTTP/JSON on DATA_DIR/api.sock, for spirtctl.

A unix socket with mode 0600 means only the daemon's own user (and root) can
drive it. TCP is off by default; ``[control] listen_tcp`` turns it on for remote
tooling, and then every TCP request must carry the node's token
(``Authorization: Bearer ...``), because a TCP port has no owner to check.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from spirtd import metrics
from spirtd.control import sdnotify

# ApiError lives with the services' interface; importing it from here still works.
from spirtd.nodeapi import ApiError

if TYPE_CHECKING:
    from spirtd.config import ControlConfig
    from spirtd.nodeapi import RouteHandler, StatusSource

log = logging.getLogger("spirtd.api")

MAX_REQUEST = 64 * 1024
TOKEN_FILE = "api.token"  # in the data dir, unless [control] token_file says otherwise


class ApiServer:
    def __init__(self, node: StatusSource, path: Path) -> None:
        self.node = node
        self.path = path
        self._runners: list[web.AppRunner] = []
        self._routes: dict[tuple[str, str], RouteHandler] = {}
        config = getattr(node, "config", None)
        self.control: ControlConfig | None = getattr(config, "control", None)
        self.tcp_address: str | None = None
        node_id = node.key.node_id if hasattr(node, "key") else "local"
        self.metrics = metrics.NodeMetrics(node, node_id)

    def route(self, method: str, path: str, fn: RouteHandler) -> None:
        """Subsystems add their endpoints here (fn: async (body: dict) -> dict | str)."""
        self._routes[(method, path)] = fn

    def _app(self, token: bytes | None) -> web.Application:
        middlewares = [_require_token(token)] if token is not None else []
        app = web.Application(client_max_size=MAX_REQUEST, middlewares=middlewares)
        app.router.add_get("/v1/status", self._json(self.node.status))
        app.router.add_get("/v1/peers", self._json(lambda: {"members": self.node.members()}))
        app.router.add_get("/v1/metrics", self._metrics)
        # Prometheus scrapes /metrics by default.
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
        return app

    async def _runner(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def start(self) -> None:
        runner = await self._runner(self._app(None))
        self._remove_stale_socket()
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            await web.UnixSite(runner, str(self.path)).start()
        finally:
            os.umask(old)
        # Belt and braces: a umask cannot widen, but a pre-existing ACL default could.
        os.chmod(self.path, 0o600)
        if self.control is not None and self.control.listen_tcp:
            await self._start_tcp(self.control)
        # The control socket is the last thing a node brings up: from here on
        # spirtctl works, which is what readiness means to systemd.
        sdnotify.notify("READY=1\nSTATUS=serving")

    async def _start_tcp(self, control: ControlConfig) -> None:
        from spirtd.config import ConfigError, parse_hostport

        token = load_or_create_token(self.token_path())
        host, port = parse_hostport(control.listen_tcp, "control.listen_tcp")
        runner = await self._runner(self._app(token))
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(
                f"control.listen_tcp: cannot listen on {control.listen_tcp}: {e.strerror}"
            ) from None
        bound = runner.addresses[0][1] if runner.addresses else port
        self.tcp_address = f"{host}:{bound}"
        log.info("control API also on tcp %s (token in %s)", self.tcp_address, self.token_path())
        with contextlib.suppress(OSError):
            # spirtctl --api finds the port here when it was 0 (picked by the kernel).
            (self.path.parent / "api.tcp").write_text(self.tcp_address + "\n")

    def token_path(self) -> Path:
        if self.control is not None and self.control.token_file:
            return Path(self.control.token_file).expanduser()
        return self.path.parent / TOKEN_FILE

    def _remove_stale_socket(self) -> None:
        # The data dir lock (node.py) guarantees no live daemon owns this socket.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if len(str(self.path).encode()) > 107:
            raise OSError(f"control socket path too long: {self.path}")

    async def stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        for runner in self._runners:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.path.parent / "api.tcp").unlink()

    @staticmethod
    def _json(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(fn())

        return handler

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE}
        )

    async def _dispatch(self, request: web.Request) -> web.Response:
        fn = self._routes.get((request.method, request.path))
        if fn is None:
            known = any(p == request.path for _, p in self._routes)
            return _error(405 if known else 404, f"no endpoint {request.method} {request.path}")
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = json.loads(await request.read())
            except ValueError:
                return _error(400, "request body is not JSON")
            if not isinstance(body, dict):
                return _error(400, "request body must be a JSON object")
        try:
            result = await fn(body)
        except ApiError as e:
            return _error(e.status, str(e))
        return web.json_response(result)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def load_or_create_token(path: Path) -> bytes:
    """The bearer token TCP clients must present: read from ``path``, or created there
    (32 random bytes, hex, mode 0600) when the file does not exist."""
    from spirtd.config import ConfigError
    from spirtd.keyfiles import write_secret

    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = secrets.token_hex(32)
        write_secret(path, (text + "\n").encode())
        log.info("created the control API token in %s", path)
    except OSError as e:
        raise ConfigError(f"control.token_file: cannot read {path}: {e.strerror}") from None
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"control.token_file: {path} is readable by others; chmod 600 it")
    if len(text) < 16:
        raise ConfigError(f"control.token_file: {path} holds fewer than 16 characters")
    return text.encode()


def _require_token(token: bytes) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not reveal how much of a guess matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            return _error(
                401, "missing or wrong token: send 'Authorization: Bearer <the node's api.token>'"
            )
        return await handler(request)

    return check
