"""The gradient function, called as a plain handler, against a real redis-server."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from torch import nn

from spirtd.functions import gradient
from spirtd.functions.credentials import (
    CredentialError,
    CredentialRef,
    RedisBinding,
    bindings_env,
)
from spirtd.functions.event import DataSlice, EventError, GradientEvent, RedisTarget
from spirtd.functions.runtime.context import local_context
from spirtd.redis import tensorfmt
from spirtd.redis.process import FUNCTION_ACL
from spirtd.tasks import Shard, TaskError, load_task, minibatch_slice
from spirtd.training.state import StateKeys
from tests.fixtures_redis import RunningRedis


@pytest.fixture(autouse=True)
def function_config(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Sets the in-process function's Redis binding, like the runtime's environment."""

    def bind(*bindings: RedisBinding) -> None:
        for k, v in bindings_env(bindings).items():
            monkeypatch.setenv(k, v)

    return bind


@pytest.fixture
def plain_redis(plain_redis: RunningRedis, function_config: Any) -> RunningRedis:
    """The plain server, bound in the function's configuration to its functions' user."""
    function_config(plain_redis.server.function_binding())
    return plain_redis


def make_event(
    r: RunningRedis,
    *,
    task: str = "synthetic",
    slice_index: int = 0,
    slices: int = 3,
    batch: int = 48,
    seed: int = 5,
    shard: str = "0/1",
    indices: list[int] | None = None,
    options: dict[str, Any] | None = None,
    job: str = "job1",
    rnd: int = 4,
    params_key: str = "spirt:job1:theta",
    ttl: int = 600,
) -> GradientEvent:
    if indices is not None:
        data = DataSlice(shard=Shard.parse(shard), batch_size=len(indices), indices=tuple(indices))
    else:
        data = DataSlice(shard=Shard.parse(shard), batch_size=batch, seed=seed, slices=slices)
    return GradientEvent(
        job=job,
        round=rnd,
        slice=slice_index,
        task=task,
        task_options=options or {},
        redis=RedisTarget(r.url),
        params_key=params_key,
        data=data,
        output_key=StateKeys(job).fn_output(rnd, slice_index, "nonce"),
        ttl_seconds=ttl,
    )


async def put_params(r: RunningRedis, key: str, params: np.ndarray) -> None:
    values, shape = tensorfmt.encode(params)
    await r.client.set(key, values)
    await r.client.set(tensorfmt.shape_key(key), shape)


async def get_tensor(r: RunningRedis, key: str) -> np.ndarray:
    return tensorfmt.decode(await r.client.get(key), await r.client.get(tensorfmt.shape_key(key)))


def reference_gradient(
    task_name: str, shard: str, params: np.ndarray, rows: np.ndarray, **options: Any
) -> tuple[np.ndarray, float]:
    """The gradient computed here with plain torch, independently of the handler."""
    task = load_task(task_name, shard, **options)
    model = task.build_model()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), model.parameters())
    idx = torch.as_tensor(rows)
    loss = nn.functional.cross_entropy(model(task.train.x[idx]), task.train.y[idx])
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    return flat, loss.item()


async def call(ev: GradientEvent | dict[str, Any]) -> dict[str, Any]:
    payload = ev.to_json() if isinstance(ev, GradientEvent) else ev
    return await asyncio.to_thread(gradient.handler, payload, local_context())


@pytest.mark.parametrize(("task_name", "shard"), [("synthetic", "0/1"), ("digits", "1/2")])
async def test_gradient_equals_torch(plain_redis: RunningRedis, task_name: str, shard: str) -> None:
    task = load_task(task_name, shard)
    params = task.initial_params(21)
    await put_params(plain_redis, "spirt:job1:theta", params)
    for k in range(3):
        ev = make_event(plain_redis, task=task_name, shard=shard, slice_index=k)
        out = await call(ev)
        rows = minibatch_slice(len(task.train), 5, 48, k, 3)
        want, want_loss = reference_gradient(task_name, shard, params, rows)
        got = await get_tensor(plain_redis, ev.output_key)
        assert got.shape == (task.param_count,)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        assert out["samples"] == len(rows) == 16
        assert out["loss"] == pytest.approx(want_loss, abs=1e-6)
        assert out["output_key"] == ev.output_key and out["slice"] == k
        assert out["param_count"] == task.param_count and out["duration_ms"] > 0


