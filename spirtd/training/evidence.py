"""Evidence that a peer is Byzantine, checkable by anyone from signed bytes alone.

Two kinds of proof get an offender excluded for the rest of a job:

* **Equivocation**: one origin, two different signed gradients for one (job,
  round). An honest peer publishes one gradient per round. A Byzantine one can
  sign two and send each to a different part of the cluster, so that honest
  peers aggregate different inputs and split. Gossip relays what it accepts, so
  the two versions meet at some honest peer, whose validation hook then holds
  both signed envelopes: that pair is the proof. (Gossip shows the validator a
  second message under an already used sequence number too, so reusing a seq
  does not hide the second version.)
* **A non-finite gradient**: an honest peer never publishes one (its own
  averaging refuses NaN and infinities before anything is sent), so a signed
  gradient whose body holds one is proof on its own. The proof is the signed
  envelope, the body's chunk table and the one chunk holding the bad value:
  the table hashes to the signed body digest and the chunk to its table entry,
  so a few hundred KiB stand for the whole body. Without it, a peer that closed
  a round before pulling the liar's body would keep waiting for the liar in
  later rounds (a Krum round at n = 2f + 3 needs every member) while the peers
  that saw it moved on.

A proof is gossiped on its own topic, and every honest peer checks it (same
key, this job, the claims above) before it excludes the offender.

"Different" is strict on purpose: the second message must claim the same base
digest and carry another body. An honest peer that republishes after a restart
computes the same bits on the same model and minibatch (another body digest is
impossible), and one that recomputes a round after a state sync does so on
another model (another base digest), so neither can be framed.

Kept per origin: the first announcement seen for each recent round, bounded by
a window of rounds and a cap on origins.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import compression, strictpack, wire
from protocol.errors import DecodeError
from protocol.gossip import GossipConfig
from protocol.gossip.messages import DIGEST_SIZE, MAX_CHUNKS, Announcement, message_id
from protocol.gossip.transfer import body_digest, chunk_count, chunk_digest, digest_of, table_size
from protocol.identity import node_id
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, decode_train_meta

EVIDENCE_TOPIC = "spirt.evidence"
# A gradient announcement is small (its body is pulled) unless the model is tiny
# enough for the payload to ride inline; equivocation evidence is two of them.
MAX_PROOF_ENVELOPE = 64 * 1024
# A non-finite proof carries a chunk table (at most MAX_CHUNKS entries: 1 MiB)
# and one chunk; bodies cut in larger chunks get their sender excluded by the
# peers that pulled them, without a proof for the others.
MAX_PROOF_CHUNK = 1 << 20
MAX_PROOF_TABLE = MAX_CHUNKS * DIGEST_SIZE
MAX_EVIDENCE = MAX_PROOF_ENVELOPE + MAX_PROOF_TABLE + MAX_PROOF_CHUNK + 64
_EVIDENCE_LIMITS = strictpack.Limits(
    max_size=MAX_EVIDENCE,
    max_depth=1,
    max_items=4,
    max_bin=max(MAX_PROOF_ENVELOPE, MAX_PROOF_TABLE, MAX_PROOF_CHUNK),
)
EQUIVOCATION = "equivocation"
NONFINITE = "nonfinite"
_META_LIMITS = strictpack.Limits(max_size=256, max_depth=1, max_items=4, max_str=64)


class EvidenceError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Proof:
    """Two conflicting signed gradient envelopes of ``offender`` for ``round``."""

    offender: str
    job: str
    round: int
    first: bytes
    second: bytes
    kind = EQUIVOCATION

    def encode(self) -> bytes:
        return strictpack.pack([self.first, self.second])

    def meta(self) -> bytes:
        return encode_evidence_meta(self.job, self.offender, self.round)


@dataclass(frozen=True, slots=True)
class NonfiniteProof:
    """``offender``'s signed gradient envelope for ``round``, its body's chunk
    table, and chunk ``index`` of the body, which holds a NaN or an infinity."""

    offender: str
    job: str
    round: int
    envelope: bytes
    table: bytes
    index: int
    chunk: bytes
    kind = NONFINITE

    def encode(self) -> bytes:
        return strictpack.pack([self.envelope, self.table, self.index, self.chunk])

    def meta(self) -> bytes:
        return encode_evidence_meta(self.job, self.offender, self.round)


Evidence = Proof | NonfiniteProof


def nonfinite_proof(
    offender: str,
    job: str,
    round: int,
    envelope: bytes,
    body: bytes,
    chunk_size: int,
    fmt: str = "none",
    count: int = 0,
) -> NonfiniteProof | None:
    """The proof that ``body`` (announced in ``envelope`` in chunks of
    ``chunk_size``; ``count`` values in compression ``fmt``) decodes to a
    non-finite value; None if it does not, or if the proof would be too large to
    gossip."""
    if chunk_size % 8 or chunk_size > MAX_PROOF_CHUNK or len(envelope) > MAX_PROOF_ENVELOPE:
        return None
    bad = compression.first_bad(fmt, body, count)
    if bad is None:
        return None
    index = bad // chunk_size
    table, _ = digest_of(body, chunk_size)
    chunk = body[index * chunk_size : (index + 1) * chunk_size]
    return NonfiniteProof(offender, job, round, envelope, table, index, chunk)


def encode_evidence_meta(job: str, offender: str, round: int) -> bytes:
    return strictpack.pack([job, offender, round])


def decode_evidence_meta(meta: bytes) -> tuple[str, str, int]:
    """(job, offender, round) as the publisher claims them: a hint for the
    validator (is it news?), never trusted; ``verify`` decides."""
    obj = strictpack.unpack(meta, _META_LIMITS)
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or not isinstance(obj[0], str)
        or not isinstance(obj[1], str)
        or not isinstance(obj[2], int)
        or isinstance(obj[2], bool)
    ):
        raise DecodeError("bad_field", "evidence meta is not [job, offender, round]")
    return obj[0], obj[1], obj[2]


@dataclass(frozen=True, slots=True)
class _Seen:
    msg_id: bytes
    base_digest: bytes
    body: tuple[bytes, int]  # body digest and size
    wire: bytes


class Ledger:
    """The first gradient announcement per (origin, round) of one job; ``see``
    returns a Proof when a conflicting second one arrives."""

    def __init__(self, job_id: str, *, window: int = 8, max_origins: int = 4096) -> None:
        self.job_id = job_id
        self.window = window
        self.max_origins = max_origins
        self._seen: dict[str, dict[int, _Seen]] = {}

    def see(
        self,
        origin: str,
        round: int,
        base_digest: bytes,
        body_digest: bytes,
        size: int,
        envelope: bytes,
        *,
        current: int,
    ) -> Proof | None:
        """``current``: this peer's round. Only rounds within ``window`` of it either
        way are kept, measured from our round, never from what the origin claims: a
        flood of far-future rounds from a liar would otherwise push its real rounds
        out, blinding this ledger to its equivocation and leaving a signed NaN of it
        without the envelope its proof needs (so the proof never went out)."""
        if not envelope or len(envelope) > MAX_PROOF_ENVELOPE:
            return None  # no signed bytes to keep (a replayed buffer entry)
        if not current - self.window < round <= current + self.window:
            return None  # refused as stale or future anyway
        rounds = self._seen.get(origin)
        if rounds is None:
            if len(self._seen) >= self.max_origins:
                return None
            rounds = self._seen[origin] = {}
        mid = message_id(envelope)
        first = rounds.get(round)
        if first is None:
            rounds[round] = _Seen(mid, base_digest, (body_digest, size), envelope)
            for old in [r for r in rounds if r <= current - self.window]:
                del rounds[old]
            return None
        if first.msg_id == mid:
            return None
        if first.base_digest != base_digest or first.body == (body_digest, size):
            return None
        return Proof(origin, self.job_id, round, first.wire, envelope)

    def envelope(self, origin: str, round: int, msg_id: bytes) -> bytes | None:
        """The signed envelope kept for (origin, round), if it is message ``msg_id``."""
        first = self._seen.get(origin, {}).get(round)
        return first.wire if first is not None and first.msg_id == msg_id else None

    def forget(self, origin: str) -> None:
        self._seen.pop(origin, None)


def verify(
    data: bytes, job_id: str, config: GossipConfig, fmt: str = "none", count: int = 0
) -> Evidence:
    """Checks evidence from the network on its own terms (``fmt``, ``count``: the
    job's compression and parameter count). Raises EvidenceError or DecodeError."""
    obj = strictpack.unpack(data, _EVIDENCE_LIMITS)
    if isinstance(obj, list) and len(obj) == 4:
        return _verify_nonfinite(obj, job_id, config, fmt, count)
    if not isinstance(obj, list) or len(obj) != 2 or not all(isinstance(x, bytes) for x in obj):
        raise EvidenceError("evidence is not two envelopes (nor a non-finite chunk proof)")
    return _verify_equivocation(obj[0], obj[1], job_id, config)


def _verify_nonfinite(
    obj: list, job_id: str, config: GossipConfig, fmt: str, count: int
) -> NonfiniteProof:
    """The envelope is validly signed, a gradient of ``job_id``; the table hashes to
    its body digest, the chunk to its table entry, and the chunk holds a
    non-finite float32 (chunks start at multiples of 4 bytes)."""
    envelope, table, index, chunk = obj
    if not (
        isinstance(envelope, bytes)
        and isinstance(table, bytes)
        and isinstance(chunk, bytes)
        and isinstance(index, int)
        and not isinstance(index, bool)
    ):
        raise EvidenceError("non-finite evidence is not [envelope, table, index, chunk]")
    env, meta, ann = _gradient(envelope, config)
    if meta.job != job_id:
        raise EvidenceError("not about this job")
    cs = ann.chunk_size
    if cs % 8:
        raise EvidenceError("chunks do not start on float (or int8 header) boundaries")
    if len(table) != table_size(ann.size, cs) or body_digest(ann.size, cs, table) != ann.digest:
        raise EvidenceError("the chunk table is not the signed body's")
    if not 0 <= index < chunk_count(ann.size, cs):
        raise EvidenceError("chunk index out of range")
    if len(chunk) != min(cs, ann.size - index * cs):
        raise EvidenceError("the chunk has the wrong length")
    if chunk_digest(chunk) != table[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]:
        raise EvidenceError("the chunk is not the signed body's")
    if compression.first_bad(fmt, chunk, count, at=index * cs) is None:
        raise EvidenceError("the chunk holds no non-finite value")
    return NonfiniteProof(node_id(env.origin), job_id, meta.round, envelope, table, index, chunk)


def _verify_equivocation(a: bytes, b: bytes, job_id: str, config: GossipConfig) -> Proof:
    """Both envelopes are validly signed by one key, both are gradients of
    ``job_id`` for one round on one model, and their bodies differ."""
    if message_id(a) == message_id(b):
        raise EvidenceError("the two envelopes are one message")
    ea, ma, aa = _gradient(a, config)
    eb, mb, ab = _gradient(b, config)
    if ea.origin != eb.origin:
        raise EvidenceError("the envelopes have different origins")
    if ma.job != job_id or mb.job != job_id:
        raise EvidenceError("not about this job")
    if ma.round != mb.round:
        raise EvidenceError("the gradients are for different rounds")
    if ma.base_digest != mb.base_digest:
        raise EvidenceError("the gradients are on different models")
    if (aa.digest, aa.size) == (ab.digest, ab.size):
        raise EvidenceError("the gradients are the same")
    return Proof(node_id(ea.origin), job_id, ma.round, a, b)


def _gradient(
    data: bytes, config: GossipConfig
) -> tuple[wire.Envelope, GradientMeta, Announcement]:
    env = wire.decode(data)  # raises on a bad signature
    if env.type is not wire.MsgType.GOSSIP_PUBLISH:
        raise EvidenceError("not a published message")
    ann = Announcement.from_obj(
        env.body,
        max_payload=config.max_payload,
        max_meta=config.max_meta,
        inline_max=config.inline_max,
    )
    if ann.topic != TRAIN_TOPIC:
        raise EvidenceError("not a training message")
    meta = decode_train_meta(ann.meta)
    if not isinstance(meta, GradientMeta):
        raise EvidenceError("not a gradient")
    return env, meta, ann
