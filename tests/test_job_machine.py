"""The job machine, one decision at a time (simulated time, no processes)."""

from __future__ import annotations

from typing import Any

from protocol.gossip import Verdict
from protocol.rounds import (
    CHECKPOINT,
    Aggregate,
    CaughtUp,
    Diverged,
    Evaluate,
    Excluded,
    FetchState,
    Finished,
    InvokeFunctions,
    JobConfig,
    JobDone,
    JobFailed,
    JobMachine,
    Lifecycle,
    LoadState,
    PublishGradient,
    PublishState,
    ReadLocalState,
    Resumed,
    RoundConfig,
    RoundMachine,
    StateLoaded,
    StateUnvouched,
    SyncStarted,
    Unfollowed,
    WarmUp,
    WriteGradient,
)
from protocol.rounds.job import JOIN_DIGEST, NO_DIGEST

JOB = "job-1"
PARAMS = 10
SIZE = PARAMS * 4
D = [bytes([i]) * 32 for i in range(1, 20)]  # D[r]: the model at the start of round r
OTHER = b"\xee" * 32
ME = "n1"
PEERS = ["n2", "n3", "n4", "n5"]
CFG = RoundConfig(initial_deadline_s=10.0, deadline_floor_s=1.0, deadline_ceiling_s=50.0)


def job(
    *,
    self_id: str = ME,
    members: list[str] | None = None,
    rounds: int = 5,
    min_contributors: int = 1,
    f: int = 1,
    checkpoint_every: int = 0,
    buffer_max: int = 512,
) -> JobMachine:
    m = RoundMachine(
        self_id=self_id,
        job_id=JOB,
        rounds=rounds,
        min_contributors=min_contributors,
        eval_every=0,
        param_count=PARAMS,
        members=[ME, *PEERS] if members is None else members,
        config=CFG,
    )
    return JobMachine(
        m, f=f, config=JobConfig(checkpoint_every=checkpoint_every, buffer_max=buffer_max)
    )


def drain(j: JobMachine) -> tuple[list[Any], list[Any]]:
    return j.drain_actions(), j.drain_events()


def work(actions: list[Any]) -> list[Any]:
    """The actions other than "not taking part" heads-ups (repeated while syncing)."""
    return [a for a in actions if not (isinstance(a, PublishState) and not a.participating)]


def started(**kw: Any) -> JobMachine:
    j = job(**kw)
    j.start(D[1], 0.0)
    drain(j)
    return j


def run_round(j: JobMachine, r: int, t: float, *, others: list[str] = PEERS) -> list[Any]:
    """Every peer's gradient for round ``r`` on D[r], our own too, then the update to
    D[r + 1]; returns the actions that came out."""
    out: list[Any] = []
    for p in others:
        assert j.validate_gradient(p, JOB, r, D[r], SIZE, t) is Verdict.ACCEPT
        assert j.gradient_arrived(p, JOB, r, D[r], SIZE, None, t)
        assert j.gradient_stored(p, JOB, r, D[r], SIZE, t) is None
    if j.rounds.participating:
        j.local_gradient_ready(r, t)
    out += j.drain_actions()
    assert any(isinstance(a, Aggregate) and a.round == r for a in out), out
    j.aggregated(r, D[r + 1], t + 0.1)
    out += j.drain_actions()
    return out


def vouch(j: JobMachine, r: int, digest: bytes, peers: list[str], t: float = 0.0) -> None:
    for p in peers:
        j.announce(p, JOB, r, digest, True, t)


def syncing_without_state(rounds: int = 5) -> JobMachine:
    j = job(rounds=rounds)
    j.start_elsewhere("joining", 0.0)
    actions, events = drain(j)
    # The functions warm up beside the sync: a warm-only call needs no state.
    assert actions == [PublishState(1, NO_DIGEST, False), WarmUp(1), ReadLocalState()]
    assert events == [SyncStarted("joining")]
    return j


# --- lifecycle --------------------------------------------------------------------------


def test_start_runs_round_one_and_computes() -> None:
    j = job()
    assert j.lifecycle is Lifecycle.STARTING
    j.start(D[1], 0.0)
    assert j.lifecycle is Lifecycle.RUNNING and j.state == "running"
    assert j.drain_actions() == [InvokeFunctions(1), PublishState(1, D[1], True)]


def test_stop_checkpoints_a_running_job_only() -> None:
    j = started()
    assert j.stop("user") is True
    assert j.lifecycle is Lifecycle.STOPPED and j.status()["detail"] == "user"
    assert j.stop("again") is False  # already stopped: nothing to save twice
    j = syncing_without_state()
    assert j.stop("user") is False  # no valid state to save