async def test_explicit_indices_and_ttl(plain_redis: RunningRedis) -> None:
    task = load_task("synthetic")
    params = task.initial_params(2)
    await put_params(plain_redis, "spirt:job1:theta", params)
    ev = make_event(plain_redis, indices=[3, 1, 4, 1, 5], ttl=120)
    out = await call(ev)
    want, _ = reference_gradient("synthetic", "0/1", params, np.array([3, 1, 4, 1, 5]))
    np.testing.assert_allclose(await get_tensor(plain_redis, ev.output_key), want, atol=1e-6)
    assert out["samples"] == 5
    for key in (ev.output_key, tensorfmt.shape_key(ev.output_key)):
        assert 0 < await plain_redis.client.ttl(key) <= 120


@pytest.fixture
def module_redis(managed_redis: RunningRedis, function_config: Any) -> RunningRedis:
    """The managed server with the module, bound to its functions' user (FUNCTION_ACL
    plus SPIRT.PUT)."""
    function_config(managed_redis.server.function_binding())
    return managed_redis


async def test_with_the_module_the_output_is_scratch_with_a_ttl(
    module_redis: RunningRedis,
) -> None:
    # The gradient lives for one round: SPIRT.PUT ... SCRATCH EX keeps it out of the AOF.
    task = load_task("synthetic")
    params = task.initial_params(3)
    await put_params(module_redis, "spirt:job1:theta", params)
    ev = make_event(module_redis, ttl=90)
    await call(ev)
    await call(ev)  # a retry overwrites
    want, _ = reference_gradient(
        "synthetic", "0/1", params, minibatch_slice(len(task.train), 5, 48, 0, 3)
    )
    np.testing.assert_allclose(await get_tensor(module_redis, ev.output_key), want, atol=1e-6)
    for key in (ev.output_key, tensorfmt.shape_key(ev.output_key)):
        assert 0 < await module_redis.client.ttl(key) <= 90
    assert await module_redis.client.execute_command("SPIRT.INFO") is not None
    await module_redis.server.stop()
    await module_redis.server.start()  # replays the AOF
    c = await module_redis.server.client()
    try:
        assert await c.exists("spirt:job1:theta") == 1
        assert await c.exists(ev.output_key, tensorfmt.shape_key(ev.output_key)) == 0
    finally:
        await c.aclose()


