"""Gossip messages and their strict encodings.

Two things travel between gossip peers:

* ``Publish``: a published message, which *is* the origin's signed envelope
  (``MsgType.GOSSIP_PUBLISH``), kept and forwarded as the exact original bytes. Its
  body is an ``Announcement``: topic, body size and digest, chunk size,
  application metadata and, for small payloads only, the payload itself. A large
  body never rides in an envelope; it is pulled (see transfer.py).
* ``Control``: one peer's batched control traffic for another (subscriptions,
  GRAFT, PRUNE with peer exchange, IHAVE, IWANT, body pulls, refusals and
  cancels), carried in a ``MsgType.GOSSIP`` envelope signed by the sender. The
  envelope's body is the control's msgpack bytes (``encode_control``), opaque to
  the envelope decoder: its structure is checked by ``decode_control``, whose
  every refusal the shell can charge to the sender, where a refusal at envelope
  level could not be charged to anyone.

Message ids are content ids: BLAKE2b-160 over the envelope's signed bytes. Any two
peers that name an id therefore mean the very same announcement, so a body asked
for by id is the body of that exact announcement, and an origin that signs two
announcements with one sequence number cannot make honest relays look like liars.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from .. import strictpack
from ..errors import DecodeError
from ..identity import MAX_CERT_BYTES, SIGNATURE_SIZE

DOMAIN_MESSAGE_ID = b"spirt/v1/gossip-id\0"
ID_SIZE = 20
DIGEST_SIZE = 32

MAX_TOPIC = 200  # bytes of UTF-8
MAX_NODE_ID = 64
MAX_ADDR = 128
MAX_TOPIC_ENTRIES = 256  # subscriptions, grafts, prunes, pulls, refusals, cancels per message
MAX_IDS = 2048  # ids in IHAVE (all topics together) or IWANT, per message
MAX_PX = 16
# Chunks of one body: its chunk table (32 bytes a chunk, 1 MiB at most) is what a
# receiver must hold before it can verify anything (see transfer).
MAX_CHUNKS = 1 << 15

# A Control travels alone in an envelope. Its items: the ids of IHAVE and IWANT
# (MAX_IDS each) and their topic pairs, plus a few per topic entry. What a
# Control would need beyond that is split off by ``Control.parts``.
_CONTROL_ITEMS = 2 * MAX_IDS + 8 * MAX_TOPIC_ENTRIES
CONTROL_LIMITS = strictpack.Limits(
    max_size=1 << 18,
    max_depth=5,
    max_items=_CONTROL_ITEMS,
    max_str=MAX_ADDR,
    max_bin=64,
    max_container=MAX_IDS,
)

_CONTROL_KEYS = frozenset("sgphwqrx")


class RefuseCode:
    MISSING = 0  # we do not hold the body (not a broken promise if we never claimed it)
    BUSY = 1  # all upload slots taken: try elsewhere, no penalty
    # We held the body and let it go on purpose (its owner released it, e.g. a
    # closed round's gradient): ask elsewhere, no penalty. Peers before this code
    # existed decode it as malformed, which is why it is only sent for released ids.
    RELEASED = 2


_REFUSE_CODES = frozenset((RefuseCode.MISSING, RefuseCode.BUSY, RefuseCode.RELEASED))


def message_id(envelope_wire: bytes | memoryview) -> bytes:
    """The id of a published message: a digest of its signed bytes, so a copy with a
    forged signature has the same id as the real one but never enters the caches."""
    if len(envelope_wire) <= SIGNATURE_SIZE:
        raise DecodeError("malformed", "shorter than a signature")
    h = hashlib.blake2b(DOMAIN_MESSAGE_ID, digest_size=ID_SIZE)
    h.update(memoryview(envelope_wire)[:-SIGNATURE_SIZE])
    return h.digest()


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a publisher signs: enough to decide, before any body byte moves, whether
    the body is wanted and how to verify it."""

    topic: str
    size: int
    digest: bytes  # transfer.body_digest over the chunk table
    chunk_size: int
    meta: bytes = b""
    inline: bytes | None = None  # the payload itself, when small
    # The origin's encoded certificate, so any receiver can admit the origin without
    # a round trip (empty for an allowlisted origin).
    cert: bytes = b""

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "t": self.topic,
            "n": self.size,
            "d": self.digest,
            "c": self.chunk_size,
            "m": self.meta,
        }
        if self.inline is not None:
            obj["x"] = self.inline
        if self.cert:
            obj["k"] = self.cert
        return obj

    @classmethod
    def from_obj(
        cls, obj: Any, *, max_payload: int, max_meta: int, inline_max: int
    ) -> Announcement:
        if not isinstance(obj, dict):
            raise DecodeError("bad_field", "announcement is not a map")
        extra = set(obj) - {"t", "n", "d", "c", "m", "x", "k"}
        if extra:
            raise DecodeError("bad_field", f"announcement has unknown keys {sorted(extra)}")
        topic = _topic(strictpack.field(obj, "t", str, what="announcement"))
        size = strictpack.field(obj, "n", int, what="announcement")
        if not 0 <= size <= max_payload:
            raise DecodeError("oversized", f"body of {size} bytes (limit {max_payload})")
        digest = strictpack.fixed_bytes(obj, "d", DIGEST_SIZE, what="announcement")
        chunk = strictpack.field(obj, "c", int, what="announcement")
        if not 1024 <= chunk <= 1 << 24:
            raise DecodeError("bad_field", f"chunk size {chunk} out of range")
        if (size + chunk - 1) // chunk > MAX_CHUNKS:
            raise DecodeError("oversized", f"body of {size} bytes in chunks of {chunk}")
        meta = strictpack.field(obj, "m", bytes, what="announcement")
        if len(meta) > max_meta:
            raise DecodeError("oversized", f"metadata of {len(meta)} bytes > {max_meta}")
        inline = None
        if "x" in obj:
            inline = strictpack.field(obj, "x", bytes, what="announcement")
            if len(inline) != size:
                raise DecodeError("bad_field", "inline payload does not match its size")
            if size > inline_max:
                raise DecodeError("oversized", f"inline payload of {size} > {inline_max}")
        cert = b""
        if "k" in obj:
            cert = strictpack.field(obj, "k", bytes, what="announcement")
            if not 0 < len(cert) <= MAX_CERT_BYTES:
                raise DecodeError("bad_field", "origin certificate is empty or oversized")
        return cls(topic, size, digest, chunk, meta, inline, cert)


