"""A round's work on this peer, in its Redis: the local gradient, its publish,
peers' bodies stored, the aggregation with the optimizer step, the new digest and
position mark (and, on due rounds, the checkpoint), and the evaluation. The
trainer spawns these for the job machine's actions and feeds it what came of them.

Every tensor a round writes (gradients, aggregate, the updated state) is SCRATCH:
Redis keeps it out of its AOF. Writing the gradients there cost Redis more CPU than
all its tensor work, and the state would put the whole model on disk every round.
The state is made durable by the checkpoints (every ``checkpoint_every`` rounds and
at stop) and by the peers; after a restart of Redis it is taken from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from protocol.rounds import Aggregate
from spirtd.pubsub.retention import RoundBodies
from spirtd.redis.store import NonFinite, StoreError, TensorNotFound
from spirtd.training import state
from spirtd.training.compute import LocalCompute, LocalVector, optimizer_step
from spirtd.training.job import JobSpec
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta
from spirtd.training.records import RoundLog
from spirtd.training.state import StateKeys
from spirtd.training.stateio import StateIO

if TYPE_CHECKING:
    from spirtd.training.trainerenv import TrainerEnv

log = logging.getLogger("spirtd.training")

# Sends a gradient's body with its meta (TrainerEnv.gradient_publisher, bound).
Publisher = Callable[[bytes, GradientMeta], Awaitable[None]]


class RoundWork:
    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        env: TrainerEnv,
        compute: LocalCompute,
        stateio: StateIO,
        records: RoundLog,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.env = env
        self.keys = StateKeys(job_id)
        self.rule = spec.rule
        self.compute = compute
        self.stateio = stateio
        self.records = records
        self._samples = 0  # this node's sample count in its current gradient
        self._stored: dict[int, set[str]] = {}  # per round: the scratch keys written
        # Gradient message ids per round (received and ours), released from the body
        # store once the round is body_rounds behind: retain_s would keep hundreds.
        self.bodies = RoundBodies(env.pubsub.release, env.body_rounds)

    async def local_gradient(self, r: int) -> LocalVector:
        """This peer's gradient for round ``r`` into StateKeys.local (SlicesFailed
        when too few of its slices succeed)."""
        v = await self.compute.vector(r)
        self._stored.setdefault(r, set()).add(self.keys.local(r))
        self.records.losses.setdefault(r, {})[self.env.node_id] = v.loss
        self.records.phases[r] = v.phases
        self._samples = v.samples
        return v

    async def compress(self, r: int, v: LocalVector) -> None:
        if self.spec.compression != "none":
            c0 = time.perf_counter()
            self._stored[r].add(self.keys.wire(r))
            await self.compute.compress(r)
            v.phases["compression_s"] = time.perf_counter() - c0

    def gradient_meta(self, r: int, base: bytes) -> GradientMeta:
        me = self.env.node_id
        return GradientMeta(self.job_id, r, base, self._samples, self.records.losses[r][me])

    async def publish_gradient(
        self, r: int, meta: GradientMeta, publisher: Publisher | None
    ) -> None:
        # Everything about round r is read before the first await: when our gradient
        # is the last one the round waited for, the round closes (and its records
        # are dropped by the aggregation) while the body is still being fetched.
        phases = self.records.phases.get(r, {})
        t0 = time.perf_counter()
        key = self.keys.local(r) if self.spec.compression == "none" else self.keys.wire(r)
        body = await self.env.store.client.get(key)
        if body is None:
            # It is scratch: a Redis that restarted since it was written lost it. Redis
            # trouble, handled as such (the state is re-established), not a failed job.
            raise TensorNotFound(f"local gradient for round {r} vanished from Redis")
        if publisher is not None:
            await publisher(body, meta)
        else:
            sent = await self.env.pubsub.publish(TRAIN_TOPIC, body, meta=meta.encode())
            if sent:
                self.bodies.add(r, bytes.fromhex(sent["msg_id"]))
        phases["publish_s"] = time.perf_counter() - t0
        # A round that closed during the publish has its record made already (holding
        # this dict): the internal timestamp must not land in its history.
        if self.records.phases.get(r) is phases:
            phases["ready_at"] = time.monotonic()

    async def store_body(self, r: int, origin: str, body: bytes) -> tuple[str, str | None]:
        """A peer's body for round ``r`` into its key as float32, decoded inside the
        module: the same bits on every peer. Returns the key and, if it was refused,
        why: "nonfinite" for a body that decodes to a non-finite value (the sender
        is then proven Byzantine), "unstored" for any other refusal."""
        key = self.keys.peer(r, origin)
        try:
            await self._store_body(key, body)
        except NonFinite as e:
            log.warning("gradient from %s for round %d refused: %s", origin, r, e)
            return key, "nonfinite"
        except StoreError as e:
            # Not the sender's fault that we know of (Redis refused the write):
            # stop waiting for it this round, but prove nothing.
            log.warning("gradient from %s for round %d not stored: %s", origin, r, e)
            return key, "unstored"
        self._stored.setdefault(r, set()).add(key)
        return key, None

    async def _store_body(self, key: str, body: bytes) -> None:
        spec, store = self.spec, self.env.store
        if spec.compression == "none":
            await store.put(key, np.frombuffer(body, dtype="<f4"), scratch=True)
            return
        # SPIRT.UNPACK checks the size and every header itself (NonFinite, StoreError).
        wire = key + ":wire"
        try:
            await store.client.set(wire, body)
            await store.unpack(
                key, wire, fmt=spec.compression, count=spec.param_count, scratch=True
            )
        finally:
            await store.delete(wire)

    async def aggregate(self, a: Aggregate) -> bytes:
        """The round's aggregation, step, digest, mark and due checkpoint, with the
        state lock held; returns the new digest. ``a.f``: the round's Byzantine
        bound, lower than the job's when too few contributors are left for it (the
        machine decides from the contributor count, so it is the same on every
        honest peer with the same set)."""
        env, spec, keys = self.env, self.spec, self.keys
        r, contributors, f = a.round, a.contributors, a.f
        rule = self.rule if f is None or f == self.rule.f else replace(self.rule, f=f)
        me = env.node_id
        t0 = time.perf_counter()
        inputs = [keys.local(r) if c == me else keys.peer(r, c) for c in contributors]
        previous = keys.agg_prev if await env.store.exists(keys.agg_prev) else None
        await rule.run(env.store, keys.agg, inputs, previous=previous, scratch=True)
        t1 = time.perf_counter()
        if spec.inner_steps > 1:
            # The outer step: the robust aggregate of the Δs is a gradient of θ_r.
            await env.store.sgd(
                keys.theta,
                keys.agg,
                lr=spec.outer_lr,
                momentum=spec.outer_momentum,
                buf=keys.outer_buf if spec.outer_momentum > 0 else None,
                nesterov=spec.outer_momentum > 0,
                scratch=True,
            )
        else:
            await optimizer_step(
                env.store, spec, keys.theta, keys.agg, buf=keys.buf, m=keys.m, v=keys.v, step=r
            )
        if self.rule.keeps_previous:
            await env.store.mean(keys.agg_prev, [keys.agg], scratch=True)
        t2 = time.perf_counter()
        digest = await state.digest_of(env.store, self.job_id, spec, r)
        await self.stateio.mark_position(r, digest)
        t3 = time.perf_counter()
        stale = [k for rr in [x for x in self._stored if x <= r] for k in self._stored.pop(rr)]
        if stale:
            await env.store.delete(*stale)
        self.bodies.closed(r)
        timings = {"aggregation_s": t1 - t0, "update_s": t2 - t1, "digest_s": t3 - t2}
        closing = self.records.closing(r, timings)
        if a.checkpoint:
            c0 = time.perf_counter()
            await self.stateio.checkpoint_locked(r)
            closing.phases["checkpoint_s"] = time.perf_counter() - c0
        cost = self.compute.cost.round_json(r)
        self.records.record(r, closing, contributors, digest, t3 - t0, cost)
        return digest

    async def evaluate(self, r: int) -> None:
        params = await self.env.store.get(self.keys.theta)
        ev = await asyncio.to_thread(self.env.task.evaluate, params)
        self.records.evaluated(r, ev)

    def forget_body(self, round: int, origin: str) -> list[str]:
        """A refused gradient's key, if it was stored: for the caller to delete."""
        key = self.keys.peer(round, origin)
        stored = self._stored.get(round)
        if stored is not None and key in stored:
            stored.discard(key)
            return [key]
        return []

    def forget_before(self, round: int) -> list[str]:
        """The keys of rounds abandoned by a sync: for the caller to delete."""
        return [k for rr in [x for x in self._stored if x < round] for k in self._stored.pop(rr)]
