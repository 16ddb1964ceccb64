"""Membership with 5 real spirtd processes on 127.0.0.1 (local profile)."""

from __future__ import annotations

import pytest

from spirtd.localcluster import all_see, member_states, wait_for

pytestmark = pytest.mark.timeout(240)

ARGS = ["--profile", "local"]


def test_five_nodes_join_leave_die_and_come_back(make_cluster):
    c = make_cluster(5, args=ARGS).start()
    nodes = c.nodes
    ids = {n.node_id: "alive" for n in nodes}
    # One bootstrap address (node 0) is enough for everyone to see everyone.
    wait_for(lambda: all_see(nodes, ids), 60, "one cluster of 5")
    for n in nodes:
        assert set(member_states(n)) == set(ids)

    # SIGTERM: a graceful leave, seen as "left" (not "dead") everywhere.
    leaver = nodes[4]
    assert leaver.stop() == 0
    rest = nodes[:4]
    wait_for(lambda: all_see(rest, {leaver.node_id: "left"}), 30, "left everywhere")

    # kill -9: suspect, then dead everywhere.
    victim = nodes[3]
    victim.kill()
    survivors = nodes[:3]
    wait_for(lambda: all_see(survivors, {victim.node_id: "dead"}), 30, "dead everywhere")
    assert all(member_states(n)[leaver.node_id] == "left" for n in survivors)
    counts = survivors[0].status()["counters"]
    assert counts.get("membership.event.suspect", 0) >= 1

    # Restart with the same data dir: alive again, with a higher incarnation.
    old_inc = {m["node_id"]: m["incarnation"] for m in survivors[0].status()["members"]}
    victim.start()
    wait_for(
        lambda: all_see([*survivors, victim], {victim.node_id: "alive"}), 30, "alive everywhere"
    )
    new_inc = {m["node_id"]: m["incarnation"] for m in survivors[0].status()["members"]}
    assert new_inc[victim.node_id] > old_inc[victim.node_id]
    # No duplicate or conflicting entries.
    for n in [*survivors, victim]:
        view = n.status()["members"]
        assert len(view) == len({m["node_id"] for m in view}) == 5
