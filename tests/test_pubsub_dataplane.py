"""The daemon's body data plane (spirtd.pubsub.service) with the real gossip machine and
no network: the body store, staging, and a pulled body that meets a corrupt
chunk, is resumed from another source at the last verified chunk, and ends up
byte-exact on disk with mode 0600."""

from __future__ import annotations

import os
import random
import stat
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from protocol import strictpack, wire
from protocol.gossip import Announcement, GossipConfig, GossipMachine, Publish, message_id
from protocol.gossip.transfer import digest_of, stream_pieces, stream_size
from spirtd.localcluster import async_wait_for
from spirtd.pubsub.service import PubSub
from spirtd.pubsub.store import StoreLimits, _Partial
from tests.protocol_helpers import key

T = "grad"
CS = 64 * 1024


def make_pubsub(root: Path, limits: StoreLimits) -> PubSub:
    me = key("me")
    node = SimpleNamespace(
        counters=Counter(),
        data=SimpleNamespace(root=root),
        key=me,
        transport=SimpleNamespace(links={}, gates=[]),  # nothing connected: sends are drops
        seal=lambda t, body: wire.seal(me, t, 1, int(time.time() * 1000), body),
        stream_meta=lambda kind, header: strictpack.pack([kind, header]),
    )
    ps = PubSub(node, GossipConfig(chunk_size=CS), limits)  # type: ignore[arg-type]
    ps.store.reset()
    ps.m = GossipMachine(me.node_id, ps.config, random.Random(1), time.monotonic())
    return ps


def fake_link(name: str) -> SimpleNamespace:
    k = key(name)
    return SimpleNamespace(peer_id=k.node_id, peer_key=k.public_key, peer_addr="127.0.0.1:1")


@pytest.mark.parametrize("in_memory", [True, False])
async def test_corrupt_chunk_then_resume_from_another_source(
    tmp_path: Path, in_memory: bool
) -> None:
    limits = StoreLimits(memory_body_max=(1 << 30) if in_memory else 0)
    ps = make_pubsub(tmp_path / "ps", limits)
    m = ps.m
    assert m is not None
    got = []
    ps.subscribe(T, got.append)
    a, b = fake_link("a"), fake_link("b")
    for link in (a, b):
        ps._on_link(link, True)  # type: ignore[arg-type]
    data = random.Random(5).randbytes(10 * CS + 123)
    table, digest = digest_of(data, CS)
    ann = Announcement(T, len(data), digest, CS)
    env = wire.seal(key("origin"), wire.MsgType.GOSSIP_PUBLISH, 1, 0, ann.to_obj())
    mid = message_id(env)
    t0 = time.monotonic()
    m.receive(a.peer_id, Publish(env), t0)
    m.receive(b.peer_id, Publish(env), t0)
    ps._pump()
    assert (a.peer_id, mid) in ps._expected  # the pull went to the first announcer

    # a's stream: a flipped byte in chunk 4. The first 4 chunks verify and are kept.
    stream = bytearray(b"".join(stream_pieces(table, data, CS, 0, 100_000)))
    stream[len(table) + 4 * CS + 7] ^= 1
    header = strictpack.pack([mid, 0])
    sink = ps._on_stream(a, len(stream), header)  # type: ignore[arg-type]
    assert sink is not None
    for i in range(0, len(stream), 50_000):
        await sink.write(bytes(stream[i : i + 50_000]))
    assert m.score(a.peer_id) < 0  # invalid body: penalised
    assert ps.counters["gossip.body_bad_chunk"] == 1
    # The pull moved to b, resuming at chunk 4.
    assert ps._expected.get((b.peer_id, mid), (None,))[0] == 4
    # Late bytes from a are discarded; a stream from a is no longer accepted.
    assert ps._on_stream(a, len(stream), header) is None  # type: ignore[arg-type]

    rest = b"".join(stream_pieces(table, data, CS, 4, 65_536))
    assert len(rest) == stream_size(len(data), CS, 4)
    sink2 = ps._on_stream(b, len(rest), strictpack.pack([mid, 4]))  # type: ignore[arg-type]
    assert sink2 is not None
    for i in range(0, len(rest), 30_000):
        await sink2.write(rest[i : i + 30_000])
    await sink2.finish()
    body = ps.store.get(mid)
    assert body is not None and body.read() == data
    assert body.in_memory is in_memory
    if not in_memory:
        assert body.path is not None
        assert stat.S_IMODE(os.stat(body.path).st_mode) == 0o600
    # Delivered once to the subscriber, with the verified body.
    await async_wait_for(lambda: bool(got), 30, "the delivery")
    assert [g.msg_id for g in got] == [mid]
    assert await got[0].read() == data
    assert m.counters["body_received"] == 1
    await ps.stop()
    assert not list((tmp_path / "ps" / "pubsub").iterdir())  # stopping removes stored bodies


