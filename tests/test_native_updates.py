"""SPIRT.SGD / SPIRT.ADAM against torch.optim and a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio
import torch

from tests.fixtures_redis import RunningRedis, reset_shared
from tests.test_native_rules import assert_close, get, put

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(params=["main", "worker"], loop_scope="module")
async def r(request: pytest.FixtureRequest, module_managed_redis: RunningRedis) -> RunningRedis:
    return await reset_shared(module_managed_redis, worker=request.param == "worker")


def ref_sgd(p, g, buf, lr, mu, damp, nesterov, wd):  # type: ignore[no-untyped-def]
    p, g = p.astype(np.float64), g.astype(np.float64)
    g = g + wd * p
    if mu == 0:
        return p - lr * g, None
    b = g if buf is None else mu * buf.astype(np.float64) + (1 - damp) * g
    step = g + mu * b if nesterov else b
    return p - lr * step, b


def ref_adam(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled):  # type: ignore[no-untyped-def]
    p, g = p.astype(np.float64), g.astype(np.float64)
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * (0 if m is None else m.astype(np.float64)) + (1 - b1) * g
    v = b2 * (0 if v is None else v.astype(np.float64)) + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    return p - lr / (1 - b1**t) * m / denom, m, v


@pytest.mark.parametrize(
    ("mu", "damp", "nesterov", "wd"),
    [
        (0.0, 0.0, False, 0.0),
        (0.0, 0.0, False, 0.01),
        (0.9, 0.0, False, 0.0),
        (0.9, 0.0, True, 0.001),
        (0.5, 0.3, False, 0.1),
    ],
)
async def test_sgd_matches_torch_and_numpy(
    r: RunningRedis, mu: float, damp: float, nesterov: bool, wd: float
) -> None:
    c = r.client
    rng = np.random.default_rng(int(mu * 10 + damp * 100 + wd * 1000))
    size = int(rng.integers(1, 20000))
    p0 = rng.standard_normal(size).astype(np.float32)
    lr = 0.05
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD(
        [param], lr=lr, momentum=mu, dampening=damp, nesterov=nesterov, weight_decay=wd
    )
    await put(c, "w", p0)
    p_ref, b_ref = p0, None
    for _step in range(4):
        g = rng.standard_normal(size).astype(np.float32)
        await put(c, "g", g)
        args: list[object] = ["SPIRT.SGD", "w", "g", "LR", lr, "WEIGHT_DECAY", wd]
        if mu:
            args += ["MOMENTUM", mu, "BUF", "buf", "DAMPENING", damp]
        if nesterov:
            args.append("NESTEROV")
        assert await c.execute_command(*args) == b"OK"
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        p_ref, b_ref = ref_sgd(p_ref, g, b_ref, lr, mu, damp, nesterov, wd)
        got = await get(c, "w")
        assert_close(got, p_ref, p0)
        assert_close(got, param.detach().numpy(), p0)
        if mu:
            assert_close(await get(c, "buf"), b_ref, p0)
            assert_close(await get(c, "buf"), opt.state[param]["momentum_buffer"].numpy(), p0)
        else:
            assert not await c.exists("buf")
        p_ref = got  # continue from the stored float32 state, as torch does
        if b_ref is not None:
            b_ref = await get(c, "buf")


@pytest.mark.parametrize(("wd", "decoupled"), [(0.0, False), (0.01, False), (0.05, True)])
async def test_adam_matches_torch_and_numpy(r: RunningRedis, wd: float, decoupled: bool) -> None:
    c = r.client
    rng = np.random.default_rng(int(wd * 1000) + decoupled)
    size = int(rng.integers(1, 20000))
    p0 = rng.standard_normal(size).astype(np.float32)
    lr, b1, b2, eps = 1e-2, 0.8, 0.99, 1e-6
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    await put(c, "w", p0)
    p_ref, m_ref, v_ref = p0, None, None
    for t in range(1, 6):
        g = rng.standard_normal(size).astype(np.float32)
        await put(c, "g", g)
        args: list[object] = [
            "SPIRT.ADAM",
            "w",
            "g",
            "M",
            "m",
            "V",
            "v",
            "STEP",
            t,
            "LR",
            lr,
            "BETAS",
            b1,
            b2,
            "EPS",
            eps,
            "WEIGHT_DECAY",
            wd,
        ]
        if decoupled:
            args.append("DECOUPLED")
        assert await c.execute_command(*args) == b"OK"
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        p_ref, m_ref, v_ref = ref_adam(p_ref, g, m_ref, v_ref, t, lr, b1, b2, eps, wd, decoupled)
        got = await get(c, "w")
        assert_close(got, p_ref, p0)
        assert_close(got, param.detach().numpy(), p0)
        st = opt.state[param]
        assert_close(await get(c, "m"), st["exp_avg"].numpy(), g)
        np.testing.assert_allclose(
            await get(c, "v"), st["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-12
        )
        p_ref, m_ref, v_ref = got, await get(c, "m"), await get(c, "v")


async def test_adam_step_one_ignores_stale_moments(r: RunningRedis) -> None:
    c = r.client
    p = np.ones(10, np.float32)
    g = np.full(10, 0.5, np.float32)
    await put(c, "w", p)
    await put(c, "g", g)
    await put(c, "m", np.full(10, 9.0, np.float32))
    bad = np.full(10, np.nan, np.float32)  # stale garbage: not even read at step 1
    await c.set("v", bad.tobytes())
    await c.set("v:shape", "10")
    await c.execute_command("SPIRT.ADAM", "w", "g", "M", "m", "V", "v", "STEP", 1, "LR", 0.1)
    ref, m, v = ref_adam(p, g, None, None, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, False)
    assert_close(await get(c, "w"), ref, p)
    assert_close(await get(c, "m"), m, g)
    assert_close(await get(c, "v"), v, g * g)


async def test_update_keeps_parameter_shape(r: RunningRedis) -> None:
    c = r.client
    p = np.arange(12, dtype=np.float32).reshape(3, 4)
    await put(c, "w", p)
    await put(c, "g", np.ones(12, np.float32))  # flat gradient for a 3x4 parameter
    await c.execute_command("SPIRT.SGD", "w", "g", "LR", 1.0)
    got = await get(c, "w")
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got, p - 1)
