"""The invoker: retries, backoff, concurrency and deadlines, against the real local
runtime (and a tiny stand-in server for 5xx), through the real boto3 client."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from spirtd.functions.invoker import (
    DeadlineExceeded,
    FunctionError,
    InvocationError,
    Invoker,
    RetryPolicy,
    ServiceError,
    TransportError,
)
from spirtd.functions.runtime.config import FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.server import LocalRuntime

PROBE = "spirtd.functions.probe:handler"
FAST_RETRY = RetryPolicy(attempts=4, base_s=0.01, cap_s=0.05)


def probe_runtime(tmp_path: Path, *, concurrency: int = 2, timeout_s: float = 10.0) -> LocalRuntime:
    spec = FunctionSpec(
        handler=PROBE,
        timeout_s=timeout_s,
        memory_mb=256,
        environment={"SPIRT_PROBE_DIR": str(tmp_path)},
    )
    return LocalRuntime(RuntimeConfig(functions={"probe": spec}, concurrency=concurrency))


def invoker_for(runtime: LocalRuntime, name: str, **kw: Any) -> Invoker:
    """An Invoker signing with the runtime's own access key."""
    return Invoker(runtime.endpoint_url, name, credentials=runtime.credentials, **kw)


@pytest.fixture
async def rt(tmp_path: Path) -> AsyncIterator[LocalRuntime]:
    async with probe_runtime(tmp_path, timeout_s=1.0) as runtime:
        yield runtime


def test_backoff_is_full_jitter_and_capped() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.1, cap_s=1.0)
    rng = random.Random(1)
    for retry in range(8):
        bound = min(1.0, 0.1 * 2**retry)
        samples = [policy.delay(retry, rng) for _ in range(200)]
        assert all(0.0 <= s <= bound for s in samples)
        assert max(samples) > 0.7 * bound  # spread over the whole range: jittered
        assert min(samples) < 0.3 * bound


async def test_invoke_returns_result(rt: LocalRuntime) -> None:
    async with invoker_for(rt, "probe", retry=FAST_RETRY) as inv:
        assert (await inv.invoke({"action": "echo", "value": 7}))["echo"] == 7
        assert inv.stats.attempts == 1 and inv.in_flight == 0


async def test_handler_error_is_not_retried(rt: LocalRuntime) -> None:
    async with invoker_for(rt, "probe", retry=FAST_RETRY) as inv:
        with pytest.raises(FunctionError) as info:
            await inv.invoke({"action": "raise", "message": "bad slice"})
        assert info.value.error_type == "ProbeError" and info.value.message == "bad slice"
        assert info.value.attempts == 1
        assert rt.pools["probe"].stats.invocations == 1


async def test_timeout_is_retried_on_a_new_worker(rt: LocalRuntime) -> None:
    async with invoker_for(rt, "probe", retry=FAST_RETRY) as inv:
        out = await inv.invoke({"action": "flaky", "marker": "t1", "mode": "sleep", "seconds": 30})
        assert out["recovered"] is True
        assert inv.stats.retries == 1 and inv.stats.environment_failures == 1
        stats = rt.pools["probe"].stats
        assert stats.timeouts == 1 and stats.replacements == 1


async def test_worker_crash_is_retried(rt: LocalRuntime) -> None:
    async with invoker_for(rt, "probe", retry=FAST_RETRY) as inv:
        out = await inv.invoke({"action": "flaky", "marker": "c1", "mode": "exit"})
        assert out["recovered"] is True and inv.stats.retries == 1
        assert rt.pools["probe"].stats.worker_deaths == 1


async def test_throttling_is_retried_with_backoff(tmp_path: Path) -> None:
    async with probe_runtime(tmp_path, concurrency=1) as runtime:
        # The invoker allows 3 at once but the runtime only 1: two get 429 and back off.
        policy = RetryPolicy(attempts=30, base_s=0.02, cap_s=0.2)
        async with invoker_for(runtime, "probe", concurrency=3, retry=policy) as inv:
            outs = await asyncio.gather(
                *(inv.invoke({"action": "sleep", "seconds": 0.2}) for _ in range(3))
            )
        assert [o["slept"] for o in outs] == [0.2, 0.2, 0.2]
        assert inv.stats.throttled >= 2 and runtime.throttles == inv.stats.throttled
        assert inv.stats.retries == inv.stats.throttled