def test_fail_tells_the_others_not_to_wait() -> None:
    j = started()
    j.fail("compute-1 failed: boom", 1.0)
    actions, events = drain(j)
    assert j.lifecycle is Lifecycle.FAILED
    assert actions == [PublishState(1, D[1], False)]
    assert events == [JobFailed("compute-1 failed: boom")]
    j.fail("twice", 2.0)
    assert drain(j) == ([], [])


def test_last_round_finishes_then_done() -> None:
    j = started(rounds=2)
    run_round(j, 1, 1.0)
    out = run_round(j, 2, 2.0)
    assert Finished(2) in out
    assert j.lifecycle is Lifecycle.RUNNING  # the evaluation is still the daemon's
    j.done(3.0)
    assert j.lifecycle is Lifecycle.DONE
    assert JobDone(2, "run") in j.drain_events()


def test_checkpointed_rounds_are_marked_on_the_aggregate() -> None:
    j = started(rounds=5, checkpoint_every=2)
    flags = {}
    for r in range(1, 6):
        for a in run_round(j, r, float(r)):
            if isinstance(a, Aggregate):
                flags[a.round] = a.checkpoint
    assert flags == {1: False, 2: True, 3: False, 4: True, 5: True}  # and the last


# --- the round machine's work is moot while syncing ---------------------------------------


def test_round_work_is_dropped_while_syncing() -> None:
    j = started()
    j.redis_trouble("redis went away", 0.5)
    actions, events = drain(j)
    assert j.lifecycle is Lifecycle.SYNCING
    assert SyncStarted("redis went away") in events
    assert actions == [PublishState(1, D[1], False), WarmUp(1), ReadLocalState()]
    j.local_gradient_ready(1, 1.0)  # the functions finish anyway
    assert not any(isinstance(a, PublishGradient) for a in j.drain_actions())


# --- buffering and replay ---------------------------------------------------------------


def test_gradients_are_held_while_syncing_and_replayed_once_running() -> None:
    j = syncing_without_state()
    assert j.validate_gradient("n2", JOB, 3, D[3], SIZE, 1.0) is Verdict.ACCEPT
    assert j.gradient_arrived("n2", JOB, 3, D[3], SIZE, "h2", 1.0) is False
    assert j.validate_gradient("n3", JOB, 3, D[3], SIZE - 4, 1.0) is Verdict.REJECT
    assert j.buffered() == 1
    # This node's Redis still holds round 3's state: it resumes there and the held
    # gradient goes to the round machine.
    j.local_state((2, D[3]), None, 1.5)
    actions, events = drain(j)
    assert Resumed(3) in events and j.lifecycle is Lifecycle.RUNNING and j.following
    assert WriteGradient("n2", 3, "h2") in actions
    assert j.buffered() == 0


def test_held_gradients_are_bounded_oldest_dropped() -> None:
    j = job(buffer_max=2)
    j.start_elsewhere("joining", 0.0)
    for i, p in enumerate(PEERS[:3]):
        j.validate_gradient(p, JOB, 1, D[1], SIZE, 0.1)
        assert not j.gradient_arrived(p, JOB, 1, D[1], SIZE, p, 0.1 + i)
    assert j.buffered() == 2 and j.counters["buffer_dropped"] == 1
    j.local_state((0, D[1]), None, 1.0)
    written = [a.handle for a in j.drain_actions() if isinstance(a, WriteGradient)]
    assert written == ["n3", "n4"]


def test_follower_holds_gradients_past_the_window() -> None:
    j = syncing_without_state()
    j.local_state((2, D[3]), None, 1.0)
    drain(j)
    assert j.following and j.rounds.round == 3
    far = 3 + CFG.future_window + 1
    j.validate_gradient("n2", JOB, far, D[far], SIZE, 1.1)
    assert not j.gradient_arrived("n2", JOB, far, D[far], SIZE, "far", 1.1)
    near = 3 + CFG.future_window
    assert j.gradient_arrived("n2", JOB, near, D[near], SIZE, "near", 1.1)


# --- when to sync --------------------------------------------------------------------------


def test_a_minority_syncs_when_the_others_announce_another_model() -> None:
    j = started(f=1)
    run_round(j, 1, 1.0)
    drain(j)
    vouch(j, 2, OTHER, ["n2", "n3", "n4"], 2.0)
    actions, events = drain(j)
    assert any(isinstance(e, Diverged) for e in events)
    assert j.lifecycle is Lifecycle.SYNCING
    assert any(isinstance(e, SyncStarted) and "diverged" in e.why for e in events)
    assert ReadLocalState() in actions


def test_a_peer_far_behind_finds_out_at_the_periodic_check() -> None:
    j = started(f=1)
    drain(j)
    vouch(j, 5, D[5], ["n2", "n3"], 0.5)  # far ahead, no divergence in our round
    assert j.lifecycle is Lifecycle.RUNNING
    nxt = j.next_deadline()
    assert nxt is not None and nxt <= j.config.sync_check_s
    j.tick(0.6)  # the first check is due at once
    assert j.lifecycle is Lifecycle.SYNCING
    assert "behind" in j.sync_detail


