"""The local runtime: the AWS Lambda Invoke API over HTTP on loopback.

``POST /2015-03-31/functions/{name}/invocations`` with ``X-Amz-Invocation-Type``
``RequestResponse`` (default; waits), ``Event`` (202, runs later) or ``DryRun``
(204). Errors use Lambda's codes and shapes (lambda_errors.py), so the same
boto3 client and invoker work against this and against AWS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from aiohttp import web

from spirtd.functions.runtime import lambda_errors, sigv4
from spirtd.functions.runtime.config import RuntimeConfig
from spirtd.functions.runtime.pool import FunctionPool

log = logging.getLogger(__name__)

INVOKE_PATH = "/2015-03-31/functions/{name}/invocations"


def _function_name(raw: str) -> str:
    # Clients may name a function by ARN ("arn:aws:lambda:r:a:function:NAME[:QUAL]")
    # or "NAME:QUALIFIER"; the local runtime has one version of each function.
    if raw.startswith("arn:"):
        parts = raw.split(":")
        return parts[6] if len(parts) >= 7 else ""
    return raw.split(":", 1)[0]


class LocalRuntime:
    """``endpoint = await LocalRuntime(cfg).start()`` ... ``await runtime.stop()``."""

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.pools = {n: FunctionPool(n, s, self.config) for n, s in self.config.functions.items()}
        key = self.config.access_key
        self.access_key = sigv4.AccessKey(*key) if key else sigv4.AccessKey.generate()
        self.in_flight = 0
        self.throttles = 0
        self.rejected_signatures = 0
        self._events_pending = 0
        self._slot_freed = asyncio.Event()
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._endpoint: str | None = None

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> str:
        if self._runner is not None:
            raise RuntimeError("runtime already started")
        app = web.Application(client_max_size=self.config.max_request_bytes + 1)
        app.router.add_post(INVOKE_PATH, self._handle_invoke)
        # In-flight requests end within seconds once stop() closes the pools, so
        # the server need not wait aiohttp's default minute for them.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
            await asyncio.gather(*(p.prewarm(self.config.prewarm) for p in self.pools.values()))
        except BaseException:
            await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        host, port = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
        host = f"[{host}]" if ":" in host else host
        self._endpoint = f"http://{host}:{port}"
        log.info("local functions runtime on %s", self._endpoint)
        return self._endpoint

    async def stop(self) -> None:
        """Ends every worker and the server; invocations still running get an error."""
        for t in list(self._event_tasks):
            t.cancel()
        await asyncio.gather(*self._event_tasks, return_exceptions=True)
        # Workers first: that answers in-flight requests, so the server's own
        # shutdown does not wait on them.
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> LocalRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what the daemon reports ----------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if self._endpoint is None:
            raise RuntimeError("runtime not started")
        return self._endpoint

    @property
    def credentials(self) -> tuple[str, str]:
        """(access key id, secret) a client must sign with; hand them only to the daemon."""
        return self.access_key.as_tuple()

    @property
    def cold_starts(self) -> int:
        return sum(p.stats.cold_starts for p in self.pools.values())

    def stats(self) -> dict[str, Any]:
        return {
            "endpoint": self._endpoint,
            "in_flight": self.in_flight,
            "concurrency": self.config.concurrency,
            "throttles": self.throttles,
            "rejected_signatures": self.rejected_signatures,
            "events_pending": self._events_pending,
            "cold_starts": self.cold_starts,
            "functions": {
                n: {k: v for k, v in vars(p.stats).items() if k != "durations_ms"}
                | {"workers": len(p.worker_pids)}
                for n, p in self.pools.items()
            },
        }

    # --- HTTP ---------------------------------------------------------------------------
    @staticmethod
    def _error(err: lambda_errors.ServiceError, request_id: str) -> web.Response:
        headers = err.headers() | {"X-Amzn-RequestId": request_id}
        return web.Response(status=err.status, body=err.body(), headers=headers)

    async def _read_body(self, request: web.Request, limit: int) -> bytes | None:
        """The body, or None when it is over ``limit`` (checked before buffering it)."""
        if request.content_length is not None and request.content_length > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle_invoke(self, request: web.Request) -> web.StreamResponse:
        rid = str(uuid.uuid4())
        kind = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if kind not in ("RequestResponse", "Event", "DryRun"):
            return self._error(
                lambda_errors.bad_parameter(
                    f"Invalid invocation type {kind!r}: use RequestResponse, Event or DryRun"
                ),
                rid,
            )
        limit = self.config.max_event_bytes if kind == "Event" else self.config.max_request_bytes
        body = await self._read_body(request, limit)
        if body is None:
            return self._error(lambda_errors.too_large(limit), rid)
        if self.config.require_signature:
            try:
                sigv4.verify(
                    self.access_key,
                    method=request.method,
                    raw_path=request.raw_path.partition("?")[0],
                    query=request.rel_url.raw_query_string,
                    headers=request.headers,
                    get_all=request.headers.getall,
                    body=body,
                )
            except sigv4.SignatureError as e:
                self.rejected_signatures += 1
                return self._error(lambda_errors.forbidden(str(e)), rid)
        name = _function_name(request.match_info["name"])
        pool = self.pools.get(name)
        if pool is None:
            return self._error(lambda_errors.not_found(name), rid)
        if not body.strip():
            body = b"{}"  # Lambda hands an empty payload to the handler as {}
        try:
            json.loads(body)
        except ValueError as e:
            return self._error(lambda_errors.bad_json(str(e)), rid)
        ok_headers = {"X-Amzn-RequestId": rid, "X-Amz-Executed-Version": "$LATEST"}
        if kind == "DryRun":
            return web.Response(status=204, headers=ok_headers)
        if kind == "Event":
            if self._events_pending >= self.config.event_queue:
                self.throttles += 1
                return self._error(lambda_errors.throttled(), rid)
            self._events_pending += 1
            task = asyncio.get_running_loop().create_task(self._run_event(pool, rid, body))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_tasks.discard)
            return web.Response(status=202, headers=ok_headers)
        if self.in_flight >= self.config.concurrency:
            self.throttles += 1
            return self._error(lambda_errors.throttled(), rid)
        self.in_flight += 1
        try:
            outcome = await pool.invoke(rid, body)
        finally:
            self._free_slot()
        headers = ok_headers | {"Content-Type": "application/json"}
        if outcome.error:
            headers["X-Amz-Function-Error"] = "Unhandled"
        return web.Response(status=200, body=outcome.body, headers=headers)

    def _free_slot(self) -> None:
        self.in_flight -= 1
        self._slot_freed.set()

    async def _run_event(self, pool: FunctionPool, rid: str, body: bytes) -> None:
        # Async invocations queue for a free slot (bounded by event_queue) instead
        # of being throttled, as Lambda's internal event queue does.
        # asyncio.timeout (not wait_for) keeps this in one task, so nothing runs
        # between seeing a free slot and taking it.
        try:
            async with asyncio.timeout(self.config.event_max_age_s):
                while self.in_flight >= self.config.concurrency:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
        except TimeoutError:
            log.warning(
                "async invocation %s of %s dropped: waited longer than %.0f s",
                rid,
                pool.name,
                self.config.event_max_age_s,
            )
            return
        finally:
            self._events_pending -= 1
        self.in_flight += 1
        try:
            outcome = await pool.invoke(rid, body)
            if outcome.error:
                log.warning(
                    "async invocation %s of %s failed: %s",
                    rid,
                    pool.name,
                    outcome.body[:500].decode(errors="replace"),
                )
        finally:
            self._free_slot()
