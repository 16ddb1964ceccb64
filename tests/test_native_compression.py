"""SPIRT.PACK / SPIRT.UNPACK (native/pack.c, native/codec.c) and their TensorStore
wrappers, against protocol/compression.py, the formats' definition.

The contract: every peer decodes the same bytes to the same float32 bits, so the
module's UNPACK must give exactly protocol.compression.decode's bits, for any body that
compression.check accepts, and refuse (writing nothing) any body it rejects. PACK may
round a code differently from compression.encode; its residual is taken against the
decoding of the bytes it wrote, and that is what error feedback relies on.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from protocol import compression as C
from spirtd.redis.store import NonFinite, StoreError, TensorNotFound, TensorStore
from tests.fixtures_redis import (
    RunningRedis,
    reset_shared,
    short_tmpdir,
    start_redis,
    stop_redis,
)
from tests.test_native_errors import snapshot
from tests.test_native_replication import assert_same, attach, pair, replicated  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")

FORMATS = ("fp16", "int8")


HAVE_AVX2 = "avx2" in Path("/proc/cpuinfo").read_text().split()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def baseline_redis() -> AsyncIterator[RunningRedis]:
    """A server whose module runs the baseline kernels: portable half conversions."""
    d = short_tmpdir()
    try:
        r = await start_redis(d, module_args=["ISA", "baseline"])
        try:
            yield r
        finally:
            await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["avx2", "baseline"])
def isa_redis(request: pytest.FixtureRequest) -> tuple[str, RunningRedis]:
    """Every module test runs with the AVX2 kernel set (F16C half conversions, where
    the CPU has them) and with the baseline one (portable C): the same bits."""
    if request.param == "avx2" and not HAVE_AVX2:
        pytest.skip("this CPU has no AVX2")
    name = "module_managed_redis" if request.param == "avx2" else "baseline_redis"
    return request.param, request.getfixturevalue(name)


@pytest_asyncio.fixture(loop_scope="module")
async def c(isa_redis: tuple[str, RunningRedis]) -> aioredis.Redis:
    isa, r = isa_redis
    await reset_shared(r)
    info = await r.client.execute_command("SPIRT.INFO")
    assert info[info.index(b"isa") + 1] == isa.encode()
    return r.client


async def set_tensor(c: aioredis.Redis, key: str, x: np.ndarray) -> None:
    """A tensor written with plain SETs (values the module's PUT would refuse too)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    await c.set(key, x.tobytes())
    await c.set(f"{key}:shape", ",".join(map(str, x.shape)))


async def unpack(c: aioredis.Redis, fmt: str, body: bytes, count: int) -> bytes:
    await c.set("body", body)
    assert await c.execute_command("SPIRT.UNPACK", "out", "body", "FORMAT", fmt, "COUNT", count)
    assert await c.get("out:shape") == str(count).encode()
    out = await c.get("out")
    assert out is not None
    return out


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def int8_body(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray) -> bytes:
    head = np.stack([scale, offset], axis=1).astype("<f4")
    return head.tobytes() + codes.astype(np.uint8).tobytes()


def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(23)
    return {
        "random": rng.standard_normal(10_000).astype(np.float32),
        "constant": np.full(5000, -1.25, np.float32),
        "tiny": (rng.standard_normal(4097) * 1e-38).astype(np.float32),  # subnormal steps
        "huge-range": np.concatenate([rng.uniform(-3e38, 3e38, 6000), [-3.3e38, 3.3e38]]).astype(
            np.float32
        ),
        "not-a-multiple": rng.uniform(-5, 7, 3 * C.BLOCK + 17).astype(np.float32),
        "one": np.array([0.3], np.float32),
        "mixed-scales": np.concatenate(
            [rng.standard_normal(C.BLOCK) * 10.0**k for k in range(-6, 7, 3)]
        ).astype(np.float32),
    }


# ---- UNPACK gives the reference's bits --------------------------------------------


@pytest.mark.parametrize("name", list(vectors()))
@pytest.mark.parametrize("fmt", FORMATS)
async def test_unpack_bits_equal_the_reference_decode(
    c: aioredis.Redis, fmt: str, name: str
) -> None:
    x = vectors()[name]
    if fmt == "fp16":
        x = np.clip(x, -C.FP16_MAX, C.FP16_MAX)
    body = C.encode(fmt, x)
    C.check(fmt, body, x.size)
    assert await unpack(c, fmt, body, x.size) == bits(C.decode(fmt, body, x.size))


async def test_unpack_int8_arbitrary_valid_headers_and_codes(c: aioredis.Redis) -> None:
    """Bodies no encoder would write (random codes under random valid headers, a zero
    scale, -0.0, subnormal scales, a top code right at float32's limit) decode to the
    reference's bits too."""
    rng = np.random.default_rng(7)
    n = 9 * C.BLOCK + 123
    nb = C.blocks(n)
    scale = (10.0 ** rng.uniform(-44, 30, nb) * rng.uniform(0, 1, nb)).astype(np.float32)
    offset = (rng.standard_normal(nb) * 10.0 ** rng.uniform(-40, 30, nb)).astype(np.float32)
    scale[0], offset[0] = 0.0, -0.0
    scale[1], offset[1] = np.float32(1e-45), np.float32(-1e-45)
    scale[2] = np.float32(3.4e38 / 255 / 2)
    offset[2] = np.float32(np.finfo(np.float32).max) - np.float32(255.0) * scale[2]
    codes = rng.integers(0, 256, n)
    codes[2 * C.BLOCK] = 255
    body = int8_body(scale, offset, codes)
    C.check("int8", body, n)
    assert await unpack(c, "int8", body, n) == bits(C.decode("int8", body, n))


async def test_fp16_every_finite_half_decodes_exactly_and_every_other_is_refused(
    c: aioredis.Redis,
) -> None:
    halves = np.arange(1 << 16, dtype=np.uint32).astype("<u2")
    finite = halves[(halves & 0x7C00) != 0x7C00]
    assert finite.size == 65536 - 2048
    body = finite.tobytes()
    got = await unpack(c, "fp16", body, finite.size)
    assert got == bits(C.decode("fp16", body, finite.size))
    assert got == bits(finite.view("<f2").astype(np.float32))
    # Each infinity and NaN is refused, naming its index; a sample of every kind.
    for h in (0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFE00, 0x7FFF, 0xFFFF):
        mixed = finite[:100].copy()
        mixed[42] = h
        await c.set("body", mixed.tobytes())
        before = await snapshot(c)
        with pytest.raises(
            ResponseError, match=rf"non-finite value in 'body' at index 42 \(fp16 0x{h:04x}\)"
        ):
            await c.execute_command("SPIRT.UNPACK", "out", "body", "FORMAT", "fp16", "COUNT", 100)
        assert await snapshot(c) == before


async def test_fp16_pack_rounds_like_numpy_at_every_half_and_every_tie(c: aioredis.Redis) -> None:
    """PACK's float -> half conversion (portable C) against numpy's on every finite half's
    value and on every midpoint between neighbours (ties to even), subnormals included."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype("<u2")
    values = halves[(halves & 0x7C00) != 0x7C00].view("<f2").astype(np.float64)
    pos = np.unique(np.abs(values))
    mids = (pos[:-1] + pos[1:]) / 2  # exact in float32: one bit more than a half
    x = np.concatenate([values, mids, -mids]).astype(np.float32)
    x = x[np.abs(x) <= C.FP16_MAX]
    await set_tensor(c, "x", x)
    assert await c.execute_command("SPIRT.PACK", "d", "x", "FORMAT", "fp16") == 2 * x.size
    assert await c.get("d") == x.astype("<f2").tobytes()


# ---- PACK: encoding, residual, error feedback ------------------------------------


@pytest.mark.parametrize("name", list(vectors()))
@pytest.mark.parametrize("fmt", FORMATS)
async def test_pack_round_trip_within_one_step(c: aioredis.Redis, fmt: str, name: str) -> None:
    x = vectors()[name]
    if fmt == "fp16":
        x = np.clip(x, -C.FP16_MAX, C.FP16_MAX)
    await set_tensor(c, "x", x)
    n = await c.execute_command("SPIRT.PACK", "d", "x", "FORMAT", fmt, "RESIDUAL", "res")
    body = await c.get("d")
    assert n == len(body) == C.encoded_size(fmt, x.size)
    assert await c.exists("d:shape") == 0  # a plain string, not a tensor
    C.check(fmt, body, x.size)
    dec = C.decode(fmt, body, x.size)
    # The residual is what the body lost, against the bytes actually written.
    res = np.frombuffer(await c.get("res"), "<f4")
    assert await c.get("res:shape") == str(x.size).encode()
    assert bits(res) == bits(x - dec)
    if fmt == "fp16":
        assert bits(dec) == bits(x.astype(np.float16).astype(np.float32))
        return
    scale, offset = C._headers(body, x.size)
    which = np.arange(x.size) // C.BLOCK
    # Each value within half a step of its decoding (float32 rounding of the decoded
    # value and of the scale add a few ulps).
    err = np.abs(x.astype(np.float64) - dec)
    slack = 4 * np.spacing(np.maximum(np.abs(x), np.abs(dec)).astype(np.float32))
    assert np.all(err <= scale[which].astype(np.float64) * (0.5 + 1e-6) + slack)
    # Offsets are the block minima, the top code reaches the maximum.
    pad = np.full(C.blocks(x.size) * C.BLOCK, np.nan, np.float32)
    pad[: x.size] = x
    assert bits(offset) == bits(np.nanmin(pad.reshape(-1, C.BLOCK), axis=1))


@pytest.mark.parametrize("name", ["random", "not-a-multiple", "constant", "one"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_pack_writes_the_reference_encoding(c: aioredis.Redis, fmt: str, name: str) -> None:
    """Not required by the contract, but the C encoder follows compression.encode's
    formula (rint of a float64 quotient, clipped), so on these inputs the bytes agree."""
    x = vectors()[name]
    await set_tensor(c, "x", x)
    await c.execute_command("SPIRT.PACK", "d", "x", "FORMAT", fmt)
    assert await c.get("d") == C.encode(fmt, x)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_error_feedback_keeps_the_sum_within_one_step(c: aioredis.Redis, fmt: str) -> None:
    """Packing the same v K times with RESIDUAL: the decoded values sum to K v minus the
    last residual, so the error stays one step's error instead of growing with K."""
    rng = np.random.default_rng(11)
    v = (
        rng.standard_normal(3 * C.BLOCK + 5)
        * np.repeat([1e-3, 1.0, 30.0, 5.0], C.BLOCK)[: 3 * C.BLOCK + 5]
    ).astype(np.float32)
    await set_tensor(c, "v", v)
    K = 40
    total = np.zeros(v.size, np.float64)
    plain_total = np.zeros(v.size, np.float64)
    for _ in range(K):
        await c.execute_command("SPIRT.PACK", "d", "v", "FORMAT", fmt, "RESIDUAL", "res")
        total += C.decode(fmt, await c.get("d"), v.size)
        await c.execute_command("SPIRT.PACK", "p", "v", "FORMAT", fmt)
        plain_total += C.decode(fmt, await c.get("p"), v.size)
    res = np.frombuffer(await c.get("res"), "<f4").astype(np.float64)
    err = np.abs(total - K * v.astype(np.float64))
    # One step's error bound, not K steps': half a step of what was encoded (v plus a
    # residual, which may reach the next fp16 binade or move an int8 block's range).
    if fmt == "int8":
        scale, _ = C._headers(C.encode(fmt, v), v.size)
        step = 0.5 * np.repeat(scale.astype(np.float64), C.BLOCK)[: v.size] * 1.01
    else:
        step = np.spacing(np.abs(v).astype(np.float16)).astype(np.float64)
    # Each round rounds v + residual to float32, at most |v| + step in magnitude.
    rounding = K * np.spacing((np.abs(v) + step).astype(np.float32)).astype(np.float64)
    # The error is the last residual, up to those roundings ...
    assert np.all(np.abs(err - np.abs(res)) <= rounding)
    # ... so it stays within one step.
    assert np.all(err <= step + rounding)
    plain_err = np.abs(plain_total - K * v.astype(np.float64))
    assert plain_err.max() > 10 * err.max()  # without feedback the error grows with K


@pytest.mark.parametrize("fmt", FORMATS)
async def test_base_packs_the_pseudo_gradient(c: aioredis.Redis, fmt: str) -> None:
    rng = np.random.default_rng(3)
    theta_r = rng.standard_normal(2 * C.BLOCK + 9).astype(np.float32)
    local = (theta_r - rng.standard_normal(theta_r.size).astype(np.float32) * 0.01).astype(
        np.float32
    )
    res = (rng.standard_normal(theta_r.size) * 1e-3).astype(np.float32)
    await set_tensor(c, "base", theta_r)
    await set_tensor(c, "src", local)
    await set_tensor(c, "res", res)
    await set_tensor(c, "diff", theta_r - local)
    await c.execute_command("SPIRT.PACK", "a", "src", "FORMAT", fmt, "BASE", "base")
    await c.execute_command("SPIRT.PACK", "b", "diff", "FORMAT", fmt)
    assert await c.get("a") == await c.get("b")
    # With a residual: v = (base - src) + res, in float64, rounded once.
    v = ((theta_r.astype(np.float64) - local) + res).astype(np.float32)
    await c.execute_command(
        "SPIRT.PACK", "a", "src", "FORMAT", fmt, "BASE", "base", "RESIDUAL", "res"
    )
    body = await c.get("a")
    assert bits(C.decode(fmt, body, v.size)) == bits(C.decode(fmt, C.encode(fmt, v), v.size))
    assert await c.get("res") == bits(v - C.decode(fmt, body, v.size))


async def test_an_absent_residual_counts_as_zeros(c: aioredis.Redis) -> None:
    x = vectors()["random"]
    await set_tensor(c, "x", x)
    await c.execute_command("SPIRT.PACK", "d", "x", "FORMAT", "int8", "RESIDUAL", "res")
    assert await c.get("d") == C.encode("int8", x)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_pack_on_a_worker_thread_writes_the_same_bytes(c: aioredis.Redis, fmt: str) -> None:
    """PACK is a job: inline below ASYNC_MIN_BYTES, on a worker above it (reading its
    inputs in chunks under the module lock). Both give the same body and residual,
    over several chunks of whole blocks and a short last block."""
    rng = np.random.default_rng(8)
    n = 5 * 16384 + C.BLOCK + 77
    base = rng.standard_normal(n).astype(np.float32)
    src = (base - rng.standard_normal(n).astype(np.float32) * 1e-2).astype(np.float32)
    res = (rng.standard_normal(n) * 1e-4).astype(np.float32)
    v = ((base.astype(np.float64) - src) + res).astype(np.float32)
    results = []
    for threshold in (1 << 40, 0):
        await c.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", threshold)
        for key, x in (("base", base), ("src", src), ("res", res)):
            await set_tensor(c, key, x)
        before = await c.execute_command("SPIRT.INFO")
        await c.execute_command(
            "SPIRT.PACK", "d", "src", "FORMAT", fmt, "BASE", "base", "RESIDUAL", "res"
        )
        after = await c.execute_command("SPIRT.INFO")
        field = b"jobs_sync" if threshold else b"jobs_async"
        i = after.index(field) + 1
        assert after[i] == before[i] + 1, field
        results.append((await c.get("d"), await c.get("res"), await c.get("res:shape")))
    assert results[0] == results[1]
    body = results[0][0]
    assert body == C.encode(fmt, v)
    assert results[0][1] == bits(v - C.decode(fmt, body, n))


# ---- refusals: a clear error, nothing written -------------------------------------

N = 5000


async def refusal_keys(c: aioredis.Redis) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N).astype(np.float32)
    await set_tensor(c, "x", x)
    await set_tensor(c, "short", x[:100])
    bad = x.copy()
    bad[17] = np.nan
    await set_tensor(c, "nan", bad)
    big = x.copy()
    big[9] = 7e4
    await set_tensor(c, "big", big)
    edge = x.copy()
    edge[3] = np.float32(3.4e38)
    await set_tensor(c, "top", edge)
    edge = x.copy()
    edge[3] = np.float32(-3.4e38)
    await set_tensor(c, "bottom", edge)
    # A range whose scale rounds up far enough to put the top code past float32's limit.
    await set_tensor(c, "extreme", np.array([-3.3997929e38, 3.4028235e38], np.float32))
    await c.set("d", b"old body")
    await set_tensor(c, "out", np.ones(3, np.float32))
    await c.rpush("lst", "x")
    body = bytearray(C.encode("int8", x))
    await c.set("good8", bytes(body))
    await c.set("good16", C.encode("fp16", x))
    for name, block, scale, offset in [
        ("nanscale", 1, np.nan, 0.0),
        ("infscale", 0, np.inf, 0.0),
        ("infoffset", 1, 1.0, -np.inf),
        ("negscale", 0, -1e-3, 0.0),
        ("overtop", 1, 1.5e36, 3.0e38),
    ]:
        b = bytearray(body)
        b[8 * block : 8 * block + 8] = np.array([scale, offset], "<f4").tobytes()
        with pytest.raises(C.CompressionError, match="nonfinite"):
            C.check("int8", bytes(b), N)
        await c.set(name, bytes(b))
    h = bytearray(C.encode("fp16", x))
    h[2 * 77 : 2 * 77 + 2] = np.array([0x7C00], "<u2").tobytes()
    await c.set("infhalf", bytes(h))