def test_stuck_without_quorum_takes_a_position_one_round_ahead() -> None:
    j = job(min_contributors=3)
    j.start(D[1], 0.0)
    vouch(j, 1, D[1], PEERS, 0.1)
    j.local_gradient_ready(1, 1.0)
    vouch(j, 2, D[2], ["n2", "n3"], 2.0)  # one round ahead: within lag_rounds
    drain(j)
    j.tick(5.0)
    assert j.lifecycle is Lifecycle.RUNNING  # not past the deadline yet
    j.tick(CFG.initial_deadline_s + 0.1)  # the deadline passes with 1 of the 3 needed
    assert j.rounds.waiting_for_quorum
    j.tick(CFG.initial_deadline_s + 1.2)
    assert j.lifecycle is Lifecycle.SYNCING and "stuck" in j.sync_detail


def test_a_peer_that_went_on_alone_syncs_back_to_the_others_behind_it() -> None:
    """Cut off, a peer whose view shrank to itself closes rounds alone, faster than
    the others; healed, it is ahead of them in rounds on a model nobody vouches
    for. Its digest at their round shows the fork: it syncs back to them at the
    next check, instead of waiting (as many rounds as it ran alone) for them to
    reach its round. A bench.sync heal waited 13.7 s so."""
    mine = [bytes([0x80 + i]) * 32 for i in range(10)]  # our fork: mine[r] at round r
    j = job(rounds=20, min_contributors=1)
    j.start(D[1], 0.0)
    drain(j)
    for p in PEERS:
        j.member_gone(p, 0.1)
    t = 0.2
    for r in range(1, 6):  # alone: every round closes on our gradient
        j.local_gradient_ready(r, t)
        assert any(isinstance(a, Aggregate) and a.round == r for a in j.drain_actions())
        j.aggregated(r, mine[r + 1], t + 0.05)
        drain(j)
        if r == 4:
            for p in PEERS:  # healed: round 6, begun next, waits for them again
                j.member_alive(p, t + 0.06)
        t += 0.1
    assert j.rounds.round == 6
    j.local_gradient_ready(6, t)
    vouch(j, 3, D[3], PEERS, t)  # the others, behind us, on another model
    drain(j)
    j.tick(t + j.config.sync_check_s + 0.01)  # the next check: no deadline to wait for
    _, events = drain(j)
    assert any(isinstance(e, SyncStarted) and "fork" in e.why for e in events)
    assert j.lifecycle is Lifecycle.SYNCING and "fork" in j.sync_detail, j.sync_detail
    j.local_state((5, mine[6]), None, t + 2.0)  # Redis holds our fork's state
    assert work(j.drain_actions()) == [FetchState("n2", 2, D[3])]
    j.state_fetched("n2", 2, D[3], t + 2.5)
    assert work(j.drain_actions()) == [LoadState("n2", 2, D[3])]
    j.state_loaded("n2", 2, D[3], t + 3.0)
    _, events = drain(j)
    assert Resumed(3) in events and j.lifecycle is Lifecycle.RUNNING
    assert j.rounds.round == 3 and j.digest == D[3]


def test_a_peer_ahead_on_the_others_model_does_not_go_back() -> None:
    """The same lead without a fork (its digest at the others' round is theirs):
    the others are only slow, and it waits for them."""
    j = started(min_contributors=3, rounds=20)
    run_round(j, 1, 1.0)
    run_round(j, 2, 2.0)
    vouch(j, 2, D[2], PEERS, 2.5)  # the others still close round 2, on our model
    j.local_gradient_ready(3, 3.0)
    drain(j)
    j.tick(3.0 + CFG.deadline_ceiling_s)
    assert j.rounds.waiting_for_quorum
    j.tick(3.0 + CFG.deadline_ceiling_s + 1.2)
    assert j.lifecycle is Lifecycle.RUNNING, j.sync_detail


# --- a sync pass: from which vouched position -------------------------------------------------


