"""Membership tuning: the ``local``, ``lan`` and ``wan`` profiles and the formulas
that scale timeouts and fan-outs with the cluster size.

Every knob is documented on the field. The profiles start from hashicorp/memberlist's
DefaultLocalConfig / DefaultLANConfig / DefaultWANConfig and add the knobs that
memberlist's users asked for (byte budgets, queue bounds, stall detection,
re-probing a fresh suspect so confirmations arrive early).

All times are seconds of whatever clock the caller feeds in as ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .messages import MAX_UPDATE_BYTES


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    # --- probing (SWIM failure detector) ----------------------------------------------
    probe_interval: float
    """Time between two probes started by this node. Each probe targets the next
    member of a random permutation, so every member is probed once per round."""

    probe_timeout: float
    """How long a direct ping waits for its ack before the prober asks
    ``indirect_checks`` other members to ping the target on its behalf. A relay
    answers a ping-req with a nack after 80% of min(probe_timeout, probe_interval -
    probe_timeout), so the nack arrives while the prober still waits."""

    indirect_checks: int
    """k: members asked to ping a target that missed a direct ping (ping-req)."""

    stall_threshold: float
    """If ``tick`` runs this much later than a probe deadline, this node itself was
    stalled (GC pause, CPU starvation): the probe is abandoned as inconclusive
    instead of accusing a target whose ack may be sitting unread in our queue."""

    # --- suspicion (Lifeguard) --------------------------------------------------------
    suspicion_mult: int
    """Minimum suspicion timeout = suspicion_mult * max(1, log10 N) * probe_interval.
    Also sets the confirmations wanted: k = suspicion_mult - 2 (0 when N is tiny)."""

    suspicion_max_timeout_mult: int
    """A suspicion timer starts at this multiple of the minimum timeout and shrinks
    toward the minimum as independent confirmations arrive (log scale)."""

    suspicion_probe_fanout: float
    """Expected number of members that, on first hearing a suspicion from someone
    else, probe the suspect themselves right away. Their verdicts are the
    independent confirmations that shrink the timer, so detection does not wait for
    the round-robin to reach the suspect. 0 turns it off (memberlist behaviour)."""

    awareness_max_multiplier: int
    """Lifeguard local health: probe interval and timeout are multiplied by
    (score + 1), score in [0, awareness_max_multiplier - 1]. Missed nacks, failed
    probes and having to refute raise the score; successful probes lower it."""

    # --- dissemination ----------------------------------------------------------------
    gossip_interval: float
    """Time between gossip rounds; a round sends queued updates to gossip_nodes
    members. Nothing is sent when the queue is empty."""

    gossip_nodes: int
    """Members each gossip round sends to (and that hear a graceful leave at once)."""

    gossip_to_dead_time: float
    """Members dead for less than this still receive gossip, so a short partition or
    pause can hear that it was declared dead and refute."""

    retransmit_mult: int
    """Each update is sent retransmit_mult * ceil(log10(N + 1)) times by every node
    that relays it; the least-sent updates go first."""

    broadcast_queue_limit: int
    """Upper bound of the outgoing update queue. When full, the most-sent update is
    evicted and counted (``broadcast_evicted``); push-pull repairs what it carried."""

    piggyback_budget_bytes: int
    """Bytes of updates packed into one message (piggybacked on pings/acks or in a
    gossip message). Updates that do not fit wait for the next message; none is
    dropped for size. Links are TCP, so this bounds head-of-line delay, not an MTU."""

    max_message_bytes: int
    """Largest message this node sends. Push-pull state bigger than this goes out
    in several chunks; keep it below the envelope limit of the transport."""

    # --- anti-entropy -----------------------------------------------------------------
    push_pull_interval: float
    """Base interval of full-state exchange with one random live member. Scaled by
    ceil(log2 N - log2 push_pull_scale_threshold) + 1 past the threshold, so the
    per-node cost stays flat as the cluster grows."""

    push_pull_scale_threshold: int
    """Cluster size up to which push_pull_interval is used unscaled (memberlist: 32)."""

    join_retry_interval: float
    """A join that got no push-pull reply from any seed is retried after this."""

    reconnect_interval: float
    """Every this often, push-pull one random member we hold as dead (not left). A
    healed partition has both sides holding the other dead and never probing it;
    this is how they find each other again (memberlist leaves this to Serf, which
    tries every 30 s). It bounds how long a healed host stays out of the training:
    every node on either side tries, so the first try after the heal comes in about
    interval / nodes, at worst one interval. One small dial per interval is the
    cost, so ``local`` and ``lan`` try every 1 s and 2 s (the target is back at
    work within 5 s of the heal)."""

    # --- tombstones and limits --------------------------------------------------------
    dead_tombstone_ttl: float
    """How long a dead member is remembered (reconnect target, and protection
    against stale alive records) before it is removed."""

    left_tombstone_ttl: float
    """How long a member that left gracefully is remembered before removal."""

    max_members: int
    """Hard bound on the member table, tombstones included. Records about further
    new members are refused and counted (``table_full``)."""

    max_pending_relays: int
    """Bound on ping-req relays in flight for other members; more are refused and
    counted (``relay_limit``)."""

    max_confirm_probes: int
    """Bound on concurrent suspicion-triggered probes (see suspicion_probe_fanout)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"MembershipConfig.{f.name} must be >= 0, got {value}")
        positive = (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "push_pull_interval",
            "join_retry_interval",
            "reconnect_interval",
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "awareness_max_multiplier",
            "retransmit_mult",
            "broadcast_queue_limit",
            "max_members",
            "push_pull_scale_threshold",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"MembershipConfig.{name} must be > 0")
        if self.probe_timeout >= self.probe_interval:
            raise ValueError("probe_timeout must be shorter than probe_interval")
        # One update of maximal size (see messages.MAX_UPDATE_BYTES) must always fit,
        # otherwise it could never be sent and would sit in the queue forever.
        if self.piggyback_budget_bytes < MAX_UPDATE_BYTES:
            raise ValueError(f"piggyback_budget_bytes must be at least {MAX_UPDATE_BYTES}")
        if self.max_message_bytes < 4 * self.piggyback_budget_bytes:
            raise ValueError("max_message_bytes must be at least 4 * piggyback_budget_bytes")

    def with_overrides(self, **changes: float) -> MembershipConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    # --- formulas ---------------------------------------------------------------------

    def suspicion_min_timeout(self, n: int) -> float:
        """memberlist's suspicionTimeout: mult * max(1, log10 n) * interval."""
        scale = max(1.0, math.log10(max(1, n)))
        return self.suspicion_mult * scale * self.probe_interval

    def suspicion_max_timeout(self, n: int) -> float:
        return self.suspicion_max_timeout_mult * self.suspicion_min_timeout(n)

    def suspicion_confirmations(self, n: int) -> int:
        """Independent confirmations that bring a timer down to its minimum."""
        k = self.suspicion_mult - 2
        return 0 if n - 2 < k else k

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def push_pull_period(self, n: int) -> float:
        if n <= self.push_pull_scale_threshold:
            return self.push_pull_interval
        mult = math.ceil(math.log2(n) - math.log2(self.push_pull_scale_threshold)) + 1
        return self.push_pull_interval * mult


