"""State sync's decision: who vouches for which model, and what a peer syncs to
(pure, no I/O, no clock)."""

from __future__ import annotations

import hashlib
import random

import pytest

from protocol.rounds import Decision, Target, VouchTable, sync_decision


def dg(label: str) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=32).digest()


D12 = dg("honest-12")
X12 = dg("other-12")
D13 = dg("honest-13")
MADE_UP = dg("made-up")


def table(f: int = 1, **kw: int) -> VouchTable:
    return VouchTable(f=f, **kw)


def announce(t: VouchTable, origins: list[str], round: int, digest: bytes) -> None:
    for o in origins:
        t.note(o, round, digest)


def decide(t: VouchTable, round: int | None, digest: bytes | None, **kw: int) -> Decision:
    return sync_decision(t, self_id="me", round=round, digest=digest, **kw)


# --- the table --------------------------------------------------------------------------


def test_vouched_needs_f_plus_one_distinct_origins() -> None:
    t = table(f=2)
    for _ in range(5):
        t.note("a", 12, D12)  # one origin repeating itself is one voucher
    t.note("b", 12, D12)
    assert t.vouchers(12, D12) == frozenset({"a", "b"})
    assert not t.vouched(12, D12) and t.target() is None
    # An origin that changes its digest for a round moves its vouch, never adds one.
    t.note("c", 12, X12)
    t.note("c", 12, D12)
    assert t.vouchers(12, X12) == frozenset()
    assert t.vouchers(12, D12) == frozenset({"a", "b", "c"})
    assert t.vouched(12, D12)
    assert not t.vouched(12, D12, exclude=["c"])
    assert t.target() == Target(12, D12, ("a", "b", "c"))
    assert t.counters["repeated"] == 4 and t.counters["replaced"] == 1


def test_f_colluding_liars_never_become_the_target() -> None:
    f = 3
    t = table(f=f)
    honest = [f"h{i}" for i in range(6)]
    liars = [f"liar{i}" for i in range(f)]
    announce(t, honest, 12, D12)
    for r in range(13, 20):  # newer than anything honest, every round
        announce(t, liars, r, MADE_UP)
    assert t.target() == Target(12, D12, tuple(sorted(honest)))
    assert not t.vouched(19, MADE_UP)
    assert t.newest_round() == 19  # seen, just not trusted
    # Nor can a peer vouch for itself to tip the count: "me" plus f liars is f + 1
    # origins, but "me" does not count in its own decision.
    t.note("me", 19, MADE_UP)
    assert t.vouched(19, MADE_UP)
    assert t.target(exclude=["me"]) == Target(12, D12, tuple(sorted(honest)))
    d = decide(t, None, None)
    assert d.action == "sync" and d.target is not None and d.target.digest == D12
    # A peer it excludes is not offered as a source either.
    t.note("me", 12, D12)
    assert t.target(exclude=["me"]) == Target(12, D12, tuple(sorted(honest)))
    assert t.target() == Target(19, MADE_UP, tuple(sorted([*liars, "me"])))


def test_newest_vouched_wins_and_ties_are_deterministic() -> None:
    t = table(f=1)
    announce(t, ["a", "b", "c", "d"], 12, D12)
    announce(t, ["a", "b"], 13, D13)
    assert t.target() == Target(13, D13, ("a", "b"))  # newer beats more vouchers

    # Two digests vouched at one round: more vouchers, then lower bytes, whatever
    # the order the statements came in.
    lo, hi = sorted([dg("p"), dg("q")])
    for order in (0, 1):
        t = table(f=1)
        groups = [(["a", "b"], hi), (["c", "d"], lo)]
        for origins, d in groups if order else groups[::-1]:
            announce(t, origins, 12, d)
        assert t.target() == Target(12, lo, ("c", "d"))
        t.note("e", 12, hi)
        assert t.target() == Target(12, hi, ("a", "b", "e"))


def test_window_keeps_each_origins_recent_rounds_only() -> None:
    t = table(f=0, window=3)
    for r in range(1, 6):
        t.note("a", r, dg(f"r{r}"))
    assert [r for r in range(1, 6) if t.vouched(r, dg(f"r{r}"))] == [3, 4, 5]
    assert t.counters["evicted"] == 2
    t.note("a", 2, dg("r2"))  # outside the window: dropped, not re-added
    assert not t.vouched(2, dg("r2")) and t.counters["too_old"] == 1
    t.note("b", 1, dg("late"))  # another origin's window is its own
    assert t.vouched(1, dg("late"))
    # A liar's far-future round evicts its own entries only.
    t.note("liar", 4, dg("r4"))
    t.note("liar", 10**9, MADE_UP)
    assert t.vouchers(4, dg("r4")) == frozenset({"a"})
    assert t.status()["entries"] == 3 + 1 + 1


