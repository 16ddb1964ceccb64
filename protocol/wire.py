"""The signed message envelope.

On the wire a message is ``ENVELOPE || SIGNATURE``:

* ENVELOPE is the msgpack array ``[version, type, origin, seq, ts_ms, body]``;
  origin is the sender's 32-byte Ed25519 public key, so a relayed message can be
  checked by anyone without a key lookup.
* SIGNATURE is Ed25519 over ``DOMAIN_ENVELOPE || ENVELOPE`` — the exact bytes
  sent. Nothing is re-encoded before verification, so there is no canonical-form
  question to get wrong.

Decoding is strict and ordered by cost, so that bytes nobody signed cost a
receiver almost nothing:

1. the total size;
2. a fixed-position peek at the head of ENVELOPE (the array header, version,
   type and origin, which ``seal`` always writes first), so an unknown version
   or type and a malformed origin are refused without walking the body;
3. the signature over the raw bytes (about 65 us, against milliseconds for a
   16 KB body of small integers through the structural scan);
4. only then the full strict decode (strictpack), with item limits that depend
   on the message type: every type but GOSSIP_PUBLISH carries one byte string,
   not thousands of integers.
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

# Bodies that are one opaque byte string (the subsystem decodes it with its own
# limits) need almost no structure at envelope level.
_OPAQUE_LIMITS = strictpack.Limits(
    max_size=MAX_ENVELOPE,
    max_depth=2,
    max_items=64,
    max_str=4096,
    max_bin=MAX_ENVELOPE,
    max_container=64,
)


class MsgType(IntEnum):
    """Every envelope type there is. Ranges are kept per subsystem."""

    MEMBERSHIP = 16  # body: protocol.membership message bytes
    GOSSIP = 32  # body: protocol.gossip control message bytes (encode_control)
    GOSSIP_PUBLISH = 33  # body: a published message (announcement of a payload)
    ROUNDS = 48  # body: training-round coordination
    STATE = 64  # body: model state offers/requests for joining peers


_KNOWN_TYPES = frozenset(int(t) for t in MsgType)

# Item limits per message type, checked by the structural scan after the
# signature. Each is sized to what its sender can legitimately build. Strings
# and byte strings are skipped in one step by the scan, so their caps stay
# generous; what costs CPU is the number of items and containers. A body whose
# structure is large (a gossip control, a membership state) travels as one byte
# string that its subsystem decodes: a refusal there is charged to the peer
# that sent it, where a refusal here reaches no peer score. So no type admits
# more than a few dozen items at envelope level.
TYPE_LIMITS: dict[MsgType, strictpack.Limits] = {
    MsgType.MEMBERSHIP: _OPAQUE_LIMITS,
    MsgType.STATE: _OPAQUE_LIMITS,
    MsgType.GOSSIP: _OPAQUE_LIMITS,  # gossip.messages.encode_control
    # Reserved: nothing sends it yet, and whatever will, will send bytes.
    MsgType.ROUNDS: _OPAQUE_LIMITS,
    # An announcement: a map of seven fields, one of them the inline payload.
    MsgType.GOSSIP_PUBLISH: strictpack.Limits(
        max_size=MAX_ENVELOPE,
        max_depth=3,
        max_items=64,
        max_str=4096,
        max_bin=MAX_ENVELOPE,
        max_container=16,
    ),
}

_ORIGIN_HEADER = bytes([0xC4, PUBLIC_KEY_SIZE])  # bin8 of 32 bytes, as msgpack packs a key


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


def peek(raw: bytes | memoryview) -> tuple[int, MsgType, bytes]:
    """(version, type, origin) from the head of ENVELOPE, reading a few bytes at
    fixed positions: no container is walked and nothing is allocated but the
    origin. Raises DecodeError with the same reasons as the full decode."""
    n = len(raw)
    if n < 1:
        raise DecodeError("malformed", "empty envelope")
    head = raw[0]
    if head == 0x96:  # fixarray of 6: what msgpack always writes
        pos = 1
    elif head == 0xDC and n >= 3 and raw[1] == 0 and raw[2] == 6:
        pos = 3
    elif head == 0xDD and n >= 5 and bytes(raw[1:5]) == b"\x00\x00\x00\x06":
        pos = 5
    else:
        raise DecodeError("malformed", "envelope is not a 6-element array")
    version, pos = _peek_int(raw, pos)
    if version is None:
        raise DecodeError("bad_field", "version is not an integer")
    if version != VERSION:
        raise DecodeError("bad_version", f"version {version}")
    typ, pos = _peek_int(raw, pos)
    if typ is None:
        raise DecodeError("bad_field", "type is not an integer")
    if typ not in _KNOWN_TYPES:
        raise DecodeError("unknown_type", f"type {typ}")
    if bytes(raw[pos : pos + 2]) != _ORIGIN_HEADER or n < pos + 2 + PUBLIC_KEY_SIZE:
        raise DecodeError("bad_field", "origin is not a 32-byte key")
    origin = bytes(raw[pos + 2 : pos + 2 + PUBLIC_KEY_SIZE])
    return version, MsgType(typ), origin


def _peek_int(raw: bytes | memoryview, pos: int) -> tuple[int | None, int]:
    """A msgpack integer at ``pos`` and the position after it; None if the byte
    there starts anything else (the caller reports which field)."""
    if pos >= len(raw):
        return None, pos
    b = raw[pos]
    if b <= 0x7F:
        return b, pos + 1
    if b >= 0xE0:
        return b - 0x100, pos + 1
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}.get(b)
    if width is None or pos + 1 + width > len(raw):
        return None, pos
    value = int.from_bytes(raw[pos + 1 : pos + 1 + width], "big", signed=b >= 0xD0)
    return value, pos + 1 + width


def decode(data: bytes, *, verify_signature: bool = True) -> Envelope:
    """Parses and authenticates one envelope. Raises DecodeError with a reason.

    The signature is checked on the raw bytes before the body is decoded (see
    the module docstring), so an unsigned flood costs a peek and a verify."""
    if len(data) > MAX_ENVELOPE:
        raise DecodeError("oversized", f"{len(data)} bytes > {MAX_ENVELOPE}")
    if len(data) <= SIGNATURE_SIZE:
        raise DecodeError("malformed", "shorter than a signature")
    raw = data[:-SIGNATURE_SIZE]
    sig = data[-SIGNATURE_SIZE:]
    version, typ, origin = peek(raw)
    if verify_signature and not verify(origin, DOMAIN_ENVELOPE, raw, sig):
        raise DecodeError("bad_signature", "origin signature does not verify")
    obj = strictpack.unpack(raw, TYPE_LIMITS[typ])
    if not isinstance(obj, list) or len(obj) != 6:
        raise DecodeError("malformed", "envelope is not a 6-element array")
    _, _, _, seq, ts_ms, body = obj
    if not _is_int(seq) or seq < 0:
        raise DecodeError("bad_field", "seq is not a non-negative integer")
    if not _is_int(ts_ms) or ts_ms < 0:
        raise DecodeError("bad_field", "timestamp is not a non-negative integer")
    return Envelope(version, typ, origin, seq, ts_ms, body, bytes(raw), bytes(sig))


def decode_counted(data: bytes, counters: Counter[str]) -> Envelope | None:
    """decode() for receive paths: a rejection is counted as ``wire.<reason>``."""
    try:
        return decode(data)
    except DecodeError as e:
        counters[f"wire.{e.reason}"] += 1
        return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
