"""The gossip machine, one behaviour at a time, driven by hand (no simulator)."""

from __future__ import annotations

import random

import pytest

from protocol import wire
from protocol.gossip import (
    Announcement,
    BodyDropped,
    Control,
    Delivered,
    GossipConfig,
    GossipMachine,
    PeerExchange,
    Prune,
    Publish,
    PullEnded,
    PullStarted,
    ServeBody,
    StopServe,
    Verdict,
    message_id,
)
from protocol.gossip.mcache import MessageCache
from protocol.gossip.messages import RefuseCode
from protocol.gossip.score import Scoreboard
from protocol.gossip.seen import SeenCache, SeqWindows
from protocol.gossip.transfer import digest_of
from protocol.identity import NodeKey
from tests.protocol_helpers import key

T = "grad"
CFG = GossipConfig.fast(chunk_size=1024, inline_max=0)
ORIGIN = key("origin")


def machine(name: str = "me", config: GossipConfig = CFG, **kw: object) -> GossipMachine:
    return GossipMachine(key(name).node_id, config, random.Random(1), 0.0, **kw)  # type: ignore[arg-type]


def peer(name: str) -> str:
    return key(name).node_id


def announce(
    k: NodeKey = ORIGIN, seq: int = 1, size: int = 4000, ts_ms: int = 0, topic: str = T
) -> bytes:
    data = random.Random(seq).randbytes(size)
    _, digest = digest_of(data, CFG.chunk_size)
    ann = Announcement(topic, size, digest, CFG.chunk_size)
    return wire.seal(k, wire.MsgType.GOSSIP_PUBLISH, seq, ts_ms, ann.to_obj())


def with_peers(m: GossipMachine, *names: str, subscribed: bool = True) -> list[str]:
    ids = [peer(n) for n in names]
    for p in ids:
        m.add_peer(p, 0.0, f"127.0.0.1:{len(p)}")
        if subscribed:
            m.receive(p, Control(subs=[(T, True)]), 0.0)
    return ids


def sent(m: GossipMachine) -> list[tuple[str, object]]:
    return [(o.peer_id, o.message) for o in m.drain_outgoing()]


def publishes_to(out: list[tuple[str, object]]) -> set[str]:
    return {p for p, msg in out if isinstance(msg, Publish)}


def controls(out: list[tuple[str, object]], p: str) -> Control:
    merged = Control()
    for q, msg in out:
        if q == p and isinstance(msg, Control):
            for f in ("subs", "graft", "prune", "ihave", "iwant", "pull", "refuse", "cancel"):
                getattr(merged, f).extend(getattr(msg, f))
    return merged


# --- the small parts ------------------------------------------------------------------


def test_seen_cache_ttl_and_bound() -> None:
    s = SeenCache(ttl=10.0, max_entries=3)
    assert s.add(b"a", 0.0) and not s.add(b"a", 1.0)
    s.add(b"b", 1.0, 2)
    assert s.get(b"b") == 2
    assert s.expire(10.5) == [b"a"] and b"b" in s
    s.add(b"c", 2.0)
    s.add(b"d", 3.0)
    s.add(b"e", 4.0)  # over the bound: the oldest goes early
    assert b"b" not in s and s.evicted == 1 and len(s) == 3


def test_seq_window_rejects_replays_and_too_old() -> None:
    w = SeqWindows(window=4, max_origins=2, max_per_peer=3, idle_evict=100.0)
    o = b"o" * 32
    for seq in (10, 12, 11):  # reordering inside the window is fine
        assert w.check(o, seq)
        w.accept(o, seq, 0.0)
    assert not w.check(o, 11)  # replay
    w.accept(o, 20, 0.0)
    w.accept(o, 21, 0.0)  # window now 11,12,20,21
    assert not w.check(o, 10) and not w.check(o, 11) and not w.check(o, 5)  # too old
    assert w.check(o, 15) and w.check(o, 22)
    w.accept(b"p" * 32, 1, 0.0)
    # Full of active origins: a third gets no room rather than evicting one...
    assert w.room(b"q" * 32, "", 50.0) == "origins_full" and w.origins() == 2
    # ...until the least recently active has been silent past idle_evict.
    assert w.room(b"q" * 32, "", 100.0) is None
    assert w.evicted == 1 and w.origins() == 1 and w.check(o, 11)


