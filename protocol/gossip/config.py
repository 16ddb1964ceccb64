"""Gossip tuning: every knob documented, with gossipsub v1.1's defaults where
gossipsub has the knob, and our own for the large-payload path it lacks.

All times are seconds of whatever clock the caller feeds in as ``now``.
``GossipConfig.fast()`` shrinks the timers for loopback tests; the counts and
thresholds stay the same so tests exercise the real policy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, slots=True)
class GossipConfig:
    # --- mesh (gossipsub v1.1 §"Parameters") ------------------------------------------
    d: int = 6
    """D: the mesh degree a heartbeat steers each topic mesh toward."""

    d_lo: int = 5
    """D_lo: below this many mesh peers, a heartbeat grafts up to D."""

    d_hi: int = 12
    """D_hi: above this many, a heartbeat prunes down to D (keeping the best
    ``d_score`` by score, the rest chosen at random). A GRAFT that would exceed it
    is answered with PRUNE and peer exchange."""

    d_score: int = 4
    """Peers kept by score when a heartbeat trims an oversized mesh."""

    d_lazy: int = 6
    """Minimum number of non-mesh peers that receive IHAVE gossip per topic per
    heartbeat (more when ``gossip_factor`` asks for more)."""

    gossip_factor: float = 0.25
    """Fraction of non-mesh topic peers that receive IHAVE, if above d_lazy."""

    heartbeat_interval: float = 1.0
    """Mesh maintenance, IHAVE emission, cache shifting and score decay period."""

    # --- caches -----------------------------------------------------------------------
    mcache_len: int = 5
    """History windows (heartbeats) a forwarded announcement stays answerable to
    IWANT."""

    mcache_gossip: int = 3
    """Newest windows whose ids are advertised in IHAVE."""

    seen_ttl: float = 120.0
    """A message id is remembered this long: a copy arriving within it is a
    duplicate and costs no signature check."""

    seen_max: int = 200_000
    """Hard bound on remembered ids; past it the oldest are forgotten early (counted)."""

    seq_window: int = 1024
    """Per-origin replay window: the last ``seq_window`` accepted sequence numbers
    of each origin are kept; a seq at or below the oldest kept one, or equal to a
    kept one, is a replay. Tolerates reordering among the last 1024 messages."""

    max_origins: int = 10_000
    """Bound on per-origin windows. Origins are admitted members (see Admission),
    so this is rarely reached; when it is, a window is forgotten only if its origin
    has been silent longer than ``max_message_age + max_future_skew`` (anything it
    could still stop is refused as stale), otherwise the new origin's message is
    ignored (counted ``origins_full``): an active origin's window is never evicted."""

    max_origins_per_peer: int = 4096
    """Windows one neighbour may bring into being (origins it was first to relay);
    past it, messages from further new origins via that neighbour are ignored
    (counted ``origins_per_peer``), so one link cannot claim the whole table."""

    max_message_age: float = 600.0
    """When the caller provides a wall clock, announcements whose signed timestamp is
    older than this are refused: the seq window cannot know an origin it has never
    heard, so this is what stops replaying old messages to a fresh node."""

    max_future_skew: float = 60.0
    """...and announcements dated further than this in the future."""

    # --- lazy gossip ------------------------------------------------------------------
    max_ihave_length: int = 2048
    """Ids per IHAVE message, and ids asked in IWANT per peer per heartbeat
    (gossipsub's 5000 would not fit our envelope's array limit)."""

    max_ihave_messages: int = 10
    """IHAVE messages accepted from one peer per heartbeat; more are ignored."""

    gossip_retransmission: int = 3
    """Times one announcement is sent to one peer in answer to IWANT."""

    iwant_followup_time: float = 3.0
    """A peer that advertised an id in IHAVE and does not deliver it this long after
    our IWANT broke a promise (behaviour penalty)."""

    # --- backoff and peer exchange ----------------------------------------------------
    prune_backoff: float = 60.0
    """After a PRUNE, neither side grafts the other on that topic for this long."""

    unsubscribe_backoff: float = 10.0
    """Backoff announced in the PRUNEs sent when leaving a topic."""

    graft_flood_threshold: float = 10.0
    """A GRAFT arriving sooner than this into a backoff earns an extra penalty."""

    prune_peers: int = 16
    """Peers offered in a PRUNE's peer exchange."""

    max_backoffs_per_peer: int = 64
    """Backoff entries kept per peer. A PRUNE only creates one for a topic we hold a
    mesh for; one past this bound (or for a topic without a mesh) is ignored, counted
    and charged to the peer as a broken promise."""

    # --- publishing -------------------------------------------------------------------
    flood_publish: bool = True
    """Own messages go to every topic peer scored >= publish_threshold, not only the
    mesh (gossipsub v1.1): a publisher cannot be eclipsed by its mesh."""

    # --- peer scoring (gossipsub v1.1 §"Peer Scoring", one topic weight) ---------------
    first_delivery_weight: float = 1.0
    """P2: reward per first delivery of a valid message, capped."""

    first_delivery_cap: float = 10.0
    """P2 counter cap: good behaviour cannot bank credit for later misbehaviour."""

    first_delivery_decay: float = 0.9
    """P2 counter multiplier per heartbeat."""

    invalid_weight: float = -10.0
    """P4: weight of the squared count of invalid messages (bad signature, malformed,
    replayed, rejected by validation, failed body chunk). One invalid message makes
    a score negative (pruned); three reach the graylist."""

    invalid_decay: float = 0.99
    """P4 counter multiplier per heartbeat: slow, so a spammer stays graylisted for
    minutes."""

    behaviour_weight: float = -2.0
    """P7: weight of the squared excess of broken promises (IHAVE/announcement not
    served, GRAFT during backoff) over ``behaviour_threshold``."""

    behaviour_threshold: float = 2.0
    """Broken promises forgiven: a lossy link may break one or two honestly."""

    behaviour_decay: float = 0.99
    """P7 counter multiplier per heartbeat."""

    decay_to_zero: float = 0.01
    """Counters below this after decay become 0."""

    gossip_threshold: float = -10.0
    """Below this, no IHAVE is sent to the peer and its IHAVE/IWANT are ignored."""

    publish_threshold: float = -50.0
    """Below this, own messages are not flood-published to the peer."""

    graylist_threshold: float = -80.0
    """Below this, everything the peer sends is ignored."""

    accept_px_threshold: float = 5.0
    """Peer exchange in a PRUNE is used only from peers scored at least this."""

    max_scored_peers: int = 4096
    """Score records kept for disconnected peers (so reconnecting does not reset a
    bad score) are bounded; the least negative are forgotten first."""

    retain_score: float = 600.0
    """A disconnected peer's score record is kept this long."""

    # --- large payloads ---------------------------------------------------------------
    chunk_size: int = 256 * 1024
    """Bodies are verified in chunks of this size: each chunk's SHA-256 is in the
    chunk table, whose digest (with the size) is the announced body digest. A bad
    chunk is caught within one chunk and the transfer resumes elsewhere."""

    inline_max: int = 16 * 1024
    """Payloads up to this size travel inside the signed announcement; no pull."""

    max_payload: int = 1 << 30
    """Largest body accepted; larger announcements are invalid (REJECT)."""

    max_meta: int = 4096
    """Application metadata carried in an announcement (round, shape, ...)."""

    pull_timeout: float = 10.0
    """A pull that makes no progress for this long is abandoned: the source is
    cancelled, charged a broken promise, and another source is tried, resuming at
    the last verified chunk."""

    max_pull_attempts: int = 8
    """Sources tried for one body before it is given up (``dropped`` event)."""

    max_active_pulls: int = 16
    """Bodies downloaded at once; further wanted bodies wait their turn."""

    max_pulls_per_source: int = 4
    """Bodies downloaded at once from one neighbour: spreads load across sources."""

    max_pending_bodies: int = 1024
    """Announced bodies waiting for a download slot; more are refused (IGNORE,
    counted) until the backlog drains."""

    max_sources: int = 16
    """Known holders remembered per wanted body."""

    max_active_serves: int = 64
    """Bodies uploaded at once; a pull beyond it is answered BUSY (no penalty)."""

    max_serves_per_peer: int = 8
    """Bodies uploaded at once to one peer."""

    # --- bounds -----------------------------------------------------------------------
    max_topics: int = 256
    """Topics one peer may be subscribed to in our view; subscriptions past it are
    ignored (counted)."""

    max_peers: int = 4096
    """Connected peers tracked."""

    @classmethod
    def fast(cls, **overrides: object) -> GossipConfig:
        """Timers for loopback tests and simulations: 0.2 s heartbeats, short
        backoffs. Counts and score policy are unchanged."""
        base = cls(
            heartbeat_interval=0.2,
            seen_ttl=30.0,
            iwant_followup_time=1.0,
            prune_backoff=5.0,
            unsubscribe_backoff=2.0,
            graft_flood_threshold=1.0,
            pull_timeout=3.0,
            retain_score=60.0,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if not 0 < self.d_lo <= self.d <= self.d_hi:
            raise ValueError("need 0 < d_lo <= d <= d_hi")
        if not 0 < self.mcache_gossip <= self.mcache_len:
            raise ValueError("need 0 < mcache_gossip <= mcache_len")
        if not (self.graylist_threshold < self.publish_threshold < self.gossip_threshold <= 0):
            raise ValueError("need graylist < publish < gossip threshold <= 0")
        if self.chunk_size < 1024 or self.inline_max < 0 or self.max_payload < 1:
            raise ValueError("chunk_size >= 1024, inline_max >= 0, max_payload >= 1")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                if f.name.endswith(("_weight", "_threshold")):
                    continue
                raise ValueError(f"{f.name} must be >= 0")
