"""Finding 2 (SECURITY.md): pending-handshake slots cannot be exhausted without
authenticating, and a hello costs the responder no key work until it has passed
the cheap checks. The attacks run for real on 127.0.0.1 (several loopback
source addresses stand for several attacking hosts)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import threading
import time
from collections import Counter

import nacl.bindings
import pytest

from protocol import handshake as hs_mod
from protocol import strictpack
from protocol.errors import HandshakeError
from protocol.handshake import PROTOCOL, Handshake, ReplayCache, Role, screen_hello
from protocol.identity import NodeKey, TrustStore
from spirtd.config import TransportConfig
from spirtd.localcluster import LocalNode, async_wait_for, linked_peers, wait_for
from spirtd.net.admission import PendingTable, source_key
from spirtd.net.transport import Transport
from tests.fixtures_cluster import FAST_TRANSPORT
from tests.protocol_helpers import NOW, key, rng_bytes, trust

pytestmark = pytest.mark.timeout(180)

IDLE_CONNECTIONS = 200


# --- the attacker --------------------------------------------------------------------------


class IdleFlood:
    """Holds ``n`` TCP connections open on ``port`` that never say anything; one
    the server closes is opened again after ``reopen_s``. ``sources`` are the
    local addresses the connections come from, in turn."""

    def __init__(self, port: int, n: int, sources: list[str], reopen_s: float = 0.5) -> None:
        self.port = port
        self.n = n
        self.sources = sources
        self.reopen_s = reopen_s
        self.opened = 0
        self.open_now = 0
        self.closed_by_server = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._slot(self.sources[i % len(self.sources)]))
            for i in range(self.n)
        ]
        # Let the first wave land before the honest node tries.
        await async_wait_for(lambda: self.opened >= self.n, 30, "the first wave of the flood")

    async def _slot(self, source: str) -> None:
        while not self._stop.is_set():
            writer = None
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(source, 0)
                )
                self.opened += 1
                self.open_now += 1
                try:
                    await reader.read(4096)  # b"" (or a reset) when the server drops us
                finally:
                    self.open_now -= 1
                self.closed_by_server += 1
            except OSError:
                pass
            finally:
                if writer is not None:
                    writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.reopen_s)

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class FloodThread:
    """An IdleFlood on its own event loop, for tests that drive real daemons."""

    def __init__(self, port: int, n: int, sources: list[str]) -> None:
        self.flood = IdleFlood(port, n, sources)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.flood.start())
        self._started.set()
        self._loop.run_until_complete(self.flood._stop.wait())
        self._loop.run_until_complete(self.flood.stop())
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(30), "the flood did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self.flood._stop.set)
        self._thread.join(30)


def attacker_sources(n: int) -> list[str]:
    """Loopback addresses other than the honest nodes' 127.0.0.1."""
    return [f"127.0.{1 + i // 250}.{2 + i % 250}" for i in range(n)]


# --- the policy, alone -------------------------------------------------------------------


def test_full_table_drops_the_oldest_silent_connection_not_the_newcomer():
    t = PendingTable(max_total=3, max_per_source=8, rng=random.Random(1))
    aborted: list[str] = []
    a, _ = t.admit("10.0.0.1", lambda: aborted.append("a"))
    b, _ = t.admit("10.0.0.2", lambda: aborted.append("b"))
    c, _ = t.admit("10.0.0.3", lambda: aborted.append("c"))
    assert a and b and c
    t.said_hello(a)  # a is past its hello: real work in progress
    d, evicted = t.admit("10.0.0.4", lambda: None)
    assert d is not None and evicted == [b] and b.evicted
    assert len(t) == 3
    t.said_hello(c)
    t.said_hello(d)
    # Nobody silent is left: a random handshake goes, never the newcomer.
    e, evicted = t.admit("10.0.0.5", lambda: None)
    assert e is not None and len(evicted) == 1 and evicted[0] in (a, c, d)
    assert len(t) == 3