def test_sync_fetches_from_each_voucher_and_loads_only_what_is_vouched() -> None:
    j = syncing_without_state(rounds=10)
    vouch(j, 4, D[4], ["n3", "n2"], 0.5)  # vouched by f+1 = 2
    j.local_state(None, None, 1.0)
    assert j.drain_actions() == [FetchState("n2", 3, D[4])]  # vouchers in sorted order
    j.fetch_failed("n2", "unreachable", 2.0)
    assert j.drain_actions() == [FetchState("n3", 3, D[4])]
    j.state_fetched("n2", 3, D[4], 2.5)  # an answer from a source no longer asked
    assert j.drain_actions() == []
    j.state_fetched("n3", 5, D[6], 3.0)  # n3 moved on; round 6 is nobody's word yet
    assert j.drain_actions() == []
    vouch(j, 6, D[6], ["n4"], 3.5)
    assert j.drain_actions() == []  # one voucher: not f+1
    vouch(j, 6, D[6], ["n5"], 3.6)
    assert j.drain_actions() == [LoadState("n3", 5, D[6])]
    j.state_loaded("n3", 5, D[6], 4.0)
    actions, events = drain(j)
    assert StateLoaded("n3", 5, D[6], 2) in events and Resumed(6) in events
    assert j.lifecycle is Lifecycle.RUNNING and j.following and j.digest == D[6]
    assert PublishState(6, D[6], False) in actions  # following: not computing
    # Its functions are warming since the sync began (WarmUp(1)): not asked again.
    assert not any(isinstance(a, (WarmUp, InvokeFunctions)) for a in actions)


def test_a_warm_up_that_failed_while_syncing_is_tried_again_at_resume() -> None:
    j = syncing_without_state(rounds=10)
    j.warm_up_done(False, 0.5)  # the functions did not answer
    vouch(j, 4, D[4], ["n2", "n3"], 0.6)
    j.local_state(None, None, 1.0)
    assert j.drain_actions() == [FetchState("n2", 3, D[4])]
    j.state_fetched("n2", 3, D[4], 1.5)
    assert j.drain_actions() == [LoadState("n2", 3, D[4])]
    j.state_loaded("n2", 3, D[4], 2.0)
    assert WarmUp(4) in j.drain_actions()
    j.warm_up_done(True, 2.5)
    assert j.warmed


def test_a_voucher_that_dies_while_we_sync_is_not_asked() -> None:
    """Membership events reach a syncing machine (the daemon asks ``hears_members``):
    a dead voucher leaves the table instead of costing a fetch timeout."""
    j = syncing_without_state(rounds=10)
    vouch(j, 4, D[4], ["n2", "n3", "n4"], 0.5)
    assert j.hears_members
    j.member_gone("n2", 0.7)
    j.local_state(None, None, 1.0)
    assert j.drain_actions() == [FetchState("n3", 3, D[4])]
    assert not job().hears_members  # not started: nothing to tell it yet


def test_an_unvouched_state_is_never_loaded() -> None:
    j = syncing_without_state()
    vouch(j, 4, D[4], ["n2", "n3"], 0.5)
    j.local_state(None, None, 1.0)
    drain(j)
    j.state_fetched("n2", 9, OTHER, 1.5)  # a liar's made-up position
    j.tick(1.5 + j.config.vouch_wait_s + 0.01)
    actions, events = drain(j)
    assert StateUnvouched("n2", 9) in events
    assert work(actions) == [FetchState("n3", 3, D[4])]
    assert not any(isinstance(a, LoadState) for a in actions)


def test_nothing_vouched_waits_and_decides_again() -> None:
    j = syncing_without_state()
    vouch(j, 4, D[4], ["n2"], 0.5)  # one voucher of f+1 = 2
    j.local_state(None, None, 1.0)
    assert j.drain_actions() == []
    assert "waiting" in j.sync_detail
    j.tick(1.0)  # the periodic check, due at once: only says again that we are out
    assert j.drain_actions() == [PublishState(1, NO_DIGEST, False)]
    assert j.next_deadline() == 1.0 + j.config.sync_retry_s
    vouch(j, 4, D[4], ["n3"], 1.2)
    j.tick(1.0 + j.config.sync_retry_s)
    assert work(j.drain_actions()) == [FetchState("n2", 3, D[4])]


def test_a_syncing_peer_says_again_each_check_that_it_takes_no_part() -> None:
    """Its first "not taking part" can be lost: a peer that held it dead when it came
    drops it, and would then count it in its quorum and wait for it for ever (while
    it waits, f = 1, for a second voucher). Seen in the elastic test of a lone trainer."""
    j = syncing_without_state()
    j.local_state(None, None, 0.5)
    drain(j)
    out = []
    for k in range(4):
        j.tick(k * j.config.sync_check_s + 0.01)
        out += [a for a in j.drain_actions() if isinstance(a, PublishState)]
    assert out == [PublishState(1, NO_DIGEST, False)] * 4


def test_sync_trouble_starts_a_fresh_pass() -> None:
    j = syncing_without_state()
    vouch(j, 4, D[4], ["n2", "n3"], 0.5)
    j.local_state(None, None, 1.0)
    assert j.drain_actions() == [FetchState("n2", 3, D[4])]
    j.state_fetched("n2", 3, D[4], 1.5)
    assert j.drain_actions() == [LoadState("n2", 3, D[4])]
    j.sync_trouble("redis down while loading", 2.0)
    j.tick(2.0 + j.config.sync_retry_s)
    assert work(j.drain_actions()) == [ReadLocalState()]