async def test_concurrency_limit_is_respected(tmp_path: Path) -> None:
    async with probe_runtime(tmp_path, concurrency=4) as runtime:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, runtime.in_flight)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        async with invoker_for(runtime, "probe", concurrency=2) as inv:
            await asyncio.gather(
                *(inv.invoke({"action": "sleep", "seconds": 0.15}) for _ in range(6))
            )
        watcher.cancel()
        assert peak == 2 and runtime.throttles == 0


async def test_round_deadline_and_quorum(rt: LocalRuntime) -> None:
    async with invoker_for(rt, "probe", concurrency=2, retry=FAST_RETRY) as inv:
        events = [{"action": "echo", "value": i} for i in range(3)]
        events.append({"action": "raise", "message": "slice 3 is bad"})
        res = await inv.invoke_round(events, deadline=20.0, min_fraction=0.75)
        assert [s.ok for s in res.slices] == [True, True, True, False]
        assert [s.result["echo"] for s in res.succeeded] == [0, 1, 2]  # type: ignore[index]
        assert res.fraction == 0.75 and res.met_quorum
        assert isinstance(res.slices[3].error, FunctionError)

        # A slice that keeps timing out (1 s function timeout) misses a 1.6 s round.
        slow = [{"action": "echo"}, {"action": "sleep", "seconds": 30}]
        res = await inv.invoke_round(slow, deadline=1.6, min_fraction=1.0)
        assert res.slices[0].ok and not res.slices[1].ok
        assert isinstance(res.slices[1].error, DeadlineExceeded)
        # DeadlineExceeded above: the round ended at its deadline, not when the 30 s
        # function would have.
        assert not res.met_quorum


async def test_service_5xx_is_retried() -> None:
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        if calls <= 2:
            return web.Response(
                status=500,
                body=b'{"Type":"Service","Message":"try again"}',
                headers={"X-Amzn-ErrorType": "ServiceException"},
            )
        return web.Response(status=200, body=json.dumps({"n": calls}).encode())

    app = web.Application()
    app.router.add_post("/2015-03-31/functions/{name}/invocations", flaky)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with Invoker(f"http://127.0.0.1:{port}", "f", retry=FAST_RETRY) as inv:
            assert await inv.invoke({}) == {"n": 3}
            assert inv.stats.server_errors == 2 and inv.stats.retries == 2
            calls = -10  # now more failures than attempts: the error surfaces
            with pytest.raises(ServiceError) as info:
                await inv.invoke({})
            assert info.value.error_type == "ServiceException" and info.value.attempts == 4
    finally:
        await runner.cleanup()


async def test_unreachable_endpoint_is_a_transport_error() -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(attempts=2, base_s=0.01, cap_s=0.01)
    async with Invoker(f"http://127.0.0.1:{port}", "f", retry=policy) as inv:
        with pytest.raises(TransportError) as info:
            await inv.invoke({}, timeout=10)
        assert info.value.attempts == 2


async def test_not_found_is_not_retried(rt: LocalRuntime) -> None:
    async with invoker_for(rt, "missing", retry=FAST_RETRY) as inv:
        with pytest.raises(ServiceError) as info:
            await inv.invoke({})
        assert info.value.error_type == "ResourceNotFoundException"
        assert info.value.attempts == 1


async def test_aws_mode_targets_lambda_in_region() -> None:
    inv = Invoker(None, "spirt-gradient", region="eu-west-1", credentials=("AKIDEXAMPLE", "s"))
    try:
        assert inv.client.meta.endpoint_url == "https://lambda.eu-west-1.amazonaws.com"
        assert inv.client.meta.config.retries["total_max_attempts"] == 1
    finally:
        await inv.close()


async def test_an_invocation_on_a_closed_invoker_fails_as_an_invocation() -> None:
    inv = Invoker("http://127.0.0.1:9", "f", retry=FAST_RETRY)
    await inv.close()
    with pytest.raises(InvocationError) as info:
        await inv.invoke({}, timeout=10)
    assert info.value.error_type == "InvokerClosed"
