"""The membership machine, driven by hand: a few machines, instant delivery, time
moved explicitly. Scale and randomised faults are in tests/test_sim_membership.py."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from protocol.membership import (
    Ack,
    Alive,
    Dead,
    EventKind,
    Gossip,
    Left,
    MemberEvent,
    Membership,
    MemberState,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    lan,
    record_bytes,
)
from protocol.membership.config import MembershipConfig
from protocol.sim.signing import SimKeys

KEYS = SimKeys(b"machine-tests")
CFG = lan()


def addr(name: str, gen: int = 0) -> str:
    return f"127.0.{gen}.{1 + int(name[1:])}:7946"


def sign(u, signer_id: str):  # type: ignore[no-untyped-def]
    """A record as ``signer_id`` would sign it."""
    sig = KEYS.signer(signer_id)(record_bytes(u))
    if isinstance(u, Alive):
        return Alive(u.node_id, u.addr, u.incarnation, sig)
    if isinstance(u, Left):
        return Left(u.node_id, u.incarnation, sig)
    return type(u)(u.node_id, u.incarnation, u.from_id, sig)


class Net:
    """Instant, lossless delivery between machines; ``down`` ones hear nothing."""

    def __init__(self, config: MembershipConfig = CFG) -> None:
        self.config = config
        self.m: dict[str, Membership] = {}
        self.by_addr: dict[str, str] = {}
        self.down: set[str] = set()
        self.events: dict[str, list[MemberEvent]] = {}
        self.now = 0.0
        self.log: list[tuple[str, str, object]] = []
        self.filter: Callable[[str, str, object], bool] | None = None

    def add(self, name: str, *, gen: int = 0, incarnation: int = 0) -> Membership:
        m = Membership(
            name,
            addr(name, gen),
            self.config,
            random.Random(f"{name}/{gen}"),
            self.now,
            incarnation,
            record_signer=KEYS.signer(name),
            record_verifier=KEYS.verifier(),
        )
        self.m[name] = m
        self.by_addr[m.addr] = name
        self.events.setdefault(name, [])
        return m

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            for name, m in list(self.m.items()):
                self.events[name].extend(m.drain_events())
                for out in m.drain_outgoing():
                    moved = True
                    dst = self.by_addr.get(out.addr)
                    if dst is None or dst in self.down or name in self.down:
                        continue
                    if out.node_id is not None and out.node_id != dst:
                        continue
                    if self.filter is not None and not self.filter(name, dst, out.message):
                        continue
                    self.log.append((name, dst, out.message))
                    self.m[dst].receive(name, m.addr, out.message, self.now)
            if not moved:
                return
        raise AssertionError("messages kept flowing")

    def run(self, until: float, step: float = 0.05) -> None:
        while self.now < until:
            self.now = min(until, self.now + step)
            for name, m in self.m.items():
                if name not in self.down:
                    m.tick(self.now)
            self.pump()

    def kinds(self, name: str, subject: str) -> list[EventKind]:
        return [e.kind for e in self.events[name] if e.node_id == subject]


def cluster(*names: str, config: MembershipConfig = CFG) -> Net:
    net = Net(config)
    first = net.add(names[0])
    first.join([], 0.0)
    for n in names[1:]:
        net.add(n).join([first.addr], 0.0)
    net.pump()
    net.run(3.0)
    return net


def state(net: Net, observer: str, subject: str) -> MemberState | None:
    mem = net.m[observer].member(subject)
    return None if mem is None else mem.state


# --- joining ------------------------------------------------------------------------------


def test_two_nodes_join_through_an_address() -> None:
    net = Net()
    a = net.add("n1")
    b = net.add("n2")
    a.join([], 0.0)
    b.join([a.addr, b.addr], 0.0)  # its own address among the seeds is skipped
    assert not b.joined
    net.pump()
    assert b.joined and a.joined
    assert state(net, "n1", "n2") is MemberState.ALIVE
    assert state(net, "n2", "n1") is MemberState.ALIVE
    assert net.kinds("n1", "n2") == [EventKind.JOINED]
    # The first message went to an address only: no node id was known.
    first = next(m for m in net.log if m[0] == "n2")
    assert isinstance(first[2], PushPull) and first[2].join


def test_join_through_any_member_reaches_everyone() -> None:
    net = cluster("n1", "n2", "n3")
    c = net.add("n4")
    c.join([net.m["n3"].addr], net.now)
    net.run(net.now + 3.0)
    for o in ("n1", "n2", "n3", "n4"):
        assert net.m[o].count(MemberState.ALIVE) == 4, o


def test_join_is_retried_until_a_seed_answers() -> None:
    net = Net()
    a = net.add("n1")
    a.join([], 0.0)
    b = net.add("n2")
    net.down.add("n1")
    b.join([a.addr], 0.0)
    net.run(CFG.join_retry_interval * 2.5)
    attempts = sum(1 for m in net.log if m[0] == "n2")
    assert attempts == 0 and not b.joined  # all lost while n1 was down
    net.down.discard("n1")
    net.run(net.now + CFG.join_retry_interval + 0.1)
    assert b.joined and state(net, "n1", "n2") is MemberState.ALIVE


# --- probing ------------------------------------------------------------------------------


def test_healthy_probes_raise_no_suspicion() -> None:
    net = cluster("n1", "n2", "n3")
    net.run(net.now + 20.0)
    for m in net.m.values():
        assert m.count(MemberState.ALIVE) == 3
        assert m.awareness == 0
        assert m.counters["probe_failed"] == 0
    pings = [x for x in net.log if isinstance(x[2], Ping)]
    acks = [x for x in net.log if isinstance(x[2], Ack)]
    assert len(pings) >= 3 * 15 and len(acks) == len(pings)


def test_a_dead_target_is_pinged_indirectly_then_suspected_then_dead() -> None:
    net = cluster("n1", "n2", "n3", "n4")
    net.down.add("n4")
    # Round-robin over three others: each reaches n4 within three intervals, plus the
    # interval that its probe of n4 lasts.
    net.run(net.now + 4 * CFG.probe_interval + 0.1)
    reqs = [x for x in net.log if isinstance(x[2], PingReq) and x[2].target_id == "n4"]
    nacks = [x for x in net.log if isinstance(x[2], Nack)]
    assert reqs, "no indirect probe"
    assert nacks, "relays did not nack"
    for o in ("n1", "n2", "n3"):
        assert state(net, o, "n4") is MemberState.SUSPECT
        # Every relay answered with a nack: the prober is healthy, the target is not.
        assert net.m[o].awareness == 0
    net.run(net.now + CFG.suspicion_max_timeout(4) + 1)
    for o in ("n1", "n2", "n3"):
        assert state(net, o, "n4") is MemberState.DEAD
        assert net.kinds(o, "n4")[-2:] == [EventKind.SUSPECT, EventKind.DEAD]


def test_missing_nacks_raise_awareness_and_stretch_probing() -> None:
    net = cluster("n1", "n2", "n3", "n4")
    # n1 can still send but hears nothing back: it is the sick one.
    net.filter = lambda src, dst, msg: dst != "n1"
    net.run(net.now + 6 * CFG.probe_interval)
    m = net.m["n1"]
    assert m.awareness >= 2
    t0 = net.now
    before = sum(1 for x in net.log if x[0] == "n1" and isinstance(x[2], Ping))
    net.run(t0 + 10 * CFG.probe_interval)
    after = sum(1 for x in net.log if x[0] == "n1" and isinstance(x[2], Ping))
    # Healthy: ~10 probes in 10 intervals; stretched by (score + 1) >= 3: far fewer.
    assert after - before <= 5


def test_a_stalled_prober_accuses_nobody() -> None:
    net = cluster("n1", "n2")
    m = net.m["n1"]
    net.down.add("n2")  # n2's ack will not come...
    deadline = m.next_deadline()
    assert deadline is not None
    # ...but n1 itself was frozen far past its probe deadlines (a GC pause).
    m.tick(deadline)
    net.pump()
    late = net.now + 10.0
    net.now = late
    m.tick(late)
    net.pump()
    assert m.counters["probe_stalled"] >= 1
    assert state(net, "n1", "n2") is MemberState.ALIVE
    assert m.awareness >= 1


def test_ping_for_another_identity_gets_no_ack() -> None:
    net = cluster("n1", "n2")
    net.m["n2"].receive("n1", addr("n1"), Ping(77, "n9"), net.now)
    net.pump()
    assert net.m["n2"].counters["ping_wrong_target"] == 1
    assert not any(isinstance(x[2], Ack) and x[2].seq == 77 for x in net.log)


def test_ack_from_a_stranger_does_not_complete_a_probe() -> None:
    net = cluster("n1", "n2", "n3")
    m = net.m["n1"]
    ping = None
    t = net.now
    for _ in range(100):
        t = m.next_deadline() or t
        m.tick(t)
        pings = [o.message for o in m.drain_outgoing() if isinstance(o.message, Ping)]
        if pings:
            ping = pings[0]
            break
    assert ping is not None
    target = ping.target_id
    other = "n3" if target == "n2" else "n2"
    m.receive(other, addr(other), Ack(ping.seq), t)
    assert m.counters["ack_wrong_sender"] == 1
    m.receive(target, addr(target), Ack(ping.seq), t)
    assert m.counters["ack_unmatched"] == 0
    m.receive(target, addr(target), Ack(ping.seq), t)  # the probe is over: a late duplicate
    assert m.counters["ack_unmatched"] == 1


def test_relays_are_bounded() -> None:
    net = cluster("n1", "n2", "n3", config=CFG.with_overrides(max_pending_relays=1))
    m = net.m["n2"]
    m.receive("n1", addr("n1"), PingReq(1, "n3", addr("n3")), net.now)
    m.receive("n1", addr("n1"), PingReq(2, "n3", addr("n3")), net.now)
    assert m.counters["relay_limit"] == 1
    m.receive("n1", addr("n1"), PingReq(3, "n2", addr("n2")), net.now)
    assert m.counters["ping_req_bad_target"] == 1


# --- suspicion and refutation -------------------------------------------------------------


def test_a_suspected_node_refutes_with_a_higher_incarnation() -> None:
    net = cluster("n1", "n2", "n3")
    claim = sign(Suspect("n2", 0, "n1"), "n1")
    net.m["n3"].receive("n1", addr("n1"), Gossip((claim,)), net.now)
    assert state(net, "n3", "n2") is MemberState.SUSPECT
    net.run(net.now + 2.0)
    b = net.m["n2"]
    assert b.incarnation == 1 and b.counters["refuted"] == 1
    assert b.awareness >= 0
    for o in ("n1", "n3"):
        mem = net.m[o].member("n2")
        assert mem is not None and mem.state is MemberState.ALIVE and mem.incarnation == 1
    assert net.kinds("n3", "n2")[-2:] == [EventKind.SUSPECT, EventKind.ALIVE]


def test_suspicion_timer_shrinks_with_independent_confirmations() -> None:
    names = [f"n{i}" for i in range(1, 8)]
    net = cluster(*names)
    m = net.m["n1"]
    t0 = net.now
    n = m.live_count()
    lo, hi = CFG.suspicion_min_timeout(n), CFG.suspicion_max_timeout(n)
    # Nobody delivers anything from now on: only what we hand n1 counts.
    net.down.update(names[1:])
    m.receive("n2", addr("n2"), Gossip((sign(Suspect("n7", 0, "n2"), "n2"),)), t0)
    assert state(net, "n1", "n7") is MemberState.SUSPECT
    assert m.next_deadline() is not None
    # The same accuser again is no confirmation; two others are.
    m.receive("n2", addr("n2"), Gossip((sign(Suspect("n7", 0, "n2"), "n2"),)), t0)
    m.receive("n3", addr("n3"), Gossip((sign(Suspect("n7", 0, "n3"), "n3"),)), t0)
    m.receive("n4", addr("n4"), Gossip((sign(Suspect("n7", 0, "n4"), "n4"),)), t0)
    # k = 2 confirmations: the minimum applies.
    m.tick(t0 + lo - 0.01)
    assert state(net, "n1", "n7") is MemberState.SUSPECT
    m.tick(t0 + lo + 0.01)
    assert state(net, "n1", "n7") is MemberState.DEAD
    assert lo < hi


def test_dead_is_final_until_the_node_itself_says_otherwise() -> None:
    net = cluster("n1", "n2", "n3")
    m = net.m["n1"]
    m.receive("n3", addr("n3"), Gossip((sign(Dead("n2", 0, "n3"), "n3"),)), net.now)
    assert state(net, "n1", "n2") is MemberState.DEAD
    # A stale alive (same incarnation), relayed by anyone, changes nothing.
    m.receive("n3", addr("n3"), Gossip((sign(Alive("n2", addr("n2"), 0), "n2"),)), net.now)
    assert state(net, "n1", "n2") is MemberState.DEAD
    m.receive("n3", addr("n3"), Gossip((sign(Alive("n2", addr("n2"), 1), "n2"),)), net.now)
    assert state(net, "n1", "n2") is MemberState.ALIVE


# --- signatures ---------------------------------------------------------------------------


def test_a_lying_member_cannot_move_or_kill_another_node() -> None:
    net = cluster("n1", "n2", "n3")
    m = net.m["n1"]
    liar = "n3"
    forged = [
        sign(Alive("n2", "10.6.6.6:7946", 5), liar),  # redirect n2's address
        sign(Left("n2", 0), liar),  # make n2 "leave"
        sign(Suspect("n2", 0, "n1"), liar),  # a suspicion in someone else's name
        sign(Dead("n2", 0, "n9"), liar),
        Alive("n2", "10.6.6.6:7946", 6),  # unsigned
    ]
    for u in forged:
        m.receive(liar, addr(liar), Gossip((u,)), net.now)
    mem = m.member("n2")
    assert mem is not None
    assert (mem.state, mem.addr, mem.incarnation) == (MemberState.ALIVE, addr("n2"), 0)
    assert m.counters["bad_signature"] == len(forged)


def test_a_liar_counts_once_as_a_confirmation() -> None:
    names = [f"n{i}" for i in range(1, 8)]
    net = cluster(*names)
    m = net.m["n1"]
    net.down.update(names[1:])
    t0 = net.now
    for _ in range(5):
        m.receive("n3", addr("n3"), Gossip((sign(Suspect("n7", 0, "n3"), "n3"),)), t0)
    m.tick(t0 + CFG.suspicion_min_timeout(7) + 0.1)
    assert state(net, "n1", "n7") is MemberState.SUSPECT  # not enough confirmations


def test_claims_about_unseen_incarnations_are_refused() -> None:
    net = cluster("n1", "n2", "n3")
    m = net.m["n1"]
    m.receive("n3", addr("n3"), Gossip((sign(Suspect("n2", 9, "n3"), "n3"),)), net.now)
    assert state(net, "n1", "n2") is MemberState.ALIVE
    assert m.counters["claim_ahead"] == 1
    # The same about ourselves: no incarnation jump to 10.
    net.m["n2"].receive("n3", addr("n3"), Gossip((sign(Dead("n2", 9, "n3"), "n3"),)), net.now)
    assert net.m["n2"].incarnation == 0


# --- leaving ------------------------------------------------------------------------------


def test_graceful_leave_is_seen_as_left_then_forgotten() -> None:
    cfg = CFG.with_overrides(left_tombstone_ttl=30.0)
    net = cluster("n1", "n2", "n3", "n4", config=cfg)
    net.m["n4"].leave(net.now)
    assert net.m["n4"].leaving
    net.pump()
    net.run(net.now + 1.0)
    for o in ("n1", "n2", "n3"):
        assert state(net, o, "n4") is MemberState.LEFT
        assert EventKind.DEAD not in net.kinds(o, "n4")
    assert net.m["n4"].incarnation == 0  # a leaving node refutes nothing
    net.down.add("n4")
    net.run(net.now + 31.0)
    for o in ("n1", "n2", "n3"):
        assert net.m[o].member("n4") is None
        assert net.kinds(o, "n4")[-1] is EventKind.REMOVED
        assert net.m[o].count(MemberState.ALIVE) == 3


# --- rejoin -------------------------------------------------------------------------------


def test_restart_with_same_identity_comes_back_alive_with_higher_incarnation() -> None:
    net = cluster("n1", "n2", "n3")
    net.down.add("n3")
    net.run(net.now + CFG.suspicion_max_timeout(3) + 5)
    assert state(net, "n1", "n3") is MemberState.DEAD
    net.down.discard("n3")
    fresh = net.add("n3")  # a new process, incarnation 0, empty table
    fresh.join([addr("n1")], net.now)
    net.run(net.now + 3.0)
    assert fresh.incarnation >= 1
    for o in ("n1", "n2"):
        mem = net.m[o].member("n3")
        assert mem is not None and mem.state is MemberState.ALIVE
        assert mem.incarnation == fresh.incarnation
        assert EventKind.ALIVE in net.kinds(o, "n3")


def test_rejoin_from_a_new_address_moves_the_single_entry() -> None:
    net = cluster("n1", "n2", "n3")
    old = net.m["n3"].addr
    net.down.add("n3")
    del net.by_addr[old]
    fresh = net.add("n3", gen=5)  # same identity, new address, incarnation 0
    net.down.discard("n3")
    fresh.join([addr("n1")], net.now)
    net.run(net.now + 3.0)
    assert fresh.addr != old and fresh.incarnation >= 1
    for o in ("n1", "n2"):
        entries = [x for x in net.m[o].members() if x.node_id == "n3"]
        assert len(entries) == 1
        assert entries[0].addr == fresh.addr and entries[0].state is MemberState.ALIVE
        assert EventKind.UPDATED in net.kinds(o, "n3")


# --- anti-entropy and limits --------------------------------------------------------------


def test_large_state_goes_in_chunks_and_is_answered_once() -> None:
    cfg = CFG.with_overrides(piggyback_budget_bytes=2048, max_message_bytes=8192)
    net = Net(cfg)
    a = net.add("n1")
    a.join([], 0.0)
    extra = [
        sign(Alive(f"x{i:03d}", f"10.1.{i // 250}.{i % 250}:7946", 0), f"x{i:03d}")
        for i in range(400)
    ]
    a.receive("x000", "10.1.0.0:7946", PushPull(False, True, False, tuple(extra)), 0.0)
    assert a.known_count() == 401
    a.drain_outgoing()
    b = net.add("n2")
    b.join([a.addr], 0.0)
    net.pump()
    chunks = [x[2] for x in net.log if x[0] == "n1" and isinstance(x[2], PushPull)]
    assert len(chunks) >= 3
    assert all(c.reply for c in chunks)
    assert [c.more for c in chunks] == [True] * (len(chunks) - 1) + [False]
    assert b.known_count() == 402 and b.joined


def test_member_table_is_bounded() -> None:
    net = cluster("n1", "n2", config=CFG.with_overrides(max_members=3))
    m = net.m["n1"]
    for i in range(5):
        rec = sign(Alive(f"y{i}", f"10.2.0.{i}:7946", 0), f"y{i}")
        m.receive("n2", addr("n2"), Gossip((rec,)), net.now)
    assert m.known_count() == 3
    assert m.counters["table_full"] == 4


def test_members_lists_everyone_with_last_heard() -> None:
    net = cluster("n1", "n2", "n3")
    mems = {x.node_id: x for x in net.m["n1"].members()}
    assert set(mems) == {"n1", "n2", "n3"}
    assert mems["n1"].last_heard == net.now
    assert mems["n2"].last_heard is not None and 0 < mems["n2"].last_heard <= net.now
    assert mems["n2"].addr == addr("n2")


def test_next_deadline_is_always_set_and_ticks_advance_it() -> None:
    net = Net()
    m = net.add("n1")
    m.join([], 0.0)
    d = m.next_deadline()
    assert d is not None and d <= CFG.probe_interval
    m.tick(d)
    d2 = m.next_deadline()
    assert d2 is not None and d2 > d


@pytest.mark.parametrize("bad", [-1, 2**63 - 1])
def test_incarnation_range(bad: int) -> None:
    with pytest.raises(ValueError):
        Membership("n1", addr("n1"), CFG, random.Random(1), 0.0, bad)


def test_push_pull_answers_are_rate_limited_per_peer() -> None:
    net = cluster("n1", "n2")
    m = net.m["n1"]
    ask = PushPull(False, False, False, ())
    m.drain_outgoing()
    for _ in range(5):
        m.receive("n2", addr("n2"), ask, net.now)
    answers = [o for o in m.drain_outgoing() if isinstance(o.message, PushPull)]
    assert len(answers) == 1 and m.counters["push_pull_throttled"] == 4
    m.receive("n2", addr("n2"), ask, net.now + CFG.probe_interval)
    assert any(isinstance(o.message, PushPull) for o in m.drain_outgoing())


def test_the_same_identity_live_at_two_addresses_does_not_escalate() -> None:
    net = cluster("n1", "n2")
    m = net.m["n2"]
    twin = sign(Alive("n2", "10.9.9.9:7946", 0), "n2")  # our key, another address
    m.receive("n1", addr("n1"), Gossip((twin,)), net.now)
    assert m.incarnation == 1  # outbid once, as after a restart elsewhere
    for inc in range(1, 6):
        twin = sign(Alive("n2", "10.9.9.9:7946", inc), "n2")
        m.receive("n1", addr("n1"), Gossip((twin,)), net.now + 0.1 * inc)
    assert m.incarnation == 1
    assert m.counters["identity_conflict"] == 5