async def test_an_acl_without_spirt_put_falls_back_to_set(
    managed_redis: RunningRedis, function_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deploy/aws/README.md's rule on a Redis that was set up without +spirt.put.
    await managed_redis.client.execute_command(
        "ACL", "SETUSER", "spirt-old", "reset", "on", ">old-password-0123456789", *FUNCTION_ACL
    )
    monkeypatch.setenv("OLD_FN_PASSWORD", "old-password-0123456789")
    url = managed_redis.server.function_binding().url
    function_config(RedisBinding(url, "spirt-old", CredentialRef("env", "OLD_FN_PASSWORD")))
    task = load_task("synthetic")
    params = task.initial_params(4)
    await put_params(managed_redis, "spirt:job1:theta", params)
    ev = make_event(managed_redis, ttl=60)
    for _ in range(2):  # the second call goes straight to SET
        await call(ev)
    want, _ = reference_gradient(
        "synthetic", "0/1", params, minibatch_slice(len(task.train), 5, 48, 0, 3)
    )
    np.testing.assert_allclose(await get_tensor(managed_redis, ev.output_key), want, atol=1e-6)
    assert 0 < await managed_redis.client.ttl(ev.output_key) <= 60


async def test_retry_overwrites_never_adds(plain_redis: RunningRedis) -> None:
    task = load_task("synthetic")
    p1 = task.initial_params(1)
    await put_params(plain_redis, "spirt:job1:theta", p1)
    ev = make_event(plain_redis, slice_index=1)
    await call(ev)
    await call(ev)  # a retry of the same slice
    p2 = task.initial_params(2)
    await put_params(plain_redis, "spirt:job1:theta", p2)
    await call(ev)
    keys = sorted(k.decode() for k in await plain_redis.client.keys("spirt:job1:fn:*"))
    assert keys == [ev.output_key, tensorfmt.shape_key(ev.output_key)]
    want, _ = reference_gradient(
        "synthetic", "0/1", p2, minibatch_slice(len(task.train), 5, 48, 1, 3)
    )
    np.testing.assert_allclose(await get_tensor(plain_redis, ev.output_key), want, atol=1e-6)


async def test_missing_or_misshapen_params(plain_redis: RunningRedis) -> None:
    ev = make_event(plain_redis)
    with pytest.raises(gradient.ParamsError, match="no parameters"):
        await call(ev)
    await put_params(plain_redis, "spirt:job1:theta", np.zeros(10, dtype=np.float32))
    with pytest.raises(gradient.ParamsError, match="40 bytes"):
        await call(ev)
    bad = load_task("synthetic").initial_params(0)
    bad[0] = np.inf
    await put_params(plain_redis, "spirt:job1:theta", bad)
    with pytest.raises(TaskError, match="NaN or infinity"):
        await call(ev)
    assert await plain_redis.client.exists(ev.output_key) == 0  # nothing was written


async def test_credentials_by_reference(
    plain_redis: RunningRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function_config: Any
) -> None:
    await put_params(plain_redis, "spirt:job1:theta", load_task("synthetic").initial_params(0))
    info = plain_redis.server.connection_info()
    password = Path(info.password_file).read_text().strip()

    def bind(ref: CredentialRef) -> None:
        function_config(RedisBinding(info.url, info.username, ref))

    loose = tmp_path / "loose"
    loose.write_text(password)
    loose.chmod(0o644)
    bind(CredentialRef("file", str(loose)))
    with pytest.raises(CredentialError, match="0600"):
        await call(make_event(plain_redis))
    bind(CredentialRef("file", str(tmp_path / "none")))
    with pytest.raises(CredentialError, match="cannot open"):
        await call(make_event(plain_redis))

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    bind(CredentialRef("file", str(wrong)))
    with pytest.raises(redis.AuthenticationError):
        await call(make_event(plain_redis))

    monkeypatch.setenv("SPIRT_TEST_REDIS_PASSWORD", password)
    bind(CredentialRef("env", "SPIRT_TEST_REDIS_PASSWORD"))
    out = await call(make_event(plain_redis, slice_index=2))
    assert out["samples"] == 16
    bind(CredentialRef("env", "SPIRT_UNSET_VAR_X"))
    with pytest.raises(CredentialError, match="not set"):
        await call(make_event(plain_redis))


async def test_a_warm_only_call_needs_no_parameters_and_writes_nothing(
    plain_redis: RunningRedis,
) -> None:
    """What a joining node sends while it syncs (no parameters in its Redis yet): the
    task and its data load, the Redis answers, and nothing is read or written."""
    ev = replace(make_event(plain_redis, task="digits", shard="1/2"), warm=True)
    assert ev.to_json()["warm"] is True and "warm" not in make_event(plain_redis).to_json()
    assert await plain_redis.client.exists("spirt:job1:theta") == 0
    out = await call(ev)
    assert out["warm"] is True and out["round"] == ev.round and out["duration_ms"] > 0
    assert "loss" not in out and await plain_redis.client.exists(ev.output_key) == 0
    # The same container then computes a real gradient.
    task = load_task("digits", "1/2")
    await put_params(plain_redis, "spirt:job1:theta", task.initial_params(3))
    assert (await call(replace(ev, warm=False)))["samples"] == 16


def _valid(r: RunningRedis) -> dict[str, Any]:
    return make_event(r).to_json()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda e: e.pop("job"), "event.job"),
        (lambda e: e.update(job="bad job!"), "event.job"),
        (lambda e: e.update(v=2), "event.v"),
        (lambda e: e.update(round=-1), "event.round"),
        (lambda e: e.update(round=True), "event.round"),
        (lambda e: e.update(password="hunter2"), "unknown field"),
        (lambda e: e["redis"].update(password="hunter2"), "unknown field"),
        (lambda e: e["redis"].update(url="http://127.0.0.1:6379"), "redis.url"),
        (lambda e: e["redis"].update(credentials={"kind": "none"}), "only the url"),
        (lambda e: e["redis"].update(username="spirt"), "only the url"),
        (lambda e: e.update(redis="unix:///x"), "event.redis must be a JSON object"),
        (lambda e: e.update(output_key="has space"), "output_key"),
        (lambda e: e.update(output_key="k" * 513), "output_key"),
        (lambda e: e.update(ttl_seconds=0), "ttl_seconds"),
        (lambda e: e["data"].update(indices=[1, 2]), "exactly one of indices or seed"),
        (lambda e: e["data"].update(seed=None), "exactly one of indices or seed"),
        (lambda e: e["data"].update(slices=2, batch_size=48) or e.update(slice=2), "not below"),
        (lambda e: e["data"].update(shard="3/3"), "shard"),
        (lambda e: e["data"].update(batch_size=0), "batch_size"),
        (
            lambda e: e["data"].update(seed=None, indices=[0] * 1_000_001, batch_size=1_000_001),
            "indices",
        ),
        (lambda e: e.update(task_options={"x": [1, 2]}), "scalar"),
        (lambda e: e.update(task="tests.test_functions:evil"), "not in the allowed"),
        (lambda e: e.update(warm="yes"), "event.warm"),
    ],
)
async def test_bad_events_get_clear_errors(
    plain_redis: RunningRedis, mutate: Any, match: str
) -> None:
    ev = _valid(plain_redis)
    mutate(ev)
    with pytest.raises((EventError, TaskError), match=match):
        await call(ev)


