"""The trainer: one job on this node, the asyncio shell around protocol.rounds.JobMachine.

The job machine decides everything (the rounds, buffering, when and from where to
sync, following, resuming, exclusion); this file performs its actions and tells
it what happened, as aioquic's asyncio protocol does for its connection:

* ``InvokeFunctions``: W gradient functions on slices of this peer's minibatch,
  averaged in Redis into the local gradient (compute.py);
* ``PublishState`` / ``PublishGradient``: the heads-up and the gradient go out on
  the training topic (the body on the large-payload path);
* incoming gradients are checked by the machine before their bodies move, then
  written into Redis (non-finite values refused there) and counted;
* ``Aggregate``: the job's rule over the contributors in node-id order, the
  optimizer step, the new state digest and, on due rounds, the checkpoint, all
  inside Redis (one locked sequence: the state and its marks move together);
* ``Evaluate``: test accuracy on the due rounds;
* ``ReadLocalState`` / ``FetchState`` / ``LoadState`` / ``WarmUp`` /
  ``WriteGradient``: a sync pass's I/O and a follower's.

The I/O itself is in roundwork.py, stateio.py (sync, marks, checkpoints) and
conviction.py; records.py keeps the history, eventlog.py counts and logs the
events. Nothing blocks the loop: Redis calls are awaited, torch evaluation runs on
a thread, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import numpy as np

from protocol.gossip import Verdict
from protocol.rounds import (
    Aggregate,
    Evaluate,
    Excluded,
    FetchState,
    Finished,
    GradientRejected,
    InvokeFunctions,
    JobConfig,
    JobDone,
    JobFailed,
    JobMachine,
    Lifecycle,
    LoadState,
    PublishGradient,
    PublishState,
    ReadLocalState,
    Resumed,
    RoundClosed,
    RoundMachine,
    WarmUp,
    WriteGradient,
)
from spirtd import logs
from spirtd.pubsub.service import Info, Message
from spirtd.training.checkpoint import Snapshot, SnapshotError, read_snapshot
from spirtd.training.compute import LocalCompute, SlicesFailed
from spirtd.training.conviction import Conviction
from spirtd.training.eventlog import EventLog
from spirtd.training.evidence import NONFINITE, Evidence
from spirtd.training.job import JobSpec
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, StateMeta
from spirtd.training.records import RoundLog, RoundRecord
from spirtd.training.roundwork import RoundWork
from spirtd.training.state import StateKeys
from spirtd.training.stateio import REDIS_TROUBLE, StateIO
from spirtd.training.trainerenv import GradientPublisher, GradientSource, TrainerEnv

__all__ = ["GradientPublisher", "GradientSource", "RoundRecord", "Trainer", "TrainerEnv"]

log = logging.getLogger("spirtd.training")

TICK_MAX_S = 1.0  # the timer wakes at least this often, deadline or not


class Trainer:
    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        env: TrainerEnv,
        members: list[str],
        on_finish: Callable[[Trainer], None],
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.env = env
        self.keys = StateKeys(job_id)
        self.rule = spec.rule
        # The round machine, for inspection (``train status``); the job machine drives it.
        self.m = RoundMachine(
            self_id=env.node_id,
            job_id=job_id,
            rounds=spec.rounds,
            min_contributors=self.rule.min_peers(),
            eval_every=spec.eval_every,
            param_count=spec.param_count,
            members=members,
            config=env.round_config.for_inner_steps(spec.inner_steps),
            f=spec.f,
            min_for_f=lambda f: replace(self.rule, f=f).min_peers(),
            body_size=spec.body_size,
        )
        self.job = JobMachine(
            self.m, f=spec.f, config=JobConfig(checkpoint_every=env.checkpoint_every)
        )
        self.compute = LocalCompute(job_id, spec, env)
        self.records = RoundLog(spec, env)
        self.history: deque[RoundRecord] = self.records.history
        self.stateio = StateIO(job_id, spec, env, self.compute)
        self.work = RoundWork(job_id, spec, env, self.compute, self.stateio, self.records)
        self.conviction = Conviction(job_id, spec, env)
        self.eventlog = EventLog(job_id, env)
        self._on_finish = on_finish
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()

    # --- what the node reads -------------------------------------------------------------

    @property
    def state(self) -> Lifecycle:
        return self.job.lifecycle

    @property
    def detail(self) -> str:
        return self.job.detail

    @property
    def digest(self) -> bytes:
        return self.job.digest

    @property
    def completed(self) -> int:
        return self.job.completed

    @property
    def excluded(self) -> dict[str, dict[str, Any]]:
        return self.job.excluded

    @property
    def last_accuracy(self) -> float | None:
        return self.records.last_accuracy

    def status(self) -> dict[str, Any]:
        st = self.job.status() | self.records.status()
        return st | {"inner_steps_run": self.compute.inner_done}  # outer rounds: run here

    async def snapshot(self) -> Snapshot | None:
        """Our state now, for a peer that syncs from us; None while we have none."""
        if self.state not in (Lifecycle.RUNNING, Lifecycle.DONE) or not self.digest:
            return None
        async with self.stateio.lock:
            return await read_snapshot(self.env.store, self.job_id, self.spec, self.completed)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, initial: np.ndarray) -> None:
        """A new job: round 1 from the job's initial parameters."""
        digest = await self.stateio.initialise(initial)
        self.job.start(digest, time.monotonic())
        self._start_loop()

    async def start_elsewhere(self, why: str) -> None:
        """A job already under way (a late join, a restart): establish the state from
        this node's Redis or checkpoint if they still fit, else from the peers."""
        self._start_loop()
        self.job.start_elsewhere(why, time.monotonic())
        self._kick()

    async def stop(self, why: str) -> None:
        save = self.job.stop(why)
        tasks = [*self._work, *(x for x in (self._loop_task,) if x is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if save:
            with contextlib.suppress(*REDIS_TROUBLE, SnapshotError):
                async with self.stateio.lock:
                    await self.stateio.checkpoint_locked(self.completed)

    async def _run(self) -> None:
        # A done trainer keeps listening: a split in the last round shows in the final
        # positions the others announce, and is repaired like any other.
        while self.state in (Lifecycle.RUNNING, Lifecycle.SYNCING, Lifecycle.DONE):
            self._pump()
            dl = self.job.next_deadline()
            wait = TICK_MAX_S if dl is None else min(TICK_MAX_S, max(0.0, dl - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            self.job.tick(time.monotonic())

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str, round: int | None = None) -> None:
        # Its log lines carry the job and, for a round's work, the round.
        ctx = logs.task_context(job=self.job_id[:12], round=round)
        t = asyncio.create_task(coro, name=name, context=ctx)
        self._work.add(t)
        t.add_done_callback(self._work_done)

    def _delete(self, keys: list[str], name: str) -> None:
        if keys:
            self._spawn(self.env.store.delete(*keys), name)

    def _start_loop(self) -> None:
        ctx = logs.task_context(job=self.job_id[:12])
        self._loop_task = asyncio.create_task(
            self._run(), name=f"trainer-{self.job_id[:8]}", context=ctx
        )

    def _work_done(self, t: asyncio.Task[None]) -> None:
        self._work.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None:
            return
        name, now = t.get_name(), time.monotonic()
        if name.startswith("sync-"):
            log.warning("%s failed: %s", name, exc)
            self.job.sync_trouble(f"{name}: {exc}", now)
        elif isinstance(exc, REDIS_TROUBLE) and self.state is Lifecycle.RUNNING:
            self.env.counters["training.redis_trouble"] += 1
            log.warning("%s: %s; re-establishing the state", name, exc)
            self.job.redis_trouble(f"redis trouble during {name}: {exc}", now)
        elif name.startswith("evaluate-"):
            log.warning("%s failed: %s", name, exc)
        else:
            self.job.fail(f"{name} failed: {exc}", now)
        self._kick()

    def _kick(self) -> None:
        self._pump()
        self._wake.set()

    # --- the machine's actions and events --------------------------------------------------

    def _pump(self) -> None:
        while True:
            actions, events = self.job.drain_actions(), self.job.drain_events()
            if not actions and not events:
                return
            for a in actions:
                self._perform(a)
            for ev in events:
                self._on_event(ev)

    def _perform(self, a: Any) -> None:
        if isinstance(a, InvokeFunctions):
            self._spawn(self._compute(a.round), f"compute-{a.round}", a.round)
        elif isinstance(a, PublishState):
            meta = StateMeta(self.job_id, a.round, a.digest, a.participating).encode()
            heads_up = self.env.pubsub.publish(TRAIN_TOPIC, b"", meta=meta)
            self._spawn(heads_up, f"heads-up-{a.round}", a.round)
        elif isinstance(a, PublishGradient):
            self._spawn(
                self._publish_gradient(a.round, a.base_digest), f"publish-{a.round}", a.round
            )
        elif isinstance(a, Aggregate):
            self._spawn(self._aggregate(a), f"aggregate-{a.round}", a.round)
        elif isinstance(a, Evaluate):
            self._spawn(self.work.evaluate(a.round), f"evaluate-{a.round}", a.round)
        elif isinstance(a, Finished):
            self._spawn(self._finish(), f"finish-{a.round}", a.round)
        elif isinstance(a, WriteGradient):
            msg, meta = a.handle  # type: ignore[misc]
            self._spawn(self.deliver(msg, meta), f"replay-{a.round}", a.round)
        elif isinstance(a, WarmUp):
            self._spawn(self._warm_up(a.round), "warm-up")
        elif isinstance(a, ReadLocalState):
            self._spawn(self._read_local_state(), "sync-local")
        elif isinstance(a, FetchState):
            self._spawn(self._fetch(a), f"sync-fetch-{a.peer[:8]}")
        elif isinstance(a, LoadState):
            self._spawn(self._load(a), "sync-load")

    def _on_event(self, ev: Any) -> None:
        self.eventlog.report(ev, self.digest, self.records.last_accuracy)
        if isinstance(ev, RoundClosed):
            self.records.closed[ev.round] = (ev, time.monotonic(), self.m.deadline_s)
        elif isinstance(ev, GradientRejected):
            self._delete(self.work.forget_body(ev.round, ev.origin), f"forget-{ev.round}")
        elif isinstance(ev, Resumed):
            # Rounds abandoned by a sync leave no per-round records behind.
            self.records.forget_before(ev.round)
            self._delete(self.work.forget_before(ev.round), "forget-abandoned")
        elif isinstance(ev, Excluded):
            self.conviction.excluded(ev)
        elif isinstance(ev, (JobDone, JobFailed)):
            self._wake.set()
            self._on_finish(self)

    # --- inputs from the node -------------------------------------------------------------

    def member_alive(self, node_id: str) -> None:
        self.job.member_alive(node_id, time.monotonic())
        self._kick()

    def member_gone(self, node_id: str) -> None:
        self.job.member_gone(node_id, time.monotonic())
        self._kick()

    def validate(self, info: Info, meta: GradientMeta | StateMeta) -> Verdict:
        """The pub/sub validation hook: runs on the announcement, before any body byte."""
        if isinstance(meta, StateMeta):
            return Verdict.ACCEPT if info.size == 0 else Verdict.REJECT
        proof = self.conviction.see(info, meta, self.excluded, self.job.rounds.round)
        if proof is not None:
            self.convict(proof, "detected")
            return Verdict.IGNORE
        verdict = self.job.validate_gradient(
            info.origin, meta.job, meta.round, meta.base_digest, info.size, time.monotonic()
        )
        if verdict is Verdict.ACCEPT:
            self.conviction.pulled(info)
        self._kick()
        return verdict

    async def deliver(self, msg: Message, meta: GradientMeta | StateMeta) -> None:
        job = self.job
        if isinstance(meta, StateMeta):
            job.announce(
                msg.origin, meta.job, meta.round, meta.digest, meta.participating, time.monotonic()
            )
            self._kick()
            return
        r = meta.round
        if not job.gradient_arrived(
            msg.origin, meta.job, r, meta.base_digest, msg.size, (msg, meta), time.monotonic()
        ):
            return  # held by the machine; it comes back as WriteGradient once it fits
        self.work.bodies.add(r, msg.msg_id)
        body = await msg.read()
        key, refused = await self.work.store_body(r, msg.origin, body)
        if refused is not None:
            job.gradient_refused(msg.origin, r, refused, time.monotonic())
            if refused == "nonfinite":
                self._convict_nonfinite(msg, r, body)
            else:
                self._kick()
            return
        reason = job.gradient_stored(
            msg.origin, meta.job, r, meta.base_digest, msg.size, time.monotonic()
        )
        if reason is None:
            self.records.losses.setdefault(r, {})[msg.origin] = meta.loss
        else:
            await self.env.store.delete(key)
        self._kick()

    # --- proven Byzantine ---------------------------------------------------------------------

    def convict(self, proof: Evidence, how: str) -> None:
        """``proof.offender`` is proven Byzantine (it signed two gradients for one
        round, or a non-finite one). ``how``: "detected" here (the proof is then
        gossiped) or "evidence" (checked proof from a peer)."""
        fresh = self.job.convict(proof.offender, proof.round, proof.kind, how, time.monotonic())
        if fresh:
            self.conviction.keep(proof)
            if how == "detected":
                self._spawn(self.conviction.gossip(proof), f"evidence-{proof.round}")
        self._kick()

    def state_served(self) -> None:
        """A peer synced from us: it missed what happened before, the proofs among it
        (those who know the offender already ignore them unread)."""
        for proof in self.conviction.proofs.values():
            self._spawn(self.conviction.gossip(proof), f"evidence-again-{proof.round}")

    def validate_evidence(self, info: Info) -> Verdict:
        """The hook for the evidence topic: pull a proof only if it is news."""
        return self.conviction.admit(info, self.excluded)

    async def deliver_evidence(self, msg: Message) -> None:
        proof = await self.conviction.read(msg)
        if proof is not None:
            self.convict(proof, "evidence")

    def _convict_nonfinite(self, msg: Message, r: int, body: bytes) -> None:
        """A signed gradient with a NaN or an infinity in it: no honest peer sends
        one, so its origin is out for the rest of the job, here at once and, through
        the proof, at every peer (also those that closed the round before pulling
        it, and would otherwise go on waiting for the liar in later rounds)."""
        proof = self.conviction.nonfinite(msg, r, body)
        if proof is None:
            self.job.convict(msg.origin, r, NONFINITE, "detected", time.monotonic())
            self._kick()
        else:
            self.convict(proof, "detected")

    # --- a round's work -----------------------------------------------------------------

    async def _warm_up(self, r: int) -> None:
        """After a restart or a join the local functions are cold (worker start,
        imports, dataset load: seconds). One throwaway invocation warms them, so the
        first round this node computes does not miss its deadline: warm-only while
        it syncs (no parameters in Redis yet), a full one once it follows."""
        try:
            warm = await self.compute.warm_up(r, state=self.state is not Lifecycle.SYNCING)
        except BaseException:
            self.job.warm_up_done(False, time.monotonic())
            raise
        self.job.warm_up_done(warm, time.monotonic())
        self._kick()

    async def _compute(self, r: int) -> None:
        try:
            v = await self.work.local_gradient(r)
        except SlicesFailed as e:
            self.job.local_gradient_failed(r, e.detail, time.monotonic(), warm=e.warm)
            self._kick()
            return
        if self.env.gradient_source is not None:
            # Before the machine hears of it: the round cannot close on this peer
            # until the gradient it publishes is the one in Redis.
            await self.env.gradient_source(self, r)
        await self.work.compress(r, v)
        self.job.local_gradient_ready(r, time.monotonic())
        self._kick()

    async def _publish_gradient(self, r: int, base: bytes) -> None:
        seam = self.env.gradient_publisher
        publisher = None if seam is None else functools.partial(seam, self, r)
        # The meta before the first await (see RoundWork.publish_gradient).
        await self.work.publish_gradient(r, self.work.gradient_meta(r, base), publisher)

    async def _aggregate(self, a: Aggregate) -> None:
        async with self.stateio.lock:
            digest = await self.work.aggregate(a)
            self.job.aggregated(a.round, digest, time.monotonic())
            self._kick()

    async def _finish(self) -> None:
        # The last round always evaluates; wait for it before saying done.
        pending = [t for t in self._work if t.get_name().startswith("evaluate-")]
        await asyncio.gather(*pending, return_exceptions=True)
        self.job.done(time.monotonic())
        self._kick()

    # --- a sync pass's I/O ------------------------------------------------------------------

    async def _read_local_state(self) -> None:
        redis, checkpoint = await self.stateio.read_local(self.job)
        self.job.local_state(redis, checkpoint, time.monotonic())
        self._kick()

    async def _fetch(self, a: FetchState) -> None:
        got = await self.stateio.fetch(a)
        if isinstance(got, str):
            self.job.fetch_failed(a.peer, got, time.monotonic())
        else:
            self.job.state_fetched(a.peer, got.completed, got.digest, time.monotonic())
        self._kick()

    async def _load(self, a: LoadState) -> None:
        snap = await self.stateio.load(a)
        self.job.state_loaded(a.source, snap.completed, snap.digest, time.monotonic())
        self._kick()