def test_one_source_holds_at_most_its_share():
    t = PendingTable(max_total=64, max_per_source=2, rng=random.Random(1))
    first, _ = t.admit("10.0.0.9", lambda: None)
    second, _ = t.admit("10.0.0.9", lambda: None)
    third, evicted = t.admit("10.0.0.9", lambda: None)
    assert third is not None and evicted == [first]
    assert t.count("10.0.0.9") == 2
    t.said_hello(second)
    t.said_hello(third)
    refused, evicted = t.admit("10.0.0.9", lambda: None)
    assert refused is None and evicted == []  # its slots all do real work
    other, _ = t.admit("10.0.0.10", lambda: None)
    assert other is not None  # another source is unaffected
    t.remove(second)
    assert t.count("10.0.0.9") == 1


def test_source_keys_group_an_ipv6_host_and_unmap_ipv4():
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"


# --- no key work before the cheap checks -------------------------------------------------


class KeyWork:
    """Counts the responder's expensive operations."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in ("crypto_scalarmult_base", "crypto_scalarmult"):
            real = getattr(nacl.bindings, name)
            monkeypatch.setattr(nacl.bindings, name, self._counting(name, real))
        real_sign = NodeKey.sign
        monkeypatch.setattr(NodeKey, "sign", self._counting("sign", real_sign))

    def _counting(self, name, fn):
        def wrapper(*a, **kw):
            self.calls[name] += 1
            return fn(*a, **kw)

        return wrapper


def hello(**overrides) -> bytes:
    msg = {
        "k": "hello",
        "p": PROTOCOL,
        "c": "c1",
        "e": os.urandom(32),
        "n": os.urandom(16),
        "t": int(NOW * 1000),
        "a": ["chacha20poly1305"],
    }
    msg.update(overrides)
    return strictpack.pack({k: v for k, v in msg.items() if v is not None})


def responder() -> Handshake:
    return Handshake(
        Role.RESPONDER,
        key("bob"),
        None,
        trust(),
        random_bytes=rng_bytes(3),
        now=NOW,
        replay_cache=ReplayCache(),
    )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (hello(c="elsewhere"), "wrong_cluster"),
        (hello(p="spirt/0"), "bad_version"),
        (hello(p="spirt/1"), "bad_version"),  # 0.1.0: gossip controls were maps
        (hello(t=int((NOW - 3600) * 1000)), "handshake_stale"),
        (hello(x="extra field"), "handshake_malformed"),
        (hello(e=b"short"), "handshake_malformed"),
        (hello(n=None), "handshake_malformed"),
        (hello(a=None), "handshake_malformed"),
        (hello(a="chacha20poly1305"), "handshake_malformed"),
        (hello(a=[]), "handshake_malformed"),
        (hello(a=[7]), "handshake_malformed"),
        (hello(a=["c" * 33]), "handshake_malformed"),
        (hello(a=["chacha20poly1305"] * 9), "handshake_malformed"),
        (hello(c="c" * 120), "wrong_cluster"),
        (hello() + bytes(600), "handshake_oversized"),
    ],
    ids=lambda v: v if isinstance(v, str) else "hello",  # stable across xdist workers
)
def test_a_bad_hello_costs_the_responder_no_key_work(monkeypatch, bad, reason):
    work = KeyWork(monkeypatch)
    r = responder()  # a connection's handshake state: no key work yet either
    with pytest.raises(HandshakeError) as e:
        screen_hello(bad, "c1", NOW)
    assert e.value.reason == reason
    with pytest.raises(HandshakeError) as e:
        r.receive(bad, NOW)
    assert e.value.reason == reason
    assert sum(work.calls.values()) == 0, work.calls


def test_a_good_hello_is_where_the_key_work_starts(monkeypatch):
    work = KeyWork(monkeypatch)
    r = responder()
    assert sum(work.calls.values()) == 0
    good = hello()
    screen_hello(good, "c1", NOW)
    assert sum(work.calls.values()) == 0
    reply = r.receive(good, NOW)
    assert reply is not None
    assert work.calls["crypto_scalarmult_base"] == 1
    assert work.calls["crypto_scalarmult"] == 1
    assert work.calls["sign"] == 1
    assert len(good) <= hs_mod.MAX_HELLO


# --- real transports on loopback ------------------------------------------------------------


async def make_pair(**cfg) -> tuple[Transport, Transport]:
    ka, kb = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    config = TransportConfig(**cfg)

    class Quiet:
        def on_message(self, link, data):
            pass

        def on_stream(self, link, stream, total, meta):
            return None

    a = Transport(
        ka, None, TrustStore("t", allowlist={kb.public_key}), config, Quiet(), counters=Counter()
    )
    b = Transport(
        kb, None, TrustStore("t", allowlist={ka.public_key}), config, Quiet(), counters=Counter()
    )
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    return a, b


@pytest.mark.parametrize(
    "sources",
    [
        pytest.param(attacker_sources(IDLE_CONNECTIONS), id="one-address-each"),
        pytest.param(attacker_sources(1), id="all-from-one-address"),
    ],
)
async def test_a_node_joins_while_200_idle_connections_are_held(sources):
    a, b = await make_pair()
    port = int(b.listen_addr.rsplit(":", 1)[1])
    flood = IdleFlood(port, IDLE_CONNECTIONS, sources)
    try:
        await flood.start()
        assert flood.opened >= IDLE_CONNECTIONS
        # Several joins and rejoins in a row, each while the flood keeps up.
        for _ in range(3):
            link = await asyncio.wait_for(a.connect(b.listen_addr), 30)
            assert link.peer_id == b.node_id
            await async_wait_for(
                lambda: b.links.get(a.node_id) is not None, 30, "the server's side of the link"
            )
            link.close("again")
            await link.wait_closed()
            a._backoff.clear()
        # The server shed idle ones (counted), and the flood opened a slot again: a
        # shed slot reopens after reopen_s, so wait for it rather than race it.
        assert b.counters["handshake.evicted"] + b.counters["handshake.hello_timeout"] > 0
        await async_wait_for(
            lambda: flood.opened > IDLE_CONNECTIONS, 30, "the flood to reopen a shed slot"
        )
        assert len(b._pending) <= b.config.max_pending_handshakes
    finally:
        await flood.stop()
        await a.stop()
        await b.stop()


async def test_silent_connections_are_dropped_at_the_hello_deadline():
    _, b = await make_pair(hello_timeout_s=0.3, handshake_timeout_s=30.0)
    port = int(b.listen_addr.rsplit(":", 1)[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Well inside the 30 s handshake timeout, the silent connection is gone.
        assert await asyncio.wait_for(reader.read(100), 20) == b""
        writer.close()
        assert b.counters["handshake.hello_timeout"] == 1
    finally:
        await b.stop()


async def test_key_work_is_budgeted_per_source_address():
    _, b = await make_pair(handshakes_per_source_s=0.001, handshake_burst_per_source=3)
    port = int(b.listen_addr.rsplit(":", 1)[1])

    async def send_hello(source: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            msg = hello(c="t", t=int(time.time() * 1000))
            writer.write(struct.pack(">I", len(msg)) + msg)
            (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 20))
            return strictpack.unpack(await reader.readexactly(n))["k"]
        finally:
            writer.close()

    try:
        kinds = [await send_hello("127.0.0.2") for _ in range(5)]
        assert kinds == ["reply"] * 3 + ["reject"] * 2
        assert b.counters["handshake.handshake_rate"] == 2
        assert await send_hello("127.0.0.3") == "reply"  # another address has its own
    finally:
        await b.stop()


# --- real daemons ------------------------------------------------------------------------------


def test_a_daemon_joins_while_200_idle_connections_are_held_on_the_peer_port(make_cluster):
    c = make_cluster(1, config=FAST_TRANSPORT).start()
    a = c.nodes[0]
    port = int(a.address.rsplit(":", 1)[1])
    flood = FloodThread(port, IDLE_CONNECTIONS, attacker_sources(IDLE_CONNECTIONS))
    flood.start()
    try:
        assert flood.flood.opened >= IDLE_CONNECTIONS
        b: LocalNode = c.add_node(config=FAST_TRANSPORT)
        wait_for(lambda: linked_peers(a) == {b.node_id}, 60, "b to link with a under the flood")
        wait_for(lambda: linked_peers(b) == {a.node_id}, 60, "a to link with b under the flood")
        counters = a.status()["counters"]
        assert counters.get("handshake.evicted", 0) + counters.get("handshake.hello_timeout", 0)
        assert a.running and b.running
    finally:
        flood.stop()
