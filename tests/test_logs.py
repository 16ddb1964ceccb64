"""Finding 8 (SECURITY.md) and issue 15's log format: peer-supplied text is
quoted, repeated lines are rate-limited with a count of the suppressed ones,
and every line is one event, as text or JSON, with its context fields."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from protocol import strictpack
from protocol.handshake import Handshake
from protocol.identity import NodeKey, TrustStore
from spirtd import logs
from spirtd.config import TransportConfig
from spirtd.localcluster import LocalNode, all_see, wait_for
from spirtd.net.transport import DialError, Transport
from tests.fixtures_cluster import FAST_TRANSPORT
from tests.fixtures_redis import short_tmpdir, start_redis, stop_redis

pytestmark = pytest.mark.timeout(120)

INJECTION = "no\n2030-01-01T00:00:00.000Z ERROR spirtd.node: \x1b[2Jroot key stolen\r"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ [\w.]+: ")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Capture:
    def __init__(self, fmt: str, clock: FakeClock | None = None, burst: int = 20) -> None:
        self.stream = io.StringIO()
        self.limiter = logs.RateLimit(burst=burst, rate=1.0, clock=clock or FakeClock())
        self.handler = logs.make_handler(fmt, self.stream, ratelimit=self.limiter)

    @property
    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


@pytest.fixture
def capture() -> Iterator[Callable[..., Capture]]:
    logger = logging.getLogger("spirtd")
    old_level, old_propagate = logger.level, logger.propagate
    made: list[Capture] = []

    def make(fmt: str = "text", **kw) -> Capture:
        c = Capture(fmt, **kw)
        logger.addHandler(c.handler)
        made.append(c)
        return c

    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield make
    for c in made:
        logger.removeHandler(c.handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


def test_quote_escapes_control_characters_and_caps_length():
    q = logs.quote(INJECTION)
    assert "\n" not in q and "\r" not in q and "\x1b" not in q
    assert q.startswith("'") and "\\n" in q and "\\x1b" in q
    assert logs.quote(b"\xff\x00") == repr("\ufffd\x00")
    long = logs.quote("x" * 1000)
    assert len(long) < 220 and long.endswith("...")
    assert logs.quote("bidi \u202e txt") == "'bidi \\u202e txt'"
    assert "\n" not in logs.sanitize("a\nb\u2028c") and "\u2028" not in logs.sanitize("a\u2028")


def test_a_formatter_keeps_one_event_on_one_line_whatever_the_caller_did(capture):
    cap = capture("text")
    log = logging.getLogger("spirtd.test")
    log.warning("raw: %s", INJECTION)  # a careless call site
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("failed")
    assert len(cap.lines) == 2
    assert all(TEXT_LINE.match(line) for line in cap.lines)
    assert "Traceback" in cap.lines[1] and "ValueError" in cap.lines[1]


async def fake_responder(reason: str) -> tuple[asyncio.Server, str]:
    """A listener that answers any hello with a reject carrying ``reason``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        await reader.readexactly(n)
        msg = strictpack.pack({"k": "reject", "r": reason})
        writer.write(struct.pack(">I", len(msg)) + msg)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, f"{host}:{port}"


def transport(k: NodeKey | None = None, allow: bytes | None = None) -> Transport:
    k = k or NodeKey(os.urandom(32))

    class Quiet:
        def on_message(self, link, data):
            pass

        def on_stream(self, link, stream, total, meta):
            return None

    trust = TrustStore("t", allowlist={allow} if allow else set())
    return Transport(k, None, trust, TransportConfig(), Quiet(), counters=Counter())


async def test_a_peers_reject_reason_is_logged_quoted(capture):
    cap = capture("text")
    server, addr = await fake_responder(INJECTION)
    t = transport()
    try:
        with pytest.raises(DialError) as e:
            await t.connect(addr)
        assert e.value.reason == "rejected_by_peer"
        assert "\n" not in str(e.value)  # callers that log the error are safe too
    finally:
        server.close()
        await t.stop()
    refused = [line for line in cap.lines if "refused" in line]
    assert len(refused) == 1 and len(cap.lines) == 1
    assert "rejected_by_peer 'no\\n2030-01-01" in refused[0]
    assert "\\x1b[2Jroot key stolen\\r'" in refused[0]


