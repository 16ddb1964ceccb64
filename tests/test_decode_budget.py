"""Finding 4 (SECURITY.md): cheap messages must not cost the receiver a lot of
CPU. The signature is checked on the raw bytes before the structural decode,
item limits depend on the message type, and each link has message and byte
budgets. Work is measured by counting calls, never by timing."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import strictpack, wire
from protocol.budget import KeyedBuckets, LinkBudget, MessageBudget, TokenBucket
from protocol.errors import DecodeError
from protocol.gossip import GossipConfig
from protocol.gossip.messages import Control, decode_control, encode_control
from protocol.identity import SIGNATURE_SIZE, NodeKey, TrustStore
from protocol.wire import DOMAIN_ENVELOPE, MsgType
from spirtd.config import TransportConfig
from spirtd.keyfiles import DataDir
from spirtd.localcluster import async_wait_for
from spirtd.net import link as link_mod
from spirtd.net.transport import Transport
from tests.protocol_helpers import key

pytestmark = pytest.mark.timeout(120)

K = key("mallory")


class ScanCount:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = strictpack.scan

        def counting(data, limits=strictpack.DEFAULT):
            self.calls += 1
            return real(data, limits)

        monkeypatch.setattr(strictpack, "scan", counting)


def small_ints_envelope(typ: MsgType, n: int = 16_000) -> bytes:
    """~16 KB: n small integers, in arrays the generic limits would admit."""
    body = [[1] * 4000 for _ in range(n // 4000)]
    return wire.seal(K, typ, 1, 1, body)


def test_small_integer_flood_with_a_bad_signature_is_not_decoded(monkeypatch):
    scans = ScanCount(monkeypatch)
    for typ in MsgType:
        data = bytearray(small_ints_envelope(typ))
        assert 16_000 <= len(data) <= 17_000
        data[-1] ^= 1  # any signature but the origin's
        with pytest.raises(DecodeError) as e:
            wire.decode(bytes(data))
        assert e.value.reason == "bad_signature"
    assert scans.calls == 0  # refused before the structural scan ever ran


def test_the_same_flood_decodes_only_under_its_types_item_limits(monkeypatch):
    # Signed by its (made-up) origin, so it reaches the scan: the per-type item
    # limits refuse 16,000 integers in every envelope type.
    scans = ScanCount(monkeypatch)
    for typ in MsgType:
        with pytest.raises(DecodeError) as e:
            wire.decode(small_ints_envelope(typ))
        assert e.value.reason == "oversized", typ
    assert scans.calls == len(MsgType)
    # What each type legitimately carries still decodes.
    assert wire.decode(wire.seal(K, MsgType.MEMBERSHIP, 1, 1, b"m" * 50_000)).body == b"m" * 50_000
    ids = [os.urandom(20) for _ in range(2048)]
    control = wire.decode(wire.seal(K, MsgType.GOSSIP, 1, 1, encode_control(Control(iwant=ids))))
    assert decode_control(control.body).iwant == ids


def test_header_is_peeked_at_fixed_positions_before_the_signature(monkeypatch):
    scans = ScanCount(monkeypatch)
    raw = strictpack.pack([1, int(MsgType.GOSSIP), K.public_key, 1, 1, [1] * 10])
    cases = {
        "bad_version": b"\x96\x02" + raw[2:],
        "unknown_type": b"\x96\x01\x7f" + raw[3:],
        "bad_field": raw[:3] + b"\xc4\x1f" + raw[5:],
        "malformed": b"\x95" + raw[1:],
    }
    for reason, bad in cases.items():
        with pytest.raises(DecodeError) as e:
            wire.decode(bad + bytes(SIGNATURE_SIZE))
        assert e.value.reason == reason
    assert scans.calls == 0
    # Non-canonical but valid integer and array encodings still parse.
    loose = b"\xdc\x00\x06\xcc\x01\xcd\x00\x20" + raw[3:]
    env = wire.decode(loose + K.sign(DOMAIN_ENVELOPE, loose))
    assert (env.version, env.type, env.origin) == (1, MsgType.GOSSIP, K.public_key)
    assert env.body == [1] * 10 and env.raw == loose


def test_peek_agrees_with_the_full_decode():
    for typ in MsgType:
        data = wire.seal(K, typ, 7, 8, [b"x", {"a": 1}])
        assert wire.peek(data[:-SIGNATURE_SIZE]) == (1, typ, K.public_key)
        assert msgpack.unpackb(data[:-SIGNATURE_SIZE])[:3] == [1, int(typ), K.public_key]


# --- budgets, with the time handed in --------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    b = TokenBucket(rate=4, burst=5, now=100.0)
    assert [b.try_take(1, 100.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.try_take(1, 100.25)  # one token back after a quarter second
    assert not b.try_take(1, 100.25)
    assert b.tokens(1000.0) == 5  # never more than the burst
    assert b.tokens(10.0) == 5  # a clock that steps back mints nothing


def test_a_charge_beyond_the_burst_leaves_a_debt_that_takes_time_to_repay():
    b = TokenBucket(rate=100, burst=50, now=0.0)
    assert b.charge(150, 0.0) == pytest.approx(1.0)  # 100 in debt at 100/s
    assert b.delay(0.5) == pytest.approx(0.5)
    assert b.delay(1.0) == 0.0


def test_link_budget_holds_over_simulated_time():
    limits = MessageBudget(
        messages_per_s=100, message_burst=200, bytes_per_s=10_000, byte_burst=50_000
    )
    budget = LinkBudget(limits, now=0.0)
    now = 0.0
    bytes_in = 0
    # A reader that waits out each debt, as a link does, facing an endless flood.
    for i in range(5000):
        size = 10 if i % 2 else 1000
        now += budget.charge(size, now)
        delivered = i + 1
        bytes_in += size
        # At any moment, what got through is within burst + rate x elapsed.
        assert delivered <= limits.message_burst + limits.messages_per_s * now + 1
        assert bytes_in <= limits.byte_burst + limits.bytes_per_s * now + 1000
    assert budget.throttled > 0
    assert now > 10.0  # 2.5 MB at 10 kB/s cannot arrive in less


def test_keyed_buckets_are_bounded():
    kb = KeyedBuckets(rate=1, burst=1, max_keys=3)
    for i in range(10):
        assert kb.try_take(f"k{i}", 1, 0.0)
    assert len(kb) == 3
    assert not kb.try_take("k9", 1, 0.0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def on_message(self, link, data: bytes) -> None:
        self.messages.append(data)

    def on_stream(self, link, stream, total, meta):
        return None


async def settle(rec: Recorder, link_counters: Counter[str], want: int, throttles: int) -> None:
    """Waits until ``want`` messages are in and the reader has charged the next
    one into debt (its ``throttles``-th): then, while the test's clock stands
    still, nothing more can come, and the count can be checked."""
    await async_wait_for(
        lambda: len(rec.messages) >= want and link_counters["link.budget_throttled"] >= throttles,
        20,
        f"{want} messages and the reader stopped by its budget",
    )


async def test_a_link_delivers_no_more_than_its_budget():
    clock = FakeClock()
    config = TransportConfig(messages_per_s=5, message_burst=10)
    ka, kb = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    ra, rb = Recorder(), Recorder()
    a = Transport(
        ka, None, TrustStore("t", allowlist={kb.public_key}), config, ra, counters=Counter()
    )
    b = Transport(
        kb,
        None,
        TrustStore("t", allowlist={ka.public_key}),
        config,
        rb,
        counters=Counter(),
        clock=clock,  # the receiver's budget runs on a clock the test moves
    )
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    try:
        link = await a.connect(b.listen_addr)
        for i in range(50):
            await link.send(b"m%d" % i)
        await settle(rb, b.counters, 10, 1)
        assert len(rb.messages) == 10  # the burst, and not one more while time stands still
        clock.t += 1.0  # five more tokens: repays the debt of the 11th and pays 4 more
        await settle(rb, b.counters, 15, 2)
        assert len(rb.messages) == 15
        assert rb.messages == [b"m%d" % i for i in range(15)]  # delayed, never dropped
        assert b.counters["link.budget_throttled"] == 2

        def advanced() -> bool:
            clock.t += 10.0  # never more than a burst at once, however long the wait
            return len(rb.messages) >= 50

        await async_wait_for(advanced, 30, "all 50 messages as the clock moves on")
        assert rb.messages == [b"m%d" % i for i in range(50)]
        assert a.links[b.node_id].close_reason is None
    finally:
        await a.stop()
        await b.stop()


class CostlyRecorder(Recorder):
    """A handler each message costs at least ``cost`` seconds of this thread's CPU."""

    def __init__(self, cost: float) -> None:
        super().__init__()
        self.cost = cost

    def on_message(self, link, data: bytes) -> None:
        end = time.thread_time() + self.cost
        while time.thread_time() < end:
            pass
        super().on_message(link, data)


