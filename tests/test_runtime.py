"""The local runtime speaks the Lambda Invoke API: checked with the real boto3 client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from spirtd.functions.invoker import add_request_nonce
from spirtd.functions.runtime.config import FunctionSpec, RuntimeConfig, RuntimeConfigError
from spirtd.functions.runtime.server import LocalRuntime
from spirtd.localcluster import async_wait_for

PROBE = "spirtd.functions.probe:handler"


def lambda_client(rt: LocalRuntime, credentials: tuple[str, str] | None = None) -> Any:
    """The real boto3 Lambda client, signing with the runtime's own access key."""
    key, secret = credentials or rt.credentials
    client = boto3.client(
        "lambda",
        endpoint_url=rt.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=60),
    )
    # As spirtd's invoker does, so these calls are held to the runtime's replay check
    # (requests without the nonce are not; see sigv4.NONCE_HEADER).
    add_request_nonce(client)
    return client


async def invoke(client: Any, event: Any, name: str = "probe", **kw: Any) -> dict[str, Any]:
    def call() -> dict[str, Any]:
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        resp = client.invoke(FunctionName=name, Payload=payload, **kw)
        body = resp["Payload"].read()
        return {
            "status": resp["StatusCode"],
            "error": resp.get("FunctionError"),
            "body": json.loads(body) if body else None,
        }

    return await asyncio.to_thread(call)


def probe_config(**kw: Any) -> RuntimeConfig:
    """``probe_dir``: where the probe's ``flaky`` action leaves its markers."""
    probe_dir = kw.pop("probe_dir", None)
    spec = FunctionSpec(
        handler=PROBE,
        timeout_s=kw.pop("timeout_s", 10.0),
        memory_mb=kw.pop("memory_mb", 256),
        environment={"SPIRT_PROBE_DIR": str(probe_dir)} if probe_dir is not None else {},
    )
    return RuntimeConfig(functions={"probe": spec}, **kw)


# The flaky probe creates its marker before it sleeps: once the marker exists, the
# handler itself is running in the worker (not just the request on its way there).
def running_sleep(marker: str) -> dict[str, Any]:
    return {"action": "flaky", "marker": marker, "mode": "sleep", "seconds": 60}


@pytest.fixture
async def runtime() -> AsyncIterator[LocalRuntime]:
    async with LocalRuntime(probe_config(concurrency=2, timeout_s=1.5)) as rt:
        yield rt


async def test_success_and_warm_reuse(runtime: LocalRuntime) -> None:
    c = lambda_client(runtime)
    first = await invoke(c, {"action": "echo", "value": [1, "two"]})
    second = await invoke(c, {"action": "echo", "value": 3})
    assert first["status"] == 200 and first["error"] is None
    assert first["body"]["echo"] == [1, "two"] and second["body"]["echo"] == 3
    assert first["body"]["pid"] == second["body"]["pid"] != os.getpid()
    assert first["body"]["request_id"] != second["body"]["request_id"]
    assert runtime.cold_starts == 1
    stats = runtime.stats()["functions"]["probe"]
    assert stats["cold_invocations"] == 1 and stats["invocations"] == 2


async def test_handler_exception_surfaces(runtime: LocalRuntime) -> None:
    c = lambda_client(runtime)
    r = await invoke(c, {"action": "raise", "message": "the loss went sideways"})
    assert r["status"] == 200 and r["error"] == "Unhandled"
    assert r["body"]["errorType"] == "ProbeError"
    assert r["body"]["errorMessage"] == "the loss went sideways"
    assert any("probe.py" in line for line in r["body"]["stackTrace"])
    # The worker survives a handler error and stays warm.
    assert (await invoke(c, {"action": "echo"}))["error"] is None
    assert runtime.cold_starts == 1


