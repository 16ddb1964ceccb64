"""Liveness stalls of the round and job machines, found by fuzzing the simulator
near a clean-clone CI stall of test_byzantine_bad_gradients (four honest peers,
f = 1, three contributors a round, bodies slow enough that deadline closes split
the contributor sets; in CI the four stalled for > 350 s, two at one round and
two at the next). One test per cause; every one failed at cdb43e5.

1. A follower that unfollowed (past its deadline with nobody ahead) restarted its
   round with ``begin``, dropping the gradients it had counted there; their
   senders never send them again. Two followers that unfollowed together then
   closed the next round on one gradient each: two unvouched single holders, and
   no timer left on any peer. Now ``RoundMachine.take_part`` keeps them.
2. **Open:** a four-way split at a deadline (every peer closes round r with a
   different set) leaves each peer alone at r + 1 with nothing vouched there, so
   none may load another's state, and each waits. Repairing it needs the peers to
   agree on round r again (keep theta_r one round and re-aggregate, or agree on
   the contributor set before closing); its test is marked xfail (strict).
3. A peer that ended the job by sync never published its final position, so the
   others counted it as still closing the last round and a lone peer on another
   final model never saw its rival outnumber it.
4. A follower whose warm-up failed never tried again, and followed for good.
5. A peer restarted without its state, while the others waited for it to make a
   quorum, heard no position to sync to: heads-ups went out only at round starts.
   Live peers now repeat theirs when a member comes (back), and, since that member
   event reaches them before the restarted job listens (the simulator's
   ``boot_delay``), when they hear its heads-up from behind.
6. A peer restarted from its own state after the others had finished (an operator
   run: kill -9 near the end of a 200-round job, restart) found nobody ahead of it,
   took itself for in sync, and waited for ever for a quorum that had gone home.
   Done peers now answer a straggler's heads-up with their final position.
"""

from __future__ import annotations

from collections import Counter

import pytest

from protocol.gossip import Verdict
from protocol.rounds import (
    Aggregate,
    FetchState,
    InvokeFunctions,
    JobDone,
    JobMachine,
    PublishState,
    RoundConfig,
    RoundMachine,
    Unfollowed,
    WarmUp,
)
from protocol.rounds.sim import Cut, RoundSim, SimParams


def _sim(seed: int, rounds: int) -> RoundSim:
    """Four honest peers, f = 1, three contributors a round, no faults at all: only
    load (bodies up to 3 s after their announcement, 1-6 s deadlines)."""
    sim = RoundSim(
        SimParams(
            n=4,
            rounds=rounds,
            seed=seed,
            min_contributors=3,
            f=1,
            config=RoundConfig(
                initial_deadline_s=6.0, deadline_floor_s=1.0, deadline_ceiling_s=6.0
            ),
            fn_delay=(0.5, 4.0),
            msg_delay=(0.005, 0.05),
            pull_delay=(0.01, 3.0),
            until=2000.0,
        )
    )
    sim.run()
    return sim


def _assert_all_done_on_one_model(sim: RoundSim) -> None:
    live = sim.live_peers()
    stuck = {
        x.id: (str(x.job.lifecycle), x.completed, x.machine.status()["have"], x.machine.phase)
        for x in live
        if not x.done
    }
    assert not stuck, f"stalled until t={sim.loop.now}: {stuck}"
    finals = Counter(x.final_digest for x in live)
    assert len(finals) == 1, finals


# --- cause 1: an unfollowed round forgets what it counted --------------------------------

JOB = "job-1"
SIZE = 10 * 4
D3 = b"\x03" * 32
CFG = RoundConfig(initial_deadline_s=10.0, deadline_floor_s=1.0, deadline_ceiling_s=50.0)


def _restarted(rounds: int = 5) -> JobMachine:
    """n1, restarted: four members, three contributors a round, f = 1."""
    m = RoundMachine(
        self_id="n1",
        job_id=JOB,
        rounds=rounds,
        min_contributors=3,
        eval_every=0,
        param_count=10,
        members=["n1", "n2", "n3", "n4"],
        config=CFG,
    )
    j = JobMachine(m, f=1)
    j.start_elsewhere("restarted", 0.0)
    return j