REFUSALS: list[tuple[list[object], str]] = [
    (
        ["SPIRT.UNPACK", "out", "good8", "FORMAT", "int8", "COUNT", N + 1],
        f"size mismatch: 'good8' has {C.encoded_size('int8', N)} bytes where int8 of "
        f"{N + 1} values needs {C.encoded_size('int8', N + 1)}",
    ),
    (
        ["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp16", "COUNT", N - 1],
        f"size mismatch: 'good16' has {2 * N} bytes where fp16 of {N - 1} values needs {2 * N - 2}",
    ),
    (["SPIRT.UNPACK", "out", "good8", "FORMAT", "fp16", "COUNT", N], "size mismatch"),
    (
        ["SPIRT.UNPACK", "out", "nanscale", "FORMAT", "int8", "COUNT", N],
        "non-finite value in 'nanscale': int8 block 1 has a malformed header (scale nan, offset 0)",
    ),
    (
        ["SPIRT.UNPACK", "out", "infscale", "FORMAT", "int8", "COUNT", N],
        "non-finite value in 'infscale': int8 block 0 has a malformed header (scale inf",
    ),
    (
        ["SPIRT.UNPACK", "out", "infoffset", "FORMAT", "int8", "COUNT", N],
        "int8 block 1 has a malformed header (scale 1, offset -inf)",
    ),
    (
        ["SPIRT.UNPACK", "out", "negscale", "FORMAT", "int8", "COUNT", N],
        "int8 block 0 has a malformed header (scale -0.001, offset 0)",
    ),
    (
        ["SPIRT.UNPACK", "out", "overtop", "FORMAT", "int8", "COUNT", N],
        "int8 block 1 has a malformed header (scale 1.5e+36, offset 3e+38)",
    ),
    (
        ["SPIRT.UNPACK", "out", "infhalf", "FORMAT", "fp16", "COUNT", N],
        "non-finite value in 'infhalf' at index 77 (fp16 0x7c00)",
    ),
    (["SPIRT.UNPACK", "out", "nokey", "FORMAT", "fp16", "COUNT", N], "missing key 'nokey'"),
    (
        ["SPIRT.UNPACK", "out", "lst", "FORMAT", "fp16", "COUNT", N],
        "key 'lst' holds the wrong type",
    ),
    (
        ["SPIRT.UNPACK", "lst", "good16", "FORMAT", "fp16", "COUNT", N],
        "output key 'lst' holds the wrong type",
    ),
    (
        ["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp32", "COUNT", N],
        "FORMAT must be fp16 or int8, got 'fp32'",
    ),
    (
        ["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp16", "COUNT", -1],
        "COUNT must be in [0, 536870912], got -1",
    ),
    (
        ["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp16", "COUNT", 1 << 40],
        "COUNT must be in [0, 536870912]",
    ),
    (
        ["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp16", "SCRATCH", "SCRATCH"],
        "option SCRATCH given twice",
    ),
    (["SPIRT.UNPACK", "out", "good16", "COUNT", N], "UNPACK needs FORMAT"),
    (["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp16"], "UNPACK needs COUNT"),
    (["SPIRT.UNPACK", "out", "good16", "FORMAT", "fp16", "COUNT"], "option COUNT needs 1 value"),
    (["SPIRT.PACK", "d", "nan", "FORMAT", "int8"], "non-finite value in 'nan' at index 17"),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "int8", "BASE", "nan"],
        "non-finite value in 'nan' at index 17",
    ),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "fp16", "RESIDUAL", "nan"],
        "non-finite value in 'nan' at index 17",
    ),
    (
        ["SPIRT.PACK", "d", "big", "FORMAT", "fp16"],
        "non-finite value in fp16 at index 9: 70000 is beyond 65504",
    ),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "fp16", "BASE", "big"],
        "non-finite value in fp16 at index 9:",
    ),
    (
        ["SPIRT.PACK", "d", "bottom", "FORMAT", "int8", "BASE", "top"],
        "non-finite value at index 3 of the vector to pack "
        "(base - src + residual overflows float32)",
    ),
    (
        ["SPIRT.PACK", "d", "extreme", "FORMAT", "int8"],
        "non-finite value in int8 block 0: its range overflows float32",
    ),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "int8", "BASE", "short"],
        "length mismatch: 'short' has 100 elements, 'x' has 5000",
    ),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "int8", "RESIDUAL", "short"],
        "length mismatch: 'short' has 100 elements, 'x' has 5000",
    ),
    (["SPIRT.PACK", "d", "nokey", "FORMAT", "int8"], "missing key 'nokey'"),
    (["SPIRT.PACK", "d", "x", "FORMAT", "int8", "BASE", "nokey"], "missing key 'nokey'"),
    (["SPIRT.PACK", "lst", "x", "FORMAT", "int8"], "output key 'lst' holds the wrong type"),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "int8", "RESIDUAL", "lst"],
        "key 'lst' holds the wrong type",
    ),
    (["SPIRT.PACK", "x", "x", "FORMAT", "int8"], "dst must differ from src, BASE and RESIDUAL"),
    (
        ["SPIRT.PACK", "d", "x", "FORMAT", "int8", "RESIDUAL", "x"],
        "RESIDUAL must differ from src and BASE",
    ),
    (["SPIRT.PACK", "d", "x", "SCRATCH"], "wrong number of arguments"),
    (["SPIRT.PACK", "d", "x", "BASE", "x"], "PACK needs FORMAT"),
    (["SPIRT.PACK", "d", "x", "FORMAT", "int4"], "FORMAT must be fp16 or int8, got 'int4'"),
    (["SPIRT.PACK", "d", "x", "FORMAT", "int8", "EX", "5"], "unknown option 'EX'"),
]


