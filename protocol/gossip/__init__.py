"""Gossip dissemination: gossipsub-style signed topic pub/sub whose large payloads
move once per receiver (announce small, pull the body in verified chunks).

One concern per module: config (tuning), messages (wire forms), seen (dedup and
replay windows), mcache (IHAVE/IWANT history), mesh (topic meshes, backoff),
score (peer scoring), transfer (body digests, verified reception, budgets) and
machine (the sans-IO state machine). sim wires machines into protocol.sim.
"""

from .config import GossipConfig
from .machine import (
    BodyDropped,
    Delivered,
    Event,
    GossipMachine,
    Graylisted,
    Outgoing,
    PeerExchange,
    PullEnded,
    PullStarted,
    ServeBody,
    StopServe,
    Validator,
    Verdict,
)
from .messages import Announcement, Control, Message, Prune, Publish, message_id

__all__ = [
    "Announcement",
    "BodyDropped",
    "Control",
    "Delivered",
    "Event",
    "GossipConfig",
    "GossipMachine",
    "Graylisted",
    "Message",
    "Outgoing",
    "PeerExchange",
    "Prune",
    "Publish",
    "PullEnded",
    "PullStarted",
    "ServeBody",
    "StopServe",
    "Validator",
    "Verdict",
    "message_id",
]
