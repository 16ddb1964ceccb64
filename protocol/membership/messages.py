"""Membership messages: typed dataclasses and their strict msgpack codec.

A message is the msgpack array ``[version, kind, fields..., updates]``. Updates
(the records that are gossiped: alive, suspect, dead, left) are arrays
``[kind, fields..., sig]`` and ride inside any message: piggybacked on pings and
acks, alone in a gossip message, or as the full state in a push-pull.

Every update is encoded once and the bytes are cached on the (immutable) object.
A message is then its header followed by the cached update bytes, which is valid
msgpack because an array is its header followed by its elements. So a relayed
update costs no re-encoding, and a message's size is known exactly and cheaply.

Decoding never trusts the bytes: the total size is checked first, then the
message is read element by element, each one's extent found without allocating
and its structure walked (``protocol.strictpack``) before it is built, then every
field's type and range is checked; unknown versions and kinds are refused. The
only exception that escapes ``decode_message`` is ``MembershipDecodeError`` with
a short reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .. import strictpack
from ..errors import DecodeError
from ..identity import MAX_CERT_BYTES

WIRE_VERSION = 1

MAX_ID_CHARS = 128
MAX_ADDR_CHARS = 300
MAX_SIG_BYTES = 128
MAX_INT = (1 << 63) - 1
MAX_UPDATES_PER_MESSAGE = 8192
MAX_MESSAGE_BYTES = 1 << 20
# One update of maximal size: array header, kind, two strings, an int, a signature
# and a certificate.
MAX_UPDATE_BYTES = (1 + 1 + (3 + MAX_ID_CHARS) + (3 + MAX_ADDR_CHARS) + 9 + (2 + MAX_SIG_BYTES)) + (
    3 + MAX_CERT_BYTES
)

# One element of a message (a header field, or one update), decoded on its own:
# an update is an array of at most six scalars.
ELEMENT_LIMITS = strictpack.Limits(
    max_size=MAX_UPDATE_BYTES,
    max_depth=1,
    max_items=6,
    max_str=MAX_ADDR_CHARS,
    max_bin=max(MAX_SIG_BYTES, MAX_CERT_BYTES),
    max_container=6,
)


class MembershipDecodeError(DecodeError):
    """Bytes that are not a valid membership message; ``reason`` is a short token."""


# --- updates ------------------------------------------------------------------------------

U_ALIVE = 1
U_SUSPECT = 2
U_DEAD = 3
U_LEFT = 4


def _packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@dataclass(frozen=True, slots=True)
class Alive:
    """``node_id`` is reachable at ``addr`` in incarnation ``incarnation``; signed by
    node_id. ``cert`` is node_id's encoded certificate (empty if it is admitted by
    allowlist), so every receiver can admit the member without asking anyone."""

    node_id: str
    addr: str
    incarnation: int
    sig: bytes = b""
    cert: bytes = b""
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _signed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def encoded(self) -> bytes:
        w = self._wire
        if w is None:
            w = _packed([U_ALIVE, self.node_id, self.addr, self.incarnation, self.sig, self.cert])
            object.__setattr__(self, "_wire", w)
        return w


@dataclass(frozen=True, slots=True)
class Suspect:
    """``from_id`` could not reach ``node_id`` in ``incarnation``; signed by from_id."""

    node_id: str
    incarnation: int
    from_id: str
    sig: bytes = b""
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _signed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def encoded(self) -> bytes:
        w = self._wire
        if w is None:
            w = _packed([U_SUSPECT, self.node_id, self.incarnation, self.from_id, self.sig])
            object.__setattr__(self, "_wire", w)
        return w


@dataclass(frozen=True, slots=True)
class Dead:
    """``from_id``'s suspicion of ``node_id`` in ``incarnation`` ran out; signed by from_id."""

    node_id: str
    incarnation: int
    from_id: str
    sig: bytes = b""
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _signed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def encoded(self) -> bytes:
        w = self._wire
        if w is None:
            w = _packed([U_DEAD, self.node_id, self.incarnation, self.from_id, self.sig])
            object.__setattr__(self, "_wire", w)
        return w


@dataclass(frozen=True, slots=True)
class Left:
    """``node_id`` left gracefully in ``incarnation``; signed by node_id itself."""

    node_id: str
    incarnation: int
    sig: bytes = b""
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _signed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def encoded(self) -> bytes:
        w = self._wire
        if w is None:
            w = _packed([U_LEFT, self.node_id, self.incarnation, self.sig])
            object.__setattr__(self, "_wire", w)
        return w


Update = Alive | Suspect | Dead | Left
Claim = Suspect | Dead | Left


def signer_of(update: Update) -> str:
    """Whose key must have signed ``update``: the subject for alive/left, else the accuser."""
    if type(update) is Alive or type(update) is Left:
        return update.node_id
    return update.from_id  # type: ignore[union-attr]


