"""Peers proven Byzantine, this trainer's side of it (the proofs themselves are
evidence.py's): the ledger of first gradient announcements that catches an
equivocation, the proof that a signed gradient is non-finite, and the evidence
topic's checks. Convicting (the job machine excludes the offender) is the
trainer's; this module finds and checks the proofs and logs the exclusions.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Container, Coroutine
from typing import TYPE_CHECKING, Any

from protocol.errors import DecodeError
from protocol.gossip import Verdict
from protocol.gossip.messages import message_id
from protocol.rounds import Excluded
from spirtd.pubsub.service import Info, Message
from spirtd.training.evidence import (
    EQUIVOCATION,
    EVIDENCE_TOPIC,
    MAX_EVIDENCE,
    MAX_PROOF_ENVELOPE,
    Evidence,
    EvidenceError,
    Ledger,
    decode_evidence_meta,
    nonfinite_proof,
)
from spirtd.training.evidence import verify as verify_evidence
from spirtd.training.job import JobSpec
from spirtd.training.messages import GradientMeta

if TYPE_CHECKING:
    from spirtd.training.trainerenv import TrainerEnv

log = logging.getLogger("spirtd.training")

# Signed announcements of the gradient bodies this peer pulls, newest last: a body
# that holds a NaN is proven by its own envelope. (The ledger keeps only the first
# announcement per origin and round, which a liar can make another one: a far-future
# gradient it sent rounds earlier.) About 0.5 kB each.
PULLED_KEPT = 4096
# Proofs kept to send again to each peer that syncs from this one (each up to
# MAX_EVIDENCE, about 1.1 MB): beyond this many liars the later ones went out once.
PROOFS_KEPT = 16


class Conviction:
    def __init__(self, job_id: str, spec: JobSpec, env: TrainerEnv) -> None:
        self.job_id = job_id
        self.spec = spec
        self.env = env
        self.ledger = Ledger(job_id)  # first gradient announcement per (origin, round)
        # offender -> its proof: a peer that syncs later (it joined, restarted, or had
        # not started the job when the proof went round) learns of it from them.
        self.proofs: dict[str, Evidence] = {}
        self._pulled: OrderedDict[bytes, bytes] = OrderedDict()  # msg id -> envelope

    def pulled(self, info: Info) -> None:
        """``info``'s body is to be pulled: keep its signed envelope for a proof."""
        if info.wire and len(info.wire) <= MAX_PROOF_ENVELOPE:
            self._pulled[message_id(info.wire)] = info.wire
            if len(self._pulled) > PULLED_KEPT:
                self._pulled.popitem(last=False)

    def keep(self, proof: Evidence) -> None:
        if len(self.proofs) < PROOFS_KEPT:
            self.proofs.setdefault(proof.offender, proof)

    def see(
        self, info: Info, meta: GradientMeta, excluded: Container[str], current: int
    ) -> Evidence | None:
        """A gradient announcement: the proof, if it is a second one for its round.
        ``current``: this peer's round."""
        if info.origin not in excluded:
            return self.ledger.see(
                info.origin,
                meta.round,
                meta.base_digest,
                info.digest,
                info.size,
                info.wire,
                current=current,
            )
        # Excluded origins are the machine's verdict; counted here as before.
        wrong = info.size != self.spec.body_size
        self.env.counters[f"training.gradient_rejected.{'size' if wrong else 'excluded'}"] += 1
        return None

    def nonfinite(self, msg: Message, r: int, body: bytes) -> Evidence | None:
        """The proof that ``msg``, a signed gradient for round ``r``, holds a NaN or
        an infinity; None when its envelope is no longer at hand."""
        envelope = self._pulled.get(msg.msg_id) or self.ledger.envelope(msg.origin, r, msg.msg_id)
        if envelope is None:
            return None
        return nonfinite_proof(
            msg.origin,
            self.job_id,
            r,
            envelope,
            body,
            msg.body.chunk_size,
            self.spec.compression,
            self.spec.param_count,
        )

    def gossip(self, proof: Evidence) -> Coroutine[Any, Any, Any]:
        return self.env.pubsub.publish(EVIDENCE_TOPIC, proof.encode(), meta=proof.meta())

    def admit(self, info: Info, excluded: Container[str]) -> Verdict:
        """The hook for the evidence topic: pull a proof only if it is news."""
        try:
            job, offender, _ = decode_evidence_meta(info.meta)
        except DecodeError:
            return Verdict.REJECT
        if info.size > MAX_EVIDENCE:
            return Verdict.REJECT
        if job != self.job_id or offender in excluded or offender == self.env.node_id:
            return Verdict.IGNORE
        return Verdict.ACCEPT

    async def read(self, msg: Message) -> Evidence | None:
        """A proof from the evidence topic, checked; None (counted) if it is not one."""
        data = await msg.read()
        try:
            return verify_evidence(
                data,
                self.job_id,
                self.env.pubsub.config,
                self.spec.compression,
                self.spec.param_count,
            )
        except (EvidenceError, DecodeError) as e:
            self.env.counters["training.evidence_invalid"] += 1
            log.warning("equivocation evidence from %s refused: %s", msg.origin, e)
            return None

    def excluded(self, ev: Excluded) -> None:
        c = self.env.counters
        c["training.excluded"] += 1
        c[f"training.{ev.kind}.{ev.how}"] += 1
        self.ledger.forget(ev.origin)
        what = "equivocated" if ev.kind == EQUIVOCATION else "sent a non-finite gradient"
        log.warning(
            "peer %s %s in round %d (%s); excluded for the rest of job %s",
            ev.origin,
            what,
            ev.round,
            "seen here" if ev.how == "detected" else "proof from a peer",
            self.job_id[:12],
        )