def test_mcache_windows_and_iwant_limit() -> None:
    mc = MessageCache(history=3, gossip=2)
    mc.put(b"1", "a", b"env1")
    mc.shift()
    mc.put(b"2", "a", b"env2")
    mc.put(b"3", "b", b"env3")
    assert mc.gossip_ids("a") == [b"2", b"1"]
    mc.shift()
    assert mc.gossip_ids("a") == [b"2"]  # b"1" is too old to advertise ...
    assert mc.get(b"1") == b"env1"  # ... but still answerable
    assert mc.get_for_iwant(b"2", "p", limit=2) == b"env2"
    assert mc.get_for_iwant(b"2", "p", limit=2) == b"env2"
    assert mc.get_for_iwant(b"2", "p", limit=2) is None
    mc.shift()
    assert b"1" not in mc and b"2" in mc


def test_score_thresholds_and_decay() -> None:
    sb = Scoreboard(CFG)
    sb.invalid("p")
    assert CFG.graylist_threshold < sb.score("p") < 0
    sb.invalid("p")
    sb.invalid("p")
    assert sb.score("p") < CFG.graylist_threshold
    for _ in range(3):
        sb.broken_promise("q")
    assert sb.score("q") < 0  # over the forgiven threshold
    sb.first_delivery("r")
    assert sb.score("r") > 0
    for _ in range(1000):
        sb.heartbeat(0.0)
    assert sb.score("p") == 0.0 and sb.score("q") == 0.0


# --- publishing and receiving ---------------------------------------------------------


def test_own_message_is_flood_published_and_not_delivered_to_self() -> None:
    m = machine()
    ps = with_peers(m, "a", "b", "c")
    m.add_peer(peer("nosub"), 0.0)
    m.subscribe(T, 0.0)
    sent(m)
    env = announce(key("me"))
    mid = m.publish(env, 0.0)
    out = sent(m)
    assert publishes_to(out) == set(ps)  # every subscriber, not just the mesh
    assert not [e for e in m.drain_events() if isinstance(e, Delivered)]
    assert m.holds(mid)


def test_valid_message_is_pulled_then_delivered_and_forwarded() -> None:
    m = machine()
    a, b, c = with_peers(m, "a", "b", "c")
    m.subscribe(T, 0.0)
    sent(m)
    env = announce()
    m.receive(a, Publish(env), 0.1)
    mid = message_id(env)
    out = sent(m)
    assert publishes_to(out) == set()  # nothing forwarded before the body is held
    assert controls(out, a).pull == [(mid, 0)]
    evs = m.drain_events()
    assert next(e for e in evs if isinstance(e, PullStarted)).peer_id == a
    m.receive(b, Publish(env), 0.2)  # a second announcer: a source, not a second pull
    assert controls(sent(m), b).pull == []
    assert m.body_received(a, mid, 0.3)
    out = sent(m)
    # Forwarded to the mesh, except to those known to hold it already.
    assert publishes_to(out) == {c} & m.mesh.meshes[T]
    assert next(e for e in m.drain_events() if isinstance(e, Delivered)).source == a


def test_inline_payload_is_delivered_without_a_pull() -> None:
    cfg = GossipConfig.fast()
    m = machine(config=cfg)
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    data = b"small gradient"
    _, digest = digest_of(data, cfg.chunk_size)
    ann = Announcement(T, len(data), digest, cfg.chunk_size, b"", data)
    env = wire.seal(ORIGIN, wire.MsgType.GOSSIP_PUBLISH, 1, 0, ann.to_obj())
    m.receive(a, Publish(env), 0.1)
    d = [e for e in m.drain_events() if isinstance(e, Delivered)]
    assert d and d[0].announcement.inline == data
    # An inline payload that does not match its digest is invalid.
    bad = Announcement(T, 5, digest, cfg.chunk_size, b"", b"wrong")
    m.receive(a, Publish(wire.seal(ORIGIN, wire.MsgType.GOSSIP_PUBLISH, 2, 0, bad.to_obj())), 0.2)
    assert m.counters["invalid.inline_digest"] == 1 and m.score(a) < 0


