"""Membership at scale in the deterministic simulator: the issue's acceptance
scenarios, plus leave, rejoin, wire-level runs and determinism.

Every scenario checks the machines' verdicts against the simulator's ground
truth (a host that is up or paused is alive). Where a property could hold
vacuously, a control run with a deliberately naive configuration or an
over-long fault shows that the same check does fail.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from protocol.membership import EventKind, MemberState, lan
from protocol.sim import scenarios
from protocol.sim.membership_cluster import MembershipCluster, node_name

LAN = lan()


def _joins_converge_within_log_n_periods(n: int, bound: float) -> None:
    """n nodes start within one probe period, each joining through a random
    earlier node. Stated bound: join window (1 period) + 2 x retransmit_limit(N) x
    gossip_interval, where retransmit_limit = 4 ceil(log10(N + 1)) is the O(log N) term."""
    bound_periods = scenarios.join_bound(LAN, n, LAN.probe_interval) / LAN.probe_interval
    assert bound_periods == pytest.approx(bound)
    assert bound_periods <= math.log2(n)  # the bound itself is O(log N)-sized
    r = scenarios.joins(n, LAN, seed=1)
    f = r.figures
    assert f["converged_after_periods"] is not None, f
    assert f["converged_after_periods"] <= bound_periods, f
    assert f["false_dead"] == 0
    assert r.ok


def test_joins_n300_everyone_knows_everyone_within_log_n_periods() -> None:
    # 1 + 2 x 12 x 0.2 = 5.8 periods for N = 300.
    _joins_converge_within_log_n_periods(300, 5.8)


# The 1000-node join costs ~20 s of CPU; the same scenario and checks run by default at
# N = 300 (test_joins_n300_everyone_knows_everyone_within_log_n_periods), and the
# 1000-node crash test below keeps N = 1000 in the default run.
@pytest.mark.long
def test_joins_n1000_everyone_knows_everyone_within_log_n_periods() -> None:
    # 1 + 2 x 16 x 0.2 = 7.4 periods for N = 1000.
    _joins_converge_within_log_n_periods(1000, 7.4)


def test_crash_n1000_every_survivor_marks_dead_within_the_suspicion_bound() -> None:
    n = 1000
    r = scenarios.crash(n, LAN, seed=2)
    f = r.figures
    # Bound from the formula: 2 probe intervals + suspicion_max_timeout(N) + W(N).
    assert f["bound_s"] == pytest.approx(2 + 6 * 4 * math.log10(n) + 16 * 0.2)
    assert f["all_dead_s"] is not None and f["all_dead_s"] <= f["bound_s"], f
    # Nobody may declare it faster than the minimum the formula allows...
    assert f["first_dead_s"] >= LAN.suspicion_min_timeout(n), f
    # ...and the re-probing of fresh suspects brings the k confirmations in time
    # for the minimum to apply.
    assert f["all_dead_s"] <= f["expected_s"], f
    assert f["false_dead"] == 0
    assert r.ok


def _two_percent_loss_no_live_node_marked_dead(n: int) -> None:
    r = scenarios.loss(n, LAN, seed=3, loss_rate=0.02, duration=300.0)
    f = r.figures
    assert f["dropped"]["loss"] > 0.015 * f["messages"]  # the loss was real
    assert f["false_dead"] == 0, f["false_dead_examples"]
    assert r.ok


def test_two_percent_loss_n200_300s_no_live_node_marked_dead() -> None:
    _two_percent_loss_no_live_node_marked_dead(200)


# Same scenario and checks as test_two_percent_loss_n200_300s_no_live_node_marked_dead,
# at 2.5x the nodes and 4x the CPU.
@pytest.mark.long
def test_two_percent_loss_n500_300s_no_live_node_marked_dead() -> None:
    _two_percent_loss_no_live_node_marked_dead(500)


def test_the_false_dead_check_can_fail() -> None:
    """Control: the same checker, a naive configuration (no indirect probes, a
    one-period suspicion, no Lifeguard stretch) and heavy loss: false deaths."""
    naive = LAN.with_overrides(
        indirect_checks=0,
        suspicion_mult=1,
        suspicion_max_timeout_mult=1,
        awareness_max_multiplier=1,
        suspicion_probe_fanout=0.0,
    )
    r = scenarios.loss(50, naive, seed=3, loss_rate=0.3, duration=20.0)
    assert r.figures["false_dead"] > 0
    assert not r.ok


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_node_paused_for_less_than_its_suspicion_timeout_is_never_dead(seed: int) -> None:
    n = 200
    r = scenarios.pause(n, LAN, seed=seed)  # paused for 95% of the minimum timeout
    f = r.figures
    assert f["pause_s"] < LAN.suspicion_min_timeout(n)
    assert f["suspect_events"] > 0  # it really was suspected while paused
    assert f["marked_dead_by"] == 0, f
    assert f["victim_refutations"] >= 1 and f["one_view_after"]
    assert r.ok


def test_a_node_paused_too_long_is_marked_dead_then_comes_back() -> None:
    """Control for the pause test: a pause past the maximum timeout is detected."""
    n = 200
    r = scenarios.pause(n, LAN, seed=1, pause_s=LAN.suspicion_max_timeout(n) + 10)
    f = r.figures
    assert f["marked_dead_by"] == n - 1
    assert not r.ok
    assert f["one_view_after"]  # after resuming it refuted and is alive again


def test_a_partition_that_heals_converges_back_to_one_view() -> None:
    r = scenarios.partition(64, LAN, seed=4)
    f = r.figures
    assert f["split_complete"], f  # each side had declared the other dead
    assert f["one_view_after_heal_s"] is not None, f
    assert f["one_view_after_heal_s"] <= f["heal_limit_s"]
    assert r.ok


# --- leave and rejoin at cluster scale ----------------------------------------------------


def _settle(c: MembershipCluster, cond, limit: float) -> bool:  # type: ignore[no-untyped-def]
    end = c.now + limit
    while c.now < end:
        c.run_for(0.5)
        if cond():
            return True
    return False


def test_graceful_leave_is_left_everywhere_never_dead() -> None:
    c = MembershipCluster(50, LAN, seed=5, converged=True)
    c.run_for(3)
    c.leave(17)
    c.run_for(2)
    nid = node_name(17)
    seen = c.obs.left_at.get(nid, {})
    others = [h.node_id for h in c.hosts if h.node_id != nid]
    assert set(others) <= set(seen)
    c.crash(17)  # the process exits after leaving
    c.run_for(LAN.suspicion_max_timeout(50) + 10)
    assert nid not in c.obs.dead_at
    for i in range(50):
        if i != 17:
            assert c.machine(i).member(nid).state is MemberState.LEFT  # type: ignore[union-attr]


def test_restart_with_same_identity_is_alive_everywhere_with_higher_incarnation() -> None:
    c = MembershipCluster(40, LAN, seed=6, converged=True)
    c.run_for(3)
    c.crash(9)
    assert _settle(c, lambda: c.dead_everywhere(9), 60)
    c.restart(9, seeds=[0])
    nid = node_name(9)

    def back() -> bool:
        return all(
            c.machine(i).member(nid).state is MemberState.ALIVE  # type: ignore[union-attr]
            for i in range(40)
        )

    assert _settle(c, back, 10)
    inc = c.machine(9).incarnation
    assert inc >= 1
    assert {c.machine(i).member(nid).incarnation for i in range(40)} == {inc}  # type: ignore[union-attr]


def test_rejoin_from_a_new_address_leaves_one_entry_everywhere() -> None:
    c = MembershipCluster(40, LAN, seed=7, converged=True)
    c.run_for(3)
    c.crash(12)
    c.run_for(2)  # back before anyone declares it dead
    c.restart(12, new_address=True, seeds=[3])
    nid = node_name(12)
    new_addr = c.hosts[12].addr

    def moved() -> bool:
        return all(c.machine(i).member(nid).addr == new_addr for i in range(40))  # type: ignore[union-attr]

    assert _settle(c, moved, 10)
    for i in range(40):
        entries = [m for m in c.machine(i).members() if m.node_id == nid]
        assert len(entries) == 1 and entries[0].state is MemberState.ALIVE
    assert nid not in c.obs.dead_at
    assert not c.obs.false_dead


# --- the wire and determinism -------------------------------------------------------------


def test_wire_mode_every_message_through_the_strict_decoder() -> None:
    c = MembershipCluster(30, LAN, seed=8, wire=True, converged=False, started=False)
    c.join(0, [], at=0.0)
    for i in range(1, 30):
        c.join(i, [0], at=0.01 * i)
    assert _settle(c, c.one_view, 20)
    c.crash(5)
    assert _settle(c, lambda: c.dead_everywhere(5), 60)
    assert c.net.bytes_sent > 0
    assert not [k for k in c.net.dropped if k.startswith("decode")]
    assert not c.obs.false_dead


def _trace(seed: int) -> list[tuple[float, str, str]]:
    c = MembershipCluster(30, LAN, seed=seed, converged=True, loss=0.05)
    c.run_for(2)
    c.crash(3)
    c.pause(7, 4.0)
    c.run_for(30)
    return [
        (round(t, 9), o, s)
        for s, per in sorted(c.obs.dead_at.items())
        for o, t in sorted(per.items())
    ] + [
        ("sent", str(c.net.sent), str(c.obs.events))  # type: ignore[list-item]
    ]


def test_runs_are_deterministic_per_seed() -> None:
    a, b, other = _trace(11), _trace(11), _trace(12)
    assert a == b
    assert a != other
    assert any(s == node_name(3) for _, _, s in a[:-1])


def test_events_carry_the_member_and_time() -> None:
    c = MembershipCluster(10, LAN, seed=9, converged=True)
    c.run_for(2)
    c.crash(4)
    c.run_for(LAN.suspicion_max_timeout(10) + 5)
    assert c.obs.events[EventKind.DEAD.value] == 9
    assert c.obs.events[EventKind.SUSPECT.value] >= 1


# --- the CLI ------------------------------------------------------------------------------


def test_cli_runs_a_scenario_and_prints_json() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "protocol.sim", "crash", "--n", "40", "--seed", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["scenario"] == "crash" and out["n"] == 40 and out["ok"] is True
    assert out["figures"]["all_dead_s"] <= out["figures"]["bound_s"]


def test_cli_exit_codes() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "protocol.sim", "crash", "--n", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--n" in bad.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "protocol.sim", "nonsense"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2
    failing = subprocess.run(
        [sys.executable, "-m", "protocol.sim", "pause", "--n", "30", "--pause", "90", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failing.returncode == 1
    assert json.loads(failing.stdout.strip().splitlines()[-1])["ok"] is False
