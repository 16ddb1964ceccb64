"""Admission binds every identity, not only the link (issue 13, finding 1).

An admitted member must not be able to speak for made-up keys: gossip origins,
the subjects and accusers of membership records, and the targets it asks us to
ping all pass the link's trust decision. Each test replays the attack from the
review against the sans-IO machines and checks it now does no harm.
"""

from __future__ import annotations

import random

from protocol import wire
from protocol.gossip import Announcement, Control, Delivered, GossipConfig, GossipMachine, Publish
from protocol.gossip.transfer import digest_of
from protocol.identity import Admission, Certificate, NodeKey, RevocationList, TrustStore
from protocol.membership import (
    Alive,
    Gossip,
    Membership,
    Nack,
    Ping,
    PingReq,
    Suspect,
    ed25519_signer,
    ed25519_verifier,
    lan,
    record_bytes,
)
from tests.protocol_helpers import CA, NOW, cert, key, trust

T = "grad"
CFG = GossipConfig.fast(chunk_size=1024)
WALL = NOW  # the machines' clock starts at 0; wall time = now + WALL


def made_up(i: int) -> NodeKey:
    return key(f"made-up-{i}")


def announcement(k: NodeKey, seq: int, *, carried: Certificate | None, ts_s: float = 0.0) -> bytes:
    payload = b"g%d" % seq
    _, digest = digest_of(payload, CFG.chunk_size)
    ann = Announcement(
        T,
        len(payload),
        digest,
        CFG.chunk_size,
        inline=payload,
        cert=carried.encode() if carried else b"",
    )
    return wire.seal(k, wire.MsgType.GOSSIP_PUBLISH, seq, int((WALL + ts_s) * 1000), ann.to_obj())


def gossip_node(admission: Admission, config: GossipConfig = CFG) -> tuple[GossipMachine, str]:
    m = GossipMachine(
        key("me").node_id, config, random.Random(1), 0.0, wall_offset=WALL, admission=admission
    )
    m.subscribe(T, 0.0)
    relay = key("relay").node_id
    m.add_peer(relay, 0.0, "127.0.0.1:9")
    m.receive(relay, Control(subs=[(T, True)]), 0.0)
    return m, relay


def delivered_origins(m: GossipMachine) -> list[bytes]:
    return [e.envelope.origin for e in m.drain_events() if isinstance(e, Delivered)]


# --- gossip origins ---------------------------------------------------------------------


def test_made_up_gossip_origins_are_rejected_and_counted() -> None:
    m, relay = gossip_node(Admission(trust()))
    # The review's attack: an admitted relay publishes under 50 keys it made up.
    for i in range(50):
        m.receive(relay, Publish(announcement(made_up(i), 1, carried=None)), 1.0)
    assert delivered_origins(m) == []
    assert m.seqs.origins() == 0  # no replay window was ever made for them
    # The first few are refused one by one and charged to the relay, which is then
    # graylisted: the rest is dropped unread.
    refused = m.counters["origin_refused.peer_untrusted"]
    assert refused >= 1 and refused + m.counters["graylisted_dropped"] == 50
    assert m.score(relay) < CFG.graylist_threshold

    # Made-up keys that carry a certificate, each via a fresh relay so that every one
    # meets the trust decision: no certificate, one from the attacker's own CA, and
    # an honest member's certificate stapled to a key it does not name.
    rogue_ca = key("rogue-ca")
    carried: list[Certificate | None] = [None] * 10
    carried += [
        Certificate.issue(rogue_ca, "c1", made_up(i).public_key, now=NOW - 60, days=1, serial=1)
        for i in range(10, 20)
    ]
    carried += [cert(key("honest"))] * 10
    m2, _ = gossip_node(Admission(trust()))
    for i, c in enumerate(carried):
        r = key(f"relay-{i}").node_id
        m2.add_peer(r, 0.0, "127.0.0.1:9")
        m2.receive(r, Publish(announcement(made_up(i), 1, carried=c)), 1.0)
    assert delivered_origins(m2) == []
    assert m2.counters["origin_refused.peer_untrusted"] == 30
    assert m2.seqs.origins() == 0

    # A real member's message still gets through, certificate carried.
    honest = key("honest")
    r = key("relay-ok").node_id
    m2.add_peer(r, 0.0, "127.0.0.1:9")
    m2.receive(r, Publish(announcement(honest, 1, carried=cert(honest))), 1.0)
    assert delivered_origins(m2) == [honest.public_key]


