"""Equal inputs give equal bits: the SPIRT module's results do not depend on the
worker-thread count (THREADS), on the path (inline on the main thread or on a worker
thread), or on the kernel set (ISA baseline or avx2).

Honest peers that aggregate the same gradients must hold bit-identical parameters and
optimizer state. Every command runs on the same seeded inputs (odd lengths, not
multiples of 8 or 16) on redis-servers loaded with different module arguments, inline
and through the workers (all commands of a round at once, so with THREADS 4 they run on
different threads in parallel); every output's raw bytes, its SPIRT.DIGEST and every
reply (Krum's choice, Weiszfeld's iteration count, SPIRT.NORM) must be byte-identical
across all of them, and still match the float64 references of test_native_rules.py and
test_native_updates.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.fixtures_redis import require_module, short_tmpdir, start_redis, stop_redis
from tests.test_native_rules import (
    assert_close,
    jobs,
    load,
    put,
    ref_cclip,
    ref_geomed,
    ref_krum,
    ref_mean,
    ref_median,
    ref_nnm,
    ref_trimmed_mean,
)
from tests.test_native_updates import ref_adam, ref_sgd

pytestmark = pytest.mark.asyncio(loop_scope="module")


def cpu_has_avx2() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "avx2" in line.split(":", 1)[1].split()
        for line in text.splitlines()
    )


HAVE_AVX2 = cpu_has_avx2()
NO_AVX2 = "this CPU has no AVX2 (no 'avx2' flag in /proc/cpuinfo): only the baseline kernels run"

# Server configurations (module load arguments); each one runs inline and on workers.
CONFIGS: dict[str, list[str]] = {
    "threads1-baseline": ["THREADS", "1", "ISA", "baseline"],
    "threads4-baseline": ["THREADS", "4", "ISA", "baseline"],
}
if HAVE_AVX2:
    CONFIGS["threads1-avx2"] = ["THREADS", "1", "ISA", "avx2"]
    CONFIGS["threads4-avx2"] = ["THREADS", "4", "ISA", "avx2"]
PATHS = ("inline", "worker")

# ---- inputs ------------------------------------------------------------------------------

NA, LA = 7, 300_001  # odd n, length = 16*18750 + 1
NB, LB = 6, 131_075  # even n, length = 16*8192 + 3
LR = 0.05


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240607)
    A = rng.standard_normal((NA, LA)) * rng.uniform(0.2, 3.0, (NA, 1))
    A[5] *= 8.0  # an outlier for the robust rules
    A[6] += 3.0
    B = rng.standard_normal((NB, LB)) * rng.uniform(0.5, 2.0, (NB, 1))
    B[0] -= 2.0
    return {
        "A": A.astype(np.float32),
        "B": B.astype(np.float32),
        "start": (rng.standard_normal(LA) * 0.3).astype(np.float32),
        "p": rng.standard_normal(LA).astype(np.float32),
        "wA": rng.uniform(0.0, 3.0, NA) * (np.arange(NA) != 2),  # one zero weight
    }


X = inputs()
KA = [f"a{i}" for i in range(NA)]
KB = [f"b{i}" for i in range(NB)]

# Krum ties, a sharp probe of summation order. Rows 2-4 are palindromes and row 1 is
# row 0 reversed, so rows 0 and 1 are at exactly equal distances from every row: their
# Krum scores (the lowest) are equal in exact arithmetic, and only the rounding of the
# float64 sums of squares picks the winner. The sums visit the same terms in mirrored
# order, so any dependence of the association on the ISA or the path shows up as a
# different choice (a whole different output) in some of these instances.
TIES, NT = 8, 5


def tie_rows(j: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + j)
    half = 10_000 + 37 * j
    lt = 2 * half + 1  # odd
    center = rng.standard_normal(half + 1)
    rows = np.empty((NT, lt), np.float32)
    for k in range(2, NT):
        h = (center + 3.0 * rng.standard_normal(half + 1)).astype(np.float32)
        rows[k] = np.concatenate([h, h[-2::-1]])
    a = 0.3 * rng.standard_normal(half)
    c = np.concatenate([center, center[-2::-1]])
    rows[0] = c + np.concatenate([a, [0.0], -a[::-1]])
    rows[1] = rows[0][::-1]
    return rows


T = [tie_rows(j) for j in range(TIES)]
KT = [[f"t{j}_{i}" for i in range(NT)] for j in range(TIES)]

# ---- the commands ------------------------------------------------------------------------


@dataclass
class Case:
    """One command (or a few optimizer steps): what to send, which keys it writes, and
    the float64 reference of its outputs (with the reply it should give, if checked)."""

    steps: list[list[Any]]  # commands; one per round (optimizer steps: one per round)
    outputs: list[str]
    ref: Callable[[], tuple[list[np.ndarray], Any]]
    scale: np.ndarray = field(default_factory=lambda: X["A"])  # for assert_close's floor


def agg(rule: str, out: str, keys: list[str], *opts: Any) -> list[list[Any]]:
    return [[f"SPIRT.{rule}", out, len(keys), *keys, *opts]]


def sgd_ref(steps: int, mu: float, damp: float, nesterov: bool, wd: float) -> list[np.ndarray]:
    p, b = X["p"], None
    for t in range(steps):
        p, b = ref_sgd(p, X["A"][t], b, LR, mu, damp, nesterov, wd)
    return [p] if b is None else [p, b]


def adam_ref(steps: int, wd: float, decoupled: bool) -> list[np.ndarray]:
    p, m, v = X["p"], None, None
    for t in range(1, steps + 1):
        p, m, v = ref_adam(p, X["A"][t - 1], m, v, t, LR, 0.9, 0.99, 1e-8, wd, decoupled)
    return [p, m, v]


def sgd_steps(name: str, steps: int, *opts: Any) -> list[list[Any]]:
    return [["SPIRT.SGD", f"{name}:p", "a" + str(t), "LR", LR, *opts] for t in range(steps)]


def adam_steps(name: str, steps: int, *opts: Any) -> list[list[Any]]:
    return [
        [
            *["SPIRT.ADAM", f"{name}:p", f"a{t - 1}", "M", f"{name}:m", "V", f"{name}:v"],
            *["STEP", t, "LR", LR, "BETAS", 0.9, 0.99, *opts],
        ]
        for t in range(1, steps + 1)
    ]


def krum_ref(Y: np.ndarray, f: int, m: int) -> tuple[list[np.ndarray], Any]:
    out, order = ref_krum(Y, f, m)
    return [out], order


def geomed_ref(Y: np.ndarray, maxiter: int, eps: float) -> tuple[list[np.ndarray], Any]:
    out, iters = ref_geomed(Y, maxiter, eps)
    return [out], iters


A, B = X["A"], X["B"]
MOM = ["MOMENTUM", 0.9, "BUF", "sgd_nesterov:buf", "NESTEROV", "WEIGHT_DECAY", 1e-3]
DAMP = ["MOMENTUM", 0.5, "BUF", "sgd_damp:buf", "DAMPENING", 0.3, "WEIGHT_DECAY", 0.1]
CASES: dict[str, Case] = {
    "mean": Case(agg("MEAN", "o:mean", KA), ["o:mean"], lambda: ([ref_mean(A)], None)),
    "mean_weights": Case(
        agg("MEAN", "o:wmean", KA, "WEIGHTS", *X["wA"].tolist()),
        ["o:wmean"],
        lambda: ([ref_mean(A, X["wA"])], None),
    ),
    "mean_nnm": Case(
        agg("MEAN", "o:nmean", KB, "NNM", 2),
        ["o:nmean"],
        lambda: ([ref_mean(ref_nnm(B, 2))], None),
        B,
    ),
    "median": Case(agg("MEDIAN", "o:med", KA), ["o:med"], lambda: ([ref_median(A)], None)),
    "median_even_nnm": Case(
        agg("MEDIAN", "o:nmed", KB, "NNM", 1),
        ["o:nmed"],
        lambda: ([ref_median(ref_nnm(B, 1))], None),
        B,
    ),
    "trimmean": Case(
        agg("TRIMMEAN", "o:tm", KA, "BETA", 0.3),
        ["o:tm"],
        lambda: ([ref_trimmed_mean(A, 0.3)], None),
    ),
    "trimmean_even_nnm": Case(
        agg("TRIMMEAN", "o:ntm", KB, "BETA", 0.25, "NNM", 1),
        ["o:ntm"],
        lambda: ([ref_trimmed_mean(ref_nnm(B, 1), 0.25)], None),
        B,
    ),
    "krum": Case(agg("KRUM", "o:krum", KA, "F", 2), ["o:krum"], lambda: krum_ref(A, 2, 1)),
    "multikrum_nnm": Case(
        agg("KRUM", "o:mkrum", KA, "F", 2, "M", 3, "NNM", 2),
        ["o:mkrum"],
        lambda: krum_ref(ref_nnm(A, 2), 2, 3),
    ),
    "geomed": Case(
        agg("GEOMED", "o:gm", KA, "MAXITER", 8, "EPS", 0),
        ["o:gm"],
        lambda: geomed_ref(A, 8, 0.0),
    ),
    "geomed_eps_nnm": Case(
        agg("GEOMED", "o:ngm", KB, "MAXITER", 500, "EPS", 1e-7, "NNM", 1),
        ["o:ngm"],
        lambda: geomed_ref(ref_nnm(B, 1), 500, 1e-7),
        B,
    ),
    "cclip_start": Case(
        agg("CCLIP", "o:cc", KA, "TAU", 3.0, "ITERS", 3, "START", "start"),
        ["o:cc"],
        lambda: ([ref_cclip(A, 3.0, 3, X["start"])], None),
    ),
    "cclip_nnm": Case(
        agg("CCLIP", "o:ncc", KB, "TAU", 0.5, "ITERS", 4, "NNM", 1),
        ["o:ncc"],
        lambda: ([ref_cclip(ref_nnm(B, 1), 0.5, 4, None)], None),
        B,
    ),
    "sgd": Case(sgd_steps("sgd", 2), ["sgd:p"], lambda: (sgd_ref(2, 0, 0, False, 0), None)),
    "sgd_nesterov": Case(
        sgd_steps("sgd_nesterov", 3, *MOM),
        ["sgd_nesterov:p", "sgd_nesterov:buf"],
        lambda: (sgd_ref(3, 0.9, 0.0, True, 1e-3), None),
    ),
    "sgd_damp": Case(
        sgd_steps("sgd_damp", 3, *DAMP),
        ["sgd_damp:p", "sgd_damp:buf"],
        lambda: (sgd_ref(3, 0.5, 0.3, False, 0.1), None),
    ),
    "adam": Case(
        adam_steps("adam", 3, "WEIGHT_DECAY", 0.01),
        ["adam:p", "adam:m", "adam:v"],
        lambda: (adam_ref(3, 0.01, False), None),
    ),
    "adamw": Case(
        adam_steps("adamw", 3, "WEIGHT_DECAY", 0.1, "DECOUPLED"),
        ["adamw:p", "adamw:m", "adamw:v"],
        lambda: (adam_ref(3, 0.1, True), None),
    ),
    **{
        f"krum_tie{j}": Case(
            agg("KRUM", f"o:tie{j}", KT[j], "F", 1), [f"o:tie{j}"], lambda: ([], None), T[j]
        )
        for j in range(TIES)
    },
    "norm": Case([["SPIRT.NORM", "a5"]], [], lambda: ([], None)),
    "norm_b1": Case([["SPIRT.NORM", "b1"]], [], lambda: ([], None)),
}
OPTIM_PARAMS = [f"{name}:p" for name in CASES if name.startswith(("sgd", "adam"))]


@dataclass
class Result:
    replies: list[Any]  # the reply of every step
    values: list[bytes]  # GET of every output
    digests: list[bytes]  # SPIRT.DIGEST of every output


async def reload(c: aioredis.Redis) -> None:
    await c.flushall()
    await load(c, X["A"], "a")
    await load(c, X["B"], "b")
    for j in range(TIES):
        await load(c, T[j], f"t{j}_")
    await put(c, "start", X["start"])
    for key in OPTIM_PARAMS:
        await put(c, key, X["p"])


async def run_all(c: aioredis.Redis) -> dict[str, Result]:
    """Every case, one round per step, all the round's commands at once."""
    await reload(c)
    replies: dict[str, list[Any]] = {name: [] for name in CASES}
    for rnd in range(max(len(case.steps) for case in CASES.values())):
        batch = [(name, case.steps[rnd]) for name, case in CASES.items() if rnd < len(case.steps)]
        got = await asyncio.gather(*(c.execute_command(*cmd) for _, cmd in batch))
        for (name, _), reply in zip(batch, got, strict=True):
            replies[name].append(reply)
    out = {}
    for name, case in CASES.items():
        values = [await c.get(k) for k in case.outputs]
        digests = [await c.execute_command("SPIRT.DIGEST", k) for k in case.outputs]
        out[name] = Result(replies[name], values, digests)
    return out