async def test_a_link_whose_messages_cost_more_cpu_than_its_budget_is_not_read(monkeypatch):
    # 12 ms of handler CPU at once, then 1 ms a second; each message costs 5 ms.
    monkeypatch.setattr(link_mod, "HANDLER_CPU_BURST_S", 0.012)
    monkeypatch.setattr(link_mod, "HANDLER_CPU_PER_S", 0.001)
    clock = FakeClock()
    config = TransportConfig()
    ka, kb = NodeKey(os.urandom(32)), NodeKey(os.urandom(32))
    rb = CostlyRecorder(0.005)
    a = Transport(
        ka, None, TrustStore("t", allowlist={kb.public_key}), config, Recorder(), counters=Counter()
    )
    b = Transport(
        kb,
        None,
        TrustStore("t", allowlist={ka.public_key}),
        config,
        rb,
        counters=Counter(),
        clock=clock,
    )
    await a.start("127.0.0.1:0")
    await b.start("127.0.0.1:0")
    try:
        link = await a.connect(b.listen_addr)
        for i in range(6):
            await link.send(b"m%d" % i)
        # Two messages spend most of the burst, the third goes into debt: no
        # fourth is read while the clock stands still.
        await async_wait_for(
            lambda: len(rb.messages) >= 3 and b.counters["link.cpu_throttled"] >= 1,
            20,
            "three messages and the reader stopped by its CPU budget",
        )
        assert len(rb.messages) == 3
        assert b.counters["link.budget_throttled"] == 0  # not the message budget

        def advanced() -> bool:
            clock.t += 10.0  # repays any debt a message can make
            return len(rb.messages) >= 6

        await async_wait_for(advanced, 20, "the rest once the debt is repaid")
        assert rb.messages == [b"m%d" % i for i in range(6)]  # delayed, never dropped
        assert a.links[b.node_id].close_reason is None
    finally:
        await a.stop()
        await b.stop()


