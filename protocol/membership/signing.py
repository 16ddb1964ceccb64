"""Signatures on membership records.

The link authenticates who *sent* a message, but gossip relays claims about other
nodes. So every update carries the signature of the node entitled to make it:
alive and left by the subject itself, suspect and dead by the accuser. A member
that lies can then neither move another node to a new address nor forge the
independent confirmations that shorten a suspicion timer.

What is signed is a fixed, length-prefixed construction of the typed fields, not
a msgpack re-encoding, so there is no canonical-form question. The machine takes
the two operations as injected callables; the daemon uses Ed25519 (below), the
simulator a cheap keyed hash (protocol.sim.signing).
"""

from __future__ import annotations

from collections.abc import Callable

from ..identity import NodeKey, public_key_from_node_id, verify
from .messages import Alive, Dead, Left, Suspect, Update

DOMAIN_RECORD = b"spirt/v1/membership-record\0"

RecordSigner = Callable[[bytes], bytes]
"""Signs the record bytes with this node's key."""

RecordVerifier = Callable[[str, bytes, bytes], bool]
"""``verify(signer_node_id, record_bytes, signature) -> bool``; never raises."""


def _field(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _blob(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def record_bytes(update: Update) -> bytes:
    """The bytes a record's signature covers (the update minus its signature).
    Cached on the immutable update: a relayed record is checked by every node."""
    b = update._signed
    if b is None:
        b = _record_bytes(update)
        object.__setattr__(update, "_signed", b)
    return b


def _record_bytes(update: Update) -> bytes:
    t = type(update)
    if t is Alive:
        # The certificate is covered too, so a relay cannot swap in an older or
        # foreign one and get the member refused in its name.
        return (
            b"A"
            + _field(update.node_id)
            + _field(update.addr)  # type: ignore[union-attr]
            + update.incarnation.to_bytes(8, "big")
            + _blob(update.cert)  # type: ignore[union-attr]
        )
    if t is Suspect or t is Dead:
        return (
            (b"S" if t is Suspect else b"D")
            + _field(update.node_id)
            + update.incarnation.to_bytes(8, "big")
            + _field(update.from_id)  # type: ignore[union-attr]
        )
    if t is Left:
        return b"L" + _field(update.node_id) + update.incarnation.to_bytes(8, "big")
    raise TypeError(f"not a membership record: {t.__name__}")


def ed25519_signer(key: NodeKey) -> RecordSigner:
    """A signer for this node's identity key."""

    def signer(data: bytes) -> bytes:
        return key.sign(DOMAIN_RECORD, data)

    return signer


def ed25519_verifier() -> RecordVerifier:
    """Verifies against the public key embedded in libp2p-style node ids."""

    def verifier(node_id: str, data: bytes, sig: bytes) -> bool:
        try:
            public_key = public_key_from_node_id(node_id)
        except ValueError:
            return False
        return verify(public_key, DOMAIN_RECORD, data, sig)

    return verifier