def _following_round_3(*, warm: bool = True) -> JobMachine:
    """n1 follows round 3: its Redis held the state after round 2, and nobody
    contradicts it. ``warm``: whether its warm-up answered."""
    j = _restarted()
    j.local_state((2, D3), None, 1.0)
    j.warm_up_done(warm, 1.5)
    j.drain_actions()
    j.drain_events()
    assert j.following and j.rounds.round == 3 and not j.rounds.participating
    return j


def test_an_unfollowed_round_keeps_the_gradients_it_counted() -> None:
    j = _following_round_3()
    # n4 follows too (it announced it does not take part); n2 and n3 compute
    # round 3 and send their gradients, once.
    j.announce("n4", JOB, 3, D3, False, 2.0)
    for p in ("n2", "n3"):
        assert j.validate_gradient(p, JOB, 3, D3, SIZE, 2.0) is Verdict.ACCEPT
        assert j.gradient_arrived(p, JOB, 3, D3, SIZE, None, 2.0)
        assert j.gradient_stored(p, JOB, 3, D3, SIZE, 2.0) is None
    assert j.rounds.status()["have"] == ["n2", "n3"]
    # Two of three: past the deadline n1 computes the round after all.
    j.tick(1.0 + CFG.initial_deadline_s + 0.5)
    j.tick(1.0 + CFG.initial_deadline_s + 2.0)
    assert Unfollowed(3) in j.drain_events()
    assert InvokeFunctions(3) in j.drain_actions()
    j.local_gradient_ready(3, 14.0)
    # n2's and n3's gradients will not come again: with n1's own they make the
    # quorum, so the round closes now, with the three.
    aggregates = [a for a in j.drain_actions() if isinstance(a, Aggregate)]
    assert [a.contributors for a in aggregates] == [("n1", "n2", "n3")], j.rounds.status()


def test_two_followers_that_unfollow_together_finish_the_job() -> None:
    # Seed 46, 3 rounds (at cdb43e5): round 1 splits at the deadline (p0000 and p0001
    # alone), both sync and follow round 2, both unfollow, and round 2 forks into two
    # single holders of round 3 (cause 1 above): the CI stall's shape, two peers at
    # one round, two at the next. Which seed shows it depends on the draws, so the
    # test below sweeps seeds as well.
    _assert_all_done_on_one_model(_sim(46, 3))


def test_four_honest_peers_under_load_finish_their_jobs() -> None:
    # At cdb43e5, 11 of these 20 seeds stall, all of cause 1 (cause 2 shows in about
    # 2 seeds in 100 with these parameters, seeds 54 and 97).
    stalled = {}
    for seed in range(20):
        sim = _sim(seed, 12)
        stuck = [x for x in sim.live_peers() if not x.done]
        if stuck:
            stalled[seed] = [(x.id, x.completed) for x in stuck]
    assert not stalled, stalled


# --- cause 2: a four-way split at a deadline -----------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="open: a four-way split at a deadline leaves nothing vouched to sync to "
    "(cause 2 in the module docstring)",
)
def test_a_four_way_split_at_a_deadline_is_repaired() -> None:
    # Each peer misses one other's round-2 gradient (here cut for good; in CI, a body
    # that arrived after that peer's deadline): all four close round 2 at the
    # deadline with a different set of three, so each is alone at round 3 and
    # nothing there is vouched for. Whatever the seed.
    ids = [f"p{i:04d}" for i in range(4)]
    cuts = tuple(
        Cut(frozenset({ids[(i + 3) % 4]}), frozenset({ids[i]}), 2, frozenset({"gradient"}))
        for i in range(4)
    )
    sim = RoundSim(
        SimParams(n=4, rounds=4, seed=1, min_contributors=3, f=1, cuts=cuts, until=600.0)
    )
    sim.run()
    sets = {x.id: c.contributors for x in sim.peers for c in x.closes if c.round == 2}
    assert len(set(sets.values())) == 4, sets  # the scenario
    _assert_all_done_on_one_model(sim)


