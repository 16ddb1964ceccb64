"""The local runtime: the AWS Lambda Invoke API over HTTP on loopback.

``POST /2015-03-31/functions/{name}/invocations`` with ``X-Amz-Invocation-Type``
``RequestResponse`` (default; waits), ``Event`` (202, runs later, retried twice on
failure) or ``DryRun`` (204). Errors use Lambda's codes and shapes
(lambda_errors.py), so the same boto3 client and invoker work against this and
against AWS. Also as Lambda does: ``LogType=Tail`` returns the log's last 4 KB in
``X-Amz-Log-Result``; ``X-Amz-Client-Context`` reaches ``context.client_context``;
a function is named by name, partial or full ARN, with ``$LATEST`` as its only
qualifier.

Nothing is read from an unauthenticated request beyond its headers: the SigV4
header is checked first, and at most ``max_unverified`` bodies are read at once
for requests whose signature is still to be checked. A signed request that ran is
not run again within the signature's clock window (a replay) when it signs
spirtd's random per-request header, as spirtd's invoker does
(``invoker.add_request_nonce``); a plain SDK client's two identical calls in one
second sign to the same bytes, and both run, as on Lambda.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import ssl
import uuid
from typing import Any, NamedTuple

from aiohttp import web

from spirtd.functions.runtime import lambda_errors, sigv4
from spirtd.functions.runtime.config import RuntimeConfig, RuntimeConfigError
from spirtd.functions.runtime.pool import FunctionPool, Outcome

log = logging.getLogger(__name__)

INVOKE_PATH = "/2015-03-31/functions/{name}/invocations"


_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LATEST = "$LATEST"


class FunctionRef(NamedTuple):
    """A function as an Invoke request names it; region and account are None when
    the form leaves them out."""

    name: str
    qualifier: str | None
    region: str | None = None
    account: str | None = None


def parse_function(raw: str) -> FunctionRef | None:
    """The function named by any form Lambda accepts: ``NAME``, ``NAME:QUALIFIER``,
    a partial ARN ``ACCOUNT:function:NAME[:QUALIFIER]`` or a full ARN
    ``arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]``; None if malformed."""
    parts = raw.split(":")
    region = account = None
    if raw.startswith("arn:"):
        if len(parts) not in (7, 8) or parts[2] != "lambda" or parts[5] != "function":
            return None
        region, account = parts[3], parts[4]
        name, qualifier = parts[6], (parts[7] if len(parts) == 8 else None)
    elif len(parts) in (3, 4) and parts[1] == "function":
        account = parts[0]
        name, qualifier = parts[2], (parts[3] if len(parts) == 4 else None)
    elif len(parts) in (1, 2):
        name, qualifier = parts[0], (parts[1] if len(parts) == 2 else None)
    else:
        return None
    if not _NAME_RE.match(name) or qualifier == "" or region == "" or account == "":
        return None
    return FunctionRef(name, qualifier, region, account)


def server_tls_context(cfg: RuntimeConfig) -> ssl.SSLContext:
    """TLS 1.2 or later with the configured certificate; client certificates are
    required when ``tls_client_ca`` names their CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:
            ctx.load_verify_locations(cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise RuntimeConfigError(f"TLS material: {e}") from None
    return ctx


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
        self.event_retries = 0
        self.event_failures = 0
        self._events_pending = 0
        self._unverified = 0
        self._replays = sigv4.ReplayCache(self.config.replay_cache)
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
        site = web.TCPSite(
            runner,
            self.config.host,
            self.config.port,
            reuse_address=True,
            ssl_context=server_tls_context(self.config) if self.config.tls else None,
        )
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
        scheme = "https" if self.config.tls else "http"
        self._endpoint = f"{scheme}://{host}:{port}"
        log.info("functions runtime on %s", self._endpoint)
        return self._endpoint

    def warm(self, count: int) -> None:
        """Starts up to ``count`` workers per function in the background (see
        FunctionPool.warm); unlike ``prewarm``, start() need not wait for them."""
        for p in self.pools.values():
            p.warm(min(count, self.config.concurrency))

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
            "event_retries": self.event_retries,
            "event_failures": self.event_failures,
            "cold_starts": self.cold_starts,
            "functions": {
                n: {k: v for k, v in vars(p.stats).items() if k != "durations_ms"}
                | {"workers": len(p.worker_pids), "memory_mb": p.spec.memory_mb}
                for n, p in self.pools.items()
            },
        }

    def billing(self) -> dict[str, dict[str, int]]:
        """Per function: invocations billed, their billed milliseconds in total and
        the memory they were billed at (what the REPORT lines said, summed)."""
        return {
            n: {
                "invocations": p.stats.billed_invocations,
                "billed_ms": p.stats.billed_ms,
                "memory_mb": p.spec.memory_mb,
            }
            for n, p in self.pools.items()
        }

    def log_billing(self) -> None:
        """One line per function with what it billed since the start, in the REPORT
        line's words (a function host's account, for its operator and tests)."""
        for name, b in self.billing().items():
            log.info(
                "BILLED Function: %s, Invocations: %d, Billed Duration: %d ms, Memory Size: %d MB",
                name,
                b["invocations"],
                b["billed_ms"],
                b["memory_mb"],
            )

    # --- HTTP ---------------------------------------------------------------------------
    @staticmethod
    def _error(
        err: lambda_errors.ServiceError, request_id: str, *, close: bool = False
    ) -> web.Response:
        headers = err.headers() | {"X-Amzn-RequestId": request_id}
        resp = web.Response(status=err.status, body=err.body(), headers=headers)
        if close:
            # The body was not read: drop the connection rather than drain it.
            resp.force_close()
        return resp

    def _arn(self, name: str, qualifier: str | None = None) -> str:
        arn = f"arn:aws:lambda:{self.config.region}:{self.config.account_id}:function:{name}"
        return f"{arn}:{qualifier}" if qualifier else arn

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

    async def _authenticated_body(
        self, request: web.Request, limit: int, rid: str
    ) -> tuple[bytes, sigv4.SignedHeader | None] | web.Response:
        """The body of a request signed with the runtime's key (and its signature
        header, to record once the request is acted on), or the error reply."""
        head = None
        if self.config.require_signature:
            try:
                head = sigv4.check_header(
                    self.access_key, request.headers, region=self.config.region
                )
            except sigv4.SignatureError as e:
                self.rejected_signatures += 1
                return self._error(lambda_errors.forbidden(str(e), e.code), rid, close=True)
            if self._unverified >= self.config.max_unverified:
                self.throttles += 1
                return self._error(lambda_errors.throttled(), rid, close=True)
            self._unverified += 1
        try:
            body = await self._read_body(request, limit)
            if body is None:
                return self._error(lambda_errors.too_large(limit), rid, close=True)
            if head is None:
                return body, None
            try:
                sigv4.verify_signature(
                    self.access_key,
                    head,
                    method=request.method,
                    raw_path=request.raw_path.partition("?")[0],
                    query=request.rel_url.raw_query_string,
                    headers=request.headers,
                    get_all=request.headers.getall,
                    body=body,
                )
            except sigv4.SignatureError as e:
                self.rejected_signatures += 1
                return self._error(lambda_errors.forbidden(str(e), e.code), rid)
            if not head.has_nonce:
                # A plain SDK client: Lambda runs its identical calls, and the clock
                # window bounds a replay (see sigv4.NONCE_HEADER for why that is safe).
                return body, None
            if self._replays.seen(head):
                return self._replayed(rid)
            return body, head
        finally:
            if head is not None:
                self._unverified -= 1

    def _replayed(self, rid: str) -> web.Response:
        self.rejected_signatures += 1
        return self._error(
            lambda_errors.forbidden("this signed request was already received; sign a new one"),
            rid,
        )

    def _act_on(self, head: sigv4.SignedHeader | None, rid: str) -> web.Response | None:
        """Records the signature of a request about to run: a copy sent again within
        the clock window is refused. Requests refused before running (throttled, bad
        JSON, ...) are not recorded, so a client may resend them as they were."""
        if head is None:
            return None
        try:
            if self._replays.add(head):
                return None
        except OverflowError:
            self.throttles += 1
            return self._error(lambda_errors.throttled(), rid)
        return self._replayed(rid)

    def _client_context(self, request: web.Request) -> dict[str, Any] | None:
        raw = request.headers.get("X-Amz-Client-Context")
        if raw is None:
            return None
        try:
            if len(raw) > lambda_errors.MAX_CLIENT_CONTEXT:
                raise ValueError("too long")
            doc = json.loads(base64.b64decode(raw, validate=True))
        except (ValueError, binascii.Error):
            doc = None
        if not isinstance(doc, dict):
            raise ValueError(
                "Client context must be a valid Base64-encoded JSON object of at most "
                f"{lambda_errors.MAX_CLIENT_CONTEXT} bytes."
            )
        return doc

    async def _handle_invoke(self, request: web.Request) -> web.StreamResponse:
        rid = str(uuid.uuid4())
        kind = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        limit = self.config.max_event_bytes if kind == "Event" else self.config.max_request_bytes
        got = await self._authenticated_body(request, limit, rid)
        if isinstance(got, web.Response):
            return got
        body, head = got
        if kind not in ("RequestResponse", "Event", "DryRun"):
            return self._error(
                lambda_errors.bad_parameter(
                    f"Invalid invocation type {kind!r}: use RequestResponse, Event or DryRun"
                ),
                rid,
            )
        log_type = request.headers.get("X-Amz-Log-Type", "None")
        if log_type not in ("None", "Tail"):
            return self._error(
                lambda_errors.bad_parameter(f"Invalid log type {log_type!r}: use None or Tail"),
                rid,
            )
        raw_name = request.match_info["name"]
        parsed = parse_function(raw_name)
        if parsed is None:
            return self._error(lambda_errors.not_found(raw_name[:200]), rid)
        name, qualifier = parsed.name, parsed.qualifier
        # As Lambda: an ARN of another region is not found here, one of another
        # account is not ours to run (no resource policy grants it).
        if parsed.region is not None and parsed.region != self.config.region:
            return self._error(lambda_errors.other_region(parsed.region, self.config.region), rid)
        if parsed.account is not None and parsed.account != self.config.account_id:
            arn = f"arn:aws:lambda:{self.config.region}:{parsed.account}:function:{name}"
            return self._error(lambda_errors.access_denied(self.access_key.key_id, arn), rid)
        query_qualifier = request.rel_url.query.get("Qualifier")
        if qualifier and query_qualifier and qualifier != query_qualifier:
            return self._error(
                lambda_errors.bad_parameter(
                    "The derived qualifier from the function name does not match the "
                    "specified qualifier."
                ),
                rid,
            )
        qualifier = qualifier or query_qualifier
        pool = self.pools.get(name)
        # One version per function here: $LATEST; no published versions or aliases.
        if pool is None or qualifier not in (None, LATEST):
            return self._error(lambda_errors.not_found(self._arn(name, qualifier)), rid)
        try:
            client_context = self._client_context(request)
        except ValueError as e:
            return self._error(lambda_errors.bad_content(str(e)), rid)
        if not body.strip():
            body = b"{}"  # Lambda hands an empty payload to the handler as {}
        try:
            json.loads(body)
        except ValueError as e:
            return self._error(lambda_errors.bad_json(str(e)), rid)
        ok_headers = {"X-Amzn-RequestId": rid, "X-Amz-Executed-Version": LATEST}
        if kind == "DryRun":
            return web.Response(status=204, headers=ok_headers)
        if kind == "Event":
            # Lambda hands the client context to synchronous invocations only.
            client_context = None
        invocation = _Invocation(pool, rid, body, client_context, self._arn(name, qualifier))
        if kind == "Event":
            if self._events_pending >= self.config.event_queue:
                self.throttles += 1
                return self._error(lambda_errors.throttled(), rid)
            if (refused := self._act_on(head, rid)) is not None:
                return refused
            self._events_pending += 1
            task = asyncio.get_running_loop().create_task(self._run_event(invocation))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_tasks.discard)
            return web.Response(status=202, headers=ok_headers)
        if self.in_flight >= self.config.concurrency:
            self.throttles += 1
            return self._error(lambda_errors.throttled(), rid)
        if (refused := self._act_on(head, rid)) is not None:
            return refused
        outcome = await self._run(invocation, log=log_type == "Tail")
        headers = ok_headers | {"Content-Type": "application/json"}
        if outcome.error:
            headers["X-Amz-Function-Error"] = "Unhandled"
        if outcome.log is not None:
            headers["X-Amz-Log-Result"] = base64.b64encode(outcome.log).decode()
        return web.Response(status=200, body=outcome.body, headers=headers)

    async def _run(self, inv: _Invocation, *, log: bool = False) -> Outcome:
        """Runs ``inv`` in a slot the caller saw free (nothing awaited in between)."""
        self.in_flight += 1
        try:
            return await inv.pool.invoke(
                inv.request_id, inv.body, log=log, client_context=inv.client_context, arn=inv.arn
            )
        finally:
            self.in_flight -= 1
            self._slot_freed.set()

    async def _wait_for_slot(self, deadline: float) -> bool:
        # asyncio.timeout (not wait_for) keeps this in one task, so nothing runs
        # between seeing a free slot and taking it.
        try:
            async with asyncio.timeout_at(deadline):
                while self.in_flight >= self.config.concurrency:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
        except TimeoutError:
            return False
        return True

    async def _run_event(self, inv: _Invocation) -> None:
        """An async invocation: it queues for a free slot (bounded by event_queue)
        instead of being throttled, as Lambda's internal event queue does, and a
        failed one is retried after each of ``event_retry_delays_s`` (Lambda retries
        twice). A retry waits in the queue again, counted against its bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.event_max_age_s
        delays = list(self.config.event_retry_delays_s)
        queued = True  # counted in _events_pending (the caller counted the first wait)
        try:
            while True:
                if not await self._wait_for_slot(deadline):
                    log.warning(
                        "async invocation %s of %s dropped: older than %.0f s",
                        inv.request_id,
                        inv.pool.name,
                        self.config.event_max_age_s,
                    )
                    return
                self._events_pending -= 1
                queued = False
                outcome = await self._run(inv)
                if not outcome.error:
                    return
                detail = outcome.body[:500].decode(errors="replace")
                if not delays or loop.time() + delays[0] >= deadline:
                    self.event_failures += 1
                    log.warning(
                        "async invocation %s of %s failed, not retried again: %s",
                        inv.request_id,
                        inv.pool.name,
                        detail,
                    )
                    return
                delay = delays.pop(0)
                log.info(
                    "async invocation %s of %s failed; retrying in %.1f s: %s",
                    inv.request_id,
                    inv.pool.name,
                    delay,
                    detail,
                )
                self._events_pending += 1
                queued = True
                self.event_retries += 1
                await asyncio.sleep(delay)
        finally:
            if queued:
                self._events_pending -= 1


class _Invocation:
    """One accepted invocation, kept whole so an async one can be retried."""

    __slots__ = ("arn", "body", "client_context", "pool", "request_id")

    def __init__(
        self,
        pool: FunctionPool,
        request_id: str,
        body: bytes,
        client_context: dict[str, Any] | None,
        arn: str,
    ) -> None:
        self.pool = pool
        self.request_id = request_id
        self.body = body
        self.client_context = client_context
        self.arn = arn
