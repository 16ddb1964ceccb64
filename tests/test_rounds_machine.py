"""The round machine, one rule at a time (simulated time only)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from protocol.rounds import (
    JOIN_DIGEST,
    AdaptiveDeadline,
    Aggregate,
    Diverged,
    Evaluate,
    Finished,
    GradientRejected,
    InvokeFunctions,
    LeftView,
    PublishGradient,
    PublishState,
    QuorumWait,
    RoundClosed,
    RoundConfig,
    RoundMachine,
)

JOB = "job-1"
PARAMS = 10
SIZE = PARAMS * 4
D1 = b"d1" * 16
D2 = b"d2" * 16
OTHER = b"xx" * 16
PEERS = ["n1", "n2", "n3", "n4", "n5"]  # self is n1
CFG = RoundConfig(initial_deadline_s=10.0, deadline_floor_s=1.0, deadline_ceiling_s=50.0)


def machine(
    *,
    members: list[str] = PEERS,
    rounds: int = 5,
    min_contributors: int = 1,
    eval_every: int = 2,
    config: RoundConfig = CFG,
    begin: bool = True,
) -> RoundMachine:
    m = RoundMachine(
        self_id="n1",
        job_id=JOB,
        rounds=rounds,
        min_contributors=min_contributors,
        eval_every=eval_every,
        param_count=PARAMS,
        members=members,
        config=config,
    )
    if begin:
        m.begin(1, D1, 0.0)
    return m


def krum_machine(self_id: str = "n1") -> RoundMachine:
    """Krum at n = 2f + 3 = 7 (f = 2), as the trainer builds it: the quorum is the
    rule's minimum for the f left once liars are proven."""
    m = RoundMachine(
        self_id=self_id,
        job_id=JOB,
        rounds=5,
        min_contributors=7,
        eval_every=2,
        param_count=PARAMS,
        members=[f"n{i}" for i in range(1, 8)],
        config=CFG,
        f=2,
        min_for_f=lambda f: 2 * f + 3,
    )
    m.begin(1, D1, 0.0)
    return m


def give(
    m: RoundMachine,
    origin: str,
    now: float,
    *,
    round: int | None = None,
    digest: bytes | None = None,
    size: int = SIZE,
    job: str = JOB,
) -> str | None:
    """Validate then receive, as the daemon does; returns the first refusal."""
    r = m.round if round is None else round
    d = m.digest if digest is None else digest
    reason = m.validate(origin, job, r, d, size, now)
    if reason is not None:
        return reason
    return m.receive(origin, job, r, d, size, now)


def of(items: list[object], kind: type) -> list:
    return [x for x in items if isinstance(x, kind)]


def closed(m: RoundMachine) -> RoundClosed:
    (ev,) = of(m.drain_events(), RoundClosed)
    return ev


# --- config and deadline ----------------------------------------------------------------


