"""State transfers cut short resume from another voucher, over real links on 127.0.0.1.

Three in-process nodes: a joiner, a voucher whose transfer breaks halfway, and a
second voucher. The joiner must end with exactly the full encoding while the
second voucher sends only the part that was missing, or its whole state when it
no longer holds the position the joiner is after.
"""

from __future__ import annotations

from typing import Any

import pytest

from spirtd.training.checkpoint import Snapshot
from spirtd.training.statesync import Position, SyncError
from tests.statesync_helpers import JOB, cut_first_transfer, snapshot, sync_nodes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def trio(monkeypatch: pytest.MonkeyPatch) -> Any:
    held: dict[int, Snapshot] = {1: snapshot(7, 1), 2: snapshot(7, 1)}
    async with sync_nodes(3, held) as (nodes, syncs):
        # The first transfer (the cutter's: each test asks it first) breaks halfway.
        sent = cut_first_transfer(monkeypatch)
        yield nodes, syncs, held, sent


async def test_a_cut_transfer_resumes_from_the_next_voucher(trio: Any) -> None:
    nodes, syncs, held, sent = trio
    joiner, cutter, other = nodes
    want = Position(7, held[1].digest)
    full = b"".join(held[1].encode())
    with pytest.raises(SyncError):
        await syncs[0].fetch(cutter.key.node_id, JOB, len(full), 10.0, want=want)
    kept = syncs[0].partial_bytes(JOB)
    assert 0 < kept < len(full)
    data = await syncs[0].fetch(other.key.node_id, JOB, len(full), 10.0, want=want)
    assert data == full
    assert joiner.counters["training.sync_resumed"] == 1
    assert joiner.counters["training.sync_resumed_bytes"] == kept
    assert sent[kept] == len(full) - kept  # the second voucher sent only the rest
    assert syncs[0].partial_bytes(JOB) == 0


async def test_a_voucher_that_moved_on_sends_its_whole_state(trio: Any) -> None:
    nodes, syncs, held, _ = trio
    joiner, cutter, other = nodes
    want = Position(7, held[1].digest)
    size = len(b"".join(held[1].encode()))
    with pytest.raises(SyncError):
        await syncs[0].fetch(cutter.key.node_id, JOB, size, 10.0, want=want)
    assert syncs[0].partial_bytes(JOB) > 0
    held[2] = snapshot(8, 2)  # the other voucher closed a round meanwhile
    data = await syncs[0].fetch(other.key.node_id, JOB, size, 10.0, want=want)
    assert data == b"".join(held[2].encode())
    assert joiner.counters["training.sync_resumed"] == 0


async def test_a_partial_is_only_resumed_for_the_position_it_holds(trio: Any) -> None:
    nodes, syncs, held, sent = trio
    joiner, cutter, other = nodes
    size = len(b"".join(held[1].encode()))
    with pytest.raises(SyncError):
        await syncs[0].fetch(cutter.key.node_id, JOB, size, 10.0, want=Position(7, held[1].digest))
    # A later decision targets another position: the old bytes are dropped, not mixed in.
    data = await syncs[0].fetch(other.key.node_id, JOB, size, 10.0, want=Position(9, b"\1" * 32))
    assert data == b"".join(held[2].encode())
    assert joiner.counters["training.sync_resumed"] == 0
    assert sent[0] == 2 * size