def test_validator_reject_penalises_every_sender_and_nothing_moves() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0, validator=lambda ann, env: Verdict.REJECT)
    sent(m)
    env = announce()
    m.receive(a, Publish(env), 0.1)
    m.receive(b, Publish(env), 0.2)  # relaying a known-invalid message is invalid too
    out = sent(m)
    assert publishes_to(out) == set() and not any(controls(out, p).pull for p in (a, b))
    assert m.score(a) < 0 and m.score(b) < 0
    assert m.counters["invalid.rejected"] == 1


def test_validator_ignore_drops_without_penalty() -> None:
    m = machine()
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0, validator=lambda ann, env: Verdict.IGNORE)
    m.receive(a, Publish(announce()), 0.1)
    assert m.score(a) >= 0 and m.wanted() == 0
    assert m.counters["ignored.validator"] == 1


def test_stale_timestamp_is_ignored_when_a_wall_clock_is_given() -> None:
    m = machine(wall_offset=1_800_000_000.0)
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    old = announce(seq=1, ts_ms=(1_800_000_000 - 3600) * 1000)
    fresh = announce(seq=2, ts_ms=1_800_000_000 * 1000)
    m.receive(a, Publish(old), 0.0)
    m.receive(a, Publish(fresh), 0.0)
    assert m.counters["ignored.stale"] == 1 and m.counters["accepted"] == 1
    assert m.score(a) >= 0


def test_unknown_and_graylisted_senders_are_ignored() -> None:
    m = machine()
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    m.receive(peer("stranger"), Publish(announce()), 0.0)
    assert m.counters["from_unknown_peer"] == 1
    bad = announce(seq=5)
    for _ in range(3):
        m.receive(a, Publish(bad[:-1] + bytes([bad[-1] ^ 1])), 0.0)
    m.receive(a, Publish(announce(seq=6)), 0.0)
    assert m.counters["graylisted_dropped"] == 1 and m.counters["accepted"] == 0


# --- pulls ------------------------------------------------------------------------------


def test_stalled_pull_is_cancelled_and_resumed_from_the_next_source() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    env = announce()
    mid = message_id(env)
    m.receive(a, Publish(env), 0.0)
    m.receive(b, Publish(env), 0.0)
    sent(m)
    m.drain_events()
    m.body_progress(a, mid, 2, 1.0)
    assert m.next_deadline() <= 1.0 + CFG.pull_timeout
    m.tick(1.0 + CFG.pull_timeout + 0.01)
    out = sent(m)
    assert controls(out, a).cancel == [mid]
    assert controls(out, b).pull == [(mid, 2)]  # resumes after the verified chunks
    evs = m.drain_events()
    assert any(isinstance(e, PullEnded) and e.peer_id == a for e in evs)
    assert m.scores.get(a).behaviour == pytest.approx(1.0, rel=0.1)  # decays per heartbeat
    assert m.counters["pull_timeout"] == 1


def test_refusals_busy_is_free_missing_is_a_broken_promise() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    env = announce()
    mid = message_id(env)
    m.receive(a, Publish(env), 0.0)
    m.receive(b, Publish(env), 0.0)
    sent(m)
    m.receive(a, Control(refuse=[(mid, RefuseCode.BUSY)]), 0.1)
    assert controls(sent(m), b).pull == [(mid, 0)]
    assert m.scores.get(a).behaviour == 0.0
    m.receive(b, Control(refuse=[(mid, RefuseCode.MISSING)]), 0.2)
    assert m.scores.get(b).behaviour == 1.0
    assert controls(sent(m), a).pull == [(mid, 0)]  # busy a is tried again


