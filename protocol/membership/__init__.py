"""SWIM membership with Lifeguard-style suspicion, as a sans-IO state machine.

One concern per module: ``config`` (profiles and formulas), ``messages`` (wire
format), ``signing`` (signed records), ``state`` (member table and events),
``suspicion`` (the shrinking timer), ``awareness`` (local health), ``broadcast``
(the bounded gossip queue), ``probe`` (probe/relay bookkeeping) and ``machine``.
"""

from .config import PROFILES, MembershipConfig, lan, local, profile, wan
from .machine import Membership, Outgoing
from .messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Left,
    MembershipDecodeError,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Update,
    decode_message,
    encode_message,
)
from .signing import (
    DOMAIN_RECORD,
    RecordSigner,
    RecordVerifier,
    ed25519_signer,
    ed25519_verifier,
    record_bytes,
)
from .state import EventKind, Member, MemberEvent, MemberState, SharedView

__all__ = [
    "DOMAIN_RECORD",
    "PROFILES",
    "Ack",
    "Alive",
    "Dead",
    "EventKind",
    "Gossip",
    "Left",
    "Member",
    "MemberEvent",
    "MemberState",
    "Membership",
    "MembershipConfig",
    "MembershipDecodeError",
    "Message",
    "Nack",
    "Outgoing",
    "Ping",
    "PingReq",
    "PushPull",
    "RecordSigner",
    "RecordVerifier",
    "SharedView",
    "Suspect",
    "Update",
    "decode_message",
    "ed25519_signer",
    "ed25519_verifier",
    "encode_message",
    "lan",
    "local",
    "profile",
    "record_bytes",
    "wan",
]