@dataclass(frozen=True, slots=True)
class Publish:
    """A published message as it travels: the origin's envelope, byte for byte."""

    wire: bytes


@dataclass(frozen=True, slots=True)
class Prune:
    topic: str
    backoff: int  # whole seconds
    px: tuple[tuple[str, str], ...] = ()  # (node id, address) to try instead


@dataclass(slots=True)
class Control:
    """Everything one peer tells another in one go (gossipsub's ControlMessage plus
    subscriptions and the body-pull exchange)."""

    subs: list[tuple[str, bool]] = field(default_factory=list)
    graft: list[str] = field(default_factory=list)
    prune: list[Prune] = field(default_factory=list)
    ihave: list[tuple[str, list[bytes]]] = field(default_factory=list)
    iwant: list[bytes] = field(default_factory=list)
    pull: list[tuple[bytes, int]] = field(default_factory=list)  # (id, first chunk)
    refuse: list[tuple[bytes, int]] = field(default_factory=list)  # (id, RefuseCode)
    cancel: list[bytes] = field(default_factory=list)  # stop sending me this body

    def empty(self) -> bool:
        return not (
            self.subs
            or self.graft
            or self.prune
            or self.ihave
            or self.iwant
            or self.pull
            or self.refuse
            or self.cancel
        )

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        if self.subs:
            obj["s"] = [[t, s] for t, s in self.subs]
        if self.graft:
            obj["g"] = list(self.graft)
        if self.prune:
            obj["p"] = [[p.topic, p.backoff, [[n, a] for n, a in p.px]] for p in self.prune]
        if self.ihave:
            obj["h"] = [[t, list(ids)] for t, ids in self.ihave]
        if self.iwant:
            obj["w"] = list(self.iwant)
        if self.pull:
            obj["q"] = [[i, c] for i, c in self.pull]
        if self.refuse:
            obj["r"] = [[i, c] for i, c in self.refuse]
        if self.cancel:
            obj["x"] = list(self.cancel)
        return obj

    def parts(self) -> list[Control]:
        """This control as one or more, each within what ``decode_control``
        accepts: a batch may gather more than one message carries, and a peer
        that sends what does not decode is charged for it."""
        out: list[Control] = []
        cur, items, ihave_ids = Control(), 16, 0  # 16: the map's keys and values

        def take(
            name: str, entry: Any, cost: int, cap: int = MAX_TOPIC_ENTRIES, ids: int = 0
        ) -> None:
            nonlocal cur, items, ihave_ids
            if (
                len(getattr(cur, name)) >= cap
                or items + cost > _CONTROL_ITEMS
                or ihave_ids + ids > MAX_IDS
            ):
                out.append(cur)
                cur, items, ihave_ids = Control(), 16, 0
            getattr(cur, name).append(entry)
            items += cost
            ihave_ids += ids

        for sub in self.subs:
            take("subs", sub, 3)
        for topic in self.graft:
            take("graft", topic, 1)
        for p in self.prune:
            take("prune", p, 4 + 3 * len(p.px))
        for topic, ids in self.ihave:
            for i in range(0, len(ids), MAX_IDS):
                piece = ids[i : i + MAX_IDS]
                take("ihave", (topic, piece), 3 + len(piece), ids=len(piece))
        for mid in self.iwant:
            take("iwant", mid, 1, cap=MAX_IDS)
        for pull in self.pull:
            take("pull", pull, 3)
        for refusal in self.refuse:
            take("refuse", refusal, 3)
        for mid in self.cancel:
            take("cancel", mid, 1)
        out.append(cur)
        return [c for c in out if not c.empty()]

    @classmethod
    def from_obj(cls, obj: Any) -> Control:
        if not isinstance(obj, dict):
            raise DecodeError("bad_field", "control is not a map")
        extra = set(obj) - _CONTROL_KEYS
        if extra:
            raise DecodeError("bad_field", f"control has unknown keys {sorted(extra)}")
        c = cls()
        for item in _list(obj, "s", MAX_TOPIC_ENTRIES):
            pair = _tuple(item, 2, "subscription")
            if not isinstance(pair[1], bool):
                raise DecodeError("bad_field", "subscription flag is not a bool")
            c.subs.append((_topic(pair[0]), pair[1]))
        c.graft = [_topic(t) for t in _list(obj, "g", MAX_TOPIC_ENTRIES)]
        for item in _list(obj, "p", MAX_TOPIC_ENTRIES):
            topic, backoff, px = _tuple(item, 3, "prune")
            if not _is_int(backoff) or not 0 <= backoff <= 86_400:
                raise DecodeError("bad_field", "prune backoff out of range")
            if not isinstance(px, list) or len(px) > MAX_PX:
                raise DecodeError("bad_field", "prune peer exchange is not a short list")
            peers = []
            for entry in px:
                nid, addr = _tuple(entry, 2, "peer exchange entry")
                peers.append((_short_str(nid, MAX_NODE_ID), _short_str(addr, MAX_ADDR)))
            c.prune.append(Prune(_topic(topic), backoff, tuple(peers)))
        total = 0
        for item in _list(obj, "h", MAX_TOPIC_ENTRIES):
            topic, ids = _tuple(item, 2, "ihave")
            ids = _ids(ids)
            total += len(ids)
            if total > MAX_IDS:
                raise DecodeError("oversized", f"more than {MAX_IDS} ids in IHAVE")
            c.ihave.append((_topic(topic), ids))
        c.iwant = _ids(obj.get("w", []))
        for item in _list(obj, "q", MAX_TOPIC_ENTRIES):
            mid, first = _tuple(item, 2, "pull")
            if not _is_int(first) or not 0 <= first < 1 << 32:
                raise DecodeError("bad_field", "pull chunk index out of range")
            c.pull.append((_id(mid), first))
        for item in _list(obj, "r", MAX_TOPIC_ENTRIES):
            mid, code = _tuple(item, 2, "refusal")
            if not _is_int(code) or code not in _REFUSE_CODES:
                raise DecodeError("bad_field", "unknown refusal code")
            c.refuse.append((_id(mid), code))
        c.cancel = [_id(i) for i in _list(obj, "x", MAX_TOPIC_ENTRIES)]
        return c