def test_max_peers_refuses_new_origins_rather_than_evicting() -> None:
    t = table(f=2, max_peers=8)
    honest = [f"h{i}" for i in range(5)]
    announce(t, honest, 12, D12)
    sybils = [f"sybil{i}" for i in range(100)]
    announce(t, sybils, 13, MADE_UP)
    assert t.status()["peers"] == 8
    assert t.counters["refused_origin"] == 97
    assert t.vouchers(12, D12) == frozenset(honest)
    assert t.vouchers(13, MADE_UP) == frozenset(sybils[:3])
    # Tracked origins keep announcing; a forgotten one frees its slot.
    announce(t, honest, 13, D13)
    assert t.vouchers(13, D13) == frozenset(honest)
    t.forget("sybil0")
    t.note("h5", 13, D13)
    assert "h5" in t.vouchers(13, D13)


def test_forget_removes_every_vouch_of_an_origin() -> None:
    t = table(f=1)
    announce(t, ["a", "b"], 12, D12)
    announce(t, ["a", "b"], 13, D13)
    assert t.target() == Target(13, D13, ("a", "b"))
    t.forget("b")
    t.forget("nobody")  # unknown: nothing to do
    assert t.target() is None
    assert t.vouchers(12, D12) == frozenset({"a"})
    assert t.status()["peers"] == 1 and t.counters["forgotten"] == 1
    t.forget("a")
    assert t.newest_round() is None and t.status()["entries"] == 0


def test_bad_input_is_counted_and_bad_config_raises() -> None:
    t = table()
    t.note("", 1, D12)
    t.note("a", 0, D12)
    t.note("a", 1, b"")
    assert t.counters["invalid"] == 3 and t.status()["peers"] == 0
    for kw in ({"f": -1}, {"f": 1, "window": 0}, {"f": 1, "max_peers": 0}):
        with pytest.raises(ValueError):
            VouchTable(**kw)
    with pytest.raises(ValueError, match="lag_rounds"):
        decide(t, 1, D12, lag_rounds=-1)


def test_status_shows_peers_target_and_counters() -> None:
    t = table(f=1)
    announce(t, ["a", "b", "c"], 12, D12)
    t.note("a", 13, X12)
    s = t.status()
    assert s["f"] == 1 and s["peers"] == 3 and s["entries"] == 4
    assert s["newest_round"] == 13
    assert s["target"] == {"round": 12, "digest": D12.hex(), "vouchers": 3}
    assert s["counters"]["noted"] == 4


# --- the decision -----------------------------------------------------------------------


def test_joiner_or_restart_without_state_syncs_to_the_target_or_waits() -> None:
    t = table(f=1)
    d = decide(t, None, None)
    assert d == Decision("wait", None, d.reason)
    assert "f+1 = 2 peers" in d.reason and "nobody announced" in d.reason
    t.note("a", 12, D12)
    d = decide(t, None, None)
    assert d.action == "wait" and "best: round 12 by 1 peer" in d.reason
    t.note("b", 12, D12)
    d = decide(t, None, None)
    assert d.action == "sync" and d.target == Target(12, D12, ("a", "b"))
    assert "vouched for by 2 peers" in d.reason


def test_behind_syncs_only_beyond_lag() -> None:
    t = table(f=1)
    for r in range(10, 16):
        announce(t, ["a", "b", "c"], r, dg(f"h{r}"))
    d = decide(t, 13, dg("h13"))  # 2 rounds behind round 15: the rounds catch up
    assert d.action == "in_sync" and "vouched for by 3 peers" in d.reason
    d = decide(t, 12, dg("h12"))
    assert d.action == "sync" and d.target is not None and d.target.round == 15
    assert "3 behind" in d.reason
    assert decide(t, 12, dg("h12"), lag_rounds=3).action == "in_sync"


def test_diverged_minority_syncs_and_majority_stays() -> None:
    t = table(f=1)
    majority, minority = ["a", "b", "c", "d"], ["e", "me"]
    announce(t, majority, 12, X12)
    announce(t, minority, 12, D12)
    # The minority's digest is vouched by f+1 others from the majority's side, yet
    # it loses: 2 holders against 4.
    d = decide(t, 12, D12)
    assert d.action == "sync" and d.target == Target(12, X12, tuple(majority))
    assert "diverged at round 12" in d.reason
    d = sync_decision(t, self_id="a", round=12, digest=X12)
    assert d.action == "in_sync", d.reason
    # The majority has moved on already: the minority syncs to where it is now.
    announce(t, majority, 13, D13)
    d = decide(t, 12, D12)
    assert d.action == "sync" and d.target == Target(13, D13, tuple(majority))