def local() -> MembershipConfig:
    """Loopback clusters and tests: every process on one host, sub-millisecond RTT,
    but possibly CPU-starved Python event loops. Detects a kill -9 in about 1-2 s
    with eight members (worst case, no confirmations: ~3 s)."""
    return MembershipConfig(
        probe_interval=0.25,
        probe_timeout=0.1,
        indirect_checks=2,
        stall_threshold=0.1,
        suspicion_mult=3,
        suspicion_max_timeout_mult=3,
        suspicion_probe_fanout=3.0,
        awareness_max_multiplier=8,
        gossip_interval=0.05,
        gossip_nodes=3,
        gossip_to_dead_time=5.0,
        retransmit_mult=3,
        broadcast_queue_limit=4096,
        piggyback_budget_bytes=16 * 1024,
        max_message_bytes=256 * 1024,
        push_pull_interval=10.0,
        push_pull_scale_threshold=32,
        join_retry_interval=0.5,
        reconnect_interval=1.0,
        dead_tombstone_ttl=300.0,
        left_tombstone_ttl=60.0,
        max_members=65536,
        max_pending_relays=1024,
        max_confirm_probes=4,
    )


def lan() -> MembershipConfig:
    """One data centre: memberlist's LAN defaults (1 s probes, 500 ms timeout, 3
    indirect checks, suspicion 4 x log10 N, timer starting at 6x, gossip every
    200 ms to 3, push-pull every 30 s scaled past 32 members)."""
    return MembershipConfig(
        probe_interval=1.0,
        probe_timeout=0.5,
        indirect_checks=3,
        stall_threshold=0.25,
        suspicion_mult=4,
        suspicion_max_timeout_mult=6,
        suspicion_probe_fanout=3.0,
        awareness_max_multiplier=8,
        gossip_interval=0.2,
        gossip_nodes=3,
        gossip_to_dead_time=30.0,
        retransmit_mult=4,
        broadcast_queue_limit=8192,
        piggyback_budget_bytes=8 * 1024,
        max_message_bytes=256 * 1024,
        push_pull_interval=30.0,
        push_pull_scale_threshold=32,
        join_retry_interval=2.0,
        reconnect_interval=2.0,
        dead_tombstone_ttl=3600.0,
        left_tombstone_ttl=600.0,
        max_members=65536,
        max_pending_relays=1024,
        max_confirm_probes=4,
    )


def wan() -> MembershipConfig:
    """Members across data centres: memberlist's WAN defaults (5 s probes, 3 s
    timeout, suspicion 6 x log10 N, gossip every 500 ms to 4, push-pull 60 s)."""
    return MembershipConfig(
        probe_interval=5.0,
        probe_timeout=3.0,
        indirect_checks=3,
        stall_threshold=1.0,
        suspicion_mult=6,
        suspicion_max_timeout_mult=6,
        suspicion_probe_fanout=3.0,
        awareness_max_multiplier=8,
        gossip_interval=0.5,
        gossip_nodes=4,
        gossip_to_dead_time=60.0,
        retransmit_mult=4,
        broadcast_queue_limit=8192,
        piggyback_budget_bytes=4 * 1024,
        max_message_bytes=256 * 1024,
        push_pull_interval=60.0,
        push_pull_scale_threshold=32,
        join_retry_interval=5.0,
        reconnect_interval=30.0,
        dead_tombstone_ttl=6 * 3600.0,
        left_tombstone_ttl=3600.0,
        max_members=65536,
        max_pending_relays=1024,
        max_confirm_probes=4,
    )


PROFILES = {"local": local, "lan": lan, "wan": wan}


def profile(name: str) -> MembershipConfig:
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(
            f"unknown membership profile {name!r} (expected one of {sorted(PROFILES)})"
        ) from None
