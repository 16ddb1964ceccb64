"""Releasing bodies before retain_s: the machine stops offering a released id and
answers a late pull RELEASED (no penalty, the puller asks elsewhere); the store
frees the body at once, or when a serve still streaming it ends; the trainer's
bookkeeping releases a round's bodies body_rounds after the round closes."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from protocol.errors import DecodeError
from protocol.gossip import Control, Publish, ServeBody, message_id
from protocol.gossip.messages import RefuseCode, decode_control, encode_control
from protocol.gossip.transfer import digest_of, stream_size
from spirtd.localcluster import async_wait_for
from spirtd.pubsub.retention import RoundBodies
from spirtd.pubsub.store import StoreLimits
from tests.protocol_helpers import key
from tests.test_gossip_machine import CFG, T, announce, controls, machine, sent, with_peers
from tests.test_pubsub_dataplane import CS, make_pubsub

# --- the machine ------------------------------------------------------------------------


def test_a_released_body_is_no_longer_offered_and_a_late_pull_hears_released() -> None:
    m = machine()
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    mid = m.publish(announce(key("me")), 0.0)
    sent(m)
    assert m.mcache.gossip_ids(T) == [mid]
    assert m.release_body(mid, 1.0)
    assert not m.release_body(mid, 1.0)  # once
    assert not m.holds(mid) and m.counters["bodies_released"] == 1
    assert m.mcache.gossip_ids(T) == [] and m.mcache.get(mid) is None
    m.receive(a, Control(iwant=[mid]), 1.1)
    assert not [msg for _, msg in sent(m) if isinstance(msg, Publish)]
    m.receive(a, Control(pull=[(mid, 0)]), 1.2)
    assert not [e for e in m.drain_events() if isinstance(e, ServeBody)]
    assert controls(sent(m), a).refuse == [(mid, RefuseCode.RELEASED)]
    # Remembered for seen_ttl, then a pull is just MISSING (as for any unknown id).
    t = 1.2
    while t < 1.2 + CFG.seen_ttl + 2 * CFG.heartbeat_interval:
        t += CFG.heartbeat_interval
        m.tick(t)
    assert m.status()["released"] == 0
    m.receive(a, Control(pull=[(mid, 0)]), t)
    assert controls(sent(m), a).refuse == [(mid, RefuseCode.MISSING)]


def test_the_puller_takes_released_without_penalty_and_asks_the_next_holder() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    env = announce()
    mid = message_id(env)
    m.receive(a, Publish(env), 0.0)
    m.receive(b, Publish(env), 0.0)
    assert controls(sent(m), a).pull == [(mid, 0)]
    m.receive(a, Control(refuse=[(mid, RefuseCode.RELEASED)]), 0.1)
    assert m.scores.get(a).behaviour == 0.0
    assert m.counters["pull_refused_released"] == 1
    assert controls(sent(m), b).pull == [(mid, 0)]
    # a is no longer a holder: when b refuses too, a is not asked again.
    m.receive(b, Control(refuse=[(mid, RefuseCode.RELEASED)]), 0.2)
    assert controls(sent(m), a).pull == []


def test_released_is_a_wire_refusal_code_and_others_are_still_refused() -> None:
    c = Control(refuse=[(bytes(20), RefuseCode.RELEASED)])
    assert decode_control(encode_control(c)).refuse == [(bytes(20), RefuseCode.RELEASED)]
    bad = encode_control(Control(refuse=[(bytes(20), 3)]))
    with pytest.raises(DecodeError):
        decode_control(bad)


# --- the store and the service ----------------------------------------------------------


class SlowLink:
    """A link whose stream takes one piece per ``step`` set: a serve in progress."""

    def __init__(self, name: str) -> None:
        k = key(name)
        self.peer_id, self.peer_key, self.peer_addr = k.node_id, k.public_key, "127.0.0.1:1"
        self.close_reason = None
        self.step = asyncio.Event()
        self.received = bytearray()
        self.ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def try_send(self, data: bytes) -> bool:
        return True

    async def send_stream(self, meta: bytes, total: int, chunks: Any) -> None:
        try:
            for piece in chunks:
                await self.step.wait()
                self.step.clear()
                self.received += piece
        except BaseException as e:
            self.ended.set_exception(e)
            raise
        self.ended.set_result(len(self.received))


@pytest.mark.parametrize("in_memory", [True, False])
async def test_release_frees_at_once_and_a_serve_in_progress_ends_cleanly(
    tmp_path: Path, in_memory: bool
) -> None:
    limits = StoreLimits(memory_body_max=(1 << 30) if in_memory else 0)
    ps = make_pubsub(tmp_path / "ps", limits)
    m, store = ps.m, ps.store
    assert m is not None
    link = SlowLink("a")
    ps.node.transport = SimpleNamespace(links={link.peer_id: link}, gates=[])
    ps._on_link(link, True)  # type: ignore[arg-type]
    ps.subscribe(T, lambda msg: None)
    data = random.Random(3).randbytes(6 * CS + 17)
    table, _ = digest_of(data, CS)
    sent_mid = bytes.fromhex((await ps.publish(T, data))["msg_id"])
    other = bytes.fromhex((await ps.publish(T, data[:-1]))["msg_id"])
    assert store.status()["bodies"] == 2
    used = store.memory.used if in_memory else store.disk.used
    assert used > 0

    # Nobody reads `other`: released, it is gone at once and its budget is back.
    assert ps.release([other, bytes(20)]) == 1  # an unknown id is skipped
    assert store.get(other) is None and ps.counters["pubsub.bodies_released"] == 1
    assert store.status()["released"] == 1 and store.status()["bodies"] == 1

    # `sent_mid` is being streamed to a when it is released.
    m.receive(link.peer_id, Control(pull=[(sent_mid, 0)]), 0.0)
    ps._pump()
    link.step.set()
    await async_wait_for(lambda: len(link.received) > 0, 10, "the serve to start")
    assert ps.release([sent_mid]) == 1
    assert store.get(sent_mid) is None and ps.counters["pubsub.bodies_released"] == 2
    assert store.status()["released_pending"] == 1  # still read by the serve
    assert not m.holds(sent_mid)
    # The serve goes on to the end, byte-exact, reading memory (or a file) that was
    # not freed under it.
    async with asyncio.timeout(10):
        while not link.ended.done():
            link.step.set()
            await asyncio.sleep(0)
    assert link.ended.result() == len(table) + len(data)
    assert bytes(link.received) == table + data
    assert len(link.received) == stream_size(len(data), CS, 0)
    await async_wait_for(lambda: not ps._serves, 10, "the serve to end")
    assert ps.counters["gossip.bodies_served"] == 1
    st = store.status()
    assert st["released_pending"] == 0 and st["memory_bytes"] == 0 and st["disk_bytes"] == 0
    assert not list(store.root.iterdir())  # its file is gone too
    # A later pull is told RELEASED and nothing is served.
    m.receive(link.peer_id, Control(pull=[(sent_mid, 0)]), 0.1)
    ps._pump()
    assert not ps._serves and m.counters["pull_answered_released"] == 1
    await ps.stop()


# --- the trainer's bookkeeping ----------------------------------------------------------


def test_round_bodies_release_rounds_keep_behind_the_closed_one() -> None:
    released: list[bytes] = []

    def release(ids: Any) -> int:
        ids = list(ids)
        released.extend(ids)
        return len(ids)

    rb = RoundBodies(release, keep=3, max_rounds=6)
    for r in range(1, 6):
        for p in (b"a", b"b"):
            rb.add(r, p + bytes([r]))
    assert rb.closed(3) == 0 and not released  # nothing is 3 rounds behind round 3
    assert rb.closed(5) == 4 and released == [b"a\x01", b"b\x01", b"a\x02", b"b\x02"]
    assert rb.rounds() == [3, 4, 5] and len(rb) == 6
    # A sync jumps ahead: every skipped round older than the cut goes.
    assert rb.closed(40) == 6 and rb.rounds() == [] and len(rb) == 0
    # Bounded even when no round closes: the oldest tracked round is let go.
    released.clear()
    for r in range(100, 108):
        rb.add(r, bytes([r]))
    assert released == [bytes([100]), bytes([101])] and len(rb.rounds()) == 6
    with pytest.raises(ValueError):
        RoundBodies(release, keep=0)
