"""Equivocation: one origin, two different signed gradients for one (job, round).

An honest peer publishes one gradient per round. A Byzantine one can sign two
and send each to a different part of the cluster, so that honest peers aggregate
different inputs and split. Gossip relays what it accepts, so the two versions
meet at some honest peer, whose validation hook then holds both signed
envelopes: that pair is the proof. It is gossiped on its own topic, and every
honest peer checks it from the signatures alone (both by the same key, both
gradients of this job for the same round, on the same model, with different
bodies) before it excludes the offender for the rest of the job.

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

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.gossip import GossipConfig
from protocol.gossip.messages import Announcement, message_id
from protocol.identity import node_id
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, decode_train_meta

EVIDENCE_TOPIC = "spirt.evidence"
# A gradient announcement is small (its body is pulled) unless the model is tiny
# enough for the payload to ride inline; evidence is two of them.
MAX_PROOF_ENVELOPE = 64 * 1024
MAX_EVIDENCE = 2 * MAX_PROOF_ENVELOPE + 64
_EVIDENCE_LIMITS = strictpack.Limits(
    max_size=MAX_EVIDENCE, max_depth=1, max_items=3, max_bin=MAX_PROOF_ENVELOPE
)
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

    def encode(self) -> bytes:
        return strictpack.pack([self.first, self.second])

    def meta(self) -> bytes:
        return encode_evidence_meta(self.job, self.offender, self.round)


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
    ) -> Proof | None:
        if not envelope or len(envelope) > MAX_PROOF_ENVELOPE:
            return None  # no signed bytes to keep (a replayed buffer entry)
        rounds = self._seen.get(origin)
        if rounds is None:
            if len(self._seen) >= self.max_origins:
                return None
            rounds = self._seen[origin] = {}
        mid = message_id(envelope)
        first = rounds.get(round)
        if first is None:
            newest = max(rounds, default=round)
            if round <= newest - self.window:
                return None  # far older than what this origin is at: useless
            rounds[round] = _Seen(mid, base_digest, (body_digest, size), envelope)
            for old in [r for r in rounds if r <= max(newest, round) - self.window]:
                del rounds[old]
            return None
        if first.msg_id == mid:
            return None
        if first.base_digest != base_digest or first.body == (body_digest, size):
            return None
        return Proof(origin, self.job_id, round, first.wire, envelope)

    def forget(self, origin: str) -> None:
        self._seen.pop(origin, None)


def verify(data: bytes, job_id: str, config: GossipConfig) -> Proof:
    """Checks evidence from the network on its own terms: both envelopes are
    validly signed by one key, both are gradients of ``job_id`` for one round on
    one model, and their bodies differ. Raises EvidenceError or DecodeError."""
    obj = strictpack.unpack(data, _EVIDENCE_LIMITS)
    if not isinstance(obj, list) or len(obj) != 2 or not all(isinstance(x, bytes) for x in obj):
        raise EvidenceError("evidence is not two envelopes")
    a, b = obj
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
