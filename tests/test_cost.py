"""Cost accounting (issue 24): the invoker's account of what a job's invocations were
billed (REPORT lines, CostMeter) against the function host's own, for the same
invocations: the embedded runtime's counters and a standalone host's BILLED lines."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
from pathlib import Path

import pytest

from spirtd.config import ConfigError
from spirtd.functions.cost import (
    LAMBDA_PRICES,
    Billed,
    CostMeter,
    Usage,
    billed_ms_of,
    parse_report,
    prices_for,
)
from spirtd.functions.invoker import Invoker, RetryPolicy
from tests.test_config_validation import load_text
from tests.test_function_host import Host, fn_host  # noqa: F401  (a fixture)
from tests.test_invoker import probe_runtime

FAST_RETRY = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05)
RID = "6f1c3a52-0d1e-4c1b-9c39-1f1e9a3b7c11"


def report(rid: str = RID, billed: int = 13, memory: int = 512, extra: str = "") -> bytes:
    return (
        f"START RequestId: {rid} Version: $LATEST\nhello\nEND RequestId: {rid}\n"
        f"REPORT RequestId: {rid}\tDuration: 12.31 ms\tBilled Duration: {billed} ms\t"
        f"Memory Size: {memory} MB\tMax Memory Used: 80 MB\t{extra}\n"
    ).encode()


# --- the pieces -------------------------------------------------------------------------


def test_report_lines_are_read_as_lambda_writes_them() -> None:
    assert parse_report(report(), RID) == Billed(13, 512)
    got = parse_report(report(extra="Init Duration: 250.02 ms\t", billed=263), RID)
    assert got == Billed(263, 512)
    # No request id to check against: the last REPORT line still counts.
    assert parse_report(report()) == Billed(13, 512)


def test_report_lines_are_untrusted_text() -> None:
    # A handler that prints a REPORT line of its own comes before the runtime's.
    faked = report(billed=1, memory=128).replace(b"hello", report(billed=99999, memory=10240))
    assert parse_report(faked, RID) == Billed(1, 128)
    assert parse_report(report(rid="someone-else"), RID) is None
    assert parse_report(report(billed=10**9), RID) is None  # longer than Lambda runs
    assert parse_report(report(memory=64), RID) is None  # below Lambda's memory range
    assert parse_report(b"", RID) is None
    assert (
        parse_report(b"REPORT RequestId: " + RID.encode() + b"\tBilled Duration: x ms", RID) is None
    )
    assert parse_report(bytes(range(256)) * 100, RID) is None


def test_billing_rounds_up_to_the_millisecond() -> None:
    assert [billed_ms_of(s) for s in (0.0, 0.0001, 0.001, 0.0010001, 1.2345)] == [0, 1, 1, 2, 1235]


def test_meter_sums_rounds_and_the_job() -> None:
    meter = CostMeter(prices_for("arm64"))
    meter.record(1, [Billed(1000, 1024), Billed(500, 2048)])
    meter.record(2, [Billed(250, 1024, reported=False)])
    meter.record(None, [Billed(1, 1024)])  # in the job's total only
    r1 = meter.round_json(1)
    assert r1["requests"] == 2 and r1["gb_s"] == pytest.approx(2.0)
    arm = LAMBDA_PRICES["arm64"]
    assert r1["usd"] == pytest.approx(2.0 * arm.usd_per_gb_s + 2 * 0.20 / 1e6)
    assert r1["prices"]["architecture"] == "arm64" and "2025" in r1["prices"]["source"]
    total = meter.total_json()
    assert total["requests"] == 4 and total["billed_by_wall_time"] == 1
    assert total["gb_s"] == pytest.approx(2.0 + 0.25 + 0.001)
    assert meter.round_json(7) == Usage().to_json(meter.prices)
    # Bounded: old rounds are forgotten, the total is not.
    small = CostMeter(max_rounds=2)
    for r in range(5):
        small.record(r, [Billed(1, 1024)])
    assert small.round_usage(0).requests == 0 and small.round_usage(4).requests == 1
    assert small.total.requests == 5


def test_prices_default_to_lambdas_and_can_be_configured(tmp_path: Path) -> None:
    assert prices_for() == LAMBDA_PRICES["x86_64"]
    assert LAMBDA_PRICES["x86_64"].usd_per_gb_s == 0.0000166667
    custom = prices_for("x86_64", usd_per_gb_s=0.00001)
    assert custom.usd_per_gb_s == 0.00001 and custom.usd_per_million_requests == 0.20
    assert "configured" in custom.source
    with pytest.raises(ValueError):
        prices_for("sparc")
    cfg = load_text(
        tmp_path,
        '[invoke]\narchitecture = "arm64"\nprice_gb_s = 0\nprice_per_million_requests = 1\n',
    )
    assert (cfg.invoke.architecture, cfg.invoke.price_gb_s) == ("arm64", 0.0)
    assert cfg.invoke.price_per_million_requests == 1.0
    defaults = load_text(tmp_path, "")
    assert defaults.invoke.price_gb_s is None and defaults.invoke.architecture == "x86_64"
    for text, key, allowed in (
        ('[invoke]\narchitecture = "sparc"\n', "invoke.architecture", "'x86_64', 'arm64'"),
        ("[invoke]\nprice_gb_s = -1\n", "invoke.price_gb_s", ">= 0"),
        (
            "[invoke]\nprice_per_million_requests = inf\n",
            "invoke.price_per_million_requests",
            "finite",
        ),
        ('[invoke]\nprice_gb_s = "cheap"\n', "invoke.price_gb_s", "a number"),
    ):
        with pytest.raises(ConfigError) as e:
            load_text(tmp_path, text)
        assert f"{key}: " in str(e.value) and allowed in str(e.value), str(e.value)


# --- both sides of the same invocations ---------------------------------------------------


def events(tag: str) -> list[dict[str, object]]:
    """A round's slices: plain calls, slower ones, a handler error (billed, not
    retried) and one that crashes once (billed twice: the crash and the retry)."""
    return [
        {"action": "echo", "value": 1},
        {"action": "sleep", "seconds": 0.05},
        {"action": "sleep", "seconds": 0.12},
        {"action": "raise", "message": "billed anyway"},
        {"action": "flaky", "marker": f"crash-{tag}", "mode": "exit"},
        {"action": "print", "lines": [f"REPORT RequestId: {RID}\tBilled Duration: 999999 ms"]},
    ]


async def run_rounds(inv: Invoker, meter: CostMeter, rounds: int, tag: str) -> None:
    for r in range(1, rounds + 1):
        res = await inv.invoke_round(events(f"{tag}{r}"), deadline=60.0, min_fraction=0.0)
        assert [s.ok for s in res.slices] == [True, True, True, False, True, True]
        assert len(res.slices[4].billed) == 2  # the crash was billed, then the retry
        meter.record(r, res.billed)


def check_meter(meter: CostMeter, inv: Invoker, rounds: int, memory_mb: int) -> None:
    per_round = len(events("")) + 1
    assert meter.total.requests == rounds * per_round
    assert [meter.round_usage(r + 1).requests for r in range(rounds)] == [per_round] * rounds
    # Every attempt had its REPORT line: nothing billed by the wall clock.
    assert meter.total.fallbacks == 0 and inv.stats.billed_by_wall_time == 0
    assert inv.stats.billed == meter.total.requests
    # Sleeping 0.05 s and 0.12 s is billed at least that long.
    assert meter.total.mb_ms >= rounds * (50 + 120) * memory_mb


async def test_the_meter_sums_to_what_the_embedded_runtime_billed(tmp_path: Path) -> None:
    rounds = 2
    async with probe_runtime(tmp_path, concurrency=3) as rt:
        inv = Invoker(
            rt.endpoint_url,
            "probe",
            concurrency=3,
            credentials=rt.credentials,
            retry=FAST_RETRY,
            memory_mb=999,
        )
        async with inv:
            meter = CostMeter()
            await run_rounds(inv, meter, rounds, "embedded")
        billing = rt.billing()["probe"]
    check_meter(meter, inv, rounds, 256)
    assert billing["invocations"] == meter.total.requests
    # The same integers on both sides: equal, not just close.
    assert billing["billed_ms"] * billing["memory_mb"] == meter.total.mb_ms
    assert meter.total_json()["gb_s"] == round(billing["billed_ms"] * 256 / 1024 / 1000, 9)


async def test_a_call_without_a_report_is_billed_by_wall_time(tmp_path: Path) -> None:
    """An endpoint that returns no log tail (or a mangled one): billed at the
    invoker's memory_mb for the call's wall time, and counted."""
    async with probe_runtime(tmp_path) as rt:
        inv = Invoker(rt.endpoint_url, "probe", credentials=rt.credentials, memory_mb=2048)
        inv.client.meta.events.register("after-call.lambda.Invoke", drop_log_result)
        async with inv:
            res = await inv.invoke_round([{"action": "sleep", "seconds": 0.05}], deadline=60.0)
    (bill,) = res.billed
    assert not bill.reported and bill.memory_mb == 2048 and bill.billed_ms >= 50
    assert inv.stats.billed_by_wall_time == 1
    meter = CostMeter()
    meter.record(1, res.billed)
    assert meter.total_json()["billed_by_wall_time"] == 1


def drop_log_result(parsed: dict[str, object], **_: object) -> None:
    parsed["LogResult"] = base64.b64encode(b"garbage, no report here").decode()


_BILLED = re.compile(
    r"BILLED Function: (\S+), Invocations: (\d+), Billed Duration: (\d+) ms, Memory Size: (\d+) MB"
)


async def billed_lines(h: Host) -> list[tuple[str, int, int, int]]:
    """Stops the host and reads the BILLED lines it logged at exit."""
    assert h.proc.stderr is not None
    h.proc.send_signal(signal.SIGTERM)
    err = await asyncio.wait_for(h.proc.stderr.read(), 60)
    assert await asyncio.wait_for(h.proc.wait(), 60) == 0
    return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in _BILLED.finditer(err.decode())]


async def test_the_meter_sums_to_what_a_function_host_reports(
    fn_host: Host,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standalone host (its own process, HTTPS, its own key): the node's invoker
    meters the calls, the host logs what it billed; the two agree."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(fn_host.ca.cert))
    rounds = 2
    inv = Invoker(
        fn_host.endpoint, "probe", concurrency=2, credentials=fn_host.key, retry=FAST_RETRY
    )
    async with inv:
        meter = CostMeter()
        await run_rounds(inv, meter, rounds, "host")
    check_meter(meter, inv, rounds, 256)
    ((name, invocations, billed_ms, memory_mb),) = await billed_lines(fn_host)
    assert (name, memory_mb) == ("probe", 256)
    assert invocations == meter.total.requests
    assert billed_ms * memory_mb == meter.total.mb_ms


async def test_a_cold_start_bills_its_init_with_the_first_call(tmp_path: Path) -> None:
    """As Lambda since August 2025: the first call of a new worker carries "Init
    Duration" in its REPORT line and bills it; the worker's next call does not."""
    from spirtd.functions.runtime.server import LocalRuntime
    from tests.test_runtime import lambda_client, probe_config

    async with LocalRuntime(probe_config(concurrency=1)) as rt:
        c = lambda_client(rt)

        def call() -> tuple[str, str]:
            resp = c.invoke(FunctionName="probe", Payload=b'{"action": "echo"}', LogType="Tail")
            resp["Payload"].read()
            return base64.b64decode(resp["LogResult"]).decode(), resp["ResponseMetadata"][
                "RequestId"
            ]

        (cold, cold_id), (warm, warm_id) = [await asyncio.to_thread(call) for _ in range(2)]
        billing = rt.billing()["probe"]
    init = re.search(r"Init Duration: ([0-9.]+) ms", cold)
    duration = re.search(r"\tDuration: ([0-9.]+) ms", cold)
    assert init is not None and duration is not None and "Init Duration" not in warm
    first, second = parse_report(cold.encode(), cold_id), parse_report(warm.encode(), warm_id)
    assert first is not None and second is not None
    assert first.billed_ms >= float(init[1]) + float(duration[1])
    assert billing == {
        "invocations": 2,
        "billed_ms": first.billed_ms + second.billed_ms,
        "memory_mb": 256,
    }