@dataclass
class Run:
    info: dict[str, Any]  # SPIRT.INFO
    before: dict[str, int]  # job counters before and after the run
    after: dict[str, int]
    results: dict[str, Result]


async def run_server(name: str, args: list[str]) -> dict[str, Run]:
    d = short_tmpdir("spirt-det-")
    try:
        r = await start_redis(d, module_args=args)
        try:
            c = r.client
            await c.config_set("appendonly", "no")
            info = await jobs(c)
            runs = {}
            for path in PATHS:
                limit = 0 if path == "worker" else 1 << 40
                await c.execute_command("SPIRT.CONFIG", "SET", "ASYNC_MIN_BYTES", limit)
                before = await jobs(c)
                results = await run_all(c)
                runs[path] = Run(info, before, await jobs(c), results)
            return runs
        finally:
            await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runs() -> AsyncIterator[dict[str, Run]]:
    per_server = await asyncio.gather(*(run_server(n, a) for n, a in CONFIGS.items()))
    yield {
        f"{server}/{path}": run
        for server, server_runs in zip(CONFIGS, per_server, strict=True)
        for path, run in server_runs.items()
    }


# ---- tests -------------------------------------------------------------------------------


async def test_configurations_are_what_was_asked(runs: dict[str, Run]) -> None:
    for label, run in runs.items():
        server, path = label.split("/")
        args = CONFIGS[server]
        assert run.info["isa"].decode() == args[args.index("ISA") + 1], label
        assert run.info["threads"] == int(args[args.index("THREADS") + 1]), label
        steps = sum(len(case.steps) for case in CASES.values())
        outputs = sum(len(case.outputs) for case in CASES.values())
        ran = {k: run.after[k] - run.before[k] for k in ("jobs_sync", "jobs_async")}
        # Commands and digests, none failed; all through the path under test.
        assert run.after["jobs_failed"] == run.before["jobs_failed"], label
        if path == "worker":
            assert ran == {"jobs_sync": 0, "jobs_async": steps + outputs}, label
        else:
            assert ran == {"jobs_sync": steps + outputs, "jobs_async": 0}, label


