"""Pub/sub between real spirtd processes on loopback (issue 4 acceptance):
5 daemons exchange 10 MB messages all-to-all, and every receiver's stored body
is re-hashed and compared with the publisher's file."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol.gossip import GossipConfig
from protocol.gossip.transfer import digest_of
from spirtd.localcluster import LocalNode, linked_peers, wait_for
from tests.fixtures_cluster import FAST_TRANSPORT

TOPIC = "grad"
MB = 1 << 20


def subscribed_everywhere(nodes: list[LocalNode], topic: str) -> bool:
    n = len(nodes)
    for node in nodes:
        st = node.call("GET", "/v1/pubsub/status")
        if st["topic_peers"].get(topic, 0) < n - 1 or not st["mesh"].get(topic):
            return False
    return True


def form_cluster(make_cluster, n: int) -> list[LocalNode]:
    cluster = make_cluster(n, config=FAST_TRANSPORT).start()
    nodes = cluster.nodes
    # Membership links every node to every alive member.
    wait_for(lambda: all(len(linked_peers(x)) == n - 1 for x in nodes), 90, "a full mesh of links")
    for node in nodes:
        node.call("POST", "/v1/pubsub/subscribe", {"topic": TOPIC})
    wait_for(lambda: subscribed_everywhere(nodes, TOPIC), 30, "subscriptions to propagate")
    return nodes


def test_five_daemons_exchange_10mb_all_to_all(make_cluster, short_tmp: Path) -> None:
    nodes = form_cluster(make_cluster, 5)
    files = []
    for i in range(len(nodes)):
        f = short_tmp / f"payload{i}"
        f.write_bytes(os.urandom(10 * MB))
        files.append(f)
    expected = {}
    with ThreadPoolExecutor(len(nodes)) as pool:
        results = list(
            pool.map(
                lambda i: nodes[i].call(
                    "POST", "/v1/pubsub/publish", {"topic": TOPIC, "path": str(files[i])}
                ),
                range(len(nodes)),
            )
        )
    chunk = GossipConfig().chunk_size
    for i, r in enumerate(results):
        data = files[i].read_bytes()
        assert r["size"] == len(data)
        assert r["digest"] == digest_of(data, chunk)[1].hex()
        expected[r["msg_id"]] = (r["digest"], hashlib.sha256(data).hexdigest(), i)

    def all_delivered() -> bool:
        return all(
            len(node.call("GET", "/v1/pubsub/inbox")["messages"]) >= len(nodes) - 1
            for node in nodes
        )

    wait_for(all_delivered, 120, "every 10 MB body at every receiver", interval=0.5)
    for j, node in enumerate(nodes):
        inbox = node.call("GET", "/v1/pubsub/inbox")["messages"]
        got = {m["msg_id"] for m in inbox}
        want = {mid for mid, (_, _, i) in expected.items() if i != j}
        assert got == want  # each other node's message, exactly once, not its own
        for m in inbox:
            digest, sha, origin = expected[m["msg_id"]]
            assert m["digest"] == digest
            assert m["origin"] == nodes[origin].node_id
            v = node.call("POST", "/v1/pubsub/verify", {"msg_id": m["msg_id"]})
            assert v["size"] == 10 * MB
            assert v["digest"] == digest  # the stored bytes re-hash to the signed digest
            assert v["sha256"] == sha  # and are byte-for-byte the publisher's file
    # Each body crossed into each receiver once: received bytes stay near (N-1) * 10 MB.
    for node in nodes:
        st = node.status()
        received = sum(link["bytes_in"] for link in st["links"])
        assert received < 1.1 * (len(nodes) - 1) * 10 * MB
        assert st["counters"].get("gossip.body_received", 0) == len(nodes) - 1


def test_body_memory_is_reserved_bounded_and_recycled(make_cluster) -> None:
    """Bodies land in the slab pool: reserved at start, never past memory_mb, and a
    later round reuses the pages of bodies evicted to make room for it."""
    config = FAST_TRANSPORT + "[pubsub]\nmemory_mb = 48\nreserve_mb = 32\n"
    cluster = make_cluster(3, config=config).start()
    nodes = cluster.nodes
    for node in nodes:
        pool = node.call("GET", "/v1/pubsub/status")["store"]["pool"]
        assert pool["capacity_bytes"] == 32 * MB and pool["in_use_bytes"] == 0
    wait_for(lambda: all(len(linked_peers(x)) == 2 for x in nodes), 60, "a full mesh of links")
    for rnd in range(3):
        topic = f"round{rnd}"
        for node in nodes:
            node.call("POST", "/v1/pubsub/subscribe", {"topic": topic})
        wait_for(lambda t=topic: subscribed_everywhere(nodes, t), 30, "subscriptions")
        # 3 x 12 MiB a round: a node holds 36 MiB, so round r+1 must evict round r.
        sent = {}
        for node in nodes:
            r = node.call("POST", "/v1/pubsub/publish", {"topic": topic, "random_size": 12 * MB})
            sent[r["msg_id"]] = r["digest"]

        def delivered(t: str = topic) -> bool:
            return all(
                sum(m["topic"] == t for m in x.call("GET", "/v1/pubsub/inbox")["messages"]) == 2
                for x in nodes
            )

        wait_for(delivered, 60, f"round {rnd} everywhere", interval=0.2)
        for node in nodes:
            for m in node.call("GET", "/v1/pubsub/inbox")["messages"]:
                if m["topic"] == topic:
                    v = node.call("POST", "/v1/pubsub/verify", {"msg_id": m["msg_id"]})
                    assert v["digest"] == sent[m["msg_id"]]
    for node in nodes:
        store = node.call("GET", "/v1/pubsub/status")["store"]
        assert store["evicted"] >= 3  # earlier rounds made room
        assert store["pool"]["capacity_bytes"] <= 48 * MB
        assert store["pool"]["in_use_bytes"] == store["memory_bytes"]