Message = Publish | Control


# --- standalone byte encoding (the simulator's codec, fuzzing) ----------------------------
# In the daemon both kinds travel as envelopes (wire.py); this framing exists so
# the simulator can push every message through the real decoders.


def encode_control(c: Control) -> bytes:
    """A Control's bytes: the body of its GOSSIP envelope."""
    return strictpack.pack(c.to_obj())


def decode_control(data: bytes | memoryview) -> Control:
    """The Control in untrusted bytes, or DecodeError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("bad_field", "control is not bytes")
    return Control.from_obj(strictpack.unpack(data, CONTROL_LIMITS))


def encode(msg: Message) -> bytes:
    if isinstance(msg, Publish):
        return b"P" + msg.wire
    return b"C" + encode_control(msg)


def decode(data: bytes) -> Message:
    if not data:
        raise DecodeError("malformed", "empty")
    kind, rest = data[:1], data[1:]
    if kind == b"P":
        return Publish(bytes(rest))
    if kind == b"C":
        return decode_control(rest)
    raise DecodeError("malformed", f"unknown gossip frame kind {kind!r}")


# --- field helpers ------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list(obj: dict[str, Any], key: str, limit: int) -> list[Any]:
    v = obj.get(key, [])
    if not isinstance(v, list):
        raise DecodeError("bad_field", f"control.{key} is not a list")
    if len(v) > limit:
        raise DecodeError("oversized", f"control.{key} has {len(v)} entries > {limit}")
    return v


def _tuple(v: Any, n: int, what: str) -> list[Any]:
    if not isinstance(v, list) or len(v) != n:
        raise DecodeError("bad_field", f"{what} is not a {n}-element array")
    return v


def _topic(v: Any) -> str:
    if not isinstance(v, str) or not v or len(v.encode()) > MAX_TOPIC:
        raise DecodeError("bad_field", "topic must be a non-empty string of <= 200 bytes")
    return v


def _short_str(v: Any, limit: int) -> str:
    if not isinstance(v, str) or not v or len(v) > limit:
        raise DecodeError("bad_field", "expected a short non-empty string")
    return v


def _id(v: Any) -> bytes:
    if not isinstance(v, bytes) or len(v) != ID_SIZE:
        raise DecodeError("bad_field", f"message id must be {ID_SIZE} bytes")
    return v


def _ids(v: Any) -> list[bytes]:
    if not isinstance(v, list):
        raise DecodeError("bad_field", "id list is not a list")
    if len(v) > MAX_IDS:
        raise DecodeError("oversized", f"{len(v)} ids > {MAX_IDS}")
    return [_id(i) for i in v]


def check_topic(topic: str) -> str:
    """For local callers: the same rule remote topics are held to."""
    return _topic(topic)