async def test_event_must_be_an_object() -> None:
    for bad in ([], "x", None, 3):
        with pytest.raises(EventError, match="JSON object"):
            await asyncio.to_thread(gradient.handler, bad, local_context())


def test_event_json_round_trip() -> None:
    ev = GradientEvent(
        job="j",
        round=1,
        slice=0,
        task="digits",
        redis=RedisTarget("unix:///tmp/x.sock"),
        params_key="p",
        data=DataSlice(Shard(0, 2), 8, seed=3, slices=2),
        output_key="o",
        task_options={"model": "cnn"},
    )
    assert GradientEvent.from_json(ev.to_json()) == ev
    assert GradientEvent.from_json(replace(ev, warm=True).to_json()) == replace(ev, warm=True)
    # The event names which Redis, never a secret or where one is.
    assert ev.to_json()["redis"] == {"url": "unix:///tmp/x.sock"}
    anywhere = replace(ev, redis=RedisTarget())
    assert anywhere.to_json()["redis"] == {}
    assert GradientEvent.from_json(anywhere.to_json()) == anywhere


async def test_works_with_least_privilege_acl_user(plain_redis: RunningRedis) -> None:
    """The binding logs in as the managed Redis's functions' user (process.FUNCTION_ACL,
    the same rule deploy/aws/README.md gives), which can do exactly what the function does."""
    assert plain_redis.server.function_binding().username == "spirt-fn"
    task = load_task("synthetic")
    params = task.initial_params(6)
    await put_params(plain_redis, "spirt:job1:theta", params)
    ev = make_event(plain_redis)
    out = await call(ev)
    assert out["samples"] == 16
    want, _ = reference_gradient(
        "synthetic", "0/1", params, minibatch_slice(len(task.train), 5, 48, 0, 3)
    )
    np.testing.assert_allclose(await get_tensor(plain_redis, ev.output_key), want, atol=1e-6)
    # ... and it cannot touch keys outside its namespace, overwrite the model, or
    # write a gradient in place of the node.
    await put_params(plain_redis, "other:params", params)
    with pytest.raises(redis.exceptions.NoPermissionError):
        await call(replace(ev, params_key="other:params"))
    for key in ("spirt:job1:theta", "spirt:job1:g:4:local", "spirt:job1:g:4:p:12D3KooWPeer"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            await call(replace(ev, output_key=key))
    np.testing.assert_array_equal(await get_tensor(plain_redis, "spirt:job1:theta"), params)


async def test_credentials_from_secrets_manager(
    plain_redis: RunningRedis, monkeypatch: pytest.MonkeyPatch, function_config: Any
) -> None:
    """The AWS path, with the real boto3 client pointed at a stand-in Secrets Manager
    on 127.0.0.1 (AWS_ENDPOINT_URL_SECRETS_MANAGER)."""
    from aiohttp import web

    await plain_redis.client.execute_command(
        "ACL", "SETUSER", "spirt-sm", "reset", "on", ">sm-password-0123456789", *FUNCTION_ACL
    )
    secrets = {
        "good": json.dumps({"username": "spirt-sm", "password": "sm-password-0123456789"}),
        "nopw": json.dumps({"username": "spirt-sm"}),
    }
    asked: list[str] = []

    async def get_secret_value(request: web.Request) -> web.Response:
        assert request.headers["X-Amz-Target"] == "secretsmanager.GetSecretValue"
        arn = (await request.json())["SecretId"]
        asked.append(arn)
        name = arn.rsplit(":", 1)[1]
        return web.json_response(
            {"ARN": arn, "Name": name, "SecretString": secrets[name]},
            content_type="application/x-amz-json-1.1",
        )

    app = web.Application()
    app.router.add_post("/", get_secret_value)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        await put_params(plain_redis, "spirt:job1:theta", load_task("synthetic").initial_params(0))
        arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:good"
        # The username comes from the secret, not the binding.
        function_config(RedisBinding(plain_redis.url, None, CredentialRef("secretsmanager", arn)))
        ev = replace(make_event(plain_redis), redis=RedisTarget())  # the only one configured
        assert (await call(ev))["samples"] == 16
        assert (await call(ev))["samples"] == 16
        assert asked == [arn]  # a warm function reuses the secret (and connection)
        bad = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nopw"
        function_config(RedisBinding(plain_redis.url, None, CredentialRef("secretsmanager", bad)))
        with pytest.raises(CredentialError, match="no string 'password'"):
            await call(make_event(plain_redis))
    finally:
        await runner.cleanup()
