"""What this peer computes for a round, all inside its own Redis.

* the gradient of its minibatch: W functions on slices of it (drawn from job seed,
  round, inner step and node id), each writing to a key of its own
  (``StateKeys.fn_output``, the only keys the functions may write), then SPIRT.MEAN
  weighted by each slice's sample count;
* with H inner steps per round (outer rounds): H such gradients, each followed by
  the job's optimizer on this peer's own copy of θ_r, and then the pseudo-gradient
  Δ = θ_r − θ_{r,H};
* with compression, the encoded body (``StateKeys.wire``) and, in its place, what
  every peer decodes from it (SPIRT.PACK with this peer's error-feedback residual,
  then SPIRT.UNPACK).

The trainer tells the job machine what came of it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from spirtd.functions.cost import CostMeter
from spirtd.functions.event import DataSlice, GradientEvent
from spirtd.redis.store import TensorStore
from spirtd.training.job import JobSpec
from spirtd.training.state import StateKeys

if TYPE_CHECKING:
    from spirtd.training.trainer import TrainerEnv

log = logging.getLogger("spirtd.training")

SLICE_TTL_S = 600


class SlicesFailed(Exception):
    """Too few of a step's function slices succeeded: the round goes on without
    this peer's vector. ``warm``: some did (the functions are up)."""

    def __init__(self, detail: str, warm: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.warm = warm


@dataclass
class LocalVector:
    loss: float  # mean minibatch loss over the inner steps
    samples: int
    phases: dict[str, float] = field(default_factory=dict)


def minibatch_seed(job_seed: int, round: int, node_id: str, step: int | None = None) -> int:
    """The seed of this node's minibatch in ``round`` (and inner ``step`` of an outer
    round): fixed by the job, different per peer."""
    at = f"{round}" if step is None else f"{round}.{step}"
    h = hashlib.blake2b(f"{job_seed}:{at}:{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


class LocalCompute:
    def __init__(self, job_id: str, spec: JobSpec, env: TrainerEnv) -> None:
        self.job_id = job_id
        self.spec = spec
        self.env = env
        self.keys = StateKeys(job_id)
        self.inner_done = 0  # inner steps this peer ran (outer rounds)
        self.adam_step = 0  # the inner Adam's step count: this peer's own
        # What this peer's invocations of the job were billed, per round and in total.
        self.cost = CostMeter(env.prices)

    def events(
        self, r: int, step: int | None = None, params: str | None = None, *, warm: bool = False
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The W function events of round ``r``'s minibatch (of inner ``step``, on the
        parameters at ``params``), and the key each writes its slice's gradient to
        (``warm``: requests for a warm container only, see functions/event.py).
        Each key holds a fresh nonce: it is read once and deleted, and no other
        invocation (nor a replayed event) can know it."""
        env, spec = self.env, self.spec
        outputs = [
            self.keys.fn_output(r, i, secrets.token_hex(16))
            for i in range(spec.functions_per_round)
        ]
        data = DataSlice(
            shard=env.data.shard,
            batch_size=spec.batch_size,
            seed=minibatch_seed(spec.seed, r, env.node_id, step),
            slices=spec.functions_per_round,
            uri=env.data.uri,
        )
        events = [
            GradientEvent(
                job=self.job_id,
                round=r,
                slice=i,
                task=spec.task,
                task_options=spec.task_options,
                redis=env.redis_target,
                params_key=params or self.keys.theta,
                data=data,
                output_key=output,
                ttl_seconds=SLICE_TTL_S,
                warm=warm,
            ).to_json()
            for i, output in enumerate(outputs)
        ]
        return events, outputs

    async def warm_up(self, r: int, *, state: bool) -> bool:
        """One throwaway invocation per slice: did any succeed? Without the state in
        Redis (``state`` false: still syncing) a warm-only one (functions/event.py);
        with it, a full one, which also warms a function deployed before warm-only
        calls existed."""
        events, outputs = self.events(r, warm=not state)
        res = await self.env.invoker.invoke_round(events, self.env.invoke_timeout_s)
        self.cost.record(None, res.billed)
        if state:
            await self.env.store.delete(*outputs)
        return bool(res.succeeded)

    async def vector(self, r: int) -> LocalVector:
        """This peer's vector for round ``r`` into ``keys.local(r)``: its minibatch's
        gradient or, with H inner steps, θ_r − θ_{r,H}. Raises SlicesFailed."""
        env, spec, keys = self.env, self.spec, self.keys
        outer = spec.inner_steps > 1
        phases = {"functions_s": 0.0, "averaging_s": 0.0}
        losses: list[float] = []
        samples = 0
        if outer:
            # θ_r stays as agreed; the inner steps train this peer's copy of it.
            await env.store.mean(keys.inner_theta, [keys.theta], scratch=True)
        for step in range(spec.inner_steps):
            out = keys.inner_grad if outer else keys.local(r)
            params = keys.inner_theta if outer else keys.theta
            loss, n = await self._gradient(r, step if outer else None, params, out, phases)
            losses.append(loss)
            samples += n
            if outer:
                u0 = time.perf_counter()
                await self._inner_step(out)
                phases["inner_update_s"] = phases.get("inner_update_s", 0.0) + (
                    time.perf_counter() - u0
                )
                self.inner_done += 1
        if outer:
            # Δ = θ_r − θ_{r,H}: θ_r as a "parameter" stepped by θ_{r,H} at rate 1 is
            # exactly the float32 difference, without a command of its own.
            await env.store.mean(keys.local(r), [keys.theta], scratch=True)
            await env.store.sgd(keys.local(r), keys.inner_theta, lr=1.0, scratch=True)
        return LocalVector(float(np.mean(losses)), samples, phases)

    async def compress(self, r: int) -> None:
        """``keys.local(r)`` into the job's wire format at ``keys.wire(r)`` (carrying
        the residual of the last one), and back: our own contribution is what the
        others decode from our bytes."""
        env, spec, keys = self.env, self.spec, self.keys
        wire = keys.wire(r)
        await env.store.pack(
            wire, keys.local(r), fmt=spec.compression, residual=keys.residual, scratch=True
        )
        await env.store.unpack(
            keys.local(r), wire, fmt=spec.compression, count=spec.param_count, scratch=True
        )

    async def _gradient(
        self, r: int, step: int | None, params: str, out: str, phases: dict[str, float]
    ) -> tuple[float, int]:
        """W functions on this peer's minibatch of (round, step), averaged into
        ``out``: (mean loss, samples)."""
        env = self.env
        t0 = time.perf_counter()
        events, outputs = self.events(r, step, params)
        res = await env.invoker.invoke_round(events, env.invoke_timeout_s, env.min_slice_fraction)
        t1 = time.perf_counter()
        self.cost.record(r, res.billed)
        ok = res.succeeded
        for s in res.slices:
            if s.error is not None:
                env.counters["training.slice_failed"] += 1
                log.warning("round %d slice %d failed: %s", r, s.index, s.error)
        if not res.met_quorum or not ok:
            await env.store.delete(*outputs)
            raise SlicesFailed(f"{len(ok)} of {len(res.slices)} slices", warm=bool(ok))
        weights = [float(s.result["samples"]) for s in ok]  # type: ignore[index]
        # The functions cannot write the local gradient key: it is ours to fill.
        slice_keys = [outputs[s.index] for s in ok]
        await env.store.mean(out, slice_keys, weights=weights, scratch=True)
        await env.store.delete(*outputs)
        t2 = time.perf_counter()
        loss = sum(float(s.result["loss"]) * w for s, w in zip(ok, weights, strict=True))  # type: ignore[index]
        phases["functions_s"] += t1 - t0
        phases["averaging_s"] += t2 - t1
        return loss / sum(weights), int(sum(weights))

    async def _inner_step(self, grad: str) -> None:
        """The job's optimizer on this peer's own copy (its state is this peer's too)."""
        spec, keys, store = self.spec, self.keys, self.env.store
        if spec.optimizer == "adam":
            self.adam_step += 1
            if self.adam_step > 1 and not await store.exists(keys.inner_m):
                self.adam_step = 1  # its moments went with a Redis restart
        await optimizer_step(
            store,
            spec,
            keys.inner_theta,
            grad,
            buf=keys.inner_buf,
            m=keys.inner_m,
            v=keys.inner_v,
            step=self.adam_step,
        )


async def optimizer_step(
    store: TensorStore,
    spec: JobSpec,
    param: str,
    grad: str,
    *,
    buf: str,
    m: str,
    v: str,
    step: int,
) -> None:
    """The job's optimizer (SGD with its momentum buffer at ``buf``, or Adam with its
    moments at ``m``/``v`` at step ``step``) on ``param``, inside Redis: the update
    of a plain round, and each inner step of an outer one."""
    if spec.optimizer == "adam":
        await store.adam(
            param,
            grad,
            m=m,
            v=v,
            step=step,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            scratch=True,
        )
    else:
        await store.sgd(
            param,
            grad,
            lr=spec.lr,
            momentum=spec.momentum,
            buf=buf if spec.momentum > 0 else None,
            weight_decay=spec.weight_decay,
            scratch=True,
        )
