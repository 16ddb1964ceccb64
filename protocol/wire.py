"""The signed message envelope.

On the wire a message is ``ENVELOPE || SIGNATURE``:

* ENVELOPE is the msgpack array ``[version, type, origin, seq, ts_ms, body]``;
  origin is the sender's 32-byte Ed25519 public key, so a relayed message can be
  checked by anyone without a key lookup.
* SIGNATURE is Ed25519 over ``DOMAIN_ENVELOPE || ENVELOPE`` — the exact bytes
  sent. Nothing is re-encoded before verification, so there is no canonical-form
  question to get wrong.

Decoding is strict: the total size is checked first, the msgpack structure is
scanned for depth and lengths before anything is allocated (strictpack), field
types are checked, and unknown versions and types are refused with a reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from . import strictpack
from .errors import DecodeError
from .identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, NodeKey, verify

VERSION = 1
DOMAIN_ENVELOPE = b"spirt/v1/envelope\0"

# Large payloads (gradients) never travel inside an envelope: an envelope
# announces them and the body is streamed (see gossip). So the cap is small.
MAX_ENVELOPE = 1 << 20

LIMITS = strictpack.Limits(
    max_size=MAX_ENVELOPE,
    max_depth=8,
    max_items=16_384,
    max_str=4096,
    max_bin=MAX_ENVELOPE,
    max_container=4096,
)


class MsgType(IntEnum):
    """Every envelope type there is. Ranges are kept per subsystem."""

    MEMBERSHIP = 16  # body: protocol.membership message bytes
    GOSSIP = 32  # body: protocol.gossip control message bytes
    GOSSIP_PUBLISH = 33  # body: a published message (announcement of a payload)
    ROUNDS = 48  # body: training-round coordination
    STATE = 64  # body: model state offers/requests for joining peers


_KNOWN_TYPES = frozenset(int(t) for t in MsgType)


@dataclass(frozen=True, slots=True)
class Envelope:
    version: int
    type: MsgType
    origin: bytes
    seq: int
    ts_ms: int
    body: Any
    raw: bytes = b""  # the exact signed bytes (set by decode/seal)
    signature: bytes = b""

    @property
    def wire(self) -> bytes:
        return self.raw + self.signature


def seal(
    key: NodeKey, type: MsgType, seq: int, ts_ms: int, body: Any, *, version: int = VERSION
) -> bytes:
    raw = strictpack.pack([version, int(type), key.public_key, seq, ts_ms, body])
    if len(raw) + SIGNATURE_SIZE > MAX_ENVELOPE:
        raise ValueError(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE}")
    return raw + key.sign(DOMAIN_ENVELOPE, raw)


def decode(data: bytes, *, verify_signature: bool = True) -> Envelope:
    """Parses and authenticates one envelope. Raises DecodeError with a reason."""
    if len(data) > MAX_ENVELOPE:
        raise DecodeError("oversized", f"{len(data)} bytes > {MAX_ENVELOPE}")
    if len(data) <= SIGNATURE_SIZE:
        raise DecodeError("malformed", "shorter than a signature")
    raw = data[:-SIGNATURE_SIZE]
    sig = data[-SIGNATURE_SIZE:]
    obj = strictpack.unpack(raw, LIMITS)
    if not isinstance(obj, list) or len(obj) != 6:
        raise DecodeError("malformed", "envelope is not a 6-element array")
    version, typ, origin, seq, ts_ms, body = obj
    if not _is_int(version):
        raise DecodeError("bad_field", "version is not an integer")
    if version != VERSION:
        raise DecodeError("bad_version", f"version {version}")
    if not _is_int(typ):
        raise DecodeError("bad_field", "type is not an integer")
    if typ not in _KNOWN_TYPES:
        raise DecodeError("unknown_type", f"type {typ}")
    if not isinstance(origin, bytes) or len(origin) != PUBLIC_KEY_SIZE:
        raise DecodeError("bad_field", "origin is not a 32-byte key")
    if not _is_int(seq) or seq < 0:
        raise DecodeError("bad_field", "seq is not a non-negative integer")
    if not _is_int(ts_ms) or ts_ms < 0:
        raise DecodeError("bad_field", "timestamp is not a non-negative integer")
    if verify_signature and not verify(origin, DOMAIN_ENVELOPE, raw, sig):
        raise DecodeError("bad_signature", "origin signature does not verify")
    return Envelope(version, MsgType(typ), origin, seq, ts_ms, body, bytes(raw), bytes(sig))


def decode_counted(data: bytes, counters: Counter[str]) -> Envelope | None:
    """decode() for receive paths: a rejection is counted as ``wire.<reason>``."""
    try:
        return decode(data)
    except DecodeError as e:
        counters[f"wire.{e.reason}"] += 1
        return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