@pytest.mark.skipif(not HAVE_AVX2, reason=NO_AVX2)
async def test_avx2_kernels_are_among_the_compared(runs: dict[str, Run]) -> None:
    isas = {run.info["isa"] for run in runs.values()}
    assert isas == {b"baseline", b"avx2"}


@pytest.mark.parametrize("case", list(CASES))
async def test_bit_identical_everywhere(runs: dict[str, Run], case: str) -> None:
    labels = list(runs)
    first = runs[labels[0]].results[case]
    assert all(v is not None for v in first.values)
    for label in labels[1:]:
        got = runs[label].results[case]
        assert got.replies == first.replies, f"{case}: replies differ, {label} vs {labels[0]}"
        assert got.digests == first.digests, f"{case}: digests differ, {label} vs {labels[0]}"
        # (The digests already say so; the bytes make a failure easier to look into.)
        for key, a, b in zip(CASES[case].outputs, got.values, first.values, strict=True):
            if a != b:
                x, y = np.frombuffer(a, "<f4"), np.frombuffer(b, "<f4")
                bad = np.flatnonzero(x != y)
                pytest.fail(
                    f"{case}: {key} differs between {label} and {labels[0]} at "
                    f"{bad.size} indices, first {bad[0]}: {x[bad[0]]!r} vs {y[bad[0]]!r}"
                )