async def test_a_peers_close_reason_is_logged_quoted(capture):
    cap = capture("json")
    ka, kb = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    a = transport(ka, allow=kb.public_key)
    b = transport(kb, allow=ka.public_key)
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    try:
        link = await a.connect(b.listen_addr)
        link.close(INJECTION[:150])
        async with asyncio.timeout(20):
            while a.node_id in b.links:
                await asyncio.sleep(0.05)
    finally:
        await a.stop()
        await b.stop()
    events = [json.loads(line) for line in cap.lines]  # every line is one JSON event
    down = [e for e in events if e["msg"].startswith("link down") and e.get("peer") == ka.node_id]
    assert down, events
    assert "peer_closed:no\\n2030" in down[0]["msg"]
    assert "\n" not in down[0]["msg"] and "\x1b" not in down[0]["msg"]


async def test_refused_handshakes_are_rate_limited_with_a_count(capture):
    clock = FakeClock()
    cap = capture("text", clock=clock, burst=5)
    t = transport()
    await t.start("127.0.0.1:0")
    host, port = t.listen_addr.rsplit(":", 1)

    async def garbage() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        msg = strictpack.pack({"k": "hello", "junk": 1})
        writer.write(struct.pack(">I", len(msg)) + msg)
        await reader.read()  # the reject, then the close
        writer.close()

    try:
        for _ in range(40):
            await garbage()
        assert t.counters["handshake.handshake_malformed"] == 40
        refused = [line for line in cap.lines if "refused" in line]
        assert len(refused) == 5  # the burst, then silence
        assert cap.limiter.suppressed_total == 35
        clock.t += 10.0
        await garbage()
    finally:
        await t.stop()
    refused = [line for line in cap.lines if "refused" in line]
    assert len(refused) == 6
    assert "(35 similar lines suppressed)" in refused[-1]