# --- resuming after a restart: Redis, checkpoint or peers ----------------------------------


def test_restart_keeps_the_state_in_redis_when_it_is_in_sync() -> None:
    j = syncing_without_state()
    vouch(j, 4, D[4], ["n2", "n3"], 0.5)
    j.local_state((3, D[4]), (2, D[3]), 1.0)
    actions, events = drain(j)
    assert Resumed(4) in events and not any(isinstance(a, LoadState) for a in actions)
    assert j.completed == 3 and j.digest == D[4]


def test_restart_loads_the_checkpoint_when_redis_lost_the_state() -> None:
    j = syncing_without_state()
    j.local_state(None, (2, D[3]), 1.0)
    assert j.drain_actions() == [LoadState(CHECKPOINT, 2, D[3])]
    j.state_loaded(CHECKPOINT, 2, D[3], 1.5)
    _, events = drain(j)
    assert StateLoaded(CHECKPOINT, 2, D[3], 0) in events
    # Nobody contradicts round 3: it resumes there.
    assert Resumed(3) in events and j.lifecycle is Lifecycle.RUNNING


def test_a_stale_redis_state_and_checkpoint_give_way_to_the_peers() -> None:
    j = started()
    run_round(j, 1, 1.0)  # we hold D[2] now
    j.redis_trouble("redis restarted", 2.0)
    drain(j)
    vouch(j, 5, D[5], ["n2", "n3"], 2.1)
    # Redis says round 1 with another digest, the checkpoint is neither ours nor
    # vouched: both refused, the state comes from the peers.
    j.local_state((1, OTHER), (0, OTHER), 2.5)
    actions = j.drain_actions()
    assert actions == [FetchState("n2", 4, D[5])]
    assert j.digest == b""


def test_alone_resumes_on_its_own_state() -> None:
    j = job(members=[ME])
    j.start_elsewhere("restarted", 0.0)
    drain(j)
    j.local_state((2, D[3]), None, 1.0)
    _, events = drain(j)
    assert Resumed(3) in events and j.lifecycle is Lifecycle.RUNNING


def test_without_state_and_alone_it_waits() -> None:
    j = job(members=[ME])
    j.start_elsewhere("restarted", 0.0)
    drain(j)
    j.local_state(None, None, 1.0)
    assert j.lifecycle is Lifecycle.SYNCING and "no usable state" in j.sync_detail


def test_the_others_final_model_ends_the_job_through_sync() -> None:
    j = syncing_without_state()
    vouch(j, 6, D[6], ["n2", "n3"], 0.5)  # rounds + 1: the final position
    j.local_state((4, D[5]), None, 1.0)  # one round short of it
    assert j.drain_actions() == [FetchState("n2", 5, D[6])]
    j.state_fetched("n2", 5, D[6], 2.0)
    j.drain_actions()
    j.state_loaded("n2", 5, D[6], 2.5)
    # Evaluated like a run's last round before it is done: the model it ends with is
    # not one it evaluated (train status showed no accuracy for it).
    actions, events = drain(j)
    assert actions == [PublishState(6, D[6], False), Evaluate(5), Finished(5)]
    assert not any(isinstance(e, JobDone) for e in events) and j.state == "syncing"
    j.tick(2.6)  # nothing it hears meanwhile starts another sync pass
    vouch(j, 6, OTHER, ["n4", "n5", "n2"], 2.7)
    assert not any(isinstance(a, ReadLocalState) for a in j.drain_actions())
    j.done(3.0)  # the daemon evaluated it
    assert JobDone(5, "sync") in j.drain_events()
    assert j.lifecycle is Lifecycle.DONE


def test_a_done_peer_answers_a_straggler_with_its_final_position() -> None:
    # A peer restarted from its own state after the others finished heard nobody
    # ahead of it (their membership republish came before its job listened): the
    # heads-up it sends is answered with the final position, once per check
    # interval per peer.
    j = started(rounds=2)
    run_round(j, 1, 1.0)
    run_round(j, 2, 2.0)
    j.done(3.0)
    drain(j)
    j.announce("n2", JOB, 1, D[1], False, 10.0)  # resumed at round 1, following
    assert j.drain_actions() == [PublishState(3, D[3], False)]
    j.announce("n2", JOB, 1, D[1], True, 10.5)  # within sync_check_s: not again
    j.announce("n2", JOB, 3, D[3], False, 10.6)  # a final position is no straggler's
    assert j.drain_actions() == []
    j.announce("n3", JOB, 1, NO_DIGEST, False, 10.7)  # another peer is its own case
    j.announce("n2", JOB, 2, D[2], True, 11.5)
    assert j.drain_actions() == [PublishState(3, D[3], False)] * 2
    j.member_gone("n2", 12.0)  # forgotten with the member: the table stays bounded
    assert "n2" not in j._told


