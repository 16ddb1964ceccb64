"""Bad gradients on real peers: an admitted peer (tests.lying_peer, mode
"gradients") sends, round after round, one message of each class of bad
gradient beside its honest one. Every class must be refused before it is
aggregated, and counted by reason, without crashing anything or holding any
round past its deadline."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from spirtd.keyfiles import DataDir
from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for

pytestmark = pytest.mark.timeout(600)


class _LyingNode(LocalNode):
    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("spirtd")] = "tests.lying_peer"
        return cmd

    def spawn(self) -> None:
        os.environ["SPIRT_TEST_LIE"] = "gradients"
        try:
            super().spawn()
        finally:
            os.environ.pop("SPIRT_TEST_LIE", None)


def _brief(h: dict[str, Any]) -> dict[str, Any]:
    """A history entry without its long lists, for an assertion message."""
    keys = ("round", "wait_s", "deadline_s", "closed_by", "duration_s", "digest")
    return {k: h.get(k) for k in keys} | {"contributors": len(h["contributors"])}


def _status(n: LocalNode) -> dict[str, Any]:
    return n.call("GET", "/v1/train/status")


# The liar sends its last class (the NaN, tests.lying_peer.BAD_CLASSES) with its 8th
# gradient and is out 2 rounds later; it stays in the others' model throughout, so
# that is round 8 unless an honest split makes it sync. 40 rounds leave many to check
# that it stays out.
ROUNDS = 40


def test_each_class_of_bad_gradient_is_refused_and_counted(
    short_tmp: Path, record_property: Any
) -> None:
    c = LocalCluster(short_tmp / "c", 0)
    try:
        # Four honest peers: with f = 1 a median round needs three, so one honest
        # peer repairing a split (the liar is graylisted by each peer's gossip at
        # its own moment, so they may disagree on its gradient) stalls nobody.
        for i in range(5):
            d = c.root / f"node{i}"
            c.ca.enroll(DataDir(d), now=time.time(), days=30)
            cls = _LyingNode if i == 4 else LocalNode
            c.nodes.append(cls(d, args=["--profile", "local", "--shard", f"{i}/5"]))
        c.start()
        everyone = {n.node_id: "alive" for n in c.nodes}
        wait_for(lambda: all_see(c.nodes, everyone), 90, "every node to see every other alive")
        honest, liar = c.nodes[:4], c.nodes[4]
        job = {"task": "digits", "rounds": ROUNDS, "aggregator": "median", "f": 1}
        job_id = honest[0].call("POST", "/v1/train/start", job)["job"]
        try:
            wait_for(
                lambda: all(_status(h)["state"] == "done" for h in honest),
                400,
                "the honest to finish",
            )
        except TimeoutError as e:
            # Stuck or only slow? Where each stands, and what it last did.
            where = [{k: _status(h).get(k) for k in ("state", "round", "detail")} for h in honest]
            logs = "\n".join(f"--- {n.node_id}\n{n.log_tail(25)}" for n in c.nodes)
            raise AssertionError(
                f"{e}: {where}\n{_status(honest[0])['events'][-8:]}\n{logs}"
            ) from None
        statuses = [_status(h) for h in honest]
        counters: Counter[str] = Counter()
        for h in honest:
            counters.update(h.status()["counters"])
        assert all(n.running for n in c.nodes), "a daemon crashed"
    finally:
        c.kill_all()

    # What median rounds of digits reach varies with the minibatches and the timing
    # (at 40 rounds: 0.81 on a new user's machine, 0.92 to 0.95 here): not what this test
    # is about. It asks only that the model learned and was not
    # poisoned (a NaN let through would leave no accuracy; chance is 0.1).
    record_property("honest_accuracies", [s["accuracy"] for s in statuses])
    for s in statuses:
        assert s["job"]["id"] == job_id and s["round"] == ROUNDS
        assert s["accuracy"] is not None and s["accuracy"] >= 0.5, s["accuracy"]
        for h in s["history"]:
            # Nothing bad ever made it into an aggregate: the liar's honest gradient
            # may, its bad ones never (a round's contributors number at most 5).
            assert len(h["contributors"]) <= 5
            # Closed with everyone or by its deadline (all of them within the wait
            # above); not wait_s against deadline_s: a loaded machine wakes the timer
            # late, and slow honest peers can leave a deadline short of its quorum,
            # neither of which says anything about the gradients.
            assert h["closed_by"] in ("complete", "deadline"), (_brief(h), s["events"][-8:])
    assert len({s["model_digest"] for s in statuses}) == 1
    # Each class, refused and counted by reason at the honest peers.
    rejected = {k: v for k, v in counters.items() if "rejected" in k or "invalid" in k}
    for reason in ("size", "nonfinite", "job", "stale", "digest", "future"):
        assert counters[f"training.gradient_rejected.{reason}"] >= 1, (reason, rejected)
    # Replays never reach the validator's verdict: the exact bytes again are
    # dropped by the seen cache, another message under a used sequence number by
    # the per-origin window (shown to the validator only as possible proof).
    assert counters["gossip.duplicate"] >= 1
    assert counters["gossip.seq_conflict"] >= 1, rejected
    # A flood of far-future rounds moves no body: each is refused on its
    # announcement (20 per flood).
    assert counters["training.gradient_rejected.future"] >= 20
    # None of this is equivocation: the liar signs one gradient per (round, model).
    # But a signed NaN is proof on its own: the liar is out for the rest of the
    # job, at every honest peer (from its own pull or from the proof), within 2
    # rounds of the first one.
    for s in statuses:
        assert len(s["excluded"]) == 1, (s["excluded"], rejected, s["events"][-8:])
        (ex,) = s["excluded"]
        assert ex["node_id"] == liar.node_id and ex["reason"] == "nonfinite", ex
        assert ex["at_round"] <= ex["round"] + 2, ex
        first_nan = ex["round"]
        late = [h for h in s["history"] if h["round"] > first_nan + 2]
        # The NaN is the liar's last class, one per gradient it publishes: a liar
        # that synced on the way (it misses rounds meanwhile) may send it within the
        # job's last two rounds, and then there is no later round to check.
        assert late or first_nan + 2 >= ROUNDS, (first_nan, ROUNDS)
        assert all(liar.node_id not in h["contributors"] for h in late)


# Long: seven daemons. Its parts run by default: a signed NaN excludes its sender at
# every honest peer, no round waiting past its deadline, on real peers in
# test_each_class_of_bad_gradient_is_refused_and_counted; Krum at n = 2f + 3 with two
# NaN liars keeping its quorum and one f everywhere in test_rounds_machine's
# test_a_rejected_gradient_lowers_f_and_the_quorum_with_min_for_f and
# test_the_aggregation_f_does_not_depend_on_when_a_liar_was_caught.
@pytest.mark.long
def test_nan_liars_never_stall_krum_at_n_2f_plus_3(short_tmp: Path) -> None:
    """Krum at n = 2f + 3 needs every member's gradient unless liars are proven.
    Two peers sending NaN every round are: every honest peer excludes both (by
    its own pull or by the gossiped proof), and every round closes by its
    deadline with the f the contributor count allows."""
    from bench.byzantine import run_cell, start_cluster

    cluster, honest, byz = start_cluster(short_tmp / "c", 7, 2)
    try:
        row = run_cell(
            cluster,
            honest,
            byz,
            f=2,
            rule="krum",
            attack="nonfinite",
            rounds=15,
            seed=1,
            timeout=300,
        )
        statuses = [_status(h) for h in honest]
        assert all(n.running for n in cluster.nodes), "a daemon crashed"
    finally:
        cluster.kill_all()
    assert row["error"] is None and row["equal_digests"], row
    for s in statuses:
        assert s["state"] == "done" and s["round"] == 15, s["detail"]
        assert {e["node_id"] for e in s["excluded"]} == set(byz), s["excluded"]
        assert {e["reason"] for e in s["excluded"]} == {"nonfinite"}
        for h in s["history"]:
            assert h["closed_by"] in ("complete", "deadline"), h  # none hung
            assert not set(h["contributors"]) & set(byz), h