# --- spirtctl train report ----------------------------------------------------------------


def status_doc(with_cost: bool) -> dict[str, object]:
    history = []
    for r in range(3, 8):  # the rows shown are not the job's first
        row: dict[str, object] = {
            "round": r,
            "closed_at": 1000.0 + r,
            "accuracy": 0.5 + r / 20,
            "peer_losses": {"node-a": 1.0 / r},
        }
        if with_cost:
            row["cost"] = {"gb_s": 0.1, "requests": 2, "usd": 0.25}
        history.append(row)
    doc: dict[str, object] = {"node_id": "node-a", "history": history, "events": []}
    if with_cost:
        doc["cost"] = {"gb_s": 1.0, "requests": 20, "usd": 2.0}
    return doc


def test_the_report_plots_the_cumulative_cost(tmp_path: Path) -> None:
    from spirtd.control import report

    series = report._series([status_doc(True)])
    pts = series["cost"]["node-a"]
    # Five rows of $0.25 end at the job's $2.00: the rounds before them cost $0.75.
    assert [p[0] for p in pts] == [3, 4, 5, 6, 7]
    assert [p[2] for p in pts] == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0])
    out = report.render([status_doc(True)], tmp_path / "with.png")
    assert out.read_bytes().startswith(b"\x89PNG")
    # Rows without cost objects (an older daemon, AWS prices unknown): nothing drawn.
    assert report._series([status_doc(False)])["cost"] == {}
    out = report.render([status_doc(False)], tmp_path / "without.png")
    assert out.read_bytes().startswith(b"\x89PNG")