def test_of_many_done_peers_2f_plus_1_answer_a_straggler() -> None:
    # Every holder answering is N^2 messages per straggler; the 2f + 1 that rank
    # first for it answer, and every holder ranks alike from the same table.
    ids = [f"p{i}" for i in range(9)]

    def done_peer(me: str) -> JobMachine:
        j = job(self_id=me, members=[*ids, "late"], rounds=1)
        j.start(D[1], 0.0)
        j.local_gradient_ready(1, 0.0)
        j.aggregated(1, D[2], 0.1)
        j.done(0.2)
        for p in ids:
            if p != me:
                j.announce(p, JOB, 2, D[2], False, 0.3)  # their final positions
        drain(j)
        return j

    for straggler in ("late", "p-other", "x" * 40):
        peers = {me: done_peer(me) for me in ids}
        answered = []
        for me, j in peers.items():
            j.announce(straggler, JOB, 1, D[1], False, 5.0)
            if j.drain_actions() == [PublishState(2, D[2], False)]:
                answered.append(me)
        assert len(answered) == 3, (straggler, answered)
        # A first-ranked holder may be unable to answer (restarted without its job):
        # the straggler, unanswered, repeats, and each repeat brings in one more.
        for n, t in ((1, 6.1), (2, 7.2)):
            again = []
            for me, j in peers.items():
                j.announce(straggler, JOB, 1, D[1], False, t)
                if j.drain_actions() == [PublishState(2, D[2], False)]:
                    again.append(me)
            assert set(answered) < set(again) and len(again) == 3 + n, (straggler, again)


def test_a_peer_waiting_for_a_quorum_repeats_its_heads_up() -> None:
    # Restarted from its own state after the others finished: its one heads-up at
    # resume may go out before their gossip has it back, and a done peer answers
    # only a heads-up it hears. While it waits for a quorum it says it again, once
    # per check interval; not while the round can still close.
    j = started()
    j.local_gradient_ready(1, 0.5)
    vouch(j, 1, D[1], ["n2"], 0.6)  # heard at our round, but no gradient comes
    drain(j)
    j.tick(5.0)  # before the deadline
    assert j.drain_actions() == []
    j.tick(100.0)  # past it, with one gradient of a quorum of three
    assert j.rounds.waiting_for_quorum
    assert PublishState(1, D[1], True) in j.drain_actions()
    j.tick(100.5)  # within sync_check_s
    assert j.drain_actions() == []
    j.tick(101.1)
    assert j.drain_actions() == [PublishState(1, D[1], True)]
    vouch(j, 6, D[6], ["n2", "n3"], 101.2)  # the answers: the final position
    j.tick(102.2)
    assert j.lifecycle is Lifecycle.SYNCING


def test_a_peer_nobody_answers_repeats_its_heads_up() -> None:
    # Resumed alone (the others finished, or have not heard it yet): nobody announces
    # its round, so it says it again each check interval, long before the deadline.
    j = started()
    j.tick(0.5)  # within sync_check_s of the round's start: the others' may be on their way
    assert j.drain_actions() == []
    j.tick(1.5)
    assert j.drain_actions() == [PublishState(1, D[1], True)]
    j.tick(2.0)
    assert j.drain_actions() == []  # once per check interval
    vouch(j, 1, D[1], ["n2"], 2.1)  # heard at our round: a job under way
    j.tick(2.6)
    assert j.drain_actions() == []


def test_a_running_peer_answers_only_a_straggler_out_of_the_rounds() -> None:
    j = started()
    run_round(j, 1, 1.0)  # round 2 open; our own gradient never comes
    j.announce("n2", JOB, 1, NO_DIGEST, False, 2.0)  # not waiting yet: nothing to repeat
    assert j.drain_actions() == []
    j.tick(100.0)  # past the deadline without a single gradient
    drain(j)
    assert j.rounds.waiting_for_quorum
    j.announce("n2", JOB, 1, D[1], True, 100.1)  # taking part a round behind: merely slow
    assert j.drain_actions() == []
    j.announce("n2", JOB, 1, NO_DIGEST, False, 100.2)  # restarted without state
    assert j.drain_actions() == [PublishState(2, D[2], True)]
    j.announce("n2", JOB, 1, NO_DIGEST, False, 100.3)
    assert j.drain_actions() == []


# --- following ----------------------------------------------------------------------------


def following_at_3(rounds: int = 5) -> JobMachine:
    j = syncing_without_state(rounds)
    j.local_state((2, D[3]), None, 1.0)
    drain(j)
    assert j.following
    return j