def test_config_defaults_validate_and_bad_fields_are_named() -> None:
    RoundConfig().validate()
    bad = {
        "deadline_factor": 0.0,
        "deadline_floor_s": -1.0,
        "deadline_ceiling_s": 0.5,
        "initial_deadline_s": 0.0,
        "history": 0,
        "future_window": -1,
        "strikes": 0,
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            replace(RoundConfig(), **{name: value}).validate()
    with pytest.raises(ValueError, match="deadline_factor"):
        RoundConfig(deadline_factor=float("nan")).validate()
    with pytest.raises(ValueError, match="history"):
        machine(config=RoundConfig(history=0))


def test_adaptive_deadline_median_floor_ceiling() -> None:
    cfg = RoundConfig(
        deadline_factor=3.0,
        deadline_floor_s=2.0,
        deadline_ceiling_s=20.0,
        initial_deadline_s=60.0,
        history=3,
    )
    d = AdaptiveDeadline(cfg)
    assert d.current() == 60.0  # no sample yet: cold start
    d.record(1.0)
    assert d.current() == 3.0
    d.record(5.0)
    d.record(2.0)
    assert d.current() == 6.0  # 3 x median(1, 5, 2), not the mean
    d.record(100.0)  # history 3: 1.0 falls out -> median(5, 2, 100) = 5
    assert d.current() == 15.0
    d.record(100.0)  # median(2, 100, 100) = 100 -> ceiling
    assert d.current() == 20.0
    for _ in range(3):
        d.record(0.1)
    assert d.current() == 2.0  # floor
    d.record(float("nan"))
    d.record(-1.0)
    assert d.samples() == (0.1, 0.1, 0.1)


def test_machine_deadline_follows_round_durations() -> None:
    cfg = replace(CFG, deadline_factor=2.0, history=8)
    m = machine(config=cfg, rounds=10)
    assert m.deadline_s == 10.0 and m.next_deadline() == 10.0
    t = 0.0
    for dur in (3.0, 5.0, 4.0):
        t0 = t
        t += dur
        m.local_gradient_ready(m.round, t)
        for p in PEERS[1:]:
            give(m, p, t)
        ev = closed(m)
        assert ev.duration_s == pytest.approx(dur) and ev.reason == "complete"
        m.aggregated(m.round, bytes([m.round]) * 32, t)
        assert m.begun_at == t and t0 < t
    assert m.deadline_s == pytest.approx(2.0 * 4.0)  # 2 x median(3, 5, 4)
    assert m.next_deadline() == pytest.approx(t + 8.0)


# --- begin and closing ------------------------------------------------------------------


def test_begin_invokes_functions_and_announces() -> None:
    m = machine()
    assert m.drain_actions() == [InvokeFunctions(1), PublishState(1, D1, True)]
    s = m.status()
    assert s["round"] == 1 and s["phase"] == "computing"
    assert s["view"] == PEERS and s["waiting_for"] == PEERS and s["have"] == []
    assert s["quorum"] == 3 and s["deadline_in_s"] == 10.0 and not s["waiting_for_quorum"]


def test_complete_close_waits_for_every_view_member_including_self() -> None:
    m = machine()
    m.drain_actions()
    for p in reversed(PEERS[1:]):
        assert give(m, p, 1.0) is None
    assert m.phase == "computing" and not of(m.drain_events(), RoundClosed)
    m.local_gradient_ready(1, 2.0)
    assert m.drain_actions() == [PublishGradient(1, D1), Aggregate(1, tuple(PEERS))]
    ev = closed(m)
    assert ev == RoundClosed(1, tuple(PEERS), 2.0, "complete")
    assert m.phase == "aggregating" and m.next_deadline() is None
    # Late gradient for the closed round: stale, counted.
    assert give(m, "n2", 3.0, round=1, digest=D1) == "stale"


def test_deadline_close_with_quorum_marks_missing_absent() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    give(m, "n2", 1.0)
    give(m, "n3", 1.0)
    m.tick(9.99)
    assert m.phase == "collecting"
    m.tick(10.0)
    ev = [e for e in m.drain_events() if isinstance(e, RoundClosed | LeftView)]
    assert ev[-1] == RoundClosed(1, ("n1", "n2", "n3"), 10.0, "deadline")
    assert LeftView(1, "n4", "absent") in ev and LeftView(1, "n5", "absent") in ev
    assert Aggregate(1, ("n1", "n2", "n3")) in m.drain_actions()
    assert m.status()["absent"] == ["n4", "n5"]


def test_quorum_wait_then_close_on_late_arrival() -> None:
    m = machine(min_contributors=1)
    m.local_gradient_ready(1, 1.0)
    give(m, "n2", 1.0)
    m.tick(10.0)
    assert of(m.drain_events(), QuorumWait) == [QuorumWait(1, 2, 3)]
    assert m.next_deadline() is None  # nothing more happens by time alone
    m.tick(20.0)
    assert not of(m.drain_events(), QuorumWait)  # once per round
    assert m.status()["waiting_for_quorum"] is True
    give(m, "n4", 25.0)
    assert closed(m) == RoundClosed(1, ("n1", "n2", "n4"), 25.0, "deadline")
    assert m.status()["absent"] == ["n3", "n5"]


def test_min_contributors_raises_the_quorum() -> None:
    m = machine(min_contributors=5)
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    m.tick(10.0)
    assert of(m.drain_events(), QuorumWait) == [QuorumWait(1, 4, 5)]
    give(m, "n5", 11.0)
    assert closed(m).reason == "complete"


def test_member_gone_leaves_view_and_triggers_close() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    assert m.phase == "collecting"
    m.member_gone("n5", 2.0)
    ev = m.drain_events()
    assert LeftView(1, "n5", "gone") in ev
    assert of(ev, RoundClosed) == [RoundClosed(1, ("n1", "n2", "n3", "n4"), 2.0, "complete")]
    assert "n5" not in m.peer_positions()


def test_gone_contributor_keeps_its_counted_gradient() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    give(m, "n2", 1.0)
    m.member_gone("n2", 1.5)
    for p in ("n3", "n4", "n5"):
        give(m, p, 2.0)
    assert closed(m).contributors == tuple(PEERS)


def test_self_failure_leaves_view_and_round_closes_without_self() -> None:
    m = machine()
    m.drain_actions()
    m.local_gradient_failed(1, "timeout", 1.0)
    assert LeftView(1, "n1", "failed") in m.drain_events()
    # The others are told at once, so they do not wait for us until the deadline.
    assert m.drain_actions() == [PublishState(1, D1, False)]
    for p in PEERS[1:]:
        give(m, p, 2.0)
    assert closed(m).contributors == ("n2", "n3", "n4", "n5")
    assert m.counters["local_failed:timeout"] == 1
    m.local_gradient_ready(1, 3.0)  # late: ignored
    assert m.counters["late_local_gradient"] == 1
    assert not of(m.drain_actions(), PublishGradient)


def test_a_failed_local_gradient_is_computed_again_when_no_quorum_can_close_without_it() -> None:
    """A lone peer whose functions failed (their host down) would otherwise wait for
    a quorum forever: at the deadline it computes the round again, and again, until
    its functions answer; the round then closes with its gradient."""
    m = machine(members=["n1"])
    m.drain_actions()
    m.local_gradient_failed(1, "slices", 1.0)
    assert m.drain_actions() == [PublishState(1, D1, False)]
    m.tick(5.0)  # before the deadline: nothing
    assert m.drain_actions() == []
    for attempt in (1, 2):
        m.tick(10.0 * attempt + 0.5)  # the deadline (10 s after the last start)
        assert m.drain_actions() == [InvokeFunctions(1), PublishState(1, D1, True)]
        assert m.counters["local_retries"] == attempt
        if attempt == 1:
            m.local_gradient_failed(1, "slices", 11.0)
            m.drain_actions()
    assert not of(m.drain_events(), QuorumWait)
    m.local_gradient_ready(1, 21.0)
    assert closed(m).contributors == ("n1",)


def test_a_failed_local_gradient_is_not_retried_while_the_others_can_make_a_quorum() -> None:
    """Announcing ourselves back mid-round could split the others' views: only a
    round that cannot close without us is computed again."""
    m = machine(members=["n1", "n2", "n3"])
    m.drain_actions()
    m.local_gradient_failed(1, "slices", 1.0)
    give(m, "n2", 2.0)
    m.tick(10.5)  # n3 is late, but could still come: we wait with the others
    assert not of(m.drain_actions(), InvokeFunctions)
    assert of(m.drain_events(), QuorumWait) and m.counters["local_retries"] == 0
    give(m, "n3", 11.0)
    assert closed(m).contributors == ("n2", "n3")


def test_own_gradient_after_deadline_close_is_not_published() -> None:
    m = machine()
    for p in PEERS[1:]:
        give(m, p, 1.0)
    m.tick(10.0)  # self still computing: it is the straggler
    assert closed(m).contributors == ("n2", "n3", "n4", "n5")
    m.local_gradient_ready(1, 12.0)
    assert not of(m.drain_actions(), PublishGradient)
    assert "n1" not in m.status()["absent"]  # self is never absent


# --- absent stragglers ------------------------------------------------------------------


def run_round(m: RoundMachine, now: float, without: tuple[str, ...] = ()) -> RoundClosed:
    """Self and every peer not in ``without`` contribute at ``now``; the deadline
    closes the round if needed; returns the close."""
    m.local_gradient_ready(m.round, now)
    for p in PEERS[1:]:
        if p not in without:
            give(m, p, now)
    if m.phase != "aggregating":
        m.tick(m.deadline_at or now)
    if m.phase != "aggregating":  # a body in flight: the grace (RoundConfig.body_grace)
        m.tick(m.next_deadline() or now)
    ev = closed(m)
    m.aggregated(m.round, bytes([m.round + 1]) * 32, ev.duration_s + m.begun_at)
    return ev


def test_absent_straggler_not_waited_for_then_readmitted_by_announce() -> None:
    m = machine()
    assert run_round(m, 1.0, without=("n5",)).reason == "deadline"
    # Round 2: n5 is absent, the round completes without it and without a deadline.
    assert "n5" not in m.status()["view"]
    t = m.begun_at + 1.0
    ev = run_round(m, t, without=("n5",))
    assert ev.reason == "complete" and ev.duration_s == pytest.approx(1.0)
    # Round 3: n5 announces our (round, digest): it is waited for again.
    m.announce("n5", JOB, 3, m.digest, True, m.begun_at + 0.1)
    assert "n5" in m.status()["waiting_for"]
    m.local_gradient_ready(3, m.begun_at + 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, m.begun_at + 1.0)
    assert m.phase == "collecting"
    give(m, "n5", m.begun_at + 2.0)
    assert closed(m).contributors == tuple(PEERS)


def test_absent_straggler_readmitted_by_valid_contribution() -> None:
    m = machine()
    run_round(m, 1.0, without=("n5",))
    m.local_gradient_ready(2, m.begun_at + 0.5)
    assert give(m, "n5", m.begun_at + 0.6) is None  # in time this round
    assert "n5" in m.status()["view"] and "n5" not in m.status()["absent"]
    for p in ("n2", "n3", "n4"):
        give(m, p, m.begun_at + 1.0)
    assert closed(m).contributors == tuple(PEERS)


def test_persistent_straggler_is_readmitted_only_by_contributing() -> None:
    m = machine(rounds=6)  # strikes = 2
    run_round(m, 1.0, without=("n5",))  # miss 1
    m.announce("n5", JOB, 2, m.digest, True, m.begun_at)  # back (one miss only)
    assert "n5" in m.status()["view"]
    assert run_round(m, m.begun_at + 1.0, without=("n5",)).reason == "deadline"  # miss 2
    m.announce("n5", JOB, 3, m.digest, True, m.begun_at)
    assert "n5" not in m.status()["view"]  # two misses in a row: announcing is not enough
    assert run_round(m, m.begun_at + 1.0, without=("n5",)).reason == "complete"
    m.local_gradient_ready(4, m.begun_at + 0.5)
    assert give(m, "n5", m.begun_at + 0.5) is None
    for p in ("n2", "n3", "n4"):
        give(m, p, m.begun_at + 1.0)
    assert closed(m).contributors == tuple(PEERS)
    m.aggregated(4, b"5" * 32, m.begun_at + 1.0)
    assert "n5" in m.status()["view"]  # its strikes were cleared


def test_announcement_ahead_is_applied_when_we_reach_that_round() -> None:
    m = machine()
    run_round(m, 1.0, without=("n5",))
    # n4 is already at round 3 with our future digest, n3 with another one.
    m.local_gradient_ready(2, m.begun_at + 0.5)
    next_digest = bytes([3]) * 32  # what run_round's aggregated() will report
    m.announce("n5", JOB, 3, next_digest, True, m.begun_at + 0.5)
    m.announce("n3", JOB, 3, OTHER, True, m.begun_at + 0.5)
    for p in ("n2", "n3", "n4"):
        give(m, p, m.begun_at + 1.0)
    m.drain_events()
    m.aggregated(2, next_digest, m.begun_at + 1.0)
    s = m.status()
    assert "n5" in s["view"] and "n3" not in s["view"] and s["diverged"] == ["n3"]
    assert Diverged("n3", 3, OTHER) in m.drain_events()


# --- announcements ----------------------------------------------------------------------


def test_not_participating_leaves_view_until_participating_again() -> None:
    m = machine()
    m.announce("n5", JOB, 1, D1, False, 0.5)
    assert LeftView(1, "n5", "not_participating") in m.drain_events()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    assert closed(m).reason == "complete"
    m.aggregated(1, D2, 1.0)
    assert "n5" not in m.status()["view"]  # still not participating
    m.announce("n5", JOB, 2, D2, True, 1.5)
    assert "n5" in m.status()["waiting_for"]


def test_participating_again_for_another_round_counts_from_the_next_round() -> None:
    m = machine()
    m.announce("n5", JOB, 1, D1, False, 0.1)
    m.announce("n5", JOB, 2, bytes([2]) * 32, True, 0.2)  # synced, ahead of us
    assert "n5" not in m.status()["view"]  # it cannot contribute to round 1
    assert run_round(m, 1.0, without=("n5",)).reason == "complete"
    assert "n5" in m.status()["waiting_for"]  # round 2, the digest it announced


def test_a_join_a_round_ahead_is_waited_for_from_that_round_on() -> None:
    # n5 follows round 1 (not participating) and says it computes from round 2.
    m = machine()
    m.announce("n5", JOB, 1, D1, False, 0.1)
    m.announce("n5", JOB, 2, JOIN_DIGEST, True, 0.2)
    assert "n5" not in m.status()["view"]  # not in round 1
    assert run_round(m, 1.0, without=("n5",)).reason == "complete"
    # From round 2's start it is awaited, without a divergence (a join is no digest).
    assert "n5" in m.status()["waiting_for"] and m.status()["diverged"] == []
    # Its round-2 heads-up, when it begins, matches ours; a join after it is stale.
    m.announce("n5", JOB, 2, m.digest, True, m.begun_at + 0.1)
    m.announce("n5", JOB, 2, JOIN_DIGEST, True, m.begun_at + 0.2)
    assert m.peer_positions()["n5"] == (2, m.digest)
    assert m.counters["announce_out_of_order"] == 1


def test_a_join_heard_in_the_round_it_names_is_waited_for_in_it() -> None:
    m = machine()
    m.announce("n5", JOB, 1, D1, False, 0.1)  # following round 1
    run_round(m, 1.0, without=("n5",))
    assert "n5" not in m.status()["view"]
    m.announce("n5", JOB, 2, JOIN_DIGEST, True, m.begun_at + 0.1)  # late: we began 2
    assert "n5" in m.status()["waiting_for"] and m.status()["diverged"] == []


def test_a_stateless_heads_up_after_a_position_still_says_not_participating() -> None:
    m = machine()
    m.announce("n5", JOB, 1, D1, True, 0.1)
    m.announce("n5", JOB, 1, JOIN_DIGEST, False, 0.2)  # lost its state: syncing
    assert "n5" not in m.status()["view"]


def test_out_of_order_announcement_is_ignored() -> None:
    m = machine()
    run_round(m, 1.0)
    m.announce("n5", JOB, 2, m.digest, True, m.begun_at)
    m.announce("n5", JOB, 1, D1, False, m.begun_at + 0.1)  # older, delivered late
    assert "n5" in m.status()["waiting_for"]
    assert m.peer_positions()["n5"] == (2, m.digest)
    assert m.counters["announce_out_of_order"] == 1


def test_failure_announcement_overtaken_by_next_round_still_counts_for_this_round() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    m.announce("n5", JOB, 2, D2, True, 1.5)  # n5 closed round 1 and moved on...
    assert m.phase == "collecting"  # (its gradient may still be in flight)
    m.announce("n5", JOB, 1, D1, False, 1.6)  # ...its failure heads-up arrives late
    assert closed(m) == RoundClosed(1, ("n1", "n2", "n3", "n4"), 1.6, "complete")
    assert m.peer_positions()["n5"] == (2, D2)
    m.aggregated(1, D2, 1.7)
    assert "n5" in m.status()["waiting_for"]  # round 2: it takes part


def test_round_start_announcement_arriving_after_failure_announcement_is_ignored() -> None:
    m = machine()
    m.announce("n5", JOB, 1, D1, False, 1.5)  # n5's functions failed...
    m.announce("n5", JOB, 1, D1, True, 2.0)  # ...its round start, retransmitted late
    assert "n5" not in m.status()["view"]
    assert m.counters["announce_out_of_order"] == 1
    m.announce("n5", JOB, 1, b"synced", True, 2.5)  # another position: taken
    assert m.status()["diverged"] == ["n5"]


def test_diverged_announcement_leaves_view_and_diverged_count_in_quorum() -> None:
    peers = [f"n{i}" for i in range(1, 7)]
    m = machine(members=peers)
    for p in ("n4", "n5", "n6"):
        m.announce(p, JOB, 1, OTHER, True, 0.1)
    ev = m.drain_events()
    assert [e.origin for e in of(ev, Diverged)] == ["n4", "n5", "n6"]
    assert LeftView(1, "n4", "diverged") in ev
    s = m.status()
    assert s["view"] == ["n1", "n2", "n3"] and s["quorum"] == 4  # (3 + 3 diverged)//2 + 1
    m.local_gradient_ready(1, 1.0)
    give(m, "n2", 1.0)
    give(m, "n3", 1.0)
    assert m.phase == "collecting"  # the half with our digest cannot close alone
    m.tick(10.0)
    assert of(m.drain_events(), QuorumWait) == [QuorumWait(1, 3, 4)]
    m.announce("n4", JOB, 1, D1, True, 11.0)  # n4 synced to our state
    assert "n4" in m.status()["waiting_for"]
    give(m, "n4", 12.0)
    assert closed(m).contributors == ("n1", "n2", "n3", "n4")


def test_diverged_emitted_once_per_origin_and_round() -> None:
    m = machine()
    m.announce("n2", JOB, 1, OTHER, True, 0.1)
    assert give(m, "n2", 0.2, digest=OTHER) == "digest"
    assert len(of(m.drain_events(), Diverged)) == 1
    assert m.rejected["digest"] == 1


def test_announcement_from_unknown_member_admits_it() -> None:
    m = machine()
    assert give(m, "n9", 0.5) == "not_member"
    m.announce("n9", JOB, 1, D1, True, 0.6)
    assert "n9" in m.status()["waiting_for"]
    m.announce("n8", JOB, 1, b"y", True, 0.6)
    assert "n8" not in m.status()["view"]
    assert m.peer_positions()["n8"] == (1, b"y")
    m.announce("n7", "other-job", 1, D1, True, 0.6)
    assert "n7" not in m.peer_positions() and m.counters["announce_wrong_job"] == 1


def test_member_learned_mid_round_is_waited_for_from_the_next_round() -> None:
    m = machine()
    m.member_alive("n9", 0.5)
    assert "n9" not in m.status()["view"]
    m.local_gradient_ready(1, 1.0)
    for p in PEERS[1:]:
        give(m, p, 1.0)
    assert closed(m).reason == "complete"
    m.aggregated(1, D2, 1.0)
    assert "n9" in m.status()["waiting_for"]


def test_peer_learned_mid_round_on_another_model_does_not_raise_the_quorum() -> None:
    m = machine(members=["n1", "n2", "n3"])
    assert m.status()["quorum"] == 2
    m.announce("n9", JOB, 1, OTHER, True, 0.5)  # a joiner, still on another model
    s = m.status()
    assert s["quorum"] == 2 and "n9" not in s["view"]
    m.local_gradient_ready(1, 1.0)
    give(m, "n2", 1.0)
    give(m, "n3", 1.0)
    assert closed(m).contributors == ("n1", "n2", "n3")


def test_late_announcement_from_gone_member_is_ignored_until_alive() -> None:
    m = machine()
    m.member_gone("n5", 0.5)
    m.announce("n5", JOB, 1, D1, True, 0.6)
    assert "n5" not in m.status()["view"] and "n5" not in m.peer_positions()
    assert m.counters["announce_from_gone"] == 1
    assert give(m, "n5", 0.7) == "not_member"
    m.member_alive("n5", 0.8)
    m.announce("n5", JOB, 1, D1, True, 0.9)
    assert "n5" in m.status()["waiting_for"]


# --- rejection --------------------------------------------------------------------------


def test_each_rejection_reason_is_counted_and_reported() -> None:
    m = machine(rounds=10)
    run_round(m, 1.0)
    run_round(m, m.begun_at + 1.0)
    assert m.round == 3
    d = m.digest
    cases = [
        ("job", dict(job="other")),
        ("stale", dict(round=2)),
        ("stale", dict(round=0)),
        ("future", dict(round=6)),  # window 2: 4 and 5 are held
        ("future", dict(round=11)),  # past the job's last round
        ("size", dict(size=SIZE + 4)),
        ("not_member", dict()),
    ]
    for want, kw in cases:
        # A wrong-sized gradient spends its origin's one gradient for the round.
        origin = {"not_member": "n9", "size": "n4"}.get(want, "n2")
        assert give(m, origin, 5.0, **kw) == want, kw
    assert give(m, "n4", 5.0) == "duplicate"
    assert give(m, "n2", 5.0) is None
    assert give(m, "n2", 5.0) == "duplicate"
    assert give(m, "n1", 5.0) == "duplicate"  # our own comes from local_gradient_ready
    assert give(m, "n3", 5.0, digest=b"z" * 32) == "digest"
    assert m.rejected == {
        "job": 1,
        "stale": 2,
        "future": 2,
        "size": 1,
        "not_member": 1,
        "duplicate": 3,
        "digest": 1,
    }
    ev = m.drain_events()
    assert len(of(ev, GradientRejected)) == 11
    assert LeftView(3, "n4", "bad_gradient") in ev
    assert Diverged("n3", 3, b"z" * 32) in ev and LeftView(3, "n3", "diverged") in ev
    assert m.status()["rejected"] == dict(m.rejected)
    assert m.digest == d


def test_validate_is_pure_until_receive() -> None:
    m = machine()
    for _ in range(3):
        assert m.validate("n2", JOB, 1, D1, SIZE, 0.5) is None
    assert m.status()["have"] == []
    assert m.receive("n2", JOB, 1, D1, SIZE, 0.6) is None
    assert m.receive("n2", JOB, 1, D1, SIZE, 0.6) == "duplicate"


def test_receive_rechecks_after_the_round_moved() -> None:
    m = machine()
    assert m.validate("n5", JOB, 1, D1, SIZE, 0.5) is None  # body being pulled...
    run_round(m, 1.0, without=("n5",))  # ...round closes past the deadline meanwhile
    assert m.receive("n5", JOB, 1, D1, SIZE, 16.0) == "stale"
    assert GradientRejected("n5", 1, "stale") in m.drain_events()


def _n5_in_flight_at_the_deadline() -> RoundMachine:
    """Deadline 10 s, grace half of it: four gradients in, n5's announced and
    accepted at 9 s, its body still on its way when the deadline fires."""
    m = machine()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    assert m.validate("n5", JOB, 1, D1, SIZE, 9.0) is None
    m.tick(10.0)
    return m


def test_at_the_deadline_a_body_in_flight_is_waited_for_within_the_grace() -> None:
    # Peers whose deadline fires before n5's body lands would close without it, the
    # others with it: the grace keeps them on one model.
    m = _n5_in_flight_at_the_deadline()
    assert not of(m.drain_events(), RoundClosed) and m.next_deadline() == 15.0
    assert m.receive("n5", JOB, 1, D1, SIZE, 12.0) is None
    assert closed(m).contributors == ("n1", "n2", "n3", "n4", "n5")


def test_a_body_that_never_lands_costs_the_grace_and_no_more() -> None:
    m = _n5_in_flight_at_the_deadline()
    m.tick(15.0)
    assert closed(m) == RoundClosed(1, ("n1", "n2", "n3", "n4"), 15.0, "deadline")
    # Without a quorum there is nothing to close on: no grace, QuorumWait as before.
    m2 = machine(min_contributors=4)
    m2.local_gradient_ready(1, 1.0)
    give(m2, "n2", 1.0)
    assert m2.validate("n5", JOB, 1, D1, SIZE, 9.0) is None
    m2.tick(10.0)
    assert of(m2.drain_events(), QuorumWait)
    # The arrival that makes the quorum, with a body still in flight: the grace,
    # counted from the deadline, bounds that wait too.
    for p in ("n3", "n4"):
        give(m2, p, 11.0)
    assert m2.phase == "collecting" and m2.next_deadline() == 15.0
    m2.tick(15.0)
    assert closed(m2).contributors == ("n1", "n2", "n3", "n4")


def test_daemon_reject_forgets_a_counted_gradient_and_stops_waiting() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    m.reject("n4", 1, "non_finite", 1.1)
    assert m.rejected["non_finite"] == 1
    ev = m.drain_events()
    assert GradientRejected("n4", 1, "non_finite") in ev
    assert LeftView(1, "n4", "bad_gradient") in ev
    assert m.status()["bad_gradient"] == ["n4"]
    # One gradient per origin and round: a second copy, good or not, is refused,
    # and the round does not wait for n4 (no deadline spent on a liar).
    assert give(m, "n4", 1.15) == "duplicate"
    give(m, "n5", 1.2)
    assert closed(m).contributors == ("n1", "n2", "n3", "n5")
    # Next round n4 is a member again.
    m.aggregated(1, D2, 1.3)
    assert "n4" in m.status()["view"] and m.status()["bad_gradient"] == []


def test_a_rejected_gradient_lowers_f_and_the_quorum_with_min_for_f() -> None:
    """Krum at n = 2f + 3: two liars sending non-finite values must not leave the
    round short of its quorum forever; they are proven, so f drops with them."""
    m = krum_machine()
    m.local_gradient_ready(1, 0.5)
    for p in ("n2", "n3", "n4", "n5"):
        give(m, p, 1.0)
    # As the daemon does: validated, pulled, refused by the store, never received.
    for p in ("n6", "n7"):
        assert m.validate(p, JOB, 1, D1, SIZE, 1.05) is None
        m.reject(p, 1, "nonfinite", 1.1)
    agg = [a for a in m.drain_actions() if isinstance(a, Aggregate)]
    # Five contributors: Krum takes f = 1 there (5 >= 2f + 3), whatever was proven.
    assert agg == [Aggregate(1, ("n1", "n2", "n3", "n4", "n5"), 1)]


def test_the_aggregation_f_does_not_depend_on_when_a_liar_was_caught() -> None:
    """Two honest peers close with the same five contributors. One pulled both
    liars' non-finite bodies first; the other pulled one and closed at the
    deadline before the second came (one liar proven leaves Krum a quorum of 5).
    Aggregating with f = 0 on one and f = 1 on the other would fork the model (a
    Krum or a trimmed mean depends on f); both must use the same f."""
    honest = ("n1", "n2", "n3", "n4", "n5")
    early = krum_machine("n1")
    early.local_gradient_ready(1, 0.5)
    for p in ("n6", "n7"):
        assert early.validate(p, JOB, 1, D1, SIZE, 0.6) is None
        early.reject(p, 1, "nonfinite", 0.7)
    for p in honest[1:]:
        give(early, p, 1.0)
    late = krum_machine("n2")
    late.local_gradient_ready(1, 0.5)
    for p in ("n1", "n3", "n4", "n5"):
        give(late, p, 1.0)
    assert late.validate("n6", JOB, 1, D1, SIZE, 1.05) is None
    late.reject("n6", 1, "nonfinite", 1.1)
    late.tick(late.next_deadline() or 100.0)
    a1 = [a for a in early.drain_actions() if isinstance(a, Aggregate)]
    a2 = [a for a in late.drain_actions() if isinstance(a, Aggregate)]
    assert a1 and a2 and a1[0].contributors == a2[0].contributors == honest
    assert a1[0].f == a2[0].f == 1


def test_excluded_peer_is_out_for_the_rest_of_the_job() -> None:
    m = krum_machine()
    m.local_gradient_ready(1, 0.5)
    for p in ("n2", "n3", "n7"):
        give(m, p, 1.0)
    assert give(m, "n6", 1.0, round=2, digest=D2) is None  # held for round 2
    m.exclude("n7", 1.1)
    assert LeftView(1, "n7", "excluded") in m.drain_events()
    for p in ("n4", "n5", "n6"):
        give(m, p, 1.2)
    # n7's counted gradient is dropped; six contributors leave Krum f = 1.
    agg = [a for a in m.drain_actions() if isinstance(a, Aggregate)]
    assert agg == [Aggregate(1, ("n1", "n2", "n3", "n4", "n5", "n6"), 1)]
    m.aggregated(1, D2, 2.0)
    assert "n7" not in m.status()["view"] and m.status()["excluded"] == ["n7"]
    m.announce("n7", JOB, 2, D2, True, 2.1)  # announcing our position brings it back? no
    assert "n7" not in m.status()["view"]
    assert give(m, "n7", 2.2) == "excluded"
    m.member_alive("n7", 2.3)
    assert give(m, "n7", 2.3) == "excluded"
    assert m.rejected["excluded"] == 2


# --- held future gradients --------------------------------------------------------------


def test_held_future_gradients_count_at_begin_or_are_rejected_on_digest() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3"):
        give(m, p, 1.0)
    # n4 and n5 already finished round 1 (they got all but... ) and sent round 2.
    assert give(m, "n4", 1.5, round=2, digest=D2) is None
    assert give(m, "n5", 1.5, round=2, digest=OTHER) is None
    assert give(m, "n4", 1.6, round=2, digest=D2) == "duplicate"  # held counts as pending
    assert m.status()["held"] == {2: 2}
    give(m, "n4", 2.0)
    give(m, "n5", 2.0)
    assert closed(m).reason == "complete"
    m.aggregated(1, D2, 2.0)
    ev = m.drain_events()
    assert GradientRejected("n5", 2, "digest") in ev and Diverged("n5", 2, OTHER) in ev
    s = m.status()
    assert s["have"] == ["n4"] and s["held"] == {}
    assert "n5" not in s["view"]
    m.local_gradient_ready(2, 3.0)
    give(m, "n2", 3.0)
    give(m, "n3", 3.0)
    assert closed(m).contributors == ("n1", "n2", "n3", "n4")


def test_gradients_before_first_begin_are_held() -> None:
    m = machine(begin=False)
    assert m.phase == "idle" and m.next_deadline() is None
    assert give(m, "n2", 0.1, round=1, digest=D1) is None
    assert give(m, "n3", 0.1, round=3, digest=D1) is None
    assert give(m, "n3", 0.1, round=4, digest=D1) == "future"
    m.begin(1, D1, 0.2)
    assert m.status()["have"] == ["n2"] and m.status()["held"] == {3: 1}


def test_state_sync_jump_drops_skipped_held_gradients() -> None:
    m = machine(rounds=10)
    give(m, "n2", 0.5, round=2, digest=D2)
    give(m, "n3", 0.5, round=3, digest=D2)
    m.begin(3, D2, 1.0)  # synced straight to round 3
    ev = m.drain_events()
    assert GradientRejected("n2", 2, "stale") in ev
    assert m.status()["have"] == ["n3"] and m.round == 3
    assert m.drain_actions()[-2:] == [InvokeFunctions(3), PublishState(3, D2, True)]
    m.local_gradient_ready(1, 1.1)  # for the abandoned round
    assert m.counters["late_local_gradient"] == 1
    m.begin(3, D2, 1.2)  # repeated: no-op
    assert m.counters["begin_repeated"] == 1 and not m.drain_actions()


# --- schedule ---------------------------------------------------------------------------


def test_evaluation_schedule_and_finished() -> None:
    m = machine(rounds=5, eval_every=2)
    seen = []
    t = 0.0
    while m.phase != "done":
        t += 1.0
        m.local_gradient_ready(m.round, t)
        for p in PEERS[1:]:
            give(m, p, t)
        m.aggregated(m.round, bytes([m.round + 1]) * 32, t)
        seen += [
            a for a in m.drain_actions() if isinstance(a, Evaluate | Finished | InvokeFunctions)
        ]
    assert [a for a in seen if not isinstance(a, InvokeFunctions)] == [
        Evaluate(2),
        Evaluate(4),
        Evaluate(5),
        Finished(5),
    ]
    assert [a.round for a in seen if isinstance(a, InvokeFunctions)] == [1, 2, 3, 4, 5]
    assert m.round == 5 and m.digest == bytes([6]) * 32
    m.aggregated(5, b"again", t)
    assert m.counters["late_aggregated"] == 1
    assert give(m, "n2", t, round=5) == "stale"


def test_failed_peer_announcement_lets_the_others_close_without_waiting() -> None:
    m = machine()
    m.local_gradient_ready(1, 1.0)
    for p in ("n2", "n3", "n4"):
        give(m, p, 1.0)
    m.announce("n5", JOB, 1, D1, False, 1.5)  # n5's functions failed
    assert closed(m) == RoundClosed(1, ("n1", "n2", "n3", "n4"), 1.5, "complete")
    m.aggregated(1, D2, 1.6)
    m.announce("n5", JOB, 2, D2, True, 1.7)  # its next round start
    assert "n5" in m.status()["waiting_for"]


def test_final_positions_are_published_and_compared() -> None:
    m = machine(rounds=1)
    m.announce("n3", JOB, 2, b"final-other", False, 0.5)  # n3 finished first, differently
    m.local_gradient_ready(1, 1.0)
    for p in PEERS[1:]:
        give(m, p, 1.0)
    assert m.status()["view"] == PEERS  # a final position changes no view
    m.drain_actions()
    m.aggregated(1, D2, 1.0)
    assert m.drain_actions() == [Evaluate(1), Finished(1), PublishState(2, D2, False)]
    m.announce("n4", JOB, 2, D2, False, 1.1)
    m.announce("n5", JOB, 2, b"final-third", False, 1.2)
    m.announce("n5", JOB, 2, b"final-third", False, 1.3)
    assert of(m.drain_events(), Diverged) == [
        Diverged("n3", 2, b"final-other"),
        Diverged("n5", 2, b"final-third"),
    ]


def test_eval_every_zero_evaluates_only_at_the_end() -> None:
    m = machine(rounds=2, eval_every=0)
    for r in (1, 2):
        m.local_gradient_ready(r, 1.0)
        for p in PEERS[1:]:
            give(m, p, 1.0)
        m.aggregated(r, bytes([r + 1]) * 32, 1.0)
    acts = m.drain_actions()
    assert of(acts, Evaluate) == [Evaluate(2)] and of(acts, Finished) == [Finished(2)]


def test_not_participating_peer_follows_rounds_without_computing() -> None:
    m = machine(begin=False)
    m.begin(1, D1, 0.0, participating=False)
    assert m.drain_actions() == [PublishState(1, D1, False)]
    for p in PEERS[1:]:
        give(m, p, 1.0)
    assert closed(m).contributors == ("n2", "n3", "n4", "n5")
    m.aggregated(1, D2, 1.0)
    assert m.drain_actions()[1:] == [PublishState(2, D2, False)]


def test_constructor_rejects_bad_arguments() -> None:
    base = dict(
        self_id="n1",
        job_id=JOB,
        rounds=3,
        min_contributors=1,
        eval_every=1,
        param_count=1,
        members=PEERS,
    )
    for name, value in [
        ("rounds", 0),
        ("min_contributors", 0),
        ("eval_every", -1),
        ("param_count", 0),
        ("start_round", 4),
    ]:
        with pytest.raises(ValueError, match=name):
            RoundMachine(**{**base, name: value})  # type: ignore[arg-type]
    m = RoundMachine(**base, start_round=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.begin(4, D1, 0.0)


# --- any order --------------------------------------------------------------------------


def test_random_call_orders_never_crash_and_keep_invariants() -> None:
    rng = random.Random(1234)
    peers = [f"n{i}" for i in range(1, 9)]
    digests = [b"a" * 8, b"b" * 8, b"c" * 8]
    for trial in range(300):
        m = RoundMachine(
            self_id="n1",
            job_id=JOB,
            rounds=4,
            min_contributors=rng.randint(1, 4),
            eval_every=rng.randint(0, 2),
            param_count=PARAMS,
            members=peers[: rng.randint(1, 8)],
            config=replace(CFG, future_window=rng.randint(0, 2), strikes=rng.randint(1, 3)),
        )
        now = 0.0
        for _ in range(120):
            now += rng.random() * 3
            op = rng.randrange(11)
            p = rng.choice([*peers, "zz"])
            r = rng.randint(0, 5)
            d = rng.choice(digests)
            if op == 0:
                m.begin(rng.randint(1, 4), d, now)
            elif op == 1:
                m.local_gradient_ready(r, now)
            elif op == 2:
                m.local_gradient_failed(r, "x", now)
            elif op in (3, 4):
                size = SIZE if rng.random() < 0.9 else 3
                if m.validate(p, JOB, r, d, size, now) is None or rng.random() < 0.3:
                    m.receive(p, JOB, r, d, size, now)
            elif op == 5:
                m.reject(p, r, "bad", now)
            elif op == 6:
                m.announce(p, JOB, r, d, rng.random() < 0.8, now)
            elif op == 7:
                m.member_alive(p, now)
            elif op == 8:
                m.member_gone(p, now)
            elif op == 9:
                m.aggregated(r if rng.random() < 0.5 else m.round, d, now)
            else:
                m.tick(now)
            for a in m.drain_actions():
                if isinstance(a, Aggregate):
                    assert list(a.contributors) == sorted(set(a.contributors)), trial
            s = m.status()
            m._view._qn = None  # the cached quorum must equal a fresh count
            assert m.status()["quorum"] == s["quorum"], trial
            if s["phase"] in ("computing", "collecting"):
                assert set(s["waiting_for"]) <= set(s["view"]), trial
                assert not set(s["waiting_for"]) & set(s["have"]), trial
                dl = m.next_deadline()
                assert dl is None or s["waiting_for_quorum"] is False
            m.drain_events()


def test_bad_gradient_for_a_round_not_begun_yet_is_not_waited_for() -> None:
    """A peer ahead of us relays round 2's gradients while we are in round 1: the
    liars' non-finite ones are refused then, and round 2 must not wait for them."""
    m = krum_machine()
    for p in ("n6", "n7"):
        assert m.validate(p, JOB, 2, D2, SIZE, 0.1) is None
        m.reject(p, 2, "nonfinite", 0.2)
        assert m.validate(p, JOB, 2, D2, SIZE, 0.3) == "duplicate"
    m.local_gradient_ready(1, 0.5)
    for p in ("n2", "n3", "n4", "n5", "n6", "n7"):
        give(m, p, 1.0)
    m.aggregated(1, D2, 1.5)
    assert m.status()["bad_gradient"] == ["n6", "n7"]
    m.local_gradient_ready(2, 2.0)
    for p in ("n2", "n3", "n4", "n5"):
        give(m, p, 2.5)
    agg = [a for a in m.drain_actions() if isinstance(a, Aggregate)]
    assert agg[-1] == Aggregate(2, ("n1", "n2", "n3", "n4", "n5"), 1)