async def test_refusals_name_the_problem_and_write_nothing(c: aioredis.Redis) -> None:
    await refusal_keys(c)
    for cmd, expected in REFUSALS:
        before = await snapshot(c)
        with pytest.raises(ResponseError) as ei:
            await c.execute_command(*cmd)
        assert expected in str(ei.value), (cmd, str(ei.value))
        assert await snapshot(c) == before, cmd


async def test_key_positions_cover_every_key(c: aioredis.Redis) -> None:
    keys = await c.command_getkeys(
        "SPIRT.PACK", "d", "s", "FORMAT", "int8", "BASE", "b", "RESIDUAL", "r", "SCRATCH"
    )
    assert [k.decode() if isinstance(k, bytes) else k for k in keys] == ["d", "s", "b", "r"]
    keys = await c.command_getkeys("SPIRT.UNPACK", "d", "s", "FORMAT", "int8", "COUNT", 5)
    assert [k.decode() if isinstance(k, bytes) else k for k in keys] == ["d", "s"]


# ---- the store, on both paths ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_store_pack_unpack_same_bits_on_both_paths(st: TensorStore, fmt: str) -> None:
    """Module and client-side fallback: the same bodies, residuals and decoded bits (each
    path is compared with protocol.compression, so with the other)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3, 3000)).astype(np.float32)
    src = (base - rng.standard_normal((3, 3000)).astype(np.float32) * 0.1).astype(np.float32)
    await st.put("base", base)
    await st.put("src", src)
    res = np.zeros(base.size, np.float32)
    for _ in range(3):
        n = await st.pack("d", "src", fmt=fmt, base="base", residual="res", scratch=True)
        body = await st.client.get("d")
        v = ((base.astype(np.float64) - src).reshape(-1) + res).astype(np.float32)
        assert n == len(body) == C.encoded_size(fmt, base.size)
        assert body == C.encode(fmt, v)
        dec = C.decode(fmt, body, base.size)
        got_res = await st.get("res")
        assert got_res.shape == base.shape  # the residual keeps src's shape
        assert bits(got_res) == bits(v - dec)
        res = got_res.reshape(-1)
        await st.unpack("u", "d", fmt=fmt, count=base.size)
        u = await st.get("u")
        assert u.shape == (base.size,)
        assert bits(u) == bits(dec)
    await st.pack("p", "src", fmt=fmt)
    assert await st.client.get("p") == C.encode(fmt, src)


STORE_REFUSALS = [
    (lambda s: s.pack("d", "nan", fmt="int8"), NonFinite, "non-finite value in 'nan' at index 17"),
    (lambda s: s.pack("d", "x", fmt="fp16", base="nan"), NonFinite, "non-finite value in 'nan'"),
    (
        lambda s: s.pack("d", "big", fmt="fp16"),
        NonFinite,
        "non-finite value in fp16 at index 9: 70000 is beyond 65504",
    ),
    (
        lambda s: s.pack("d", "bottom", fmt="int8", base="top"),
        NonFinite,
        "non-finite value at index 3 of the vector to pack",
    ),
    (
        lambda s: s.pack("d", "extreme", fmt="int8"),
        NonFinite,
        "non-finite value in int8 block 0: its range overflows float32",
    ),
    (lambda s: s.pack("d", "x", fmt="int8", residual="short"), StoreError, "length mismatch"),
    (lambda s: s.pack("d", "nokey", fmt="int8"), TensorNotFound, "missing key 'nokey'"),
    (lambda s: s.pack("x", "x", fmt="int8"), StoreError, "dst must differ"),
    (lambda s: s.pack("d", "x", fmt="none"), StoreError, "FORMAT must be fp16 or int8"),
    (
        lambda s: s.unpack("out", "good8", fmt="int8", count=N + 1),
        StoreError,
        f"size mismatch: 'good8' has {C.encoded_size('int8', N)} bytes where int8 of {N + 1} "
        f"values needs {C.encoded_size('int8', N + 1)}",
    ),
    (
        lambda s: s.unpack("out", "nanscale", fmt="int8", count=N),
        NonFinite,
        "non-finite value in 'nanscale': int8 block 1 has a malformed header (scale nan, offset 0)",
    ),
    (
        lambda s: s.unpack("out", "overtop", fmt="int8", count=N),
        NonFinite,
        "int8 block 1 has a malformed header (scale 1.5e+36, offset 3e+38)",
    ),
    (
        lambda s: s.unpack("out", "infhalf", fmt="fp16", count=N),
        NonFinite,
        "non-finite value in 'infhalf' at index 77 (fp16 0x7c00)",
    ),
    (lambda s: s.unpack("out", "nokey", fmt="fp16", count=N), TensorNotFound, "missing key"),
    (lambda s: s.unpack("out", "lst", fmt="fp16", count=N), StoreError, "holds the wrong type"),
]


@pytest.mark.parametrize(("call", "exc", "msg"), STORE_REFUSALS)
async def test_store_refusals_same_on_both_paths(st: TensorStore, call, exc, msg) -> None:  # type: ignore[no-untyped-def]
    await refusal_keys(st.client)
    before = await snapshot(st.client)
    with pytest.raises(exc) as ei:
        await call(st)
    assert msg in str(ei.value)
    if exc is StoreError:
        assert not isinstance(ei.value, NonFinite)
    assert await snapshot(st.client) == before


# ---- replication, ACL --------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="function")
async def test_results_reach_a_replica_by_value_unless_scratch(
    pair: tuple[RunningRedis, RunningRedis],  # noqa: F811
) -> None:
    master, replica = pair
    m, r = master.client, replica.client
    await attach(master, replica)
    x = np.random.default_rng(9).standard_normal(100_003).astype(np.float32)
    await m.execute_command("SPIRT.PUT", "x", str(x.size), x.tobytes(), "SCRATCH")
    n = await m.execute_command("SPIRT.PACK", "d", "x", "FORMAT", "int8", "RESIDUAL", "res")
    await m.execute_command("SPIRT.UNPACK", "u", "d", "FORMAT", "int8", "COUNT", x.size)
    await m.execute_command("SPIRT.PACK", "ds", "x", "FORMAT", "fp16", "RESIDUAL", "rs", "SCRATCH")
    await m.execute_command(
        "SPIRT.UNPACK", "us", "ds", "FORMAT", "fp16", "COUNT", x.size, "SCRATCH"
    )
    await replicated(m)
    assert (await r.get("d")) == (await m.get("d")) and len(await r.get("d")) == n
    assert not await r.exists("d:shape")
    for key in ("res", "u"):
        await assert_same(m, r, key)
    for key in ("x", "ds", "rs", "us"):
        assert not await r.exists(key), key


@pytest_asyncio.fixture(loop_scope="function")
async def users(managed_redis: RunningRedis) -> AsyncIterator[dict[str, aioredis.Redis]]:
    info = managed_redis.server.connection_info()
    fn = aioredis.Redis.from_url(
        info.url, username=info.username, password=Path(info.password_file).read_text().strip()
    )
    daemon = managed_redis.daemon_client()
    try:
        yield {"function": fn, "daemon": daemon}
    finally:
        await fn.aclose()
        await daemon.aclose()


@pytest.mark.asyncio(loop_scope="function")
async def test_the_daemon_may_pack_and_unpack_its_keys_and_functions_may_not(
    managed_redis: RunningRedis, users: dict[str, aioredis.Redis]
) -> None:
    st = await TensorStore.open(users["daemon"])
    x = np.linspace(-1, 1, 4100, dtype=np.float32)
    await st.put("spirt:j:theta", x)
    await st.put("spirt:j:fn:1", x)
    assert await st.pack("spirt:j:pub", "spirt:j:theta", fmt="int8", residual="spirt:j:res") == (
        C.encoded_size("int8", x.size)
    )
    await st.unpack("spirt:j:dec", "spirt:j:pub", fmt="int8", count=x.size)
    with pytest.raises(StoreError, match="no permissions"):
        await st.pack("elsewhere", "spirt:j:theta", fmt="int8")
    fn = users["function"]
    for cmd in (
        ["SPIRT.PACK", "spirt:j:fn:2", "spirt:j:fn:1", "FORMAT", "int8"],
        ["SPIRT.UNPACK", "spirt:j:fn:2", "spirt:j:fn:1", "FORMAT", "int8", "COUNT", 1],
    ):
        with pytest.raises(NoPermissionError):
            await fn.execute_command(*cmd)


@pytest.mark.asyncio(loop_scope="function")
async def test_results_survive_a_restart_through_the_aof_unless_scratch() -> None:
    """With AOF on, PACK and UNPACK's results are replayed by value: the inputs were
    SCRATCH (absent after the restart) and the module is not needed to load them."""
    d = short_tmpdir("spirt-aof-")
    try:
        r = await start_redis(d)
        c = r.client
        assert (await c.config_get("appendonly"))["appendonly"] == "yes"
        x = np.random.default_rng(4).standard_normal(10_001).astype(np.float32)
        await c.execute_command("SPIRT.PUT", "x", str(x.size), x.tobytes(), "SCRATCH")
        await c.execute_command("SPIRT.PACK", "d", "x", "FORMAT", "fp16", "RESIDUAL", "res")
        await c.execute_command("SPIRT.UNPACK", "u", "d", "FORMAT", "fp16", "COUNT", x.size)
        await c.execute_command("SPIRT.PACK", "ds", "x", "FORMAT", "int8", "SCRATCH")
        before = {k: await c.get(k) for k in ("d", "res", "res:shape", "u", "u:shape")}
        await stop_redis(r)
        r = await start_redis(d, load_module=False)
        try:
            for k, v in before.items():
                assert v is not None and await r.client.get(k) == v, k
            for k in ("x", "ds"):
                assert not await r.client.exists(k), k
        finally:
            await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)