def test_a_follower_the_others_are_level_with_joins_a_round_later() -> None:
    # The others' gradients of round 3 vouch for round 3 only: they close it when we
    # do and begin 4 at once, their heads-ups for 4 still in flight. Computing 4 now
    # would put our gradient in the views of those that hear our heads-up before they
    # close 4 and not in the others' (the rejoin fork seen under 25 ms rounds).
    j = following_at_3()
    j.warm_up_done(True, 1.5)
    out = run_round(j, 3, 2.0)
    assert not any(isinstance(a, InvokeFunctions) for a in out) and j.following
    assert PublishState(5, JOIN_DIGEST, True) in out
    out = run_round(j, 4, 3.0)
    assert CaughtUp(5) in j.drain_events()
    assert InvokeFunctions(5) in out and not j.following


def test_a_follower_follows_the_last_round_it_cannot_announce_a_join_for() -> None:
    j = following_at_3(rounds=4)
    j.warm_up_done(True, 1.5)
    out = run_round(j, 3, 2.0)
    assert not any(isinstance(a, InvokeFunctions) for a in out) and j.following
    assert not any(isinstance(a, PublishState) and a.digest == JOIN_DIGEST for a in out)
    run_round(j, 4, 3.0)
    j.done(3.5)
    assert j.state == "done"


def test_a_follower_the_others_are_a_round_ahead_of_announces_its_join_a_round_early() -> None:
    # Restarted n1 closes round 3 while n2 and n3 already compute round 4: its heads-up
    # for 4 could reach them after they closed 4 without it, and its own aggregate of 4
    # would then hold its gradient and theirs not (a fork, every time it rejoins).
    j = following_at_3()
    j.warm_up_done(True, 1.5)
    vouch(j, 4, D[4], ["n2", "n3"], 1.6)
    out = run_round(j, 3, 2.0)
    assert not any(isinstance(a, InvokeFunctions) for a in out) and j.following
    # It follows round 4 and says now that it computes from round 5.
    assert PublishState(4, D[4], False) in out
    assert PublishState(5, JOIN_DIGEST, True) in out
    assert not any(isinstance(e, CaughtUp) for e in j.drain_events())
    # Round 4 closes on the others' gradients alone; from 5 it computes, whatever
    # the others announced meanwhile (they heard of the join a round ago).
    vouch(j, 5, D[5], ["n2", "n3"], 2.5)
    out = run_round(j, 4, 3.0)
    assert InvokeFunctions(5) in out and PublishState(5, D[5], True) in out
    assert CaughtUp(5) in j.drain_events() and not j.following
    # A join is no position: nobody's vouches count it.
    assert j.vouch.target(exclude=(ME,)).digest != JOIN_DIGEST


def test_a_join_never_counts_as_a_vouched_position() -> None:
    j = following_at_3()
    vouch(j, 5, JOIN_DIGEST, ["n2", "n3", "n4"], 1.6)
    assert not j.vouch.vouched(5, JOIN_DIGEST)


def test_a_cold_follower_keeps_following() -> None:
    j = following_at_3()
    j.warm_up_done(False, 1.5)
    out = run_round(j, 3, 2.0)
    assert not any(isinstance(a, InvokeFunctions) for a in out)
    assert j.following and j.state == "syncing"


def test_a_follower_behind_vouched_rounds_keeps_following() -> None:
    j = following_at_3()
    j.warm_up_done(True, 1.5)
    vouch(j, 4, D[4], ["n2", "n3"], 1.6)
    vouch(j, 5, D[5], ["n2", "n3"], 1.6)  # the others are two rounds ahead
    out = run_round(j, 3, 2.0)
    assert not any(isinstance(a, InvokeFunctions) for a in out)
    assert j.following


def _held_ahead(j: JobMachine, rounds: list[int], t: float) -> None:
    for r in rounds:
        for p in PEERS:
            assert j.validate_gradient(p, JOB, r, D[r], SIZE, t) is Verdict.ACCEPT
            if j.gradient_arrived(p, JOB, r, D[r], SIZE, f"{p}@{r}", t):
                assert j.gradient_stored(p, JOB, r, D[r], SIZE, t) is None


def test_a_follower_holding_the_rounds_it_lags_replays_them_instead_of_syncing() -> None:
    """A joiner's transfer took longer than two of the others' rounds: it resumes
    four behind, but it holds their gradients for every round between (gossip
    went on during the transfer) and closes them faster than they run them. A
    bench.sync joiner was sent to sync again at its first check, four times."""
    j = following_at_3(rounds=12)
    j.warm_up_done(True, 1.5)
    _held_ahead(j, [4, 5, 6], 1.6)
    for r in range(3, 8):  # the others went on to round 7, four ahead of our round 3
        vouch(j, r, D[r], ["n2", "n3", "n4"], 1.6)
    j.tick(1.6 + j.config.sync_check_s + 0.01)
    assert j.lifecycle is Lifecycle.RUNNING, j.sync_detail
    run_round(j, 3, 2.0)
    assert j.lifecycle is Lifecycle.RUNNING and j.rounds.round == 4, j.sync_detail


