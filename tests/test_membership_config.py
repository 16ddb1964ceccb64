"""Membership profiles and the formulas that scale with N."""

from __future__ import annotations

import ast
import inspect
import math

import pytest

from protocol.membership import config as config_module
from protocol.membership.config import PROFILES, MembershipConfig, lan, local, profile, wan


def test_profiles_are_valid_and_ordered() -> None:
    lo, la, wa = local(), lan(), wan()
    assert lo.probe_interval < la.probe_interval < wa.probe_interval
    assert lo.probe_timeout < la.probe_timeout < wa.probe_timeout
    for cfg in (lo, la, wa):
        assert cfg.probe_timeout < cfg.probe_interval
        assert cfg.suspicion_max_timeout_mult >= 1
    assert profile("lan") == lan()
    assert set(PROFILES) == {"local", "lan", "wan"}


def test_lan_matches_memberlist_defaults() -> None:
    cfg = lan()
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.indirect_checks) == (1.0, 0.5, 3)
    assert (cfg.suspicion_mult, cfg.suspicion_max_timeout_mult) == (4, 6)
    assert (cfg.gossip_interval, cfg.gossip_nodes, cfg.retransmit_mult) == (0.2, 3, 4)
    assert cfg.push_pull_interval == 30.0
    assert cfg.awareness_max_multiplier == 8


def test_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown membership profile 'fast'"):
        profile("fast")


def test_every_knob_is_documented() -> None:
    """Each field of MembershipConfig is followed by its docstring in the source."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MembershipConfig")
    body = cls.body
    documented = set()
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
                and len(nxt.value.value.split()) >= 5
            ):
                documented.add(node.target.id)
    fields = set(MembershipConfig.__dataclass_fields__)
    assert fields - documented == set()


def test_suspicion_timeouts_follow_memberlist_formula() -> None:
    cfg = lan()
    # mult * max(1, log10 N) * interval; below N=10 the scale is 1.
    assert cfg.suspicion_min_timeout(1) == 4.0
    assert cfg.suspicion_min_timeout(5) == 4.0
    assert cfg.suspicion_min_timeout(1000) == pytest.approx(12.0)
    assert cfg.suspicion_min_timeout(10_000) == pytest.approx(16.0)
    assert cfg.suspicion_max_timeout(1000) == pytest.approx(72.0)
    assert cfg.suspicion_confirmations(100) == 2
    assert cfg.suspicion_confirmations(3) == 0  # too few members to confirm anything


def test_retransmit_limit_grows_with_log_n() -> None:
    cfg = lan()
    assert [cfg.retransmit_limit(n) for n in (1, 9, 10, 99, 100, 1000, 10_000)] == [
        4,
        4,
        8,
        8,
        12,
        16,
        20,
    ]


def test_push_pull_interval_scales_past_threshold() -> None:
    cfg = lan()
    assert cfg.push_pull_period(32) == 30.0
    assert cfg.push_pull_period(33) == 60.0
    assert cfg.push_pull_period(64) == 60.0
    assert cfg.push_pull_period(1000) == 30.0 * (math.ceil(math.log2(1000) - 5) + 1)


@pytest.mark.parametrize(
    "change",
    [
        {"probe_timeout": 2.0},  # not shorter than the interval
        {"probe_interval": 0.0},
        {"gossip_nodes": -1},
        {"piggyback_budget_bytes": 100},
        {"max_message_bytes": 1024},
        {"broadcast_queue_limit": 0},
    ],
)
def test_invalid_configs_are_refused(change: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        lan().with_overrides(**change)


def test_overrides_keep_the_rest() -> None:
    cfg = local().with_overrides(probe_interval=0.5)
    assert cfg.probe_interval == 0.5
    assert cfg.probe_timeout == local().probe_timeout
