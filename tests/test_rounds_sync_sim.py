"""State sync as the daemon does it, on the round simulator (simulated time only).

Every peer is the daemon's own JobMachine (protocol/rounds/job.py): every heads-up
and gradient goes into its VouchTable; ``sync_decision`` is asked after each round,
on each Diverged and every second; on "sync" the peer stops taking part, downloads
a voucher's state (in sorted order, the transfer takes time), loads it only if f+1
others vouch for its position, follows that round and takes part again at a next
round start once nobody announces a round beyond the next one. Joiners and
restarts without state start syncing with round None.

The tests below judge the scenarios against ground truth kept by the harness:
``sim.made`` (every position some peer aggregated to), ``sim.lies`` (the
Byzantine peers' made-up positions) and ``sim.loads`` (every state loaded, with
the vouchers the loader counted).
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from protocol.rounds import RoundConfig, RoundMachine, VouchTable, sync_decision
from protocol.rounds.sim import D0, Cut, RoundSim, SimParams, SimPeer, next_digest

# The daemon's round tuning (RoundConfig's defaults: 60 s first deadline, 2 s floor)
# with functions taking 10-15 s a round: the pace of a real job. The harness's own
# default (6 s first deadline, ~2 s rounds) runs the same logic ten times faster.
PROD = {"config": RoundConfig(), "fn_delay": (10.0, 15.0)}


def run(**kw: object) -> RoundSim:
    sim = RoundSim(SimParams(**kw))  # type: ignore[arg-type]
    sim.run()
    return sim


def ids(n: int) -> list[str]:
    return [f"p{i:04d}" for i in range(n)]


def honest(sim: RoundSim) -> list[SimPeer]:
    return [x for x in sim.live_peers() if not x.byzantine]


def final_digests(sim: RoundSim) -> Counter[bytes | None]:
    return Counter(x.final_digest for x in honest(sim))


def assert_converged(sim: RoundSim) -> bytes:
    """Every honest live peer finished the job, all on one model."""
    live = honest(sim)
    unfinished = [x.id for x in live if not x.done]
    assert not unfinished, f"never finished: {unfinished[:8]}"
    finals = final_digests(sim)
    assert len(finals) == 1, f"final models differ: {finals.most_common()}"
    (digest,) = finals
    assert digest is not None
    return digest


def assert_loads_sound(sim: RoundSim) -> None:
    """Every state loaded was vouched for by f+1 others in the loader's table, and is
    a position some peer really aggregated to: never a made-up one."""
    need = sim.p.f + 1
    for ld in sim.loads:
        assert ld.vouchers >= need, ld
        assert (ld.round, ld.digest) in sim.made, ld
        assert (ld.round, ld.digest) not in sim.lies, ld


def synced(sim: RoundSim) -> set[str]:
    """Peers that entered state sync at least once (any incarnation)."""
    return {x.id for x in sim.lives if x.sync_starts}


def digest_at(x: SimPeer, round: int) -> list[bytes]:
    return [d for r, d, _ in x.begins if r == round]


# --- 1. several joiners at once -----------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 3])
def joiners(request: pytest.FixtureRequest) -> RoundSim:
    # 40 peers run; 8 more join within the same second, in round 5. 14 rounds: a
    # joiner that the others are a round ahead of announces its join a round early,
    # so one that needs three syncs (seed 3) takes part only from round 13.
    return run(n=48, late=8, late_at=(10.0, 11.0), rounds=14, seed=request.param, f=1, loss=0.01)


def test_joiners_end_on_the_common_model(joiners: RoundSim) -> None:
    sim = joiners
    final = assert_converged(sim)
    late = [sim.by_id[j] for j in sim.late_ids]
    assert len(late) == 8 and all(x.final_digest == final for x in late)
    # They joined through state sync, started with no state...
    for x in late:
        assert x.sync_starts[0][1] == "joining a running job"
        assert x.loads and x.loads[0].round > 1
        assert x.joined_at is not None and 10.0 <= x.joined_at <= 11.0
    # ...and by the end they take part: the last round counts every peer.
    last = [c for c in sim.by_id["p0000"].closes if c.round == sim.p.rounds]
    assert last and set(sim.late_ids) <= set(last[0].contributors)


def test_joiners_load_only_vouched_positions(joiners: RoundSim) -> None:
    sim = joiners
    assert len(sim.loads) >= 8
    assert_loads_sound(sim)


def test_joiners_sync_a_few_times_at_most(joiners: RoundSim) -> None:
    sim = joiners
    for j in sim.late_ids:
        x = sim.by_id[j]
        assert 1 <= len(x.loads) <= 3, (j, x.loads)
        assert len(x.sync_starts) <= 3, (j, x.sync_starts)
    # Nobody else had a reason to sync.
    assert synced(sim) <= set(sim.late_ids)


def test_joiners_do_not_make_the_others_sync() -> None:
    sim = run(n=48, late=8, late_at=(10.0, 11.0), rounds=12, seed=8, f=1, loss=0.01)
    assert_converged(sim)  # it does end on one model, after the churn...
    assert_loads_sound(sim)
    # ...but 29 of the 40 others synced (6 of them loading the 3 joiners' fork first),
    # and one joiner loaded 5 times.
    assert synced(sim) <= set(sim.late_ids)


# --- 2. several restarts at once --------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 4])
def restarts(request: pytest.FixtureRequest) -> RoundSim:
    # 5 of 30 killed at once in round 4, back 5-7 s (3 rounds) later; 2 lost their state.
    return run(
        n=30,
        restarts=5,
        restart_lost=2,
        restart_at=8.0,
        restart_down=(5.0, 7.0),
        rounds=14,
        seed=request.param,
        f=1,
        loss=0.01,
    )


def test_restarts_converge_without_restarting_the_job(restarts: RoundSim) -> None:
    sim = restarts
    final = assert_converged(sim)
    assert len(sim.restart_ids) == 5 and len(sim.lost_ids) == 2
    for vid in sim.restart_ids:
        x = sim.by_id[vid]
        old = x.prev
        assert old is not None and not old.alive and old.completed >= 3
        assert x.final_digest == final
        # Back with the state it had (a few rounds stale) or with none...
        assert x.sync_starts[0][1] == "restarted"
        assert x.loads, vid
        # ...it moved forward from there: never back to an earlier round.
        assert x.loads[0].round > old.completed + 1, (vid, old.completed, x.loads[0])
    # Nobody started the job over: no round 1 after the start, no state of round 1 loaded.
    assert all(r > 1 or t == 0.0 for x in sim.lives for r, _, t in x.begins)
    assert all(ld.round > 1 for ld in sim.loads)
    assert_loads_sound(sim)


def test_restarts_state_kept_or_lost_both_sync() -> None:
    sim = run(
        n=30,
        restarts=5,
        restart_lost=2,
        restart_at=8.0,
        restart_down=(5.0, 7.0),
        rounds=14,
        seed=6,
        f=1,
    )
    assert_converged(sim)
    assert_loads_sound(sim)
    for vid in sim.restart_ids:
        x = sim.by_id[vid]
        assert x.prev is not None
        assert x.loads, vid
        if vid in sim.lost_ids:
            assert x.prev.digest  # it had a state, came back without: synced from None
        else:
            # Its own state, rounds stale when it came back, was not kept: it moved on.
            assert x.loads[0].round > x.prev.completed + 1, (vid, x.loads[0])
        # A few catch-ups, plus possibly one repair of the final model after the end.
        assert len(x.loads) <= 4, (vid, x.loads)


def test_everyone_restarted_at_once_follows_then_computes_again() -> None:
    # The whole cluster killed together and back with its state: every peer is in
    # sync, so every peer follows the next round and waits for gradients nobody
    # computes. Past the round's deadline each finds nobody ahead and computes it.
    sim = run(n=8, restarts=8, restart_at=8.0, restart_down=(5.0, 6.0), rounds=14, seed=1, f=1)
    assert len(sim.restart_ids) == 8
    assert sim.counters["unfollowed"] >= 1
    assert_converged(sim)
    assert_loads_sound(sim)


# --- 3. vouching that splits ----------------------------------------------------------------

SPLIT_ROUND = 4


def d_before_split(n: int) -> bytes:
    """The model at the start of SPLIT_ROUND, every earlier round counting everyone."""
    d = D0
    for _ in range(1, SPLIT_ROUND):
        d = next_digest(d, tuple(ids(n)))
    return d


def split(
    n: int, minority: int, f: int, *, drop: str = "", one_way: bool = False, seed: int = 1
) -> tuple[RoundSim, frozenset[str], frozenset[str]]:
    """Two groups close SPLIT_ROUND with different contributor sets.

    Default: ``drop``'s gradient (in the majority group) does not reach the minority
    group, which closes the round at its deadline without it while the majority
    closes complete: the minority closes later. ``one_way``: the minority's
    gradients do not reach the majority (a one-way partition), which closes at its
    deadline without them while the minority closes complete: the minority early."""
    all_ids = ids(n)
    major = frozenset(all_ids[: n - minority])
    minor = frozenset(all_ids[n - minority :])
    if one_way:
        cut = Cut(minor, major, SPLIT_ROUND, frozenset({"gradient"}))
    else:
        cut = Cut(frozenset({drop or all_ids[0]}), minor, SPLIT_ROUND, frozenset({"gradient"}))
    sim = run(n=n, rounds=10, seed=seed, f=f, cuts=(cut,))
    # The split happened: the two groups began the next round on different models.
    after = SPLIT_ROUND + 1
    by_group = {
        g: {digest_at(sim.by_id[i], after)[0] for i in grp}
        for g, grp in (("M", major), ("m", minor))
    }
    assert len(by_group["M"]) == 1 and len(by_group["m"]) == 1 and by_group["M"] != by_group["m"]
    return sim, major, minor


@pytest.mark.parametrize("f", [0, 2])
def test_split_the_minority_syncs_and_no_one_else(f: int) -> None:
    sim, major, minor = split(40, 10, f)
    final = assert_converged(sim)
    assert synced(sim) == set(minor)
    assert_loads_sound(sim)
    # Each minority peer's first load is the majority's model at the split's next round.
    majority = digest_at(sim.by_id[min(major)], SPLIT_ROUND + 1)[0]
    for i in minor:
        first = sim.by_id[i].loads[0]
        assert (first.round, first.digest) == (SPLIT_ROUND + 1, majority)
    assert {x.final_digest for x in sim.live_peers()} == {final}


def test_split_minority_smaller_than_f_plus_one_is_never_loaded() -> None:
    f = 2
    sim, _, minor = split(40, f, f)  # 2 peers hold the other model: not vouched
    assert_converged(sim)
    theirs = digest_at(sim.by_id[min(minor)], SPLIT_ROUND + 1)[0]
    assert all(ld.digest != theirs for ld in sim.loads)
    assert synced(sim) == set(minor)
    assert_loads_sound(sim)


def even_split_drop(n: int, winner: str) -> str:
    """The peer of the first half whose gradient, kept from the second half, makes
    ``winner`` ("first" or "second") hold the lower digest: the one an even split
    keeps."""
    all_ids = ids(n)
    base = d_before_split(n)
    full = next_digest(base, tuple(all_ids))
    for z in all_ids[: n // 2]:
        without = next_digest(base, tuple(i for i in all_ids if i != z))
        if (full < without) == (winner == "first"):
            return z
    raise AssertionError("no such peer")


@pytest.mark.parametrize("f", [0, 2])
def test_even_split_moves_the_side_that_loses_on_the_digest(f: int) -> None:
    # The first half closes complete (all 40), the second at its deadline without one
    # peer: 20 and 20 holders. The first half's digest is the lower: the second moves.
    n = 40
    sim, _, second = split(n, n // 2, f, drop=even_split_drop(n, "first"))
    assert_converged(sim)
    assert synced(sim) == set(second)
    assert_loads_sound(sim)


@pytest.mark.parametrize("f", [0, 2])
def test_even_split_moves_only_the_loser_when_the_late_side_wins(f: int) -> None:
    n = 40
    sim, first, _ = split(n, n // 2, f, drop=even_split_drop(n, "second"))
    assert_converged(sim)
    assert_loads_sound(sim)
    assert synced(sim) == set(first)  # all of the second half syncs instead


@pytest.mark.parametrize("f", [0, 2])
def test_split_early_minority_does_not_pull_the_majority(f: int) -> None:
    sim, major, minor = split(40, 10, f, one_way=True)
    assert_converged(sim)
    assert_loads_sound(sim)
    theirs = digest_at(sim.by_id[min(minor)], SPLIT_ROUND + 1)[0]
    assert not any(ld.digest == theirs and ld.peer in major for ld in sim.loads)
    assert synced(sim) == set(minor)


def test_split_one_round_before_the_last_everyone_finishes() -> None:
    # The minority syncs to the majority's state of the last round but one, while the
    # majority finishes the last round within lag_rounds of it. A sync pass that
    # treated that as "in sync" resumed into a round whose gradients it had dropped
    # and waited forever; a peer already out of the rounds takes the final model.
    n, rounds = 40, 10
    all_ids = ids(n)
    minor = frozenset(all_ids[30:])
    cut = Cut(frozenset({all_ids[0]}), minor, rounds - 1, frozenset({"gradient"}))
    sim = run(n=n, rounds=rounds, seed=1, f=0, cuts=(cut,))
    assert synced(sim) == set(minor)
    assert_loads_sound(sim)
    assert_converged(sim)  # the 10 never finish


# --- 4. Byzantine announcers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def byzantine() -> RoundSim:
    # f = 2 liars (p0000, p0001: the first vouchers tried) announce made-up digests for
    # rounds 2, 3 and 6 ahead of theirs, every round, and serve a made-up state; 3
    # peers join at 8-9 s and sync through all that.
    return run(n=40, byzantine=2, f=2, rounds=12, seed=1, late=3, late_at=(8.0, 9.0), loss=0.01)


def test_byzantine_never_synced_to(byzantine: RoundSim) -> None:
    sim = byzantine
    assert sim.byzantine_ids == ["p0000", "p0001"]
    assert len(sim.lies) >= 12
    # The honest peers did see the lies (newest rounds well ahead of the job)...
    x = sim.by_id["p0010"]
    assert x.table is not None and (x.table.newest_round() or 0) > sim.p.rounds
    # ...and none of them synced because of them: besides the joiners, an honest
    # peer may only have repaired a fork between honest models (none on this seed
    # since joins are announced a round ahead; see test_joiners_fork_no_one).
    assert set(sim.late_ids) <= synced(sim)
    for i in synced(sim) - set(sim.late_ids):
        for _, why in sim.by_id[i].sync_starts:
            assert why.startswith("syncing: diverged"), (i, why)
    assert_loads_sound(sim)
    # The joiners asked the liars first (sorted first) and refused their state.
    assert sim.counters["sync_unvouched"] >= 1
    assert all(ld.source not in sim.byzantine_ids for ld in sim.loads)


def test_byzantine_do_not_stop_training(byzantine: RoundSim) -> None:
    sim = byzantine
    final = assert_converged(sim)
    ran = 0
    for x in honest(sim):
        if x.id not in sim.late_ids and not x.sync_starts:
            assert x.finished_via == "run", x.id
            assert [c.round for c in x.closes] == list(range(1, sim.p.rounds + 1))
            ran += 1
    assert ran >= 30  # of the 35 honest peers there from the start
    assert all(x.final_digest == final for x in honest(sim))


def test_joiners_fork_no_one(byzantine: RoundSim) -> None:
    # A follower the others are a round ahead of announces a round early that it
    # computes from the one after (JOIN_DIGEST). It used to begin computing the
    # round the others were in and announce it then: one that closed before the
    # heads-up came did not count its gradient, the rest did, and the peers split
    # (on this seed, at round 6). Now nobody that ran from the start syncs.
    sim = byzantine
    forks = [
        (x.id, why) for x in honest(sim) if x.id not in sim.late_ids for _, why in x.sync_starts
    ]
    assert not forks
    assert_converged(sim)
    assert_loads_sound(sim)


def test_byzantine_do_not_keep_followers_from_contributing(byzantine: RoundSim) -> None:
    sim = byzantine
    for j in sim.late_ids:
        x = sim.by_id[j]
        assert x.switches, f"{j} followed to the end without contributing"


# --- at the daemon's pace ---------------------------------------------------------------------


def test_prod_pace_even_split_finishes() -> None:
    n = 10
    minor = frozenset(ids(n)[n // 2 :])
    drop = even_split_drop(n, "second")
    cut = Cut(frozenset({drop}), minor, SPLIT_ROUND, frozenset({"gradient"}))
    sim = run(n=n, rounds=10, seed=2, f=0, cuts=(cut,), until=3000.0, **PROD)
    assert_converged(sim)


def test_prod_pace_joiners_finish() -> None:
    sim = run(n=24, late=4, late_at=(60.0, 61.0), rounds=12, seed=1, f=1, until=3000.0, **PROD)
    assert_converged(sim)


def test_prod_pace_restarts_end_on_one_model() -> None:
    sim = run(
        n=24,
        restarts=4,
        restart_lost=2,
        restart_at=60.0,
        restart_down=(40.0, 50.0),
        rounds=12,
        seed=4,
        f=1,
        until=3000.0,
        **PROD,
    )
    assert all(x.done for x in honest(sim))  # they all finish...
    assert_converged(sim)  # ...on two models


# --- the faults, reduced to their rule ---------------------------------------------------------


def dg(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def test_follower_catch_up_round_does_not_set_the_deadline() -> None:
    cfg = RoundConfig()  # 60 s first deadline, 2 s floor
    others = ["a", "b", "c", "d"]
    m = RoundMachine(
        self_id="me",
        job_id="j",
        rounds=10,
        min_contributors=3,
        eval_every=0,
        param_count=10,
        members=["me", *others],
        config=cfg,
    )
    d5 = dg("round 5")
    m.begin(5, d5, 100.0, participating=False)  # loaded by state sync at t=100
    for i, o in enumerate(others):  # the buffered gradients, replayed at once
        assert m.receive(o, "j", 5, d5, 40, 100.01 + i * 0.01) is None
    assert m.phase == "aggregating"
    m.aggregated(5, dg("round 6"), 100.1, participate=True)
    # Round 6 is the first this peer computes; the job's rounds take ~30 s.
    assert m.round == 6 and m.participating
    assert m.deadline_s == cfg.initial_deadline_s, m.deadline_s  # it is 2.0


def test_sync_decision_waits_for_its_own_side_to_announce() -> None:
    f = 1
    t = VouchTable(f=f)
    d6, ours, early = dg("6"), dg("7 ours"), dg("7 early")
    peers = [f"p{i:02d}" for i in range(40)]
    for p in peers:
        t.note(p, 6, d6)  # round 6: everyone on one model
    for p in peers[:3]:
        t.note(p, 7, early)  # 3 peers closed round 6 early, with another set
    t.note(peers[3], 7, ours)  # 1 of our side has announced round 7 so far
    # We ("p04") just aggregated round 6; 35 of our side are aggregating right now.
    d = sync_decision(t, self_id=peers[4], round=7, digest=ours)
    assert d.action != "sync", d.reason


def test_vouch_model_is_deterministic() -> None:
    def trace(seed: int) -> list[tuple[str, int, bytes, float]]:
        sim = run(n=20, late=3, late_at=(6.0, 7.0), rounds=6, seed=seed, f=1, loss=0.05)
        return [(ld.peer, ld.round, ld.digest, ld.at) for ld in sim.loads]

    assert trace(5) == trace(5)
    assert trace(5) != trace(6)