def test_a_joiner_whose_held_rounds_are_still_being_written_does_not_sync_again() -> None:
    """Right after the state is loaded, the gradients held during the transfer go
    to Redis (WriteGradient) before the first of their rounds closes; under load
    that took longer than a sync check. They count as held meanwhile."""
    j = syncing_without_state(rounds=12)
    j.warm_up_done(True, 0.5)
    vouch(j, 3, D[3], ["n2", "n3", "n4"], 0.6)
    j.local_state(None, None, 0.6)
    fetch = work(j.drain_actions())
    assert fetch == [FetchState("n2", 2, D[3])], fetch
    # The transfer is slow: the others go on to round 7, their gradients held here.
    for r in range(3, 7):
        for p in PEERS:
            assert j.validate_gradient(p, JOB, r, D[r], SIZE, 0.7) is Verdict.ACCEPT
            assert not j.gradient_arrived(p, JOB, r, D[r], SIZE, f"{p}@{r}", 0.7)
        vouch(j, r + 1, D[r + 1], ["n2", "n3", "n4"], 0.7)
    j.state_fetched("n2", 2, D[3], 1.0)
    assert work(j.drain_actions()) == [LoadState("n2", 2, D[3])]
    j.state_loaded("n2", 2, D[3], 1.0)  # resumes at round 3, four behind round 7
    writes = [a for a in j.drain_actions() if isinstance(a, WriteGradient)]
    assert {a.round for a in writes} >= {3, 4, 5}
    j.tick(1.0 + j.config.sync_check_s + 0.01)  # none of them stored yet
    assert j.lifecycle is Lifecycle.RUNNING and j.following, j.sync_detail


def test_a_follower_whose_replay_stalls_syncs() -> None:
    """The rounds ahead are held but the open one does not close (its bodies were
    lost, or only a liar sent rounds ahead): once no round closed for two sync
    checks, the lag counts again. A bench.sync joiner sat 20 s at one round
    without this."""
    j = following_at_3(rounds=12)
    j.warm_up_done(True, 1.5)
    _held_ahead(j, [4, 5, 6], 1.6)
    for r in range(3, 8):
        vouch(j, r, D[r], ["n2", "n3", "n4"], 1.6)
    j.tick(1.6 + j.config.sync_check_s + 0.01)
    assert j.lifecycle is Lifecycle.RUNNING, j.sync_detail
    j.tick(1.0 + 3 * j.config.sync_check_s + 0.02)  # round 3 still open
    assert j.lifecycle is Lifecycle.SYNCING and "4 behind" in j.sync_detail, j.sync_detail


def test_a_follower_missing_a_round_it_lags_syncs() -> None:
    """The same lag with round 5's gradients gone (past the buffer, or never heard):
    replay would stop there, so it syncs as before."""
    j = following_at_3(rounds=12)
    j.warm_up_done(True, 1.5)
    _held_ahead(j, [4, 6], 1.6)
    for r in range(3, 8):
        vouch(j, r, D[r], ["n2", "n3", "n4"], 1.6)
    j.tick(1.6 + j.config.sync_check_s + 0.01)
    assert j.lifecycle is Lifecycle.SYNCING and "4 behind" in j.sync_detail, j.sync_detail


def test_a_follower_past_its_deadline_with_nobody_ahead_computes() -> None:
    j = following_at_3()
    j.warm_up_done(True, 1.5)
    j.tick(1.0 + CFG.initial_deadline_s + 1.0)
    actions, events = drain(j)
    assert Unfollowed(3) in events
    assert InvokeFunctions(3) in actions and not j.following


# --- exclusion ----------------------------------------------------------------------------


def test_a_convicted_peer_is_out_for_good() -> None:
    j = started(f=1)
    assert j.convict("n2", 1, "equivocation", "detected", 0.5) is True
    assert j.convict("n2", 1, "equivocation", "evidence", 0.6) is False
    assert j.convict(ME, 1, "nonfinite", "evidence", 0.6) is False
    assert Excluded("n2", 1, "equivocation", "detected") in j.drain_events()
    assert j.status()["excluded"][0]["reason"] == "equivocation"
    assert j.validate_gradient("n2", JOB, 1, D[1], SIZE, 1.0) is Verdict.IGNORE
    assert j.validate_gradient("n2", JOB, 1, D[1], SIZE + 4, 1.0) is Verdict.REJECT
    # Its vouches are void: with n3 alone a position is not vouched for (f = 1).
    vouch(j, 4, D[4], ["n2", "n3"], 1.0)
    assert not j.vouch.vouched(4, D[4])
    # The rounds do not wait for it.
    assert "n2" not in j.rounds.status()["view"]