def test_verified_certificate_is_cached_so_later_messages_need_not_carry_it() -> None:
    adm = Admission(trust())
    m, relay = gossip_node(adm)
    honest = key("honest")
    m.receive(relay, Publish(announcement(honest, 1, carried=cert(honest))), 1.0)
    m.receive(relay, Publish(announcement(honest, 2, carried=None)), 1.0)
    assert delivered_origins(m) == [honest.public_key, honest.public_key]
    assert adm.certificates() == 1


def test_revoked_origin_relayed_by_a_colluding_member_is_refused() -> None:
    adm = Admission(trust())
    m, relay = gossip_node(adm)
    revoked = key("revoked")
    m.receive(relay, Publish(announcement(revoked, 1, carried=cert(revoked))), 1.0)
    assert delivered_origins(m) == [revoked.public_key]

    store = trust()
    store.add_crl(RevocationList.issue(CA, 2, frozenset({revoked.public_key}), now=NOW))
    adm.update(store)
    # The link to the revoked node is gone; a colluding member relays for it.
    for seq in range(2, 12):
        m.receive(relay, Publish(announcement(revoked, seq, carried=cert(revoked))), 2.0)
    assert delivered_origins(m) == []
    assert m.counters["origin_refused.peer_revoked"] == 10
    # An honest relay may lag behind on the revocation list: no penalty for that.
    assert m.score(relay) >= 0


def test_expired_origin_is_refused() -> None:
    m, relay = gossip_node(Admission(trust()))
    old = key("old")
    expired = Certificate.issue(CA, "c1", old.public_key, now=NOW - 7200, days=1 / 24, serial=3)
    m.receive(relay, Publish(announcement(old, 1, carried=expired)), 1.0)
    assert delivered_origins(m) == []
    assert m.counters["origin_refused.peer_expired"] == 1


def test_a_flood_of_origins_cannot_evict_an_honest_replay_window() -> None:
    """The review flooded 10,000 made-up origins, evicting an honest origin's window,
    then replayed a 260-second-old honest message past the seen cache. Made-up
    origins now get no window at all; and even admitted origins (an allowlist of
    many keys here) cannot push out a window that is still in use."""
    flood = [made_up(i) for i in range(40)]
    store = TrustStore("c1", ca_keys={CA.public_key}, allowlist={k.public_key for k in flood})
    config = GossipConfig.fast(chunk_size=1024, max_origins=16, seen_ttl=30.0)
    m, relay = gossip_node(Admission(store), config)
    honest = key("honest")
    old = announcement(honest, 1, carried=cert(honest))
    m.receive(relay, Publish(old), 0.0)
    assert delivered_origins(m) == [honest.public_key]

    for i in range(10_000):  # made-up and unadmitted: refused before any window
        m.receive(relay, Publish(announcement(key(f"x{i}"), 1, carried=None)), 1.0)
        if m.score(relay) < config.graylist_threshold:
            break  # graylisted: everything further from it is dropped unread
    for i, k in enumerate(flood):  # admitted, but more origins than there is room for
        m.add_peer(key(f"r{i}").node_id, 1.0, "127.0.0.1:10")
        m.receive(key(f"r{i}").node_id, Publish(announcement(k, 1, carried=None)), 1.0)
    assert len(delivered_origins(m)) == config.max_origins - 1
    assert m.seqs.origins() == config.max_origins
    assert m.counters["ignored.origins_full"] == len(flood) - (config.max_origins - 1)

    # 260 s later the id has left the seen cache; the replay window still stops it.
    m.tick(260.0)
    assert message_forgotten(m, old)
    replayer = key("r0").node_id
    m.receive(replayer, Publish(old), 260.0)
    assert delivered_origins(m) == []
    assert m.counters["invalid.replay"] == 1


def message_forgotten(m: GossipMachine, envelope: bytes) -> bool:
    from protocol.gossip import message_id

    return m.seen.get(message_id(envelope)) is None


def test_one_neighbour_can_bring_in_only_so_many_origins() -> None:
    many = [made_up(i) for i in range(10)]
    store = TrustStore("c1", allowlist={k.public_key for k in many})
    config = GossipConfig.fast(chunk_size=1024, max_origins_per_peer=4)
    m, relay = gossip_node(Admission(store), config)
    for k in many:
        m.receive(relay, Publish(announcement(k, 1, carried=None)), 1.0)
    assert m.seqs.brought_by(relay) == 4
    assert m.counters["ignored.origins_per_peer"] == 6


# --- membership records -------------------------------------------------------------------