def test_bad_body_is_invalid_and_the_stream_is_cancelled() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    env = announce()
    mid = message_id(env)
    m.receive(a, Publish(env), 0.0)
    m.receive(b, Publish(env), 0.0)
    sent(m)
    m.body_failed(a, mid, "bad_chunk", 0.5)
    out = sent(m)
    assert controls(out, a).cancel == [mid] and controls(out, b).pull == [(mid, 0)]
    assert m.score(a) < 0
    m.body_failed(b, mid, "aborted", 0.6)  # a broken link is not the peer's fault
    assert m.score(b) >= 0


def test_a_body_nobody_can_serve_is_given_up() -> None:
    m = machine(config=GossipConfig.fast(chunk_size=1024, inline_max=0, max_pull_attempts=2))
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    env = announce()
    mid = message_id(env)
    m.receive(a, Publish(env), 0.0)
    m.receive(b, Publish(env), 0.0)
    # Two stalls use up the attempts: the body is given up at once.
    m.tick(CFG.pull_timeout + 0.1)
    m.tick(2 * CFG.pull_timeout + 0.2)
    assert any(
        isinstance(e, BodyDropped) and e.reason == "attempts_exhausted" and e.msg_id == mid
        for e in m.drain_events()
    )
    assert m.wanted() == 0
    # A sole holder that turns out not to have it leaves the body waiting for a new
    # holder (an IHAVE or announcement), until the seen TTL gives it up.
    m2 = machine()
    (c,) = with_peers(m2, "c")
    m2.subscribe(T, 0.0)
    env2 = announce(seq=2)
    m2.receive(c, Publish(env2), 0.0)
    m2.receive(c, Control(refuse=[(message_id(env2), RefuseCode.MISSING)]), 0.1)
    assert m2.wanted() == 1 and not controls(sent(m2), c).pull[1:]
    t = 0.0
    while t < CFG.seen_ttl + 1.0:
        t += CFG.heartbeat_interval
        m2.tick(t)
    assert any(isinstance(e, BodyDropped) and e.reason == "expired" for e in m2.drain_events())
    assert m2.wanted() == 0


def test_serving_respects_caps_and_cancels() -> None:
    cfg = GossipConfig.fast(chunk_size=1024, inline_max=0, max_serves_per_peer=1)
    m = machine(config=cfg)
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    mids = [m.publish(announce(key("me"), seq=s), 0.0) for s in (1, 2)]
    m.drain_events()
    m.receive(a, Control(pull=[(mids[0], 0), (mids[1], 0)]), 0.1)
    evs = m.drain_events()
    assert [e.msg_id for e in evs if isinstance(e, ServeBody)] == [mids[0]]
    assert controls(sent(m), a).refuse == [(mids[1], RefuseCode.BUSY)]
    m.receive(a, Control(cancel=[mids[0]]), 0.2)
    assert [e for e in m.drain_events() if isinstance(e, StopServe)]
    m.serve_done(a, mids[0])
    m.receive(a, Control(pull=[(mids[1], 0), (bytes(20), 0)]), 0.3)
    assert [e.msg_id for e in m.drain_events() if isinstance(e, ServeBody)] == [mids[1]]
    assert controls(sent(m), a).refuse == [(bytes(20), RefuseCode.MISSING)]


# --- lazy gossip and the mesh -----------------------------------------------------------


def test_ihave_leads_to_one_iwant_and_an_unkept_promise_is_penalised() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    sent(m)
    mid = bytes(range(20))
    m.receive(a, Control(ihave=[(T, [mid])]), 0.0)
    m.receive(b, Control(ihave=[(T, [mid])]), 0.0)
    out = sent(m)
    assert controls(out, a).iwant == [mid] and controls(out, b).iwant == []
    t = 0.0
    while t < CFG.iwant_followup_time + 2 * CFG.heartbeat_interval:
        t += CFG.heartbeat_interval
        m.tick(t)
    assert m.counters["iwant_broken"] == 1
    assert m.scores.get(a).behaviour == pytest.approx(1.0, rel=0.1)
    assert m.scores.get(b).behaviour == 0.0


def test_iwant_is_answered_from_the_cache() -> None:
    m = machine()
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    env = announce(key("me"))
    mid = m.publish(env, 0.0)
    sent(m)
    m.receive(a, Control(iwant=[mid, bytes(20)]), 0.1)
    assert [msg.wire for p, msg in sent(m) if isinstance(msg, Publish)] == [env]


