"""Proofs of Byzantine behaviour: two signed gradients of one origin for one
(job, round), or one signed gradient holding a non-finite value.

Unit tests of the ledger and of the proof checks, on real signed envelopes; the
integration tests run Byzantine spirtd peers among real honest ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol import strictpack, wire
from protocol.errors import DecodeError
from protocol.gossip import GossipConfig
from protocol.gossip.messages import Announcement, message_id
from protocol.gossip.transfer import digest_of
from protocol.identity import NodeKey
from spirtd.training.evidence import (
    EvidenceError,
    Ledger,
    NonfiniteProof,
    decode_evidence_meta,
    nonfinite_proof,
    verify,
)
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta

JOB = "ab" * 16
BASE = b"b" * 32
CFG = GossipConfig()


def _key(i: int) -> NodeKey:
    return NodeKey(bytes([i]) * 32)


def _gradient(
    key: NodeKey,
    *,
    round: int = 5,
    body: bytes = b"\x01" * 32,
    base: bytes = BASE,
    job: str = JOB,
    seq: int = 1,
    topic: str = TRAIN_TOPIC,
) -> bytes:
    meta = GradientMeta(job, round, base, 64, 0.5).encode()
    ann = Announcement(topic, 4096, body, 1024, meta)
    return wire.seal(key, wire.MsgType.GOSSIP_PUBLISH, seq, 1_700_000_000_000, ann.to_obj())


def _see(ledger: Ledger, env: bytes, current: int | None = None) -> Any:
    """``current``: our round (by default the gradient's own)."""
    e = wire.decode(env)
    ann = Announcement.from_obj(
        e.body, max_payload=CFG.max_payload, max_meta=CFG.max_meta, inline_max=CFG.inline_max
    )
    from spirtd.training.messages import decode_train_meta

    m = decode_train_meta(ann.meta)
    assert isinstance(m, GradientMeta)
    from protocol.identity import node_id

    return ledger.see(
        node_id(e.origin),
        m.round,
        m.base_digest,
        ann.digest,
        ann.size,
        env,
        current=m.round if current is None else current,
    )


def test_second_different_gradient_for_a_round_is_proof_that_verifies() -> None:
    k = _key(1)
    ledger = Ledger(JOB)
    a = _gradient(k, seq=1)
    b = _gradient(k, seq=2, body=b"\x02" * 32)
    assert _see(ledger, a) is None
    assert _see(ledger, a) is None  # the same message again is no proof
    proof = _see(ledger, b)
    assert proof is not None and proof.offender == k.node_id and proof.round == 5
    checked = verify(proof.encode(), JOB, CFG)
    assert checked.offender == k.node_id and checked.round == 5
    assert decode_evidence_meta(proof.meta()) == (JOB, k.node_id, 5)


@pytest.mark.parametrize(
    "second",
    [
        dict(seq=2),  # the same gradient re-signed (a restart): not a conflict
        dict(seq=2, body=b"\x02" * 32, base=b"c" * 32),  # recomputed on another model
        dict(seq=2, body=b"\x02" * 32, round=6),  # another round
    ],
)
def test_what_an_honest_peer_may_do_is_no_proof(second: dict[str, Any]) -> None:
    k = _key(1)
    ledger = Ledger(JOB)
    assert _see(ledger, _gradient(k, seq=1)) is None
    assert _see(ledger, _gradient(k, **second)) is None


def test_ledger_is_bounded_by_a_window_of_rounds() -> None:
    k = _key(1)
    ledger = Ledger(JOB, window=4)
    for r in range(1, 20):
        assert _see(ledger, _gradient(k, round=r, seq=r)) is None
    assert len(ledger._seen[k.node_id]) <= 4
    # Far behind our round: not kept, so not a proof either.
    assert _see(ledger, _gradient(k, round=2, seq=100, body=b"\x09" * 32), current=19) is None


def test_a_flood_of_far_future_rounds_does_not_blind_the_ledger() -> None:
    # The lying peer's "future_flood" class pushed its real rounds out of a ledger
    # that measured its window from the origin's newest claim: its NaN of round 8
    # then had no envelope, so no proof went out, and an honest peer on another model
    # that round (it never reads the body) kept the liar in for the whole job.
    k = _key(1)
    ledger = Ledger(JOB, window=4)
    a = _gradient(k, round=8, seq=1)
    assert _see(ledger, a, current=8) is None
    for i in range(20):
        flood = _gradient(k, round=10_000 + i, seq=10 + i)
        assert _see(ledger, flood, current=8) is None
    assert ledger.envelope(k.node_id, 8, message_id(a)) == a
    assert set(ledger._seen[k.node_id]) == {8}
    proof = _see(ledger, _gradient(k, round=8, seq=50, body=b"\x02" * 32), current=8)
    assert proof is not None and proof.round == 8


def _pair(a: bytes, b: bytes) -> bytes:
    return strictpack.pack([a, b])


def test_forged_or_mismatched_evidence_is_refused() -> None:
    k, other = _key(1), _key(2)
    a = _gradient(k, seq=1)
    cases = {
        "different origins": _pair(a, _gradient(other, seq=2, body=b"\x02" * 32)),
        "different rounds": _pair(a, _gradient(k, seq=2, round=6, body=b"\x02" * 32)),
        "different models": _pair(a, _gradient(k, seq=2, base=b"c" * 32, body=b"\x02" * 32)),
        "the same": _pair(a, _gradient(k, seq=2)),
        "one message": _pair(a, a),
        "not about this job": _pair(
            _gradient(k, seq=1, job="cd" * 16),
            _gradient(k, seq=2, job="cd" * 16, body=b"\x02" * 32),
        ),
        "not a training message": _pair(
            _gradient(k, seq=1, topic="other"),
            _gradient(k, seq=2, topic="other", body=b"\x02" * 32),
        ),
        "not two envelopes": strictpack.pack([a]),
    }
    for want, data in cases.items():
        with pytest.raises(EvidenceError, match=want):
            verify(data, JOB, CFG)
    # A tampered signature (someone framing k) fails the signature check.
    b = bytearray(_gradient(k, seq=2, body=b"\x02" * 32))
    b[-1] ^= 1
    with pytest.raises(DecodeError):
        verify(_pair(a, bytes(b)), JOB, CFG)
    with pytest.raises(DecodeError):
        verify(b"\xc1garbage", JOB, CFG)


# --- non-finite proofs --------------------------------------------------------------------

CHUNK = 1024


def _signed_body(key: NodeKey, body: bytes, *, job: str = JOB, round: int = 5) -> bytes:
    """A gradient announcement of ``body`` (in chunks of CHUNK) signed by ``key``."""
    _, digest = digest_of(body, CHUNK)
    meta = GradientMeta(job, round, BASE, 64, 0.5).encode()
    ann = Announcement(TRAIN_TOPIC, len(body), digest, CHUNK, meta)
    return wire.seal(key, wire.MsgType.GOSSIP_PUBLISH, 1, 1_700_000_000_000, ann.to_obj())


def _body_with_nan_at(index: int, n: int = 2000) -> bytes:
    a = np.linspace(-1, 1, n, dtype="<f4")
    a[index] = np.nan
    return a.tobytes()


def test_a_nonfinite_gradient_is_proof_in_one_chunk() -> None:
    k = _key(1)
    body = _body_with_nan_at(1500)  # byte 6000: chunk 5 of 8
    env = _signed_body(k, body)
    proof = nonfinite_proof(k.node_id, JOB, 5, env, body, CHUNK)
    assert proof is not None and proof.index == 5 and len(proof.chunk) == CHUNK
    assert len(proof.encode()) < len(body)  # one chunk, not the body
    checked = verify(proof.encode(), JOB, CFG)
    assert isinstance(checked, NonfiniteProof)
    assert (checked.offender, checked.round, checked.kind) == (k.node_id, 5, "nonfinite")
    # A finite body proves nothing.
    clean = np.linspace(-1, 1, 2000, dtype="<f4").tobytes()
    assert nonfinite_proof(k.node_id, JOB, 5, _signed_body(k, clean), clean, CHUNK) is None


def test_a_nonfinite_int8_header_is_proof_and_codes_never_are() -> None:
    """In an int8 body the headers (scale, offset) come first: a non-finite one is
    proven by the chunk that holds it; any code decodes to a finite value."""
    from protocol import compression

    k = _key(1)
    count = 3 * compression.BLOCK
    good = compression.encode("int8", np.linspace(-1, 1, count, dtype=np.float32))
    bad = bytearray(good)
    bad[2 * compression.HEADER : 2 * compression.HEADER + 4] = np.float32(np.inf).tobytes()
    bad = bytes(bad)
    env = _signed_body(k, bad)
    proof = nonfinite_proof(k.node_id, JOB, 5, env, bad, CHUNK, "int8", count)
    assert proof is not None and proof.index == 0
    assert isinstance(verify(proof.encode(), JOB, CFG, "int8", count), NonfiniteProof)
    # Codes that read as a float32 NaN prove something of a float32 body only.
    codes = bytearray(good)
    codes[CHUNK + 8 : CHUNK + 12] = np.float32(np.nan).tobytes()
    as_f32 = nonfinite_proof(k.node_id, JOB, 5, env, bytes(codes), CHUNK, "none", count)
    assert as_f32 is not None and as_f32.index == 1
    assert compression.first_bad("int8", bytes(codes), count) is None
    with pytest.raises(EvidenceError, match="no non-finite"):
        verify(
            nonfinite_proof(
                k.node_id, JOB, 5, _signed_body(k, bytes(codes)), bytes(codes), CHUNK
            ).encode(),  # type: ignore[union-attr]
            JOB,
            CFG,
            "int8",
            count,
        )
    # ...and a finite int8 body, whatever its codes, proves nothing.
    assert (
        nonfinite_proof(k.node_id, JOB, 5, _signed_body(k, good), good, CHUNK, "int8", count)
        is None
    )


def test_forged_nonfinite_proofs_are_refused() -> None:
    k = _key(1)
    body = _body_with_nan_at(1500)
    env = _signed_body(k, body)
    p = nonfinite_proof(k.node_id, JOB, 5, env, body, CHUNK)
    assert p is not None
    clean_chunk = np.zeros(CHUNK // 4, dtype="<f4").tobytes()
    # An honest peer's finite gradient, "proven" with a NaN chunk of someone else's body.
    honest_body = np.linspace(-1, 1, 2000, dtype="<f4").tobytes()
    honest_env = _signed_body(k, honest_body)
    honest_table, _ = digest_of(honest_body, CHUNK)
    cases = {
        "not the signed body's": [honest_env, honest_table, 5, p.chunk],
        "the chunk table is not": [honest_env, p.table, 5, p.chunk],
        "holds no non-finite": [
            honest_env,
            honest_table,
            5,
            honest_body[5 * CHUNK : 6 * CHUNK],
        ],
        "out of range": [env, p.table, 8, p.chunk],
        "wrong length": [env, p.table, 5, p.chunk[:-4]],
        "not about this job": [
            _signed_body(k, body, job="cd" * 16),
            p.table,
            5,
            p.chunk,
        ],
        "is not the signed": [env, p.table, 4, clean_chunk],
    }
    for want, obj in cases.items():
        with pytest.raises(EvidenceError, match=want):
            verify(strictpack.pack(obj), JOB, CFG)


# --- on real peers ------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "same_seq",
    [
        pytest.param(0, id="own_seqs"),
        # Long: five more daemons for what own_seqs runs on real peers (detection,
        # evidence, exclusion everywhere) plus the one gossip step that differs, which
        # test_gossip_sim's test_two_messages_under_one_seq_reach_the_validator_and_
        # charge_no_relay covers (both versions reach the validator, no relay charged).
        pytest.param(1, id="one_seq", marks=pytest.mark.long),
    ],
)
def test_equivocating_peer_is_excluded_by_every_honest_peer(short_tmp: Path, same_seq: int) -> None:
    """``one_seq``: both versions are signed under one sequence number, so a peer
    holding one would drop the other as a replay if gossip did not look closer."""
    from bench.byzantine import run_cell, start_cluster

    os.environ.pop("SPIRT_I_UNDERSTAND_THIS_IS_AN_ATTACK", None)
    cluster, honest, byz = start_cluster(short_tmp / "c", 5, 1)
    try:
        row = run_cell(
            cluster,
            honest,
            byz,
            f=1,
            rule="median",
            attack="equivocation",
            # Exclusion is due by round 3 (first + 2): 6 rounds leave later ones to check.
            rounds=6,
            seed=1,
            timeout=400,
            params={"same_seq": same_seq},
        )
        assert row["error"] is None, row
        statuses = [h.call("GET", "/v1/train/status") for h in honest]
        counters = [h.status()["counters"] for h in honest]
    finally:
        cluster.kill_all()
    (offender,) = byz
    # The attack is on before the job starts: it first equivocates in round 1.
    first = 1
    for s in statuses:
        assert s["state"] == "done", s["detail"]
        (ex,) = s["excluded"]
        assert ex["node_id"] == offender and ex["how"] in ("detected", "evidence")
        assert ex["round"] <= first + 2 and ex["at_round"] <= first + 2, ex
    for s, c in zip(statuses, counters, strict=True):
        # Within 2 rounds of its first equivocation, out of every round this peer ran.
        late = [h for h in s["history"] if h["round"] >= first + 2]
        brief = [(h["round"], len(h["contributors"]), h["closed_by"]) for h in s["history"]]
        assert all(offender not in h["contributors"] for h in late), brief
        # A peer that aggregated the other version before the proof reached it holds
        # another model and syncs, possibly straight to the end of this short job: it
        # then ran no late round itself. Every other peer ran them.
        assert late or c.get("training.syncs_done", 0) >= 1, (brief, s["detail"], c)
        assert s["rounds"]["excluded"] == [offender]
    assert any(h["round"] >= first + 2 for s in statuses for h in s["history"])
    assert all(c["training.excluded"] == 1 for c in counters), counters
    # At least one honest peer caught it itself; the others may have its proof.
    assert sum(c.get("training.equivocation.detected", 0) for c in counters) >= 1
    if same_seq:
        # Caught through gossip showing the validator the second message under
        # the seq, not charged to the (honest) relays as a replay.
        assert sum(c.get("gossip.seq_conflict", 0) for c in counters) >= 1
        assert sum(c.get("gossip.invalid.replay", 0) for c in counters) == 0
    assert len({s["model_digest"] for s in statuses}) == 1


def test_a_nan_is_proven_though_the_ledger_holds_another_announcement_for_its_round() -> None:
    """The ledger keeps the first announcement per (origin, round); a liar can make
    that one a far-future gradient on another base, sent rounds before its NaN. The
    NaN is proven by its own envelope all the same (kept as its body is pulled)."""
    from spirtd.pubsub.service import Info
    from spirtd.training.conviction import Conviction
    from spirtd.training.job import JobSpec
    from tests.test_trainer_unit import FakeBody, FakeMessage

    liar = _key(9)
    body = _body_with_nan_at(3)
    spec = JobSpec("synthetic", {}, rounds=20, functions_per_round=1, param_count=len(body) // 4)
    conv = Conviction(JOB, spec, None)  # type: ignore[arg-type]
    flood_base = b"\x07" * 32
    flood = _gradient(liar, round=8, base=flood_base, seq=1)
    flood_meta = GradientMeta(JOB, 8, flood_base, 64, 0.5)
    conv.see(Info(TRAIN_TOPIC, liar.node_id, 1, 0, 4096, b"f" * 32, b"", flood), flood_meta, (), 4)
    nan_env = _signed_body(liar, body, round=8)
    meta = GradientMeta(JOB, 8, BASE, 64, 0.5)
    info = Info(TRAIN_TOPIC, liar.node_id, 2, 0, len(body), b"d" * 32, meta.encode(), nan_env)
    assert conv.see(info, meta, (), 8) is None  # another base: no equivocation
    conv.pulled(info)
    msg = FakeMessage(liar.node_id, body, meta.encode(), msg_id=message_id(nan_env))
    msg.body = FakeBody(CHUNK)
    proof = conv.nonfinite(msg, 8, body)  # type: ignore[arg-type]
    assert proof is not None
    checked = verify(proof.encode(), JOB, CFG)
    assert isinstance(checked, NonfiniteProof) and checked.offender == liar.node_id
