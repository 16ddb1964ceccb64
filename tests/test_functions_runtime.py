"""The gradient function end to end: invoker -> boto3 -> local runtime -> warm worker
-> real Redis. Gradients must equal torch's, and retries must never add gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spirtd.functions.credentials import bindings_env
from spirtd.functions.invoker import FunctionError, Invoker
from spirtd.functions.runtime.config import GRADIENT_FUNCTION, FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.server import LocalRuntime
from spirtd.localcluster import async_wait_for
from spirtd.redis import tensorfmt
from spirtd.tasks import load_task, minibatch_slice
from tests.fixtures_redis import RunningRedis
from tests.test_functions import get_tensor, make_event, put_params, reference_gradient
from tests.test_runtime import invoke, lambda_client


def gradient_spec(r: RunningRedis) -> FunctionSpec:
    """The gradient function configured, as spirtd configures it, for ``r``'s Redis."""
    return FunctionSpec(timeout_s=60, environment=bindings_env([r.server.function_binding()]))


async def test_round_through_local_runtime(plain_redis: RunningRedis) -> None:
    task = load_task("digits", "0/2")
    params = task.initial_params(8)
    await put_params(plain_redis, "spirt:job1:theta", params)
    cfg = RuntimeConfig(functions={GRADIENT_FUNCTION: gradient_spec(plain_redis)}, concurrency=2)
    async with (
        LocalRuntime(cfg) as rt,
        Invoker(
            rt.endpoint_url, GRADIENT_FUNCTION, concurrency=2, credentials=rt.credentials
        ) as inv,
    ):
        events = [
            make_event(
                plain_redis, task="digits", shard="0/2", slice_index=k, slices=4, batch=64
            ).to_json()
            for k in range(4)
        ]
        # Every slice sent twice, as an at-least-once retry would.
        res = await inv.invoke_round(events + events, deadline=120.0, min_fraction=1.0)
        assert res.met_quorum, [s.error for s in res.slices]
        keys = {k.decode() for k in await plain_redis.client.keys("spirt:job1:fn:*")}
        assert len(keys) == 8  # one values key and one shape key per slice, no more
        for k in range(4):
            rows = minibatch_slice(len(task.train), 5, 64, k, 4)
            want, want_loss = reference_gradient("digits", "0/2", params, rows)
            got = await get_tensor(plain_redis, events[k]["output_key"])
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
            assert res.slices[k].result["loss"] == pytest.approx(want_loss, abs=1e-6)  # type: ignore[index]
            assert res.slices[k].result["samples"] == 16  # type: ignore[index]
        assert rt.cold_starts <= 2  # warm workers were reused across the 8 invocations

        # A bad event fails clearly and is not retried.
        bad = dict(events[0], output_key="bad key")
        with pytest.raises(FunctionError) as info:
            await inv.invoke(bad)
        assert info.value.error_type == "EventError" and "output_key" in info.value.message


async def test_event_invocation_writes_gradient(plain_redis: RunningRedis) -> None:
    task = load_task("synthetic")
    params = task.initial_params(3)
    await put_params(plain_redis, "spirt:job1:theta", params)
    cfg = RuntimeConfig(functions={GRADIENT_FUNCTION: gradient_spec(plain_redis)}, concurrency=1)
    async with LocalRuntime(cfg) as rt:
        c = lambda_client(rt)
        ev = make_event(plain_redis, slice_index=2)
        r = await invoke(
            c, json.dumps(ev.to_json()).encode(), name=GRADIENT_FUNCTION, InvocationType="Event"
        )
        assert r["status"] == 202
        shape_key = tensorfmt.shape_key(ev.output_key)

        await async_wait_for(
            lambda: plain_redis.client.exists(shape_key), 60, "the gradient's shape in Redis"
        )
        await async_wait_for(lambda: rt.in_flight == 0, 30, "the invocation to end")
        want, _ = reference_gradient(
            "synthetic", "0/1", params, minibatch_slice(len(task.train), 5, 48, 2, 3)
        )
        np.testing.assert_allclose(await get_tensor(plain_redis, ev.output_key), want, atol=1e-6)
