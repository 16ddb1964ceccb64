"""The membership acceptance scenarios, each returning its figures and the bound
it is held to. Tests assert on them; ``python -m protocol.sim`` prints them; the
scale benchmark reuses the pieces.

Bounds are derived from the configuration, so they move with the profile:

* dissemination window W(N) = retransmit_limit(N) * gossip_interval: how long one
  node keeps relaying an update. It is O(log N).
* join convergence bound = join window + 2 W(N): the joiner's pushed state plus
  one relay window for its join, and the follow-up push-pull after one window.
* detection bound = 2 probe intervals (the first failed probe, including its
  own interval) + suspicion_max_timeout(N) + W(N) for the dead record to spread.
  With k independent confirmations the timer is suspicion_min_timeout(N), so the
  expected detection is the same with min in place of max.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..membership import MembershipConfig, MemberState
from .membership_cluster import MembershipCluster, node_name


def dissemination_window(config: MembershipConfig, n: int) -> float:
    return config.retransmit_limit(n) * config.gossip_interval


def join_bound(config: MembershipConfig, n: int, join_window: float) -> float:
    return join_window + 2 * dissemination_window(config, n)


def detection_bound(config: MembershipConfig, n: int) -> float:
    return (
        2 * config.probe_interval
        + config.suspicion_max_timeout(n)
        + dissemination_window(config, n)
    )


def detection_expected(config: MembershipConfig, n: int) -> float:
    return (
        2 * config.probe_interval
        + config.suspicion_min_timeout(n)
        + dissemination_window(config, n)
    )


@dataclass
class Result:
    scenario: str
    n: int
    seed: int
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_until(cluster: MembershipCluster, done: Any, limit: float, step: float) -> float | None:
    """Runs in ``step`` slices until ``done()``; returns the time it held or None."""
    while cluster.now < limit:
        cluster.run_for(step)
        if done():
            return cluster.now
    return None


def _traffic(cluster: MembershipCluster) -> tuple[int, int]:
    return cluster.net.sent, cluster.net.bytes_sent


# --- joins ------------------------------------------------------------------------------


def joins(
    n: int,
    config: MembershipConfig,
    *,
    seed: int = 1,
    join_window: float | None = None,
    step: float | None = None,
) -> Result:
    """N nodes start at random times within ``join_window`` (default: one probe
    interval); node 0 first, alone; each later one joins through a random node
    that started before it. Measures the time from the last start until every node
    holds every other as alive."""
    t0 = time.perf_counter()
    window = config.probe_interval if join_window is None else join_window
    step = config.gossip_interval if step is None else step
    c = MembershipCluster(n, config, seed=seed, started=False, measure_bytes=False)
    rng = random.Random(f"joins/{seed}")
    starts = sorted(rng.random() * window for _ in range(n - 1))
    c.join(0, [], at=0.0)
    for i, at in enumerate(starts, start=1):
        c.join(i, [rng.randrange(i)], at=at)
    last = starts[-1] if starts else 0.0
    bound = join_bound(config, n, window)

    def everyone_knows_everyone() -> bool:
        return all(c.machine(i).count(MemberState.ALIVE) == n for i in range(n))

    done_at = _run_until(c, everyone_knows_everyone, last + 3 * bound, step)
    took = None if done_at is None else done_at - last
    return Result(
        "joins",
        n,
        seed,
        ok=took is not None and took <= bound,
        figures={
            "converged_after_s": took,
            "converged_after_periods": None if took is None else took / config.probe_interval,
            "bound_s": bound,
            "bound_periods": bound / config.probe_interval,
            "log2_n": math.log2(n),
            "messages": c.net.sent,
            "false_dead": len(c.obs.false_dead),
        },
        wall_s=time.perf_counter() - t0,
    )


# --- one crash --------------------------------------------------------------------------


def crash(
    n: int,
    config: MembershipConfig,
    *,
    seed: int = 1,
    warmup: float | None = None,
    step: float | None = None,
) -> Result:
    """A converged cluster; one node is killed; how long until every survivor has
    marked it dead, against the bound from the suspicion formula."""
    t0 = time.perf_counter()
    c = MembershipCluster(n, config, seed=seed, converged=True, measure_bytes=False)
    c.run_for(3 * config.probe_interval if warmup is None else warmup)
    victim = random.Random(f"crash/{seed}").randrange(n)
    crashed_at = c.now
    c.crash(victim)
    bound = detection_bound(config, n)
    step = config.gossip_interval if step is None else step
    done_at = _run_until(c, lambda: c.dead_everywhere(victim), crashed_at + 2 * bound, step)
    seen = c.obs.dead_at.get(node_name(victim), {})
    first = min(seen.values()) - crashed_at if seen else None
    last = None if done_at is None else max(seen.values()) - crashed_at
    return Result(
        "crash",
        n,
        seed,
        ok=last is not None and last <= bound and not c.obs.false_dead,
        figures={
            "victim": node_name(victim),
            "first_dead_s": first,
            "all_dead_s": last,
            "bound_s": bound,
            "expected_s": detection_expected(config, n),
            "suspicion_min_s": config.suspicion_min_timeout(n),
            "suspicion_max_s": config.suspicion_max_timeout(n),
            "false_dead": len(c.obs.false_dead),
        },
        wall_s=time.perf_counter() - t0,
    )


# --- packet loss ------------------------------------------------------------------------


def loss(
    n: int,
    config: MembershipConfig,
    *,
    seed: int = 1,
    loss_rate: float = 0.02,
    duration: float = 300.0,
) -> Result:
    """A converged cluster under random message loss for ``duration`` simulated
    seconds: no live node may ever be marked dead."""
    t0 = time.perf_counter()
    c = MembershipCluster(n, config, seed=seed, converged=True, loss=loss_rate, measure_bytes=False)
    c.run_for(duration)
    suspicions = sum(c.obs.suspected.values())
    refuted = sum(c.machine(i).counters["refuted"] for i in range(n))
    return Result(
        "loss",
        n,
        seed,
        ok=not c.obs.false_dead,
        figures={
            "loss_rate": loss_rate,
            "simulated_s": duration,
            "false_dead": len(c.obs.false_dead),
            "false_dead_examples": [asdict(f) for f in c.obs.false_dead[:5]],
            "suspect_events": suspicions,
            "refutations": refuted,
            "messages": c.net.sent,
            "dropped": dict(c.net.dropped),
        },
        wall_s=time.perf_counter() - t0,
    )


# --- a paused node ----------------------------------------------------------------------


def pause(
    n: int,
    config: MembershipConfig,
    *,
    seed: int = 1,
    pause_s: float | None = None,
    after_s: float | None = None,
) -> Result:
    """One node stops processing (GC pause, CPU starvation) for ``pause_s``
    (default: 95% of the minimum suspicion timeout, the shortest wait anyone can
    use at this size), then resumes. ``ok`` means it was never marked dead."""
    t0 = time.perf_counter()
    c = MembershipCluster(n, config, seed=seed, converged=True, measure_bytes=False)
    c.run_for(3 * config.probe_interval)
    victim = random.Random(f"pause/{seed}").randrange(n)
    min_timeout = config.suspicion_min_timeout(n)
    length = 0.95 * min_timeout if pause_s is None else pause_s
    c.pause(victim, length)
    c.run_for(length + (detection_bound(config, n) if after_s is None else after_s))
    nid = node_name(victim)
    marked = c.obs.dead_at.get(nid, {})
    m = c.machine(victim)
    return Result(
        "pause",
        n,
        seed,
        ok=not marked,
        figures={
            "victim": nid,
            "pause_s": length,
            "suspicion_min_s": min_timeout,
            "suspicion_max_s": config.suspicion_max_timeout(n),
            "marked_dead_by": len(marked),
            "suspect_events": c.obs.suspected[nid],
            "victim_incarnation": m.incarnation,
            "victim_refutations": m.counters["refuted"],
            "victim_stalled_probes": m.counters["probe_stalled"],
            "one_view_after": c.one_view(),
        },
        wall_s=time.perf_counter() - t0,
    )


# --- a partition that heals -------------------------------------------------------------


def partition(
    n: int,
    config: MembershipConfig,
    *,
    seed: int = 1,
    split_s: float | None = None,
    heal_limit_s: float | None = None,
) -> Result:
    """Splits a converged cluster 50/50 until each side has declared the other
    dead, heals it, and measures the time until every node again holds every node
    alive (one view)."""
    t0 = time.perf_counter()
    c = MembershipCluster(n, config, seed=seed, converged=True, measure_bytes=False)
    c.run_for(3 * config.probe_interval)
    order = list(range(n))
    random.Random(f"partition/{seed}").shuffle(order)
    side_a, side_b = order[: n // 2], order[n // 2 :]
    c.partition([side_a, side_b])
    split = 1.5 * detection_bound(config, n) if split_s is None else split_s
    c.run_for(split)
    dead_a = sum(
        1 for i in side_a if c.machine(side_b[0]).member(node_name(i)).state is MemberState.DEAD
    )  # type: ignore[union-attr]
    dead_b = sum(
        1 for i in side_b if c.machine(side_a[0]).member(node_name(i)).state is MemberState.DEAD
    )  # type: ignore[union-attr]
    split_complete = dead_a == len(side_a) and dead_b == len(side_b)
    # During the split nobody is truly dead, but each side is right not to hear the
    # other: those verdicts are expected, not false positives. Start counting now.
    c.obs.false_dead.clear()
    c.heal()
    healed_at = c.now
    limit = (
        healed_at + 10 * config.reconnect_interval + detection_bound(config, n)
        if heal_limit_s is None
        else healed_at + heal_limit_s
    )
    done_at = _run_until(c, c.one_view, limit, config.probe_interval)
    took = None if done_at is None else done_at - healed_at
    return Result(
        "partition",
        n,
        seed,
        ok=split_complete and took is not None,
        figures={
            "split_s": split,
            "split_complete": split_complete,
            "side_a_dead_seen_by_b": dead_a,
            "side_b_dead_seen_by_a": dead_b,
            "one_view_after_heal_s": took,
            "heal_limit_s": limit - healed_at,
            "reconnect_interval_s": config.reconnect_interval,
        },
        wall_s=time.perf_counter() - t0,
    )


SCENARIOS = {
    "joins": joins,
    "crash": crash,
    "loss": loss,
    "pause": pause,
    "partition": partition,
}
