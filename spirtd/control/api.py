"""The control API: HTTP/JSON on DATA_DIR/api.sock, for spirtctl.

A unix socket with mode 0600 means only the daemon's own user (and root) can
drive it; there is no network-facing control surface to secure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from spirtd.nodeapi import RouteHandler, StatusSource

log = logging.getLogger("spirtd.api")

MAX_REQUEST = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiServer:
    def __init__(self, node: StatusSource, path: Path) -> None:
        self.node = node
        self.path = path
        self._runner: web.AppRunner | None = None
        self._routes: dict[tuple[str, str], RouteHandler] = {}

    def route(self, method: str, path: str, fn: RouteHandler) -> None:
        """Subsystems add their endpoints here (fn: async (body: dict) -> dict | str)."""
        self._routes[(method, path)] = fn

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_REQUEST)
        app.router.add_get("/v1/status", self._json(self.node.status))
        app.router.add_get("/v1/peers", self._json(lambda: {"members": self.node.members()}))
        app.router.add_get("/v1/metrics", self._metrics)
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._remove_stale_socket()
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)

    def _remove_stale_socket(self) -> None:
        # The data dir lock (node.py) guarantees no live daemon owns this socket.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if len(str(self.path).encode()) > 107:
            raise OSError(f"control socket path too long: {self.path}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @staticmethod
    def _json(fn: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(fn())

        return handler

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(self.node.status()), content_type="text/plain")

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


def render_metrics(status: dict[str, Any]) -> str:
    """Prometheus text exposition of the node's counters and gauges."""
    lines = [
        "# HELP spirt_events_total Events and rejections by reason.",
        "# TYPE spirt_events_total counter",
    ]
    for name, value in sorted(status.get("counters", {}).items()):
        lines.append(f'spirt_events_total{{event="{_label(name)}"}} {value}')
    links = status.get("links", [])
    states: dict[str, int] = {}
    for m in status.get("members", []):
        states[m["state"]] = states.get(m["state"], 0) + 1
    lines += ["# HELP spirt_members Cluster members by state.", "# TYPE spirt_members gauge"]
    for state in ("alive", "suspect", "dead", "left"):
        lines.append(f'spirt_members{{state="{state}"}} {states.get(state, 0)}')
    lines += [
        "# HELP spirt_links Open peer links.",
        "# TYPE spirt_links gauge",
        f"spirt_links {len(status.get('links', []))}",
        "# HELP spirt_link_bytes_total Bytes moved over peer links.",
        "# TYPE spirt_link_bytes_total counter",
        f'spirt_link_bytes_total{{direction="in"}} {sum(x["bytes_in"] for x in links)}',
        f'spirt_link_bytes_total{{direction="out"}} {sum(x["bytes_out"] for x in links)}',
    ]
    training = status.get("training", {})
    lines += [
        "# HELP spirt_training_round Current training round.",
        "# TYPE spirt_training_round gauge",
        f"spirt_training_round {training.get('round') or 0}",
    ]
    for key in ("loss", "accuracy"):
        if training.get(key) is not None:
            lines += [f"# TYPE spirt_training_{key} gauge", f"spirt_training_{key} {training[key]}"]
    lines += [
        "# HELP spirt_uptime_seconds Seconds since the daemon started.",
        "# TYPE spirt_uptime_seconds gauge",
        f"spirt_uptime_seconds {status.get('uptime_s', 0)}",
    ]
    return "\n".join(lines) + "\n"


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