def test_heartbeat_keeps_the_mesh_between_d_lo_and_d_hi_and_gossips() -> None:
    m = machine()
    ps = with_peers(m, *[f"p{i}" for i in range(20)])
    m.subscribe(T, 0.0)
    assert CFG.d_lo <= len(m.mesh.meshes[T]) <= CFG.d
    for p in ps:
        m.receive(p, Control(graft=[T]), 0.1)  # everyone grafts us
    assert len(m.mesh.meshes[T]) == CFG.d_hi  # GRAFTs past D_hi are answered with PRUNE
    refused = [p for p in ps if p not in m.mesh.meshes[T]]
    assert all(controls(sent(m), p).prune for p in refused[:1])
    m.mesh.meshes[T].update(ps[:15])  # over D_hi (as after a burst of accepted GRAFTs)
    m.publish(announce(key("me")), 0.1)
    sent(m)
    m.tick(CFG.heartbeat_interval)
    assert len(m.mesh.meshes[T]) == CFG.d  # trimmed to D
    out = sent(m)
    ihave_to = {p for p in ps if controls(out, p).ihave}
    assert ihave_to and not ihave_to & m.mesh.meshes[T]


def test_graft_during_backoff_is_penalised_and_refused() -> None:
    m = machine()
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    m.receive(a, Control(prune=[Prune(T, 60)]), 0.0)
    assert a not in m.mesh.meshes[T]
    sent(m)
    m.receive(a, Control(graft=[T]), 0.5)
    assert a not in m.mesh.meshes[T]
    assert controls(sent(m), a).prune
    assert m.counters["graft_in_backoff"] == 1
    assert m.scores.get(a).behaviour == 2.0  # in backoff, and right after the prune


def test_peer_exchange_only_from_well_scored_peers() -> None:
    m = machine()
    a, b = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    px = (("12D3KooWnew", "127.0.0.1:9"),)
    m.receive(a, Control(prune=[Prune(T, 5, px)]), 0.0)
    assert not [e for e in m.drain_events() if isinstance(e, PeerExchange)]
    for _ in range(10):
        m.scores.first_delivery(b)
    m.receive(b, Control(prune=[Prune(T, 5, px)]), 0.0)
    assert [e.peers for e in m.drain_events() if isinstance(e, PeerExchange)] == [px]


def test_negative_peers_are_pruned_at_the_next_heartbeat() -> None:
    m = machine()
    ps = with_peers(m, *[f"p{i}" for i in range(6)])
    m.subscribe(T, 0.0)
    victim = sorted(m.mesh.meshes[T])[0]
    m.receive(victim, Publish(b"\x00" * 100), 0.1)  # garbage: invalid
    assert victim in m.mesh.meshes[T]
    sent(m)
    m.tick(CFG.heartbeat_interval)
    assert victim not in m.mesh.meshes[T]
    assert controls(sent(m), victim).prune
    assert len(ps) == 6


def test_a_replacing_link_carries_our_subscriptions_again() -> None:
    # What was in flight on the replaced link is lost, our one SUBSCRIBE maybe too.
    m = machine()
    (a,) = with_peers(m, "a")
    m.subscribe(T, 0.0)
    sent(m)
    m.add_peer(a, 1.0, "127.0.0.1:1")  # the new link comes up before the old one closes
    assert controls(sent(m), a).subs == [(T, True)]
    assert m.status()["peers"] == 1


def test_unsubscribe_prunes_the_mesh_and_tells_everyone() -> None:
    m = machine()
    ps = with_peers(m, "a", "b")
    m.subscribe(T, 0.0)
    mesh = set(m.mesh.meshes[T])
    sent(m)
    m.unsubscribe(T, 1.0)
    out = sent(m)
    for p in ps:
        assert (T, False) in controls(out, p).subs
        assert bool(controls(out, p).prune) == (p in mesh)
    m.receive(ps[0], Publish(announce()), 1.1)
    assert m.counters["ignored.not_subscribed"] == 1