@pytest.mark.parametrize("case", list(CASES))
async def test_still_matches_the_reference(runs: dict[str, Run], case: str) -> None:
    spec = CASES[case]
    res = next(iter(runs.values())).results[case]
    if case.startswith("krum_tie"):
        # Either tied row is right; the output is that row.
        chosen = [int(i) for i in res.replies[0]]
        assert chosen in ([0], [1])
        assert res.values[0] == T[int(case[len("krum_tie") :])][chosen[0]].tobytes()
        return
    refs, reply = spec.ref()
    for key, value, ref in zip(spec.outputs, res.values, refs, strict=True):
        got = np.frombuffer(value, "<f4")
        assert got.shape == ref.shape, key
        assert_close(got, ref, spec.scale)
    if case.startswith(("krum", "multikrum")):
        assert [int(i) for i in res.replies[0]] == reply
    elif case.startswith("geomed"):
        assert res.replies[0] == reply
    elif case.startswith("norm"):
        key = spec.steps[0][1]
        row = (A if key.startswith("a") else B)[int(key[1:])]
        ref_norm = float(np.linalg.norm(row.astype(np.float64)))
        assert float(res.replies[0]) == pytest.approx(ref_norm, rel=1e-12)
    else:
        assert all(r == b"OK" for r in res.replies)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ISA", "sse9"], "ISA must be auto, avx2 or baseline, got 'sse9'"),
        pytest.param(
            ["ISA", "avx2"],
            "ISA avx2 requested but this CPU does not support AVX2",
            marks=pytest.mark.skipif(HAVE_AVX2, reason="this CPU has AVX2: ISA avx2 loads"),
        ),
    ],
)
async def test_bad_isa_is_a_load_error_with_a_clear_log_line(args: list[str], message: str) -> None:
    so = require_module()
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server not on PATH"
    d = short_tmpdir("spirt-isa-")
    try:
        proc = await asyncio.create_subprocess_exec(
            *[redis_server, "--port", "0", "--unixsocket", str(d / "s.sock"), "--dir", str(d)],
            *["--save", "", "--appendonly", "no", "--loadmodule", str(so), *args],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode != 0
    assert f"spirt: {message}" in out.decode()
