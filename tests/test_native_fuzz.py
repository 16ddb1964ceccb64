"""Random argument lists to every SPIRT command: the server survives, answers PING, and
a command that fails leaves every key as it was."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from tests.fixtures_redis import RunningRedis
from tests.test_native_errors import setup_keys, snapshot

COMMANDS = [
    "SPIRT.PUT",
    "SPIRT.GET",
    "SPIRT.MEAN",
    "SPIRT.MEDIAN",
    "SPIRT.TRIMMEAN",
    "SPIRT.KRUM",
    "SPIRT.GEOMED",
    "SPIRT.CCLIP",
    "SPIRT.SGD",
    "SPIRT.ADAM",
    "SPIRT.NORM",
    "SPIRT.DIGEST",
    "SPIRT.INFO",
    "SPIRT.CONFIG",
]
KEYWORDS = [
    "WEIGHTS",
    "NNM",
    "BETA",
    "F",
    "M",
    "MAXITER",
    "EPS",
    "TAU",
    "ITERS",
    "START",
    "LR",
    "MOMENTUM",
    "BUF",
    "DAMPENING",
    "NESTEROV",
    "WEIGHT_DECAY",
    "V",
    "STEP",
    "BETAS",
    "DECOUPLED",
    "GET",
    "SET",
    "ASYNC_MIN_BYTES",
    "JOB_TIMEOUT_MS",
]
KEYS = [
    "g0",
    "g1",
    "g2",
    "g3",
    "g4",
    "g5",
    "g6",
    "short",
    "out",
    "w",
    "buf",
    "lst",
    "nan",
    "inf",
    "noshape",
    "badshape",
    "lenmis",
    "odd",
    "outlist",
    "shapelist",
    "nokey",
    "g0:shape",
    "fresh",
]

arg = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYWORDS),
    st.integers(min_value=-3, max_value=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "-0", "1e400", "nan", "inf", "0x10", " 1", "1,2", "3,4"]),
    st.binary(max_size=40),
)
command = st.tuples(st.sampled_from(COMMANDS), st.lists(arg, max_size=16))


async def _check_one(c: aioredis.Redis, name: str, args: list[object]) -> None:
    if name == "SPIRT.CONFIG" and len(args) > 2 and args[0] == "SET":
        args = [*args[:2], 600000]  # keep jobs possible: no 0 ms timeout
    before = await snapshot(c)
    try:
        await c.execute_command(name, *args)
    except ResponseError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        assert await snapshot(c) == before, (name, args, msg)
    assert await c.ping()


def _fuzz_test(max_examples: int):  # type: ignore[no-untyped-def]
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(cmds=st.lists(command, min_size=1, max_size=4))
    async def fuzz(r: RunningRedis, cmds: list[tuple[str, list[object]]]) -> None:
        for name, args in cmds:
            await _check_one(r.client, name, args)
        # Same process all along: nothing crashed and was restarted by the supervisor.
        assert r.server.restarts == 0 and r.server.running

    return fuzz


@pytest.fixture(params=["main", "worker"])
async def r(request: pytest.FixtureRequest, managed_redis: RunningRedis) -> RunningRedis:
    c = managed_redis.client
    if request.param == "worker":
        await c.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", 0)
    await setup_keys(c)
    return managed_redis


test_fuzz_every_command = _fuzz_test(100)
test_fuzz_every_command_long = pytest.mark.long(_fuzz_test(5000))
