"""The local runtime behaves like AWS Lambda where users and tools notice (issue 15),
and refuses what it must before reading a request's body (issue 13), checked with
the real boto3 client and, where boto3 cannot make the request, botocore's own
SigV4 signer over plain HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from spirtd.functions.runtime import worker
from spirtd.functions.runtime.config import FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.server import LocalRuntime, parse_function
from spirtd.functions.runtime.sigv4 import NONCE_HEADER
from spirtd.localcluster import async_wait_for
from tests.test_runtime import PROBE, invoke, lambda_client, probe_config

INVOKE = "/2015-03-31/functions/{}/invocations"


@pytest.fixture
async def rt() -> AsyncIterator[LocalRuntime]:
    async with LocalRuntime(probe_config(concurrency=2, timeout_s=5.0)) as runtime:
        yield runtime


async def raw_invoke(client: Any, **kw: Any) -> dict[str, Any]:
    """boto3's whole Invoke response, payload read."""

    def call() -> dict[str, Any]:
        resp = client.invoke(**kw)
        resp["Body"] = resp.pop("Payload").read()
        return resp

    return await asyncio.to_thread(call)


def signed_request(
    rt: LocalRuntime,
    body: bytes,
    *,
    name: str = "probe",
    service: str = "lambda",
    region: str = "us-east-1",
    headers: dict[str, str] | None = None,
) -> AWSRequest:
    req = AWSRequest(
        method="POST",
        url=rt.endpoint_url + INVOKE.format(name),
        data=body,
        headers=headers or {},
    )
    SigV4Auth(Credentials(*rt.credentials), service, region).add_auth(req)
    return req


async def send(req: AWSRequest | AWSPreparedRequest) -> tuple[int, dict[str, str], bytes]:
    """Sends a prepared request as it is (no re-signing), over plain HTTP."""

    def call() -> tuple[int, dict[str, str], bytes]:
        r = urllib.request.Request(
            req.url, data=req.body, headers=dict(req.headers.items()), method=req.method
        )
        try:
            with urllib.request.urlopen(r, timeout=60) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers.items()), e.read()

    return await asyncio.to_thread(call)


# ---- LogType=Tail -------------------------------------------------------------------------


