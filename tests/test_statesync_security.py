"""State sync against peers that misbehave, over real links on 127.0.0.1.

- a job record is taken only as the answer to our own question (peer, job, in
  time, once, hashing to the job id);
- a peer that asks for state again and again is refused with a clear reply once
  its budget is spent, without losing its link or touching other peers' budgets;
- a transfer joined from two sources that fails its digest blames the source
  whose bytes were bad, whichever end of the transfer it served.
"""

from __future__ import annotations

from typing import Any

import pytest

from protocol import strictpack
from protocol.wire import MsgType
from spirtd.localcluster import async_wait_for
from spirtd.training.checkpoint import SnapshotError, encoded_digest
from spirtd.training.job import JobSpec
from spirtd.training.statesync import (
    RECORD_WAIT_S,
    SERVE_BURST,
    SERVE_EVERY_S,
    Position,
    SyncError,
)
from tests.statesync_helpers import JOB, MiniNode, cut_first_transfer, snapshot, sync_nodes

pytestmark = pytest.mark.timeout(60)


def send_state(src: MiniNode, dst: MiniNode, obj: dict[str, Any]) -> None:
    """A STATE message from ``src`` to ``dst`` as any peer could craft it."""
    assert src.link_to(dst).try_send(src.seal(MsgType.STATE, strictpack.pack(obj)))


# --- job records ----------------------------------------------------------------------------


async def test_only_an_asked_for_job_record_is_taken() -> None:
    record, late_record = b"the job record " * 8, b"a record asked for long ago"
    job, late_job = JobSpec.job_id(record), JobSpec.job_id(late_record)
    other_job = "cd" * 16
    now = [1000.0]
    taken: list[tuple[str, bytes, str]] = []

    async def on_record(job_id: str, rec: bytes, origin: str) -> None:
        taken.append((job_id, rec, origin))

    serving: dict[str, bytes] = {}  # what node 1 answers a question with

    def options(i: int) -> dict[str, Any]:
        source = serving.get if i == 1 else (lambda job_id: None)
        return {"record": source, "on_record": on_record, "clock": lambda: now[0]}

    async with sync_nodes(3, {}, options) as (nodes, syncs):
        me, asked, other = nodes
        dropped = me.counters

        def unasked(n: int) -> bool:
            return dropped["training.sync_record_unasked"] == n

        # Before any question: dropped.
        send_state(asked, me, {"k": "job", "job": job, "record": record})
        await async_wait_for(lambda: unasked(1), 10.0, "the unsolicited record counted")
        # Asked of one peer (which has no answer yet): another peer's copy is dropped.
        syncs[0].ask_job(asked.key.node_id, job, now[0])
        send_state(other, me, {"k": "job", "job": job, "record": record})
        await async_wait_for(lambda: unasked(2), 10.0, "the other peer's record counted")
        # Asked again later, the peer answers: taken.
        serving[job] = record
        now[0] += 5.0
        syncs[0].ask_job(asked.key.node_id, job, now[0])
        await async_wait_for(lambda: len(taken) == 1, 10.0, "the asked-for record")
        assert taken == [(job, record, asked.key.node_id)]
        # Answered once: a second copy is dropped.
        send_state(asked, me, {"k": "job", "job": job, "record": record})
        await async_wait_for(lambda: unasked(3), 10.0, "the repeated record counted")
        # A record that does not hash to the job id asked for: dropped.
        syncs[0].ask_job(other.key.node_id, other_job, now[0])
        send_state(other, me, {"k": "job", "job": other_job, "record": record})
        await async_wait_for(
            lambda: dropped["training.sync_record_mismatch"] == 1, 10.0, "the mismatch counted"
        )
        # An answer that comes after the wait is over: dropped.
        syncs[0].ask_job(other.key.node_id, late_job, now[0])
        now[0] += RECORD_WAIT_S + 1
        send_state(other, me, {"k": "job", "job": late_job, "record": late_record})
        await async_wait_for(lambda: unasked(4), 10.0, "the late record counted")
        assert taken == [(job, record, asked.key.node_id)]