async def test_timeout_kills_and_replaces_worker(runtime: LocalRuntime) -> None:
    c = lambda_client(runtime)
    pid = (await invoke(c, {"action": "echo"}))["body"]["pid"]
    r = await invoke(c, {"action": "sleep", "seconds": 30})
    assert r["error"] == "Unhandled"
    assert r["body"]["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.50 seconds" in r["body"]["errorMessage"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stuck worker is gone
    after = await invoke(c, {"action": "echo"})
    assert after["error"] is None and after["body"]["pid"] != pid
    stats = runtime.stats()["functions"]["probe"]
    assert stats["timeouts"] == 1 and stats["replacements"] == 1 and stats["workers"] == 1


async def test_concurrency_cap_throttles() -> None:
    async with LocalRuntime(probe_config(concurrency=1)) as rt:
        c = lambda_client(rt)
        slow = asyncio.create_task(invoke(c, {"action": "sleep", "seconds": 1.0}))
        await async_wait_for(lambda: rt.in_flight == 1, 30, "the slow call to run")
        with pytest.raises(c.exceptions.TooManyRequestsException) as info:
            await invoke(c, {"action": "echo"})
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert info.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
        assert (await slow)["error"] is None
        assert (await invoke(c, {"action": "echo"}))["error"] is None  # slot is free again
        assert rt.throttles == 1 and rt.in_flight == 0


async def test_worker_killed_mid_invocation(tmp_path: Path) -> None:
    async with LocalRuntime(probe_config(concurrency=2, timeout_s=60, probe_dir=tmp_path)) as rt:
        c = lambda_client(rt)
        pool = rt.pools["probe"]
        pid = (await invoke(c, {"action": "echo"}))["body"]["pid"]
        call = asyncio.create_task(invoke(c, running_sleep("killed")))
        await async_wait_for((tmp_path / "killed").exists, 30, "the handler to run")
        os.kill(pid, signal.SIGKILL)
        r = await asyncio.wait_for(call, 30)
        assert r["error"] == "Unhandled" and r["body"]["errorType"] == "Runtime.ExitError"
        assert "signal: kill" in r["body"]["errorMessage"]
        await async_wait_for(
            lambda: len(pool.worker_pids) == 1 and pool.worker_pids[0] != pid, 30, "a new worker"
        )
        again = await invoke(c, {"action": "echo"})
        assert again["error"] is None and again["body"]["pid"] != pid
        assert rt.stats()["functions"]["probe"]["worker_deaths"] == 1


async def test_worker_exiting_by_itself_is_an_exit_error(runtime: LocalRuntime) -> None:
    c = lambda_client(runtime)
    r = await invoke(c, {"action": "exit", "code": 3})
    assert r["body"]["errorType"] == "Runtime.ExitError"
    assert "exit status 3" in r["body"]["errorMessage"]


async def test_oversized_payload() -> None:
    async with LocalRuntime(probe_config()) as rt:
        c = lambda_client(rt)
        big = json.dumps({"action": "echo", "value": "x" * 6_291_456}).encode()
        with pytest.raises(c.exceptions.RequestTooLargeException) as info:
            await invoke(c, big)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
        assert "6291456 bytes" in info.value.response["Error"]["Message"]
        # Async invocations have Lambda's smaller limit (1 MB).
        mid = json.dumps({"action": "echo", "value": "x" * 1_048_576}).encode()
        with pytest.raises(c.exceptions.RequestTooLargeException) as info:
            await invoke(c, mid, InvocationType="Event")
        assert "1048576 bytes" in info.value.response["Error"]["Message"]
        # Just under the synchronous limit still works, and nothing was lost.
        ok = json.dumps({"action": "echo", "value": "x" * 6_000_000}).encode()
        assert (await invoke(c, ok))["body"]["echo"] == "x" * 6_000_000
        assert rt.cold_starts == 1


async def test_oversized_response() -> None:
    async with LocalRuntime(probe_config(max_response_bytes=10_000)) as rt:
        c = lambda_client(rt)
        r = await invoke(c, {"action": "reply", "bytes": 20_000})
        assert r["error"] == "Unhandled"
        assert r["body"]["errorType"] == "Function.ResponseSizeTooLarge"
        assert (await invoke(c, {"action": "reply", "bytes": 100}))["error"] is None


async def test_memory_limit_per_worker() -> None:
    async with LocalRuntime(probe_config(memory_mb=256)) as rt:
        c = lambda_client(rt)
        assert (await invoke(c, {"action": "allocate", "mb": 32}))["error"] is None
        r = await invoke(c, {"action": "allocate", "mb": 400})
        assert r["body"]["errorType"] == "Runtime.OutOfMemory"
        assert (await invoke(c, {"action": "allocate", "mb": 32}))["error"] is None
        assert rt.pools["probe"].stats.replacements == 1


async def test_request_errors_use_lambda_codes(runtime: LocalRuntime) -> None:
    c = lambda_client(runtime)
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        await invoke(c, {}, name="no-such-function")
    with pytest.raises(c.exceptions.InvalidRequestContentException):
        await invoke(c, b"{not json")
    with pytest.raises(c.exceptions.InvalidParameterValueException):
        await invoke(c, {}, InvocationType="Sometimes")
    dry = await asyncio.to_thread(c.invoke, FunctionName="probe", InvocationType="DryRun")
    assert dry["StatusCode"] == 204
    arn = "arn:aws:lambda:us-east-1:000000000000:function:probe"
    assert (await invoke(c, {"action": "echo", "value": 1}, name=arn))["body"]["echo"] == 1


async def test_event_invocation_runs_later(tmp_path: Any) -> None:
    spec = FunctionSpec(
        handler=PROBE, timeout_s=10, memory_mb=256, environment={"SPIRT_PROBE_DIR": str(tmp_path)}
    )
    async with LocalRuntime(RuntimeConfig(functions={"probe": spec}, concurrency=1)) as rt:
        c = lambda_client(rt)
        r = await invoke(
            c, {"action": "flaky", "marker": "evt", "mode": "raise"}, InvocationType="Event"
        )
        assert r["status"] == 202 and r["body"] is None
        # The handler ran in a worker: it created its marker (and failed, as asked).
        await async_wait_for((tmp_path / "evt").exists, 30, "the handler's marker")
        await async_wait_for(
            lambda: rt.pools["probe"].stats.function_errors == 1, 30, "the error counted"
        )
        assert rt.in_flight == 0


async def test_prewarm_and_stop_leave_no_workers() -> None:
    rt = LocalRuntime(probe_config(concurrency=2, prewarm=2))
    await rt.start()
    pids = rt.pools["probe"].worker_pids
    assert len(pids) == 2 and rt.cold_starts == 2
    c = lambda_client(rt)
    assert (await invoke(c, {"action": "echo"}))["body"]["pid"] in pids
    assert rt.pools["probe"].stats.cold_invocations == 0
    await rt.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_config_refuses_non_loopback_and_bad_values() -> None:
    with pytest.raises(RuntimeConfigError, match="loopback"):
        RuntimeConfig(host="0.0.0.0")
    with pytest.raises(RuntimeConfigError, match="timeout"):
        FunctionSpec(timeout_s=1000)
    with pytest.raises(RuntimeConfigError, match="function name"):
        RuntimeConfig(functions={"bad/name": FunctionSpec()})
    assert RuntimeConfig(host="::1").host == "::1"


async def test_requests_must_be_signed_with_the_runtime_key(runtime: LocalRuntime) -> None:
    import aiohttp
    from botocore.exceptions import ClientError

    key_id, _ = runtime.credentials
    forged = lambda_client(runtime, credentials=(key_id, "not-the-secret"))
    with pytest.raises(ClientError) as info:
        await invoke(forged, {"action": "echo"})
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    # Lambda's codes: an unknown key is not a bad signature, and no signature is neither.
    stranger = lambda_client(runtime, credentials=("AKIDSTRANGER", "secret"))
    with pytest.raises(ClientError, match="unknown access key") as info:
        await invoke(stranger, {"action": "echo"})
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    url = f"{runtime.endpoint_url}/2015-03-31/functions/probe/invocations"
    async with aiohttp.ClientSession() as s, s.post(url, data=b"{}") as resp:
        assert resp.status == 403
        assert resp.headers["X-Amzn-ErrorType"] == "MissingAuthenticationTokenException"
        assert (await resp.json())["Message"] == "Missing Authentication Token"
    assert runtime.rejected_signatures == 3
    assert runtime.pools["probe"].stats.invocations == 0  # nothing ran


def test_sigv4_verify_against_botocore_signer() -> None:
    import time

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from multidict import CIMultiDict

    from spirtd.functions.runtime.sigv4 import AccessKey, SignatureError, verify

    key = AccessKey.generate()
    path = "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A0%3Afunction%3Af/invocations"
    req = AWSRequest(
        method="POST",
        url=f"http://127.0.0.1:9/{path[1:]}?Qualifier=%24LATEST",
        data=b'{"a": 1}',
        headers={"X-Amz-Invocation-Type": "Event"},
    )
    SigV4Auth(Credentials(*key.as_tuple()), "lambda", "us-east-1").add_auth(req)
    headers = CIMultiDict(req.headers.items())
    headers["Host"] = "127.0.0.1:9"

    def check(
        body: bytes = b'{"a": 1}', now: float | None = None, hdrs: CIMultiDict[str] = headers
    ) -> None:
        verify(
            key,
            method="POST",
            raw_path=path,
            query="Qualifier=%24LATEST",
            headers=hdrs,
            get_all=hdrs.getall,
            body=body,
            now=now,
        )

    check()
    with pytest.raises(SignatureError, match="does not match"):
        check(body=b'{"a": 2}')
    with pytest.raises(SignatureError, match="too far"):
        check(now=time.time() + 600)
    other = headers.copy()
    other["X-Amz-Invocation-Type"] = "RequestResponse"
    with pytest.raises(SignatureError, match="does not match"):
        check(hdrs=other)
    with pytest.raises(SignatureError, match="unknown access key"):
        verify(
            AccessKey("OTHER", key.secret),
            method="POST",
            raw_path=path,
            query="Qualifier=%24LATEST",
            headers=headers,
            get_all=headers.getall,
            body=b'{"a": 1}',
        )


async def test_worker_dead_while_idle_is_replaced_not_blamed(runtime: LocalRuntime) -> None:
    c = lambda_client(runtime)
    pid = (await invoke(c, {"action": "echo"}))["body"]["pid"]
    os.kill(pid, signal.SIGKILL)
    await async_wait_for(
        lambda: runtime.pools["probe"]._idle[0].proc.returncode is not None, 30, "the worker's exit"
    )
    r = await invoke(c, {"action": "echo"})
    assert r["error"] is None and r["body"]["pid"] != pid
    assert runtime.pools["probe"].stats.worker_deaths == 1


async def test_stop_answers_in_flight_invocations(tmp_path: Path) -> None:
    rt = LocalRuntime(probe_config(timeout_s=60, probe_dir=tmp_path))
    await rt.start()
    c = lambda_client(rt)
    call = asyncio.create_task(invoke(c, running_sleep("stopped")))
    await async_wait_for((tmp_path / "stopped").exists, 30, "the handler to run")
    pids = rt.pools["probe"].worker_pids
    await asyncio.wait_for(rt.stop(), 30)
    r = await asyncio.wait_for(call, 30)
    assert r["body"]["errorType"] == "Runtime.ExitError"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_event_invocations_queue_within_the_cap(tmp_path: Any) -> None:
    spec = FunctionSpec(
        handler=PROBE, timeout_s=10, memory_mb=256, environment={"SPIRT_PROBE_DIR": str(tmp_path)}
    )
    cfg = RuntimeConfig(functions={"probe": spec}, concurrency=1, event_queue=3)
    async with LocalRuntime(cfg) as rt:
        c = lambda_client(rt)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rt.in_flight)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        for i in range(4):  # one runs, three wait
            r = await invoke(
                c,
                {"action": "flaky", "marker": f"q{i}", "mode": "sleep", "seconds": 0.3},
                InvocationType="Event",
            )
            assert r["status"] == 202
        # The queue holds 3: one more is throttled rather than buffered without bound.
        with pytest.raises(c.exceptions.TooManyRequestsException):
            await invoke(c, {"action": "echo"}, InvocationType="Event")
        await async_wait_for(
            lambda: all((tmp_path / f"q{i}").exists() for i in range(4)), 30, "every marker"
        )
        await async_wait_for(
            lambda: rt.pools["probe"].stats.invocations == 4 and rt.in_flight == 0,
            30,
            "every queued call to end",
        )
        watcher.cancel()
        assert peak == 1


async def test_handler_that_cannot_import_reports_init_error() -> None:
    spec = FunctionSpec(handler="spirtd.functions.no_such_module:handler", memory_mb=256)
    async with LocalRuntime(RuntimeConfig(functions={"broken": spec})) as rt:
        c = lambda_client(rt)
        r = await invoke(c, {}, name="broken")
        assert r["error"] == "Unhandled"
        assert r["body"]["errorType"] == "Runtime.ImportModuleError"
        assert "no_such_module" in r["body"]["errorMessage"]
        assert rt.pools["broken"].stats.init_failures == 1 and rt.cold_starts == 0