def test_even_split_moves_one_side_only() -> None:
    lo, hi = sorted([D12, X12])
    t = table(f=1)
    side_lo, side_hi = ["a", "b", "c"], ["d", "e", "f"]
    announce(t, side_lo, 12, lo)
    announce(t, side_hi, 12, hi)
    verdicts = {
        p: sync_decision(t, self_id=p, round=12, digest=lo if p in side_lo else hi).action
        for p in side_lo + side_hi
    }
    assert verdicts == {"a": "in_sync", "b": "in_sync", "c": "in_sync"} | {
        p: "sync" for p in side_hi
    }
    # The smallest split a peer can settle: f + 1 holders on each side, so each side
    # is vouched from the other's point of view but not from its own.
    t = table(f=1)
    announce(t, ["a", "b"], 12, lo)
    announce(t, ["c", "d"], 12, hi)
    d = sync_decision(t, self_id="a", round=12, digest=lo)
    assert d.action == "in_sync" and "even split at round 12 (2 and 2)" in d.reason
    d = sync_decision(t, self_id="c", round=12, digest=hi)
    assert d.action == "sync" and d.target == Target(12, lo, ("a", "b"))


def test_split_with_nothing_vouched_waits_and_says_why() -> None:
    t = table(f=1)
    t.note("me", 12, D12)
    t.note("other", 12, X12)
    d = decide(t, 12, D12)
    assert d.action == "wait" and d.target is None
    assert "1 peer hold" in d.reason and "f+1 = 2 peers" in d.reason
    assert "best: round 12 by 1 peer" in d.reason
    # Same with an older vouched round around: still nothing to settle round 12.
    announce(t, ["x", "y"], 11, dg("h11"))
    d = decide(t, 12, D12)
    assert d.action == "wait" and "f+1 = 2 peers" in d.reason


def test_unconfirmed_position_syncs_to_a_newer_vouched_one() -> None:
    t = table(f=1)
    announce(t, ["a", "b"], 13, D13)
    d = decide(t, 12, dg("checkpoint-12"))  # restarted from a checkpoint nobody vouches
    assert d.action == "sync" and d.target == Target(13, D13, ("a", "b"))


def test_alone_or_uncontradicted_is_in_sync() -> None:
    t = table(f=0)
    assert decide(t, 5, D12).action == "in_sync"  # a one-peer cluster
    t = table(f=2)
    announce(t, ["a"], 12, D12)  # too few others to vouch, nobody against
    d = decide(t, 12, D12)
    assert d.action == "in_sync" and "1 of f+1 = 3 peers" in d.reason


def test_a_liar_far_ahead_disturbs_nobody() -> None:
    t = table(f=1)
    announce(t, ["a", "b", "c"], 12, D12)
    t.note("liar", 10**6, MADE_UP)
    assert decide(t, 12, D12).action == "in_sync"
    assert decide(t, None, None).target == Target(12, D12, ("a", "b", "c"))
    # Without any vouched position, it is reported, never followed.
    t = table(f=1)
    t.note("a", 12, D12)
    t.note("liar", 10**6, MADE_UP)
    d = decide(t, 12, D12)
    assert d.action == "wait" and d.target is None and "round 1000000" in d.reason


# --- at scale ---------------------------------------------------------------------------


def reference_target(log: dict[tuple[str, int], bytes], f: int, exclude: str) -> Target | None:
    """The target from the definition, by brute force over every statement."""
    holders: dict[tuple[int, bytes], set[str]] = {}
    for (origin, r), d in log.items():
        if origin != exclude:
            holders.setdefault((r, d), set()).add(origin)
    vouched = [(r, len(s), d) for (r, d), s in holders.items() if len(s) >= f + 1]
    if not vouched:
        return None
    r, n, _ = max(vouched, key=lambda v: (v[0], v[1]))
    d = min(v[2] for v in vouched if v[0] == r and v[1] == n)
    return Target(r, d, tuple(sorted(holders[(r, d)])))


