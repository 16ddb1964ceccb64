"""One Lambda client for the local runtime and for AWS Lambda.

boto3's Lambda client, called from a bounded thread pool, with:

* a concurrency limit (at most ``concurrency`` calls in flight);
* our own retries with full-jitter exponential backoff on throttling (429), 5xx
  service errors, connection problems, client-side timeouts, and the function
  errors that mean "the environment failed, not the code" (a timeout or a crash);
* a time budget per invocation and an overall deadline per round;
* what each attempt that ran was billed: it asks for the log tail
  (``LogType=Tail``) and reads its ``REPORT`` line (cost.py), or bills the call's
  wall time at ``memory_mb`` when there is none (``InvokerStats.billed_by_wall_time``).

The SDK's own retries are off so that exactly this policy applies. A handler's
own exception is not retried: the same event would fail the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from spirtd.functions.cost import MAX_LOG_RESULT_CHARS, Billed, billed_ms_of, parse_report
from spirtd.functions.runtime import lambda_errors

log = logging.getLogger("spirtd.functions")

# Function errors that mean the execution environment failed; retrying is safe
# because the gradient function's output for a slice is idempotent.
RETRYABLE_FUNCTION_ERRORS = frozenset({lambda_errors.TIMEOUT, lambda_errors.EXIT})
MAX_RESULT_BYTES = lambda_errors.MAX_RESPONSE
_TRANSPORT_ERRORS = (
    bexc.ReadTimeoutError,
    bexc.ConnectTimeoutError,
    bexc.EndpointConnectionError,
    bexc.ConnectionClosedError,
)


# A random header on every attempt, signed with it: the local runtime holds only
# requests that sign it to its replay check (a plain SDK client's identical calls
# run, as on Lambda), and with it two attempts of one event in the same second
# never carry identical signatures, so neither is taken for a replay. AWS ignores it.
NONCE_HEADER = "X-Spirt-Nonce"


def _add_nonce(request: Any, **_: Any) -> None:
    request.headers[NONCE_HEADER] = secrets.token_hex(8)


def add_request_nonce(client: Any) -> None:
    """Makes a boto3 Lambda client sign a random header into every Invoke request, so
    a repeated identical call is never taken for a replay by the local runtime."""
    client.meta.events.register("before-sign.lambda.Invoke", _add_nonce)


class InvocationError(RuntimeError):
    """An invocation failed for good (after any retries)."""

    def __init__(
        self, error_type: str, message: str, *, retryable: bool = False, attempts: int = 1
    ) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.attempts = attempts
        self.billed: Billed | None = None  # set when the function ran (and failed)


class FunctionError(InvocationError):
    """The function ran and failed (``X-Amz-Function-Error``)."""


class ServiceError(InvocationError):
    """The Invoke call itself was refused (throttled, too large, not found, 5xx ...)."""


class TransportError(InvocationError):
    """No answer: connection refused or reset, or the client-side read timed out."""


class DeadlineExceeded(InvocationError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in total, the first included
    base_s: float = 0.05
    cap_s: float = 5.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**retry)]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * (2**retry)))


@dataclass
class InvokerStats:
    calls: int = 0
    attempts: int = 0
    retries: int = 0
    throttled: int = 0
    server_errors: int = 0
    transport_errors: int = 0
    function_errors: int = 0
    environment_failures: int = 0  # timeouts and crashes reported by the runtime
    succeeded: int = 0
    billed: int = 0  # attempts that ran and were billed (successes and function errors)
    billed_by_wall_time: int = 0  # ... of which had no REPORT line: billed by wall time
    billed_mb_ms: int = 0  # their billed duration x memory, in MB-milliseconds


@dataclass(frozen=True)
class SliceResult:
    index: int
    result: dict[str, Any] | None
    error: InvocationError | None
    duration_s: float
    # Every attempt of this slice that ran, as billed (retries included).
    billed: tuple[Billed, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RoundResult:
    slices: list[SliceResult] = field(default_factory=list)
    min_fraction: float = 1.0
    duration_s: float = 0.0

    @property
    def succeeded(self) -> list[SliceResult]:
        return [s for s in self.slices if s.ok]

    @property
    def fraction(self) -> float:
        return len(self.succeeded) / len(self.slices) if self.slices else 0.0

    @property
    def met_quorum(self) -> bool:
        return bool(self.slices) and self.fraction + 1e-12 >= self.min_fraction

    @property
    def billed(self) -> list[Billed]:
        """Every billed attempt of the round, for a CostMeter."""
        return [b for s in self.slices for b in s.billed]


class Invoker:
    """``Invoker(endpoint_url, function_name)``: ``endpoint_url=None`` means AWS Lambda
    in ``region`` with the default AWS credential chain; a URL means a Lambda-compatible
    endpoint such as the local runtime or a function host (the given credentials, else
    the default chain's, else placeholders). An https endpoint's certificate is
    checked against ``AWS_CA_BUNDLE`` when set, as boto3 always does."""

    def __init__(
        self,
        endpoint_url: str | None,
        function_name: str,
        *,
        concurrency: int = 8,
        retry: RetryPolicy | None = None,
        region: str = "us-east-1",
        credentials: tuple[str, str] | None = None,
        attempt_timeout_s: float = 900.0,
        connect_timeout_s: float = 5.0,
        rng: random.Random | None = None,
        memory_mb: int = 1024,
    ) -> None:
        if not (1 <= concurrency <= 1024):
            raise ValueError("concurrency must be in 1..1024")
        # The function's configured memory: what a call without a REPORT line is
        # billed at.
        self.memory_mb = memory_mb
        self.endpoint_url = endpoint_url
        self.function_name = function_name
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.stats = InvokerStats()
        self.in_flight = 0
        self._answered = False  # a round has had a slice answered (the cold start is behind us)
        self._rng = rng or random.Random()
        self._sem = asyncio.Semaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="invoke")
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=concurrency,
            connect_timeout=connect_timeout_s,
            # One attempt may take as long as the function may run.
            read_timeout=attempt_timeout_s,
            tcp_keepalive=True,
        )
        kw: dict[str, Any] = {"region_name": region, "config": config}
        session = boto3.session.Session()
        if endpoint_url is not None:
            kw["endpoint_url"] = endpoint_url
            # An endpoint of one's own (a function host, a VPC endpoint) is signed for
            # with the default AWS credential chain, as Lambda is; placeholders only
            # when that chain has none (an endpoint that checks no signature).
            if credentials is None and session.get_credentials() is None:
                credentials = ("local", "local")
        if credentials is not None:
            kw.update(aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1])
        self.client = session.client("lambda", **kw)
        add_request_nonce(self.client)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.client.close)

    async def __aenter__(self) -> Invoker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one attempt (runs in a pool thread) ----------------------------------------
    def _call(self, payload: bytes) -> tuple[dict[str, Any], Billed]:
        t0 = time.perf_counter()
        resp = self.client.invoke(
            FunctionName=self.function_name,
            InvocationType="RequestResponse",
            LogType="Tail",
            Payload=payload,
        )
        body = resp["Payload"].read(MAX_RESULT_BYTES + 1)
        billed = self._billed(resp, time.perf_counter() - t0)
        try:
            doc = self._result(resp, body)
        except FunctionError as e:
            e.billed = billed
            raise
        return doc, billed

    def _billed(self, resp: dict[str, Any], wall_s: float) -> Billed:
        """The attempt as the function's REPORT line bills it, else by wall time
        (runs in a pool thread: the loop's side counts it in stats)."""
        raw = resp.get("LogResult")
        rid = resp.get("ResponseMetadata", {}).get("RequestId")
        if isinstance(raw, str) and len(raw) <= MAX_LOG_RESULT_CHARS:
            try:
                got = parse_report(base64.b64decode(raw, validate=True), rid)
            except (binascii.Error, ValueError):
                got = None
            if got is not None:
                return got
        return Billed(billed_ms_of(wall_s), self.memory_mb, reported=False)

    @staticmethod
    def _result(resp: dict[str, Any], body: bytes) -> dict[str, Any]:
        if len(body) > MAX_RESULT_BYTES:
            raise FunctionError("ResponseTooLarge", "the function's response is too large")
        try:
            doc = json.loads(body) if body else None
        except ValueError as e:
            raise FunctionError("InvalidResponse", f"response is not JSON: {e}") from e
        if resp.get("FunctionError"):
            etype = str(doc.get("errorType", "Unhandled")) if isinstance(doc, dict) else "Unhandled"
            msg = str(doc.get("errorMessage", "")) if isinstance(doc, dict) else str(doc)
            raise FunctionError(etype, msg, retryable=etype in RETRYABLE_FUNCTION_ERRORS)
        if not isinstance(doc, dict):
            raise FunctionError("InvalidResponse", "the function did not return a JSON object")
        return doc

    def _classify(self, e: Exception) -> InvocationError:
        if isinstance(e, InvocationError):
            if isinstance(e, FunctionError):
                if e.retryable:
                    self.stats.environment_failures += 1
                else:
                    self.stats.function_errors += 1
            return e
        if isinstance(e, bexc.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "Unknown"))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            throttled = code == "TooManyRequestsException" or status == 429
            server = status >= 500
            self.stats.throttled += throttled
            self.stats.server_errors += server
            return ServiceError(code, str(err.get("Message", e)), retryable=throttled or server)
        if isinstance(e, _TRANSPORT_ERRORS):
            self.stats.transport_errors += 1
            return TransportError(type(e).__name__, str(e), retryable=True)
        return InvocationError(type(e).__name__, str(e))

    # --- public -------------------------------------------------------------------------
    async def invoke(self, event: Any, timeout: float | None = None) -> dict[str, Any]:
        """Invokes the function synchronously and returns its JSON result.

        ``timeout`` bounds the whole call, retries and backoff included.
        Raises ``InvocationError`` (``FunctionError``, ``ServiceError``,
        ``TransportError``, ``DeadlineExceeded``).
        """
        return await self.invoke_billed(event, timeout, [])

    async def invoke_billed(
        self, event: Any, timeout: float | None, billed: list[Billed]
    ) -> dict[str, Any]:
        """``invoke``, appending to ``billed`` every attempt that ran, as billed."""
        payload = json.dumps(event).encode()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self.stats.calls += 1
        async with self._sem:
            self.in_flight += 1
            try:
                result = await self._attempts(payload, deadline, billed)
                self.stats.succeeded += 1
                return result
            finally:
                self.in_flight -= 1

    def _count_billed(self, bill: Billed, billed: list[Billed]) -> None:
        billed.append(bill)
        self.stats.billed += 1
        self.stats.billed_by_wall_time += not bill.reported
        self.stats.billed_mb_ms += bill.mb_ms

    async def _attempts(
        self, payload: bytes, deadline: float | None, billed: list[Billed]
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            self.stats.attempts += 1
            try:
                fut = loop.run_in_executor(self._pool, self._call, payload)
            except RuntimeError:
                # Closed meanwhile (the daemon stopping): a retry then found the pool
                # shut down, and the error went unretrieved into the log.
                raise InvocationError(
                    "InvokerClosed", "the invoker is closed", attempts=attempt
                ) from None
            try:
                if deadline is None:
                    doc, bill = await fut
                else:
                    doc, bill = await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
                self._count_billed(bill, billed)
                return doc
            except TimeoutError:
                raise DeadlineExceeded(
                    "DeadlineExceeded", "the invocation's time budget ran out", attempts=attempt
                ) from None
            except Exception as e:
                err = self._classify(e)
                err.attempts = attempt
                if err.billed is not None:
                    self._count_billed(err.billed, billed)
                if not err.retryable or attempt >= self.retry.attempts:
                    raise err from e
            pause = self.retry.delay(attempt - 1, self._rng)
            if deadline is not None and loop.time() + pause >= deadline:
                raise DeadlineExceeded(
                    "DeadlineExceeded",
                    f"no time left to retry after {err.error_type}",
                    attempts=attempt,
                ) from err
            self.stats.retries += 1
            await asyncio.sleep(pause)

    async def invoke_round(
        self, events: Sequence[Any], deadline: float, min_fraction: float = 1.0
    ) -> RoundResult:
        """Invokes every event at once (within the concurrency limit).

        Returns when all have finished or ``deadline`` seconds have passed; slices
        still running then count as failed (``DeadlineExceeded``). The round met
        its quorum when at least ``min_fraction`` of the slices succeeded.
        """
        if not (0.0 <= min_fraction <= 1.0):
            raise ValueError("min_fraction must be in [0, 1]")
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        # Per slice: its billed attempts, kept even when the round's deadline cuts it.
        billed: list[list[Billed]] = [[] for _ in events]

        async def one(i: int, ev: Any) -> SliceResult:
            s = loop.time()
            try:
                budget = max(0.0, t0 + deadline - loop.time())
                res = await self.invoke_billed(ev, budget, billed[i])
                return SliceResult(i, res, None, loop.time() - s, tuple(billed[i]))
            except InvocationError as e:
                return SliceResult(i, None, e, loop.time() - s, tuple(billed[i]))

        tasks = [loop.create_task(one(i, ev)) for i, ev in enumerate(events)]
        if tasks:
            await asyncio.wait(tasks, timeout=deadline)
        slices: list[SliceResult] = []
        for i, t in enumerate(tasks):
            if t.done() and not t.cancelled():
                slices.append(t.result())
            else:
                t.cancel()
                slices.append(
                    SliceResult(
                        i,
                        None,
                        DeadlineExceeded("DeadlineExceeded", "the round's deadline passed"),
                        loop.time() - t0,
                        tuple(billed[i]),
                    )
                )
        await asyncio.gather(*tasks, return_exceptions=True)
        result = RoundResult(slices, min_fraction, loop.time() - t0)
        if result.succeeded and not self._answered:
            # When the functions first answered: how long a node takes to be able to
            # compute after a start (bench.sync reads it from the log).
            self._answered = True
            log.info(
                "functions answering: first round %d of %d slices in %.2f s",
                len(result.succeeded),
                len(slices),
                result.duration_s,
            )
        return result