# --- messages -----------------------------------------------------------------------------

M_PING = 1
M_PING_REQ = 2
M_ACK = 3
M_NACK = 4
M_GOSSIP = 5
M_PUSH_PULL = 6


@dataclass(frozen=True, slots=True)
class Ping:
    """Probe. ``target_id`` lets a node that now holds a reused address refuse it."""

    seq: int
    target_id: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """Please ping ``target_id`` at ``target_addr`` for me; ack (or nack) with ``seq``."""

    seq: int
    target_id: str
    target_addr: str
    nack: bool = True
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """A relay's answer when the target it pinged for us stayed silent."""

    seq: int


@dataclass(frozen=True, slots=True)
class Gossip:
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full state exchange. ``join`` marks a join; ``reply`` an answer; ``more`` says
    further chunks of the same state follow (the answer goes after the last)."""

    join: bool
    reply: bool
    more: bool
    updates: tuple[Update, ...]


Message = Ping | PingReq | Ack | Nack | Gossip | PushPull


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_NO_UPDATES = _array_header(0)


def _updates_bytes(updates: tuple[Update, ...]) -> bytes:
    if not updates:
        return _NO_UPDATES
    return _array_header(len(updates)) + b"".join([u.encoded() for u in updates])


def encode_message(msg: Message) -> bytes:
    t = type(msg)
    if t is Ping:
        return (
            b"\x95"
            + _packed([WIRE_VERSION, M_PING, msg.seq, msg.target_id])[1:]
            + (_updates_bytes(msg.updates))
        )
    if t is Ack:
        return b"\x94" + _packed([WIRE_VERSION, M_ACK, msg.seq])[1:] + _updates_bytes(msg.updates)
    if t is Gossip:
        return b"\x93" + _packed([WIRE_VERSION, M_GOSSIP])[1:] + _updates_bytes(msg.updates)
    if t is Nack:
        return _packed([WIRE_VERSION, M_NACK, msg.seq])
    if t is PingReq:
        head = [WIRE_VERSION, M_PING_REQ, msg.seq, msg.target_id, msg.target_addr, msg.nack]
        return b"\x97" + _packed(head)[1:] + _updates_bytes(msg.updates)
    if t is PushPull:
        head = [WIRE_VERSION, M_PUSH_PULL, msg.join, msg.reply, msg.more]
        return b"\x96" + _packed(head)[1:] + _updates_bytes(msg.updates)
    raise TypeError(f"not a membership message: {t.__name__}")


def updates_size(updates: tuple[Update, ...] | list[Update]) -> int:
    return sum(len(u.encoded()) for u in updates)


def message_size(msg: Message) -> int:
    """Exact encoded size, computed from the cached update encodings."""
    return len(encode_message(msg))


# --- decoding -----------------------------------------------------------------------------


def _fail(reason: str, detail: str) -> MembershipDecodeError:
    return MembershipDecodeError(reason, detail)


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0 or v > MAX_INT:
        raise _fail("bad_field", f"{what} is not an integer in [0, 2^63)")
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise _fail("bad_field", f"{what} is not a boolean")
    return v


def _token(v: Any, what: str, max_len: int) -> str:
    # Ids and addresses end up in logs and tables: printable ASCII without spaces only.
    if type(v) is not str or not 0 < len(v) <= max_len:
        raise _fail("bad_field", f"{what} is not a string of 1..{max_len} characters")
    if not (v.isascii() and v.isprintable()) or " " in v:
        raise _fail("bad_field", f"{what} has characters outside printable ASCII")
    return v


def _node_id(v: Any, what: str = "node id") -> str:
    return _token(v, what, MAX_ID_CHARS)


def _addr(v: Any, what: str = "address") -> str:
    s = _token(v, what, MAX_ADDR_CHARS)
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise _fail("bad_field", f"{what} is not HOST:PORT")
    return s


def _sig(v: Any) -> bytes:
    if type(v) is not bytes or len(v) > MAX_SIG_BYTES:
        raise _fail("bad_field", f"signature is not bytes of at most {MAX_SIG_BYTES}")
    return v


def _cert(v: Any) -> bytes:
    if type(v) is not bytes or len(v) > MAX_CERT_BYTES:
        raise _fail("bad_field", f"certificate is not bytes of at most {MAX_CERT_BYTES}")
    return v


def _decode_update(raw: Any) -> Update:
    if type(raw) is not list or not raw:
        raise _fail("bad_update", "update is not a non-empty array")
    kind = raw[0]
    n = len(raw)
    if kind == U_ALIVE and type(kind) is int:
        if n != 6:
            raise _fail("bad_update", "alive has the wrong number of fields")
        return Alive(
            _node_id(raw[1]),
            _addr(raw[2]),
            _int(raw[3], "incarnation"),
            _sig(raw[4]),
            _cert(raw[5]),
        )
    if (kind in (U_SUSPECT, U_DEAD)) and type(kind) is int:
        if n != 5:
            raise _fail("bad_update", "suspect/dead has the wrong number of fields")
        cls = Suspect if kind == U_SUSPECT else Dead
        return cls(
            _node_id(raw[1]), _int(raw[2], "incarnation"), _node_id(raw[3], "from id"), _sig(raw[4])
        )
    if kind == U_LEFT and type(kind) is int:
        if n != 4:
            raise _fail("bad_update", "left has the wrong number of fields")
        return Left(_node_id(raw[1]), _int(raw[2], "incarnation"), _sig(raw[3]))
    raise _fail("unknown_update", f"update kind {kind!r:.20}")


def _decode_updates(raw: Any) -> tuple[Update, ...]:
    if type(raw) is not list:
        raise _fail("bad_field", "updates is not an array")
    if len(raw) > MAX_UPDATES_PER_MESSAGE:
        raise _fail("oversized", f"more than {MAX_UPDATES_PER_MESSAGE} updates")
    return tuple([_decode_update(u) for u in raw])


_ARITY = {M_PING: 5, M_PING_REQ: 7, M_ACK: 4, M_NACK: 3, M_GOSSIP: 3, M_PUSH_PULL: 6}


def decode_message(data: bytes) -> Message:
    """Parses one message from untrusted bytes, or raises MembershipDecodeError.

    Element by element: msgpack's C code finds where each element ends without
    building it, and only that element is scanned and decoded (ELEMENT_LIMITS).
    So a message is refused at its first bad update, and bytes that are not
    membership cost about as much as the part of them read before that."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("bad_type", "input is not bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_BYTES:
        raise _fail("oversized", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    if not data:
        raise _fail("malformed", "empty")
    reader = msgpack.Unpacker(max_buffer_size=len(data))
    reader.feed(data)
    try:
        msg = _read_message(reader, data)
    except MembershipDecodeError:
        raise
    except DecodeError as e:
        raise _fail(e.reason, e.detail) from None
    except (ValueError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError) as e:
        raise _fail("malformed", str(e)[:200] or type(e).__name__) from None
    if reader.tell() != len(data):
        raise _fail("malformed", f"{len(data) - reader.tell()} trailing bytes")
    return msg


def _element(reader: msgpack.Unpacker, data: bytes) -> Any:
    start = reader.tell()
    reader.skip()
    return strictpack.unpack(data[start : reader.tell()], ELEMENT_LIMITS)


def _read_updates(reader: msgpack.Unpacker, data: bytes) -> tuple[Update, ...]:
    pos = reader.tell()
    if pos >= len(data) or not (0x90 <= data[pos] <= 0x9F or data[pos] in (0xDC, 0xDD)):
        _element(reader, data)  # refused as malformed if it is not msgpack at all
        raise _fail("bad_field", "updates is not an array")
    n = reader.read_array_header()
    if n > MAX_UPDATES_PER_MESSAGE:
        raise _fail("oversized", f"more than {MAX_UPDATES_PER_MESSAGE} updates")
    return tuple([_decode_update(_element(reader, data)) for _ in range(n)])


def _read_message(reader: msgpack.Unpacker, data: bytes) -> Message:
    if not 0x90 <= data[0] <= 0x9F and data[0] not in (0xDC, 0xDD):
        raise _fail("malformed", "message is not an array")
    n = reader.read_array_header()
    if n < 2:
        raise _fail("malformed", "message is not an array of at least two elements")
    version = _element(reader, data)
    if type(version) is not int or version != WIRE_VERSION:
        raise _fail("bad_version", f"version {version!r:.20}")
    kind = _element(reader, data)
    if type(kind) is not int or kind not in _ARITY:
        raise _fail("unknown_kind", f"message kind {kind!r:.20}")
    if n != _ARITY[kind]:
        raise _fail("malformed", f"kind {kind} has {n} fields, wants {_ARITY[kind]}")
    if kind == M_NACK:
        return Nack(_int(_element(reader, data), "seq"))
    # Every other kind ends with its updates.
    head = [_element(reader, data) for _ in range(n - 3)]
    updates = _read_updates(reader, data)
    if kind == M_PING:
        return Ping(_int(head[0], "seq"), _node_id(head[1], "target id"), updates)
    if kind == M_ACK:
        return Ack(_int(head[0], "seq"), updates)
    if kind == M_GOSSIP:
        return Gossip(updates)
    if kind == M_PING_REQ:
        return PingReq(
            _int(head[0], "seq"),
            _node_id(head[1], "target id"),
            _addr(head[2], "target address"),
            _bool(head[3], "nack"),
            updates,
        )
    return PushPull(
        _bool(head[0], "join"), _bool(head[1], "reply"), _bool(head[2], "more"), updates
    )