class CountingBytes(bytes):
    """Bytes that count how often the scanner looks at them."""

    reads = 0

    def __getitem__(self, i):  # type: ignore[override]
        type(self).reads += 1
        return super().__getitem__(i)


def test_scan_of_scalar_runs_takes_one_step_per_array_not_per_element():
    # Counted, not timed: a run of one-byte values is checked in one pass, so the
    # scanner's steps do not grow with the number of integers.
    limits = strictpack.Limits(max_items=20_000, max_container=20_000)
    data = CountingBytes(strictpack.pack([[1] * 4000 for _ in range(4)]))
    CountingBytes.reads = 0
    strictpack.scan(data, limits)
    assert CountingBytes.reads < 20
    assert strictpack.unpack(data, limits) == [[1] * 4000 for _ in range(4)]
    # Anything else in the run takes the element-by-element path, and still scans.
    mixed = CountingBytes(strictpack.pack([1] * 3999 + ["s"]))
    CountingBytes.reads = 0
    strictpack.scan(mixed, limits)
    assert CountingBytes.reads > 3999


@settings(max_examples=150, deadline=None)
@given(
    obj=st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.text(max_size=20),
            st.binary(max_size=20),
        ),
        lambda inner: (
            st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
        ),
        max_leaves=200,
    ),
    cut=st.integers(0, 10_000),
)
def test_scan_accepts_exactly_whole_values(obj, cut):
    data = strictpack.pack(obj)
    assert strictpack.unpack(data) == obj
    if cut < len(data):
        with pytest.raises(DecodeError):
            strictpack.unpack(data[:cut])


# --- a graylisted peer's gossip, against a real daemon -----------------------------------

JUNK_CONTROLS = 40


def _graylisting_count(c: GossipConfig) -> int:
    """Invalid messages that take a fresh peer below the graylist threshold."""
    n = 1
    while c.invalid_weight * n * n >= c.graylist_threshold:
        n += 1
    return n


async def test_a_graylisted_peers_gossip_is_dropped_before_it_is_decoded(make_cluster):
    cluster = make_cluster(1, args=["--profile", "local"])
    victim = cluster.nodes[0]
    await asyncio.to_thread(cluster.start)
    mdir = DataDir(cluster.root / "mallory")
    mallory, cert = cluster.ca.enroll(mdir, now=time.time(), days=1)
    t = Transport(
        mallory, cert, mdir.trust_store(), TransportConfig(), Recorder(), counters=Counter()
    )
    await t.start("127.0.0.1:0")
    try:
        link = await t.connect(victim.address)
        now_ms = int(time.time() * 1000)
        junk = strictpack.pack({"z": []})  # a key no control has: signed by mallory, invalid
        for seq in range(1, JUNK_CONTROLS + 1):
            await link.send(wire.seal(mallory, MsgType.GOSSIP, seq, now_ms, junk))
        # Gossip's graylist is gossip's: mallory's membership messages are still read.
        await link.send(wire.seal(mallory, MsgType.MEMBERSHIP, JUNK_CONTROLS + 1, now_ms, b"\xc1"))

        def counters() -> dict[str, int]:
            return victim.status()["counters"]

        def all_read() -> bool:
            return counters().get("membership.decode.malformed", 0) == 1

        # A link delivers in order: once the last message is counted, so are the rest.
        await async_wait_for(
            lambda: asyncio.to_thread(
                lambda: counters().get("membership.decode.malformed", 0) == 1
            ),
            60,
            "the victim to read all of mallory's messages",
        )
        c = counters()
        metrics = await asyncio.to_thread(victim.call, "GET", "/v1/metrics")
    finally:
        await t.stop()
    charged = _graylisting_count(GossipConfig())
    # Decoded and charged until the score crossed the threshold, not one more.
    assert c["gossip.decode.bad_field"] == charged
    assert c["gossip.invalid.bad_field"] == charged
    assert c["wire.in.gossip"] == charged
    # The rest were dropped unread, and counted.
    assert c["gossip.graylisted_unread"] == JUNK_CONTROLS - charged
    assert f"spirt_gossip_graylisted_unread_total {JUNK_CONTROLS - charged}.0" in metrics
    assert c["wire.in.membership"] == 1
