"""PRUNE flooding leaves bounded state (issue 13, finding 3).

The review sent 400 control messages of PRUNEs for made-up topics and left
102,400 backoff entries (33 MiB) behind, each held for up to a day.
"""

from __future__ import annotations

import random

from protocol.gossip import Control, GossipConfig, GossipMachine, Prune
from tests.protocol_helpers import key

CFG = GossipConfig.fast(max_backoffs_per_peer=4)


def node(*topics: str) -> tuple[GossipMachine, str]:
    m = GossipMachine(key("me").node_id, CFG, random.Random(1), 0.0)
    attacker = key("attacker").node_id
    m.add_peer(attacker, 0.0, "127.0.0.1:9")
    for t in topics:
        m.subscribe(t, 0.0)
    m.receive(attacker, Control(subs=[(t, True) for t in topics]), 0.0)
    return m, attacker


def test_prune_flood_for_topics_without_a_mesh_leaves_nothing_behind() -> None:
    m, attacker = node("grad")
    for i in range(400):
        prunes = [Prune(f"t{i}-{j}", 86_400) for j in range(256)]
        m.receive(attacker, Control(prune=prunes), 1.0)
    assert m.mesh.backoffs() == 0
    # Counted, and charged: the first message alone graylists the attacker, and
    # everything it sends after that is dropped unread.
    assert m.counters["prune_ignored.no_mesh"] == 256
    assert m.counters["graylisted_dropped"] == 399
    assert m.score(attacker) < CFG.graylist_threshold


def test_backoff_entries_per_peer_are_capped() -> None:
    topics = [f"topic{i}" for i in range(10)]
    m, attacker = node(*topics)
    m.receive(attacker, Control(prune=[Prune(t, 86_400) for t in topics]), 1.0)
    assert m.mesh.backoffs(attacker) == CFG.max_backoffs_per_peer
    assert m.counters["prune_ignored.backoff_full"] == len(topics) - CFG.max_backoffs_per_peer


def test_an_honest_prune_still_backs_off() -> None:
    m, peer = node("grad")
    m.receive(peer, Control(prune=[Prune("grad", 30)]), 1.0)
    assert m.mesh.backoffs(peer) == 1
    assert not m.mesh.in_mesh("grad", peer)
    assert m.mesh.in_backoff("grad", peer, 20.0)
    assert m.score(peer) == 0.0
    m.tick(40.0)  # expired entries go at the heartbeat
    assert m.mesh.backoffs() == 0