def test_rate_limit_is_per_template_and_bounded():
    clock = FakeClock()
    limiter = logs.RateLimit(burst=2, rate=1.0, max_keys=4, clock=clock)

    def rec(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("spirtd.x", logging.WARNING, __file__, 1, msg, args, None)

    assert [limiter.filter(rec("a %s", i)) for i in range(4)] == [True, True, False, False]
    assert limiter.filter(rec("b %s", 1))  # another template has its own budget
    clock.t += 1.0
    r = rec("a %s", 9)
    assert limiter.filter(r) and r.suppressed == 2
    for i in range(10):
        limiter.filter(rec(f"t{i}"))
    assert len(limiter._keys) == 4


def test_json_lines_carry_node_job_round_and_peer(capture):
    cap = capture("json")
    log = logging.getLogger("spirtd.training")
    logs.bind(node="node-xyz")
    try:
        with logs.context(job="job-1", round=7):
            log.info("round closed with %d contributions", 3, extra={"peer": "peer-abc"})
        log.info("outside the job")
    finally:
        logs._bound.clear()
    first, second = (json.loads(line) for line in cap.lines)
    assert first["msg"] == "round closed with 3 contributions"
    assert (first["node"], first["job"], first["round"], first["peer"]) == (
        "node-xyz",
        "job-1",
        7,
        "peer-abc",
    )
    assert first["level"] == "info" and first["logger"] == "spirtd.training"
    assert second["node"] == "node-xyz" and "job" not in second and "round" not in second


def test_text_lines_carry_context_as_fields(capture):
    cap = capture("text")
    logs.bind(node="node-xyz")
    try:
        with logs.context(job="j", round=2):
            logging.getLogger("spirtd.t").warning("x", extra={"peer": "p\nq"})
    finally:
        logs._bound.clear()
    (line,) = cap.lines
    assert line.endswith(": x node=node-xyz job=j round=2 peer=p\\nq")


async def test_a_task_started_with_a_context_carries_it_and_its_starter_does_not(capture):
    # How the trainer tags its per-round work: each round's tasks carry job and round.
    cap = capture("json")
    log = logging.getLogger("spirtd.training")

    async def work() -> None:
        log.info("aggregated")

    ctx = logs.task_context(job="job-2", round=11)
    await asyncio.create_task(work(), context=ctx)
    log.info("between rounds")
    first, second = (json.loads(line) for line in cap.lines)
    assert (first["job"], first["round"]) == ("job-2", 11)
    assert "job" not in second and "round" not in second


@pytest.fixture
def daemon_logging() -> Iterator[Callable[[str], tuple[io.StringIO, FakeClock]]]:
    """The daemon's own logs.setup(), writing to a buffer with a fake clock; the
    process-wide hooks it installs are put back afterwards."""
    root = logging.getLogger()
    saved = (root.level, sys.excepthook, threading.excepthook, sys.unraisablehook, logs._format)
    mine: list[logging.Handler] = []

    def make(fmt: str) -> tuple[io.StringIO, FakeClock]:
        stream, clock = io.StringIO(), FakeClock()
        limiter = logs.RateLimit(burst=5, rate=1.0, clock=clock)
        logs.setup(fmt, "info", stream=stream, ratelimit=limiter)
        mine.extend(root.handlers)
        return stream, clock

    yield make
    logging.captureWarnings(False)
    for h in mine:
        root.removeHandler(h)
    root.level, sys.excepthook, threading.excepthook, sys.unraisablehook, logs._format = saved


def retry_warning() -> None:
    # One call site, as a library's warning has: repeats share one rate-limit budget.
    warnings.warn("a synchronous Retry was passed\nto an asyncio client", UserWarning, stacklevel=1)


def test_warnings_become_json_lines_and_repeats_are_rate_limited(daemon_logging, capfd):
    stream, clock = daemon_logging("json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as if each came from a new module
        for _ in range(12):
            retry_warning()
        warnings.warn("another library's warning", DeprecationWarning, stacklevel=1)
        clock.t += 10.0
        retry_warning()
    events = json_events(stream.getvalue(), "log")
    assert capfd.readouterr().err == ""  # nothing went to the real stderr raw
    assert all(e["logger"] == "py.warnings" and e["level"] == "warning" for e in events)
    retry = [e for e in events if "a synchronous Retry" in e["msg"]]
    assert len(retry) == 6  # the burst of 5, then one once the budget refilled
    assert "UserWarning: a synchronous Retry was passed\nto an asyncio client" in retry[0]["msg"]
    assert "suppressed" not in retry[0] and retry[-1]["suppressed"] == 7
    assert [e for e in events if "DeprecationWarning: another library's" in e["msg"]]
    assert len(events) == 7


def test_crashes_and_bad_log_calls_become_json_lines(daemon_logging, capfd):
    stream, _ = daemon_logging("json")
    try:
        raise RuntimeError("main thread\nboom")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())  # what the interpreter calls for an uncaught one
    worker = threading.Thread(target=lambda: 1 / 0, name="doomed")
    worker.start()
    worker.join()

    class Finalizer:
        def __del__(self) -> None:
            raise ValueError("raised in __del__")

    Finalizer()  # collected at once: its error is "unraisable"
    logging.getLogger("spirtd.x").info("%d rounds", "many")  # wrong argument type
    events = json_events(stream.getvalue(), "log")
    assert capfd.readouterr().err == ""
    main, thread, unraisable, bad = events
    assert main["level"] == "critical" and "RuntimeError: main thread\nboom" in main["exc"]
    assert thread["msg"] == "uncaught exception in thread doomed"
    assert "ZeroDivisionError" in thread["exc"]
    assert "Finalizer.__del__" in unraisable["msg"] and "raised in __del__" in unraisable["exc"]
    assert bad["level"] == "error" and bad["logger"] == "spirtd.x"
    assert bad["msg"].startswith("unformattable log line '%d rounds': TypeError")


def test_identity_and_fatal_lines_follow_the_format(daemon_logging):
    ident = {"node_id": "abc", "listen": "127.0.0.1:7000", "public_key": "00ff"}
    out, err = io.StringIO(), io.StringIO()
    daemon_logging("text")
    logs.identity(ident, out)
    logs.fatal("listen: cannot listen on 127.0.0.1:7000: in use", stream=err)
    # Text mode keeps INTERFACES.md's lines exactly.
    assert out.getvalue() == "node_id: abc\nlisten: 127.0.0.1:7000\npublic_key: 00ff\n"
    assert err.getvalue() == "spirtd: listen: cannot listen on 127.0.0.1:7000: in use\n"
    out, err = io.StringIO(), io.StringIO()
    daemon_logging("json")
    logs.identity(ident, out)
    logs.fatal("listen: in use", stream=err)
    banner = json_events(out.getvalue(), "stdout")
    assert [e["msg"] for e in banner] == [
        "node_id: abc",
        "listen: 127.0.0.1:7000",
        "public_key: 00ff",
    ]
    (fatal,) = json_events(err.getvalue(), "stderr")
    assert fatal["level"] == "critical" and fatal["msg"] == "listen: in use"
    # Before setup() knows the format, the flag's value decides.
    err = io.StringIO()
    logs.fatal("config: bad", fmt="text", stream=err)
    assert err.getvalue() == "spirtd: config: bad\n"


async def test_starting_a_managed_redis_warns_nothing():
    # redis-py 8 warned (on raw stderr, before warnings were logged) when our asyncio
    # client got the synchronous Retry: here any warning fails the start.
    d = short_tmpdir("spt-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = await start_redis(d, load_module=False)
            try:
                assert await r.client.ping()
            finally:
                await stop_redis(r)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("where", ["file", "flag"])
def test_a_bad_config_is_one_json_line_when_the_log_is_json(short_tmp, where):
    cfg = short_tmp / "spirtd.toml"
    cfg.write_text(
        ('log_format = "json"\n' if where == "file" else "") + "[transport]\nidle_timeout_s = 0.0\n"
    )
    cmd = [sys.executable, "-m", "spirtd", "--config", str(cfg), "--data-dir", str(short_tmp)]
    cmd += ["--log-format", "json"] if where == "flag" else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 78 and r.stdout == ""
    (line,) = json_events(r.stderr, "stderr")
    assert line["level"] == "critical" and "transport.idle_timeout_s" in line["msg"]


JSON_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def json_events(text: str, where: str) -> list[dict]:
    """Every line of ``text`` as a JSON log event; fails naming the first line that is not."""
    events = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{where} line {i} is not JSON: {line[:300]!r}")
        assert isinstance(event, dict), f"{where} line {i}: {line[:300]}"
        assert JSON_TS.match(event.get("ts", "")), f"{where} line {i}: {line[:300]}"
        assert event.get("level") in LEVELS, f"{where} line {i}: {line[:300]}"
        assert event.get("logger") and isinstance(event.get("msg"), str), line[:300]
        events.append(event)
    return events


def rest_of_stdout(node: LocalNode, timeout: float = 10.0) -> bytes:
    """What an exited daemon wrote on stdout after its identity lines."""
    assert node.proc is not None and node.proc.stdout is not None
    fd, out = node.proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        chunk = os.read(fd, 1 << 16) if ready else b""
        if not chunk:
            return out
        out += chunk
    pytest.fail(f"stdout of {node.data_dir} still open {timeout}s after the daemon exited")


@pytest.mark.timeout(420)
def test_daemon_writes_json_lines_with_its_node_id(make_cluster):
    # A whole training job, functions and managed Redis included, under --log-format json:
    # every line either daemon writes, on stdout or stderr, is one JSON event.
    c = make_cluster(0)
    for i in range(2):
        args = ["--log-format", "json", "--profile", "local", "--shard", f"{i}/2"]
        c.add_node(args=args, config=FAST_TRANSPORT, start=False, index=i)
    c.start()
    everyone = {n.node_id: "alive" for n in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "both nodes to see each other alive")
    ctl = [sys.executable, "-m", "spirtd.control.ctl", "train", "start", "--task", "digits"]
    ctl += ["--rounds", "3", "--json", "--data-dir", str(c.nodes[1].data_dir)]
    started = subprocess.run(ctl, capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    wait_for(
        lambda: all(n.call("GET", "/v1/train/status")["state"] == "done" for n in c.nodes),
        300,
        "both nodes to finish the job",
    )
    for node in c.nodes:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
    for node in c.nodes:
        assert node.proc is not None and node.proc.wait(timeout=30) == 0
        stdout = (node.stdout_head + rest_of_stdout(node)).decode()
        node.stop()
        banner = json_events(stdout, f"{node.data_dir} stdout")
        assert [e["msg"] for e in banner] == [
            f"node_id: {node.node_id}",
            f"listen: {node.address}",
            f"public_key: {node.public_key}",
        ]
        events = json_events(node.log_path.read_text(), f"{node.data_dir} stderr")
        # From the node's key onwards, every line names the node.
        named = [i for i, e in enumerate(events) if "node" in e]
        assert named, events[:5]
        assert all(e.get("node") == node.node_id for e in events[named[0] :]), events
        assert any("up: node" in e["msg"] for e in events)
        # The trainer's lines carry the job (its id, maybe shortened) and the round.
        about_job = [e for e in events if "job" in e]
        assert about_job and all(job.startswith(str(e["job"])) for e in about_job), about_job
        assert any("round" in e for e in about_job), about_job
        assert all(not e["msg"].startswith("Traceback") for e in events)


def test_handshake_reject_reason_we_send_is_our_own_token():
    # What we tell a refused peer is a reason token, never its own text echoed.
    assert strictpack.unpack(Handshake.reject("wrong_cluster")) == {
        "k": "reject",
        "r": "wrong_cluster",
    }