async def test_log_tail_returns_the_invocations_log(
    rt: LocalRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spirtd.functions.runtime.process")
    c = lambda_client(rt)
    event = {"action": "print", "lines": ["first line", "second line"]}
    resp = await raw_invoke(
        c, FunctionName="probe", Payload=json.dumps(event).encode(), LogType="Tail"
    )
    assert json.loads(resp["Body"]) == {"printed": 2}
    rid = resp["ResponseMetadata"]["RequestId"]
    log = base64.b64decode(resp["LogResult"]).decode()
    assert log.startswith(f"START RequestId: {rid} Version: $LATEST\n")
    for line in ("first line", "second line", "probe stderr line", "probe logging line"):
        assert line in log
    assert f"END RequestId: {rid}\n" in log
    assert f"REPORT RequestId: {rid}\tDuration: " in log and "Max Memory Used" in log
    # Without LogType=Tail there is no log in the response ...
    plain = await raw_invoke(c, FunctionName="probe", Payload=json.dumps(event).encode())
    assert "LogResult" not in plain

    # ... and either way the output still reaches the runtime's log, a record per line.
    def printed() -> list[str]:
        return [r.getMessage() for r in caplog.records if "second line" in r.getMessage()]

    await async_wait_for(lambda: len(printed()) >= 2, 30, "both invocations' output")
    assert printed() == ["function probe: second line"] * 2
    # The runtime's own START/END/REPORT lines go to the tail only, not to the log (the
    # node's invoker asks for a tail on every call).
    assert not [r for r in caplog.records if "RequestId" in r.getMessage()]


async def test_log_tail_is_the_last_4_kb(rt: LocalRuntime) -> None:
    c = lambda_client(rt)
    lines = [f"line {i:05d} " + "x" * 40 for i in range(500)]  # about 25 KB
    resp = await raw_invoke(
        c,
        FunctionName="probe",
        Payload=json.dumps({"action": "print", "lines": lines}).encode(),
        LogType="Tail",
    )
    log = base64.b64decode(resp["LogResult"])
    assert len(log) == 4096
    assert b"line 00000" not in log and b"line 00499" in log
    # The REPORT line is last (with "Init Duration" on a cold start's call, as Lambda's).
    assert log.rstrip().rsplit(b"\n", 1)[-1].startswith(b"REPORT RequestId: ")


async def test_log_tail_of_failures(rt: LocalRuntime) -> None:
    c = lambda_client(rt)
    resp = await raw_invoke(
        c,
        FunctionName="probe",
        Payload=json.dumps({"action": "raise", "message": "loss went sideways"}).encode(),
        LogType="Tail",
    )
    assert resp["FunctionError"] == "Unhandled"
    log = base64.b64decode(resp["LogResult"]).decode()
    assert "[ERROR] ProbeError: loss went sideways" in log and "Traceback" in log
    resp = await raw_invoke(
        c,
        FunctionName="probe",
        Payload=json.dumps({"action": "sleep", "seconds": 60}).encode(),
        LogType="Tail",
    )
    log = base64.b64decode(resp["LogResult"]).decode()
    assert "Task timed out after 5.00 seconds" in log and "END RequestId" in log
    with pytest.raises(c.exceptions.InvalidParameterValueException):
        await raw_invoke(c, FunctionName="probe", Payload=b"{}", LogType="Everything")


# ---- context.client_context and context.identity -----------------------------------------


async def test_context_client_context_and_identity(rt: LocalRuntime) -> None:
    c = lambda_client(rt)
    ask = json.dumps({"action": "context"}).encode()
    none = json.loads((await raw_invoke(c, FunctionName="probe", Payload=ask))["Body"])
    assert none["client_context"] is None and none["identity"] is None
    sent = {
        "client": {"installation_id": "inst-1", "app_title": "demo", "app_version_code": "7"},
        "custom": {"job": "j1", "round": 3},
        "env": {"platform": "linux"},
    }
    encoded = base64.b64encode(json.dumps(sent).encode()).decode()
    got = json.loads(
        (await raw_invoke(c, FunctionName="probe", Payload=ask, ClientContext=encoded))["Body"]
    )
    cc = got["client_context"]
    assert cc["custom"] == sent["custom"] and cc["env"] == sent["env"]
    assert cc["client"]["installation_id"] == "inst-1" and cc["client"]["app_title"] == "demo"
    assert cc["client"]["app_package_name"] is None
    assert got["identity"] is None
    for bad in ("not base64!", base64.b64encode(b"[1, 2]").decode(), "A" * 4000):
        with pytest.raises(c.exceptions.InvalidRequestContentException):
            await raw_invoke(c, FunctionName="probe", Payload=ask, ClientContext=bad)


async def test_client_context_reaches_synchronous_invocations_only(tmp_path: Path) -> None:
    """Lambda passes ClientContext to RequestResponse invocations, never to Event ones."""
    spec = FunctionSpec(
        handler="tests.recording_handler:handler",
        memory_mb=256,
        environment={"SPIRT_RECORD_DIR": str(tmp_path)},
    )
    async with LocalRuntime(RuntimeConfig(functions={"rec": spec})) as runtime:
        c = lambda_client(runtime)
        sent = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
        sync = await invoke(c, {"marker": "sync"}, name="rec", ClientContext=sent)
        assert sync["body"]["client_context"]["custom"] == {"k": "v"}
        r = await invoke(
            c, {"marker": "event"}, name="rec", ClientContext=sent, InvocationType="Event"
        )
        assert r["status"] == 202
        recorded = tmp_path / "event.json"
        await async_wait_for(recorded.exists, 60, "the Event invocation's record")
        assert json.loads(recorded.read_text()) == {"client_context": None}


# ---- qualifiers and ARNs -------------------------------------------------------------------


async def test_qualifiers_only_latest_exists(rt: LocalRuntime) -> None:
    c = lambda_client(rt)
    ask = json.dumps({"action": "context"}).encode()
    ok = await raw_invoke(c, FunctionName="probe", Payload=ask, Qualifier="$LATEST")
    assert ok["ExecutedVersion"] == "$LATEST"
    assert json.loads(ok["Body"])["arn"].endswith(":function:probe:$LATEST")
    ok = await raw_invoke(c, FunctionName="probe:$LATEST", Payload=ask)
    assert json.loads(ok["Body"])["arn"] == (
        "arn:aws:lambda:us-east-1:000000000000:function:probe:$LATEST"
    )
    for kw in (
        {"FunctionName": "probe", "Qualifier": "prod"},
        {"FunctionName": "probe", "Qualifier": "1"},
        {"FunctionName": "probe:prod"},
        {"FunctionName": "arn:aws:lambda:us-east-1:000000000000:function:probe:live"},
    ):
        with pytest.raises(c.exceptions.ResourceNotFoundException) as info:
            await raw_invoke(c, Payload=ask, **kw)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        assert (
            "Function not found: arn:aws:lambda:us-east-1:000000000000:function:probe:"
            in (info.value.response["Error"]["Message"])
        )
    with pytest.raises(c.exceptions.InvalidParameterValueException, match="does not match"):
        await raw_invoke(c, FunctionName="probe:$LATEST", Qualifier="prod", Payload=ask)
    assert rt.pools["probe"].stats.invocations == 2  # only the two that exist ran


async def test_function_named_by_partial_or_full_arn(rt: LocalRuntime) -> None:
    c = lambda_client(rt)
    ask = json.dumps({"action": "echo", "value": 5}).encode()
    for name in (
        "000000000000:function:probe",
        "000000000000:function:probe:$LATEST",
        "arn:aws:lambda:us-east-1:000000000000:function:probe",
        "probe",
    ):
        resp = await raw_invoke(c, FunctionName=name, Payload=ask)
        assert json.loads(resp["Body"])["echo"] == 5, name
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        await raw_invoke(c, FunctionName="000000000000:function:other", Payload=ask)


async def test_arn_of_another_region_or_account_is_refused(rt: LocalRuntime) -> None:
    """As Lambda: another region's function is not found (404), another account's is
    not the caller's to invoke (403), and neither runs."""
    c = lambda_client(rt)
    ask = json.dumps({"action": "echo", "value": 5}).encode()
    with pytest.raises(c.exceptions.ResourceNotFoundException) as info:
        await raw_invoke(
            c, FunctionName="arn:aws:lambda:eu-west-1:000000000000:function:probe", Payload=ask
        )
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "'eu-west-1'" in info.value.response["Error"]["Message"]
    for name in (
        "123456789012:function:probe",
        "123456789012:function:probe:$LATEST",
        "arn:aws:lambda:us-east-1:123456789012:function:probe",
    ):
        with pytest.raises(ClientError) as info:
            await raw_invoke(c, FunctionName=name, Payload=ask)
        assert info.value.response["Error"]["Code"] == "AccessDeniedException", name
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert "123456789012:function:probe" in info.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as info:
        await raw_invoke(
            c,
            FunctionName="123456789012:function:probe",
            Payload=ask,
            InvocationType="Event",
        )
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"
    assert rt.pools["probe"].stats.invocations == 0


def test_parse_function_forms() -> None:
    assert parse_function("f") == ("f", None, None, None)
    assert parse_function("f:$LATEST") == ("f", "$LATEST", None, None)
    assert parse_function("1:function:f") == ("f", None, None, "1")
    assert parse_function("1:function:f:q") == ("f", "q", None, "1")
    assert parse_function("arn:aws:lambda:r:1:function:f:q") == ("f", "q", "r", "1")
    for bad in (
        "",
        "f:",
        "a:b:c",
        "arn:aws:s3:r:1:function:f",
        "1:layer:f",
        "bad/name",
        ":function:f",
        "arn:aws:lambda::1:function:f",
    ):
        assert parse_function(bad) is None, bad


# ---- stack traces -------------------------------------------------------------------------


async def test_stack_trace_holds_the_handlers_frames_only(rt: LocalRuntime) -> None:
    c = lambda_client(rt)
    resp = await raw_invoke(
        c,
        FunctionName="probe",
        Payload=json.dumps({"action": "raise", "message": "boom"}).encode(),
        LogType="Tail",
    )
    doc = json.loads(resp["Body"])
    assert doc["errorType"] == "ProbeError" and doc["errorMessage"] == "boom"
    trace = doc["stackTrace"]
    # Lambda's shape: one '  File "...", line N, in F\n    code\n' entry per frame,
    # the handler's first, none of the runtime's own.
    assert trace and all(entry.startswith('  File "') for entry in trace)
    assert "probe.py" in trace[0] and "in handler" in trace[0]
    assert not any("runtime/worker.py" in entry for entry in trace)
    log = base64.b64decode(resp["LogResult"]).decode()
    assert "Traceback (most recent call last):" in log and "probe.py" in log
    assert "runtime/worker.py" not in log


async def test_stack_trace_of_a_nested_raise_has_no_runtime_frames() -> None:
    """The handler raises two calls down: stackTrace lists exactly those three frames,
    outermost first, as Lambda does, and no frame of the runtime that called it."""
    spec = FunctionSpec(handler="tests.nested_raise_handler:handler", memory_mb=256)
    async with LocalRuntime(RuntimeConfig(functions={"nested": spec})) as runtime:
        resp = await raw_invoke(
            lambda_client(runtime),
            FunctionName="nested",
            Payload=json.dumps({"key": "k"}).encode(),
            LogType="Tail",
        )
    assert resp["FunctionError"] == "Unhandled"
    doc = json.loads(resp["Body"])
    assert doc["errorType"] == "NestedError" and doc["errorMessage"] == "no 'k' here"
    trace = doc["stackTrace"]
    # One '  File "...", line N, in F\n    code\n' entry per frame of the handler's module.
    frame = re.compile(r'  File "[^"]*nested_raise_handler\.py", line \d+, in (\w+)\n')
    functions = [m[1] if (m := frame.match(entry)) else entry for entry in trace]
    assert functions == ["handler", "_parse", "_check"], trace
    runtime_dir = os.path.dirname(os.path.abspath(worker.__file__))
    assert not any(runtime_dir in entry for entry in trace)
    log = base64.b64decode(resp["LogResult"]).decode()
    assert "nested_raise_handler.py" in log and runtime_dir not in log


# ---- payload limits ------------------------------------------------------------------------


async def test_async_payload_limit_is_1_mb(tmp_path: Path) -> None:
    spec = FunctionSpec(
        handler=PROBE, memory_mb=256, environment={"SPIRT_PROBE_DIR": str(tmp_path)}
    )
    async with LocalRuntime(RuntimeConfig(functions={"probe": spec})) as runtime:
        c = lambda_client(runtime)
        # 900 KB: over the old 256 KB limit, under Lambda's current 1 MB.
        event = {"action": "flaky", "marker": "big", "pad": "x" * 900_000}
        r = await invoke(c, event, InvocationType="Event")
        assert r["status"] == 202
        await async_wait_for((tmp_path / "big").exists, 30, "the handler's marker")
        with pytest.raises(c.exceptions.RequestTooLargeException):
            await invoke(c, dict(event, pad="x" * 1_048_576), InvocationType="Event")


# ---- authentication errors -----------------------------------------------------------------


async def test_authentication_errors_use_lambdas_codes(rt: LocalRuntime) -> None:
    stranger = lambda_client(rt, credentials=("AKIDNOTKNOWNHERE", "whatever"))
    with pytest.raises(ClientError) as info:
        await invoke(stranger, {"action": "echo"})
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    unsigned = boto3.client(
        "lambda",
        endpoint_url=rt.endpoint_url,
        region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError) as info:
        await invoke(unsigned, {"action": "echo"})
    assert info.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert rt.pools["probe"].stats.invocations == 0


async def test_signed_for_another_region_or_service_is_refused(rt: LocalRuntime) -> None:
    key, secret = rt.credentials
    elsewhere = boto3.client(
        "lambda",
        endpoint_url=rt.endpoint_url,
        region_name="eu-west-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError, match="region") as info:
        await invoke(elsewhere, {"action": "echo"})
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    body = json.dumps({"action": "echo"}).encode()
    status, headers, text = await send(signed_request(rt, body, service="execute-api"))
    assert status == 403 and headers["X-Amzn-ErrorType"] == "InvalidSignatureException"
    assert "service: 'lambda'" in json.loads(text)["Message"]
    assert rt.pools["probe"].stats.invocations == 0
    # The same request signed for lambda in us-east-1 runs.
    status, _, text = await send(signed_request(rt, body))
    assert status == 200 and json.loads(text)["echo"] is None


async def test_error_bodies_carry_message_as_the_api_model_names_it(rt: LocalRuntime) -> None:
    status, headers, text = await send(signed_request(rt, b"{}", name="no-such-function"))
    assert status == 404 and headers["X-Amzn-ErrorType"] == "ResourceNotFoundException"
    doc = json.loads(text)
    assert "message" not in doc
    assert doc["Message"].startswith("Function not found: arn:aws:lambda:us-east-1:")
    assert doc["Type"] == "User"


# ---- async retries -------------------------------------------------------------------------


def retrying_config(tmp_path: Path, **kw: Any) -> RuntimeConfig:
    spec = FunctionSpec(
        handler=PROBE, memory_mb=256, environment={"SPIRT_PROBE_DIR": str(tmp_path)}
    )
    kw.setdefault("event_retry_delays_s", (0.05, 0.1))
    return RuntimeConfig(functions={"probe": spec}, concurrency=1, **kw)


async def test_failed_async_invocation_is_retried(tmp_path: Path) -> None:
    async with LocalRuntime(retrying_config(tmp_path)) as runtime:
        c = lambda_client(runtime)
        stats = runtime.pools["probe"].stats
        # Fails the first time only: one retry, then it succeeds.
        r = await invoke(c, {"action": "flaky", "marker": "once"}, InvocationType="Event")
        assert r["status"] == 202
        await async_wait_for(
            lambda: stats.invocations == 2 and runtime.in_flight == 0, 30, "the retry to succeed"
        )
        assert (stats.function_errors, runtime.event_retries, runtime.event_failures) == (1, 1, 0)
        # Always fails: the first attempt and two retries, then it is given up.
        await invoke(c, {"action": "raise"}, InvocationType="Event")
        await async_wait_for(lambda: runtime.event_failures == 1, 30, "the event to be given up")
        assert stats.invocations == 5 and runtime.event_retries == 3
        assert runtime.stats()["events_pending"] == 0


async def test_async_retries_wait_in_the_bounded_queue(tmp_path: Path) -> None:
    cfg = retrying_config(tmp_path, event_queue=1, event_retry_delays_s=(3600.0,))
    async with LocalRuntime(cfg) as runtime:
        c = lambda_client(runtime)
        await invoke(c, {"action": "raise"}, InvocationType="Event")
        await async_wait_for(lambda: runtime.event_retries == 1, 30, "a retry to be queued")
        # The retry waiting for its delay holds the queue's one place.
        with pytest.raises(c.exceptions.TooManyRequestsException):
            await invoke(c, {"action": "echo"}, InvocationType="Event")
        assert runtime.stats()["events_pending"] == 1
    assert runtime.stats()["events_pending"] == 0  # stop() ended the waiting retry


# ---- nothing read before authentication (issue 13) ----------------------------------------


async def _open_request(rt: LocalRuntime, head: bytes) -> tuple[Any, Any]:
    host, port = rt.endpoint_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


def _head(req: AWSRequest, length: int) -> bytes:
    netloc, path = req.url.split("//", 1)[1].split("/", 1)
    lines = [f"POST /{path} HTTP/1.1", f"Host: {netloc}"]
    lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() != "content-length"]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_bad_signature_header_is_refused_before_the_body(rt: LocalRuntime) -> None:
    req = signed_request(rt, b"{}")
    auth = req.headers["Authorization"].replace(rt.credentials[0], "AKIDSTRANGER0000")
    del req.headers["Authorization"]  # HTTPHeaders would add a second one, not replace
    req.headers["Authorization"] = auth
    # 6 MB announced, none sent: the answer comes from the headers alone.
    reader, writer = await _open_request(rt, _head(req, 6_000_000))
    try:
        status = await asyncio.wait_for(reader.readline(), 30)
        assert status.startswith(b"HTTP/1.1 403")
    finally:
        writer.close()
    assert rt.rejected_signatures == 1


async def test_bodies_awaiting_verification_are_capped() -> None:
    async with LocalRuntime(probe_config(max_unverified=2)) as runtime:
        body = json.dumps({"action": "echo", "pad": "y" * 100_000}).encode()
        held = []
        for _ in range(2):
            # Valid signature headers, then only half the body: held mid-read.
            reader, writer = await _open_request(
                runtime, _head(signed_request(runtime, body), len(body)) + body[:50_000]
            )
            held.append((reader, writer))
        await async_wait_for(lambda: runtime._unverified == 2, 30, "two bodies held")
        third = signed_request(runtime, body)
        status, headers, _ = await send(third)
        assert status == 429 and headers["X-Amzn-ErrorType"] == "TooManyRequestsException"
        for _, writer in held:
            writer.close()
        await async_wait_for(lambda: runtime._unverified == 0, 30, "the held bodies to go")
        c = lambda_client(runtime)
        assert (await invoke(c, {"action": "echo", "value": 1}))["body"]["echo"] == 1
        assert runtime.pools["probe"].stats.invocations == 1


async def test_a_signed_request_cannot_be_replayed(rt: LocalRuntime) -> None:
    """Requests that sign spirtd's nonce header, as the node's invoker sends them."""
    req = signed_request(
        rt,
        json.dumps({"action": "echo", "value": "once"}).encode(),
        headers={NONCE_HEADER: "0123456789abcdef"},
    )
    status, _, text = await send(req)
    assert status == 200 and json.loads(text)["echo"] == "once"
    status, headers, text = await send(req)
    assert status == 403 and headers["X-Amzn-ErrorType"] == "InvalidSignatureException"
    assert "already received" in json.loads(text)["Message"]
    assert rt.pools["probe"].stats.invocations == 1


async def test_the_invokers_request_cannot_be_replayed(rt: LocalRuntime) -> None:
    """A request as the node's invoker sends it (boto3 with add_request_nonce),
    captured on its way and sent again, is refused as a replay."""
    c = lambda_client(rt)
    sent: list[AWSPreparedRequest] = []
    c.meta.events.register("before-send.lambda.Invoke", lambda request, **_: sent.append(request))
    ask = json.dumps({"action": "echo", "value": "once"}).encode()
    resp = await raw_invoke(c, FunctionName="probe", Payload=ask)
    assert json.loads(resp["Body"])["echo"] == "once"
    status, headers, text = await send(sent[0])
    assert status == 403 and headers["X-Amzn-ErrorType"] == "InvalidSignatureException"
    assert "already received" in json.loads(text)["Message"]
    assert rt.pools["probe"].stats.invocations == 1


async def test_a_plain_boto3_client_may_repeat_an_identical_call(rt: LocalRuntime) -> None:
    """A standard client's two identical calls in one second sign to the same bytes;
    Lambda runs both, and so does the runtime (only nonce-signed requests are held
    to the replay check)."""
    key, secret = rt.credentials
    plain = boto3.client(
        "lambda",
        endpoint_url=rt.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}),
    )
    sent: list[str] = []
    plain.meta.events.register(
        "before-send.lambda.Invoke",
        lambda request, **_: sent.append(request.headers["Authorization"].decode()),
    )
    ask = json.dumps({"action": "echo", "value": "again"}).encode()
    # Two calls land in the same second (same X-Amz-Date) within a few tries.
    for _ in range(10):
        sent.clear()
        for _ in range(2):
            resp = await raw_invoke(plain, FunctionName="probe", Payload=ask)
            assert resp["StatusCode"] == 200 and json.loads(resp["Body"])["echo"] == "again"
        if sent[0] == sent[1]:
            break
    assert sent[0] == sent[1], "no two identical signatures in ten tries"
    assert rt.rejected_signatures == 0


async def test_a_refused_request_may_be_sent_again(rt: LocalRuntime) -> None:
    """Only requests that ran are remembered: one refused before running (here a
    bad payload) is no replay when sent again."""
    req = signed_request(rt, b"{not json")
    for _ in range(2):
        status, headers, _ = await send(req)
        assert status == 400 and headers["X-Amzn-ErrorType"] == "InvalidRequestContentException"


def test_the_invoker_signs_the_header_the_replay_check_looks_for() -> None:
    from spirtd.functions.invoker import NONCE_HEADER as SENT

    assert SENT.lower() == NONCE_HEADER
