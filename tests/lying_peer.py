"""A spirtd that serves tampered model state: for the state-sync tests only.

It runs the real daemon, except that every snapshot it serves to a syncing peer
has one parameter changed while still claiming the digest it vouched for. The
attack lives here, in the tests; nothing in spirtd can be configured to do it.
Run as ``python -m tests.lying_peer`` with spirtd's arguments.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from spirtd import cli
from spirtd.training import trainer
from spirtd.training.checkpoint import Snapshot

_honest = trainer.Trainer.snapshot


async def _lying_snapshot(self: trainer.Trainer) -> Snapshot | None:
    snap = await _honest(self)
    if snap is None:
        return None
    role, data = snap.tensors[0]
    assert data is not None
    forged = bytearray(data)
    forged[0:4] = b"\x00\x00\x80\x3f"  # the first parameter becomes 1.0
    return replace(snap, tensors=((role, bytes(forged)), *snap.tensors[1:]))


trainer.Trainer.snapshot = _lying_snapshot  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