# --- cause 3: a peer that finished by sync keeps its final position to itself --------------


def test_a_peer_that_finishes_by_sync_announces_its_final_position() -> None:
    j = _restarted(rounds=5)
    final = b"\x06" * 32
    for p in ("n2", "n3"):
        j.announce(p, JOB, 6, final, False, 0.5)  # rounds + 1: their final position
    j.local_state((4, b"\x05" * 32), None, 1.0)  # one round short of it
    assert FetchState("n2", 5, final) in j.drain_actions()
    j.state_fetched("n2", 5, final, 2.0)
    j.drain_actions()
    j.state_loaded("n2", 5, final, 2.5)
    # As a peer that aggregated the last round itself does: a lone peer on another
    # final model counts this one on the majority's side only once it hears this.
    assert PublishState(6, final, False) in j.drain_actions()
    j.done(3.0)
    assert JobDone(5, "sync") in j.drain_events()


def test_a_last_round_split_is_repaired_on_every_peer() -> None:
    # Three rounds: three peers end on one final model (one of them by sync), the
    # fourth alone on another, for good. At cdb43e5 seeds 4 and 19 end so; the
    # others stall first (cause 1), and end so once cause 1 alone is fixed.
    differ = {}
    for seed in (4, 19, 41, 42, 44, 46, 59):
        sim = _sim(seed, 3)
        finals = Counter(x.final_digest for x in sim.live_peers())
        if len(finals) > 1:
            differ[seed] = sorted(finals.values())
    assert not differ, differ


# --- cause 4: a failed warm-up is never tried again -----------------------------------------


def test_a_follower_whose_warm_up_failed_tries_again() -> None:
    j = _following_round_3(warm=False)
    for t in (5.0, 1.0 + CFG.initial_deadline_s + 0.5, 1.0 + CFG.initial_deadline_s + 2.0):
        j.tick(t)
    actions = j.drain_actions()
    assert any(isinstance(a, (WarmUp, InvokeFunctions)) for a in actions), (
        j.following,
        j.warmed,
        actions,
    )


# --- cause 5: a restart without state while the others wait for it ------------------------


def test_a_restart_without_state_that_the_quorum_needs_finishes_the_job() -> None:
    # Three peers and three contributors a round: the others cannot close a round
    # without the restarted peer, which restarts with an empty Redis. At cdb43e5 all
    # three wait for ever, whatever the seed.
    for seed in (1, 2, 3):
        sim = RoundSim(
            SimParams(
                n=3,
                rounds=8,
                seed=seed,
                min_contributors=3,
                f=1,
                restarts=1,
                restart_lost=1,
                restart_at=8.0,
                boot_delay=(2.0, 6.0),
                until=600.0,
            )
        )
        sim.run()
        _assert_all_done_on_one_model(sim)


# --- cause 6: a restart from its own state after the others finished -------------------


@pytest.mark.parametrize("lost", [0, 1])
def test_a_peer_restarted_after_the_others_finished_takes_the_final_model(lost: int) -> None:
    # Down from round ~3 of 8 until well after the others are done; back with its
    # Redis as it was (or emptied). At 226d353 the one with its state stayed running
    # for ever, whatever the seed.
    for seed in (1, 2, 3):
        sim = RoundSim(
            SimParams(
                n=3,
                rounds=8,
                seed=seed,
                min_contributors=2,
                f=1,
                restarts=1,
                restart_lost=lost,
                restart_at=5.0,
                restart_down=(40.0, 41.0),
                boot_delay=(2.0, 6.0),
                until=400.0,
            )
        )
        sim.run()
        _assert_all_done_on_one_model(sim)
        back = sim.by_id[sim.restart_ids[0]]
        assert back.prev is not None and back.prev.completed < 8
        assert back.finished_via == "sync"