@pytest.mark.parametrize("seed", range(5))
def test_simulated_joiners_only_ever_target_honest_positions(seed: int) -> None:
    rng = random.Random(seed)
    f, rounds = 3, 30
    honest = [f"h{i:02d}" for i in range(47)]
    liars = [f"liar{i}" for i in range(f)]
    late = set(rng.sample(honest, 10))  # join during the run
    t = VouchTable(f=f)
    log: dict[tuple[str, int], bytes] = {}  # (origin, round) -> latest digest
    honest_positions: set[tuple[int, bytes]] = set()

    def note(origin: str, r: int, d: bytes) -> None:
        t.note(origin, r, d)
        log[(origin, r)] = d
        if origin in honest:
            honest_positions.add((r, d))

    for g in range(1, rounds + 1):
        fork = dg(f"fork-{g}")  # two honest peers split off this round
        forked = set(rng.sample(honest, 2))
        for h in honest:
            if (h in late and g < 15) or rng.random() < 0.1:
                continue  # not here yet, or its announcement lost
            r = max(1, g - rng.choice([0, 0, 0, 1, 2]))
            note(h, r, fork if h in forked and r == g else dg(f"honest-{r}"))
        made_up = dg(f"made-up-{g}")
        for liar in liars:
            kind = rng.random()
            if kind < 0.4:  # all of them on one made-up digest, ahead of everyone
                note(liar, g + rng.randint(1, 3), made_up)
            elif kind < 0.6:
                note(liar, rng.randint(1, g + 5), rng.randbytes(32))
            elif kind < 0.8:  # backing the honest fork: it becomes vouched
                note(liar, g, fork)
            else:  # telling the truth now and then
                note(liar, g, dg(f"honest-{g}"))

        d = sync_decision(t, self_id="joiner", round=None, digest=None)
        assert d.target == reference_target(log, f, "joiner")
        if g >= 2:
            assert d.action == "sync" and d.target is not None
            assert (d.target.round, d.target.digest) in honest_positions
            assert d.target.round >= g - 1  # live: the honest cluster's newest
        for h in rng.sample(honest, 10):
            own = max((r for (o, r) in log if o == h), default=None)
            mine = None if own is None else log[(h, own)]
            dh = sync_decision(t, self_id=h, round=own, digest=mine)
            if dh.action == "sync":
                assert dh.target is not None
                assert (dh.target.round, dh.target.digest) in honest_positions


def test_a_peer_stuck_past_its_deadline_syncs_to_the_round_the_others_moved_to() -> None:
    # It holds the others' model of round 12 (it synced to it), but they closed
    # round 12 meanwhile and announce round 13: one round behind is within the lag,
    # and normally left to the rounds. Stuck past the deadline without a quorum, the
    # gradients of round 12 will not come again: it syncs.
    t = table(f=1)
    announce(t, ["a", "b", "c"], 12, D12)
    announce(t, ["a", "b", "c"], 13, D13)
    assert decide(t, 12, D12).action == "in_sync"
    d = decide(t, 12, D12, stuck=True)
    assert d.action == "sync" and d.target == Target(13, D13, ("a", "b", "c"))
    assert "stuck in round 12" in d.reason
    # Stuck with nobody ahead: waiting is all it can do (there is nothing to take).
    t2 = table(f=1)
    announce(t2, ["a", "b"], 12, D12)
    assert decide(t2, 12, D12, stuck=True).action == "in_sync"


def test_a_peer_on_a_fork_behind_it_goes_back_only_to_more_holders() -> None:
    # We went on alone to round 20; the others are at round 12 on another model
    # than the one we held there: back to theirs, if more of them held it then.
    t = table(f=1)
    announce(t, ["a", "b", "c"], 12, D12)
    X20 = dg("ours-20")
    ours = {12: X12, 20: X20}
    d = decide(t, 20, X20, own_at=ours)
    assert d.action == "sync" and d.target == Target(12, D12, ("a", "b", "c"))
    assert "fork since round 12" in d.reason
    # Ours at 12 is theirs: only a lead, it stays. Without our history: no verdict.
    assert decide(t, 20, X20, own_at={12: D12, 20: X20}).action == "in_sync"
    assert decide(t, 20, X20).action == "in_sync"
    # An even split (two of us, two of them, at round 12): the side ahead stays;
    # the side behind syncs ahead, so only one moves.
    t2 = table(f=1)
    announce(t2, ["a", "b"], 12, D12)
    announce(t2, ["c"], 12, X12)
    announce(t2, ["c"], 20, X20)
    assert decide(t2, 20, X20, own_at=ours).action != "sync"
    # Peers still closing round 11 may end on our side at 12: counted as ours.
    t3 = table(f=1)
    announce(t3, ["a", "b", "c"], 12, D12)
    announce(t3, ["d", "e"], 11, dg("honest-11"))
    assert decide(t3, 20, X20, own_at=ours).action != "sync"  # 3 against 1 + 2 open
    announce(t3, ["d"], 12, D12)
    assert decide(t3, 20, X20, own_at=ours).action == "sync"  # 4 against 1 + 1