def member(name: str, n: int, admission: Admission | None) -> Membership:
    k = key(name)
    return Membership(
        k.node_id,
        f"10.0.0.{n}:7946",
        lan(),
        random.Random(n),
        0.0,
        record_signer=ed25519_signer(k),
        record_verifier=ed25519_verifier(),
        certificate=cert(k).encode(),
        admission=admission,
        wall_offset=WALL if admission is not None else None,
    )


def signed_alive(k: NodeKey, addr: str, *, carried: bytes = b"", inc: int = 0) -> Alive:
    unsigned = Alive(k.node_id, addr, inc, cert=carried)
    return Alive(
        k.node_id,
        addr,
        inc,
        k.sign(b"spirt/v1/membership-record\0", record_bytes(unsigned)),
        carried,
    )


def test_made_up_members_are_rejected_and_counted() -> None:
    me = member("me", 1, Admission(trust()))
    liar = key("liar")
    # 200 made-up members, each correctly self-signed, at addresses the liar chose.
    fakes = tuple(signed_alive(made_up(i), f"192.0.2.{i % 250}:{1000 + i}") for i in range(200))
    me.receive(liar.node_id, "10.0.0.9:7946", Gossip(fakes), 1.0)
    assert me.known_count() == 1
    assert me.counters["member_refused.peer_untrusted"] == 200
    me.tick(30.0)
    dialed = {o.addr for o in me.drain_outgoing()}
    assert not any(a.startswith("192.0.2.") for a in dialed)

    # A real member with its certificate is taken, and then probed.
    honest = key("honest")
    rec = signed_alive(honest, "10.0.0.5:7946", carried=cert(honest).encode())
    me.receive(liar.node_id, "10.0.0.9:7946", Gossip((rec,)), 31.0)
    assert me.member(honest.node_id) is not None


def test_a_relay_cannot_swap_the_certificate_of_an_alive_record() -> None:
    me = member("me", 1, Admission(trust()))
    honest = key("honest")
    rec = signed_alive(honest, "10.0.0.5:7946", carried=cert(honest).encode())
    swapped = Alive(rec.node_id, rec.addr, rec.incarnation, rec.sig, cert(key("other")).encode())
    me.receive(key("liar").node_id, "10.0.0.9:7946", Gossip((swapped,)), 1.0)
    assert me.member(honest.node_id) is None


def test_made_up_accusers_cannot_shorten_a_suspicion() -> None:
    adm = Admission(trust())
    me = member("me", 1, adm)
    victim = key("victim")
    me.receive(
        victim.node_id,
        "10.0.0.5:7946",
        Gossip((signed_alive(victim, "10.0.0.5:7946", carried=cert(victim).encode()),)),
        0.0,
    )
    accusers = [made_up(i) for i in range(20)]
    claims = []
    for k in accusers:
        unsigned = Suspect(victim.node_id, 0, k.node_id)
        sig = k.sign(b"spirt/v1/membership-record\0", record_bytes(unsigned))
        claims.append(Suspect(victim.node_id, 0, k.node_id, sig))
    me.receive(key("liar").node_id, "10.0.0.9:7946", Gossip(tuple(claims)), 1.0)
    m = me.member(victim.node_id)
    assert m is not None and m.state.value == "alive"
    assert me.counters["accuser_refused.peer_untrusted"] == 20


def test_ping_req_cannot_aim_dials_at_an_arbitrary_address() -> None:
    me = member("me", 1, None)
    asker = key("asker")
    me.drain_outgoing()
    # Unknown target at an address of the asker's choosing: no dial, a nack.
    me.receive(
        asker.node_id, "10.0.0.9:7946", PingReq(7, key("nobody").node_id, "169.254.169.254:80"), 1.0
    )
    out = me.drain_outgoing()
    assert [(o.node_id, type(o.message)) for o in out] == [(asker.node_id, Nack)]
    assert me.counters["ping_req_unknown_target"] == 1

    # A known member named with a false address: pinged where it really is.
    known = key("known")
    me.receive(known.node_id, "10.0.0.5:7946", Gossip((signed_alive(known, "10.0.0.5:7946"),)), 1.0)
    me.drain_outgoing()
    me.receive(asker.node_id, "10.0.0.9:7946", PingReq(8, known.node_id, "192.0.2.1:22"), 2.0)
    pings = [o for o in me.drain_outgoing() if isinstance(o.message, Ping)]
    assert [(o.node_id, o.addr) for o in pings] == [(known.node_id, "10.0.0.5:7946")]
    assert me.counters["ping_req_addr_mismatch"] == 1