async def test_a_question_that_could_not_be_sent_does_not_hold_up_the_next() -> None:
    record = b"a job record " * 8
    job = JobSpec.job_id(record)
    taken: list[str] = []

    async def on_record(job_id: str, rec: bytes, origin: str) -> None:
        taken.append(origin)

    def options(i: int) -> dict[str, Any]:
        source = {job: record}.get if i == 1 else (lambda job_id: None)
        return {"record": source, "on_record": on_record, "clock": lambda: 1000.0}

    async with sync_nodes(2, {}, options) as (nodes, syncs):
        # A heads-up relayed from an origin this node has no link to: nothing is asked.
        syncs[0].ask_job("12D3KooWNotLinkedToThisNodeAtAll", job, 1000.0)
        # The next heads-up, at the same moment, comes from a linked peer: asked at once.
        syncs[0].ask_job(nodes[1].key.node_id, job, 1000.0)
        await async_wait_for(lambda: taken == [nodes[1].key.node_id], 10.0, "the record")


# --- serving budget -------------------------------------------------------------------------


async def test_a_peer_asking_again_and_again_is_refused_after_its_budget() -> None:
    now = [1000.0]
    held = {0: snapshot(7, 1)}
    full = b"".join(held[0].encode())
    async with sync_nodes(3, held, lambda i: {"clock": lambda: now[0]}) as (nodes, syncs):
        server, greedy, _ = nodes
        sid = server.key.node_id
        for _ in range(SERVE_BURST):
            assert await syncs[1].fetch(sid, JOB, len(full), 10.0) == full
        with pytest.raises(SyncError, match="asked it for state too often"):
            await syncs[1].fetch(sid, JOB, len(full), 10.0)
        assert server.counters["training.sync_rate_limited"] == 1
        assert server.counters["training.sync_served"] == SERVE_BURST
        # A refusal, not a dropped link; and another peer's budget is its own.
        assert greedy.link_to(server).close_reason is None
        assert await syncs[2].fetch(sid, JOB, len(full), 10.0) == full
        # The budget refills: one more transfer per SERVE_EVERY_S.
        now[0] += SERVE_EVERY_S
        assert await syncs[1].fetch(sid, JOB, len(full), 10.0) == full
        with pytest.raises(SyncError, match="too often"):
            await syncs[1].fetch(sid, JOB, len(full), 10.0)
        assert server.counters["training.sync_rate_limited"] == 2


# --- blame for a joined transfer --------------------------------------------------------------


GOOD = snapshot(7, 1)
LIE = snapshot(7, 9, claim=GOOD.digest)  # other bytes, under the good position's digest


@pytest.mark.parametrize("liar", [1, 2], ids=["first-part", "rest"])
async def test_a_joined_transfer_that_fails_blames_the_source_of_the_bad_bytes(
    liar: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = {1: GOOD, 2: GOOD, liar: LIE}
    full = b"".join(GOOD.encode())
    want = Position(7, GOOD.digest)
    async with sync_nodes(3, held) as (nodes, syncs):
        joiner, first, rest = nodes
        ids = {1: first.key.node_id, 2: rest.key.node_id}
        cut_first_transfer(monkeypatch)
        with pytest.raises(SyncError):
            await syncs[0].fetch(ids[1], JOB, len(full), 10.0, want=want)
        assert 0 < syncs[0].partial_bytes(JOB) < len(full)
        if liar == 1:
            # The rest's source serves the whole state again, which verifies: the
            # first part is compared with it and its source blamed.
            assert await syncs[0].fetch(ids[2], JOB, len(full), 10.0, want=want) == full
        else:
            # The whole state from the rest's source fails too: it served it alone.
            with pytest.raises(SyncError, match="does not match its digest"):
                await syncs[0].fetch(ids[2], JOB, len(full), 10.0, want=want)
        assert syncs[0].blamed == {ids[liar]: 1}
        assert joiner.counters["training.sync_joined_bad"] == 1
        assert joiner.counters["training.sync_bad_state"] == 1
        assert syncs[0].partial_bytes(JOB) == 0


def test_encoded_digest_checks_the_bytes_without_a_spec() -> None:
    data = bytearray(b"".join(GOOD.encode()))
    assert encoded_digest(bytes(data), job_id=JOB) == (7, GOOD.digest)
    data[-1] ^= 1
    with pytest.raises(SnapshotError, match="digest mismatch"):
        encoded_digest(bytes(data), job_id=JOB)
    with pytest.raises(SnapshotError, match="does not fit"):
        encoded_digest(bytes(data[:-1]), job_id=JOB)
    with pytest.raises(SnapshotError, match="past the last tensor"):
        encoded_digest(bytes(data) + b"\0", job_id=JOB)
    with pytest.raises(SnapshotError, match="not of job"):
        encoded_digest(b"".join(GOOD.encode()), job_id="cd" * 16)
