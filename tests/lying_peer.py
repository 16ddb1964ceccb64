"""A spirtd that lies: for the state-sync and bad-gradient tests only.

It runs the real daemon, except for what ``SPIRT_TEST_LIE`` selects:

* ``snapshot`` (the default): every snapshot it serves to a syncing peer has one
  parameter changed while still claiming the digest it vouched for;
* ``gradients``: in round r it publishes one bad gradient message of the class
  ``BAD_CLASSES[r % len(BAD_CLASSES)]``: wrong size or non-finite values (instead
  of its gradient), or beside its gradient one for another job, a stale round,
  another base digest, an exact replay of an earlier message, an earlier
  sequence number re-signed, or a flood of far-future rounds.

The attacks live here, in the tests; nothing in spirtd can be configured to do
them. Run as ``python -m tests.lying_peer`` with spirtd's arguments.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import numpy as np

from protocol import wire
from protocol.gossip import Outgoing
from protocol.gossip.messages import Announcement, Publish
from protocol.rounds import PublishState
from spirtd import cli
from spirtd.pubsub.service import PubSub
from spirtd.training import trainer
from spirtd.training.checkpoint import Snapshot
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, StateMeta

# One class per gradient the liar publishes (not per round: a liar that left the
# others' model after a class sent instead of its gradient misses rounds while it
# syncs, and a class tied to a round number could be skipped every time), in this
# order: the classes that cost the liar no gossip score first, so each is seen by
# the validators before the ones that get it penalised or excluded.
BAD_CLASSES = (
    "job",
    "stale",
    "digest",
    "future_flood",
    "replay",
    "reused_seq",
    "size",  # instead of its gradient; refused on its face and penalised
    # Last: its announcement is valid, so it is refused only once the body is
    # read, and the signed NaN is proof that gets the liar excluded for good.
    "nonfinite",
)
FLOOD = 20

_honest_snapshot = trainer.Trainer.snapshot
_honest_publish = trainer.Trainer._publish_gradient
_honest_compute = trainer.Trainer._compute


async def _lying_snapshot(self: trainer.Trainer) -> Snapshot | None:
    snap = await _honest_snapshot(self)
    if snap is None:
        return None
    role, data = snap.tensors[0]
    assert data is not None
    forged = bytearray(data)
    forged[0:4] = b"\x00\x00\x80\x3f"  # the first parameter becomes 1.0
    return replace(snap, tensors=((role, bytes(forged)), *snap.tensors[1:]))


# The last envelope this peer signed for a gradient: what the replays re-send.
_last: dict[str, tuple[bytes, int]] = {}
_sent = [0]  # gradients published so far: which class comes next


async def _send(ps: PubSub, body: bytes, meta: bytes, *, seq: int | None = None) -> bytes:
    """Publishes ``body`` with ``meta`` to every peer; ``seq`` re-signs with that
    sequence number instead of a fresh one. Returns the envelope."""
    assert ps.m is not None
    staged = await ps.stage(body)
    ps._staged.pop(staged.handle, None)
    ann = Announcement(
        TRAIN_TOPIC, staged.size, staged.digest, staged.chunk_size, meta, staged.data
    )
    if seq is None:
        env = ps.node.seal(wire.MsgType.GOSSIP_PUBLISH, ann.to_obj())
    else:
        key = ps.node.key
        env = wire.seal(
            key, wire.MsgType.GOSSIP_PUBLISH, seq, int(time.time() * 1000), ann.to_obj()
        )
    if seq is None:
        mid = ps.m.publish(env, time.monotonic())
        if staged.partial is not None:
            staged.partial.ann = ann
            ps.store.commit(mid, staged.partial, staged.table)
    else:
        # Our own machine would refuse a reused seq: straight onto the links.
        for peer in ps.m.peers():
            ps.m._out.append(Outgoing(peer, Publish(env)))
    ps._pump()
    ps._wake.set()
    return env


async def _lying_compute(self: trainer.Trainer, r: int) -> None:
    """Wrong size and non-finite values go out instead of the round's gradient: both
    with it would be two gradients for one round, i.e. equivocation, which gets this
    peer excluded for good (tested on its own in test_equivocation)."""
    kind = BAD_CLASSES[_sent[0] % len(BAD_CLASSES)]
    if kind not in ("size", "nonfinite"):
        await _honest_compute(self, r)
        return
    _sent[0] += 1
    n = self.spec.param_count
    good = GradientMeta(self.job_id, r, self.job.rounds.digest, 64, 1.0)
    if kind == "size":
        await _send(self.env.pubsub, np.zeros(n - 1, dtype="<f4").tobytes(), good.encode())
    else:
        await _send(self.env.pubsub, np.full(n, np.nan, dtype="<f4").tobytes(), good.encode())
    # Its own round must not count a gradient the others refuse: that would fork it
    # from them, and a forked liar spends the job syncing instead of lying (the job
    # could end before its last class went out). It stands out of its own round like
    # a peer whose functions failed, but tells nobody: the others stop waiting for
    # it only because they refuse what it sent.
    self.job.local_gradient_failed(r, "lying", time.monotonic(), warm=True)
    self.job._actions = [
        a for a in self.job._actions if not (isinstance(a, PublishState) and a.round == r)
    ]
    self._kick()


async def _lying_publish(self: trainer.Trainer, r: int, base: bytes) -> None:
    ps = self.env.pubsub
    kind = BAD_CLASSES[_sent[0] % len(BAD_CLASSES)]
    _sent[0] += 1
    good = GradientMeta(self.job_id, r, base, 64, 1.0)
    zeros = np.zeros(self.spec.param_count, dtype="<f4").tobytes()
    if kind == "job":
        await _send(ps, zeros, replace(good, job="0" * 32).encode())
    elif kind == "stale" and r > 1:
        await _send(ps, zeros, replace(good, round=r - 1).encode())
    elif kind == "digest":
        await _send(ps, zeros, replace(good, base_digest=b"\x07" * 32).encode())
    elif kind == "replay" and "last" in _last:
        env, _ = _last["last"]
        assert ps.m is not None
        for peer in ps.m.peers():
            ps.m._out.append(Outgoing(peer, Publish(env)))
        ps._pump()
    elif kind == "reused_seq" and "last" in _last:
        # Another heads-up under the last one's seq: gossip drops it like a replay
        # but, as only this key can sign it, charges no relay for it.
        _, seq = _last["last"]
        await _send(ps, b"", StateMeta(self.job_id, r, base, False).encode(), seq=seq)
    elif kind == "future_flood":
        for k in range(3, 3 + FLOOD):
            await _send(ps, zeros, replace(good, round=r + k).encode())
    await _honest_publish(self, r, base)
    # A message the others accept (its heads-up again, harmless), whose envelope
    # and sequence number the replays of later rounds reuse.
    env = await _send(ps, b"", StateMeta(self.job_id, r, base, True).encode())
    _last["last"] = (env, wire.decode(env).seq)


if os.environ.get("SPIRT_TEST_LIE", "snapshot") == "gradients":
    trainer.Trainer._publish_gradient = _lying_publish  # type: ignore[method-assign]
    trainer.Trainer._compute = _lying_compute  # type: ignore[method-assign]
else:
    trainer.Trainer.snapshot = _lying_snapshot  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