async def test_unexpected_or_malformed_streams_are_refused(tmp_path: Path) -> None:
    ps = make_pubsub(tmp_path / "ps", StoreLimits())
    a = fake_link("a")
    ps._on_link(a, True)  # type: ignore[arg-type]
    assert ps._on_stream(a, 10, b"\xc1") is None  # type: ignore[arg-type]
    assert ps._on_stream(a, 10, strictpack.pack([bytes(20), 0])) is None  # type: ignore[arg-type]
    assert ps.counters["gossip.stream_bad_header"] == 1
    assert ps.counters["gossip.stream_unexpected"] == 1
    await ps.stop()


async def test_stage_from_bytes_file_and_chunks(tmp_path: Path) -> None:
    ps = make_pubsub(tmp_path / "ps", StoreLimits(memory_body_max=CS))
    data = random.Random(1).randbytes(3 * CS + 5)
    f = tmp_path / "payload"
    f.write_bytes(data)
    want = digest_of(data, CS)[1]
    staged = [
        await ps.stage(data),
        await ps.stage(f),
        await ps.stage((data[i : i + 1000] for i in range(0, len(data), 1000)), size=len(data)),
    ]
    assert all(s.digest == want and s.size == len(data) for s in staged)
    # Too big for memory_body_max: staged in files.
    assert all(s.partial is not None and s.partial.fd is not None for s in staged)
    with pytest.raises(ValueError, match="longer"):
        await ps.stage([data], size=len(data) - 1)
    with pytest.raises(ValueError, match="ended"):
        await ps.stage([data], size=len(data) + 1)
    with pytest.raises(ValueError, match="size"):
        await ps.stage(iter([data]))
    small = await ps.stage(b"tiny")
    assert small.data == b"tiny" and small.partial is None  # inline
    r = await ps.publish(T, staged[0], meta=b"round=1")
    assert r["digest"] == want.hex() and r["size"] == len(data)
    assert ps.store.get(bytes.fromhex(r["msg_id"])).read() == data  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already published"):
        await ps.publish(T, staged[0])
    await ps.stop()


def test_store_budgets_and_eviction(tmp_path: Path) -> None:
    ps = make_pubsub(
        tmp_path / "ps",
        StoreLimits(memory_body_max=100, memory_total=150, disk_total=1000, retain_s=10.0),
    )
    store = ps.store
    ann = Announcement(T, 100, bytes(32), 1024)
    p1, p2 = _Partial(ann), _Partial(ann)
    store.allocate(p1, 100)
    store.allocate(p2, 100)
    assert p1.mem is not None and p2.fd is not None  # the second does not fit in memory
    store.commit(b"1" * 20, p1, b"")
    store.commit(b"2" * 20, p2, b"")
    assert store.memory.used == 100 and store.disk.used == 100
    big = _Partial(Announcement(T, 950, bytes(32), 1024))
    store.allocate(big, 950)  # makes room by evicting the oldest bodies
    assert store.get(b"1" * 20) is None and store.get(b"2" * 20) is None
    assert store.evicted == 2
    store.release_partial(big)
    assert store.disk.used == 0
    store.put_memory(b"3" * 20, b"x" * 50, 1024, b"")
    assert store.expire(time.monotonic() + 11.0) == [b"3" * 20]
    with pytest.raises(OSError, match="store full"):
        store.allocate(_Partial(Announcement(T, 5000, bytes(32), 1024)), 5000)


async def test_application_validator_sees_the_signed_announcement(tmp_path: Path) -> None:
    from protocol.gossip import Verdict
    from spirtd.pubsub.service import Info

    ps = make_pubsub(tmp_path / "ps", StoreLimits())
    seen: list[Info] = []

    def check(info: Info) -> Verdict:
        seen.append(info)
        return Verdict.REJECT if info.meta == b"wrong-shape" else Verdict.IGNORE

    ps.subscribe(T, lambda msg: None, validator=check)
    a = fake_link("a")
    ps._on_link(a, True)  # type: ignore[arg-type]
    origin = key("origin")
    m = ps.m
    assert m is not None
    for seq, meta in ((1, b"closed-round"), (2, b"wrong-shape")):
        ann = Announcement(T, 10 * CS, bytes(32), CS, meta)
        env = wire.seal(origin, wire.MsgType.GOSSIP_PUBLISH, seq, 0, ann.to_obj())
        ps._on_publish_envelope(a, wire.decode(env))  # type: ignore[arg-type]
    assert [(i.origin, i.seq, i.size, i.meta) for i in seen] == [
        (origin.node_id, 1, 10 * CS, b"closed-round"),
        (origin.node_id, 2, 10 * CS, b"wrong-shape"),
    ]
    assert m.wanted() == 0  # neither is pulled
    assert ps.counters["gossip.ignored.validator"] == 1
    assert ps.counters["gossip.invalid.rejected"] == 1
    assert m.score(a.peer_id) < 0  # only the REJECT costs the sender
    await ps.stop()
