"""The trainer: one job on this node, the asyncio shell around protocol.rounds.JobMachine.

The job machine decides everything (the rounds, buffering, when and from where to
sync, following, resuming, exclusion); this file performs its actions and tells
it what happened, as aioquic's asyncio protocol does for its connection:

* ``InvokeFunctions``: W gradient functions on slices of this peer's minibatch
  (drawn from job seed, round and node id), each writing to a key of its own
  (StateKeys.fn_output, the only keys the functions may write), then SPIRT.MEAN
  weighted by each slice's sample count gives the local gradient;
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

Nothing here blocks the loop: Redis calls are awaited, torch evaluation runs on
a thread, and every wait is bounded.

Every tensor a round writes (gradients, aggregate, the updated state) is SCRATCH:
Redis keeps it out of its AOF. Writing the gradients there cost Redis more CPU than
all its tensor work, and the state would put the whole model on disk every round.
The state is made durable by the checkpoints (every ``checkpoint_every`` rounds and
at stop) and by the peers; after a restart of Redis it is taken from there.

Seams: ``TrainerEnv.gradient_source`` may replace the local gradient before the
machine hears it is ready, and ``TrainerEnv.gradient_publisher`` publishes it (the
Byzantine experiments plug in there; the honest daemon leaves both unset).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from protocol.errors import DecodeError
from protocol.gossip import Verdict
from protocol.rounds import (
    CHECKPOINT,
    Aggregate,
    CaughtUp,
    Diverged,
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
    LeftView,
    Lifecycle,
    LoadState,
    PublishGradient,
    PublishState,
    QuorumWait,
    ReadLocalState,
    Resumed,
    RoundClosed,
    RoundConfig,
    RoundMachine,
    StateLoaded,
    StateUnvouched,
    SyncStarted,
    Unfollowed,
    WarmUp,
    WriteGradient,
)
from spirtd import logs, metrics
from spirtd.config import BODY_ROUNDS
from spirtd.functions.cost import Prices
from spirtd.functions.event import DataSlice, RedisTarget
from spirtd.functions.invoker import Invoker
from spirtd.pubsub.retention import RoundBodies
from spirtd.pubsub.service import Info, Message, PubSub
from spirtd.redis.store import NonFinite, StoreError, TensorNotFound, TensorStore
from spirtd.tasks import Task
from spirtd.training import state
from spirtd.training.checkpoint import (
    Checkpoints,
    Snapshot,
    SnapshotError,
    load_snapshot,
    max_encoded_size,
    read_snapshot,
)
from spirtd.training.compute import (
    LocalCompute,
    SlicesFailed,
    optimizer_step,
)
from spirtd.training.evidence import (
    EQUIVOCATION,
    EVIDENCE_TOPIC,
    MAX_EVIDENCE,
    NONFINITE,
    Evidence,
    EvidenceError,
    Ledger,
    decode_evidence_meta,
    nonfinite_proof,
)
from spirtd.training.evidence import verify as verify_evidence
from spirtd.training.job import JobSpec
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, StateMeta
from spirtd.training.state import StateKeys
from spirtd.training.statesync import Position, StateSync, SyncError

log = logging.getLogger("spirtd.training")

HISTORY_MAX = 2000  # rounds kept for `train status`
TICK_MAX_S = 1.0  # the timer wakes at least this often, deadline or not
REDIS_WAIT_S = 1.0  # between pings while this node's Redis is away
# Trouble with this node's Redis (down, restarted, flushed): the round's work is
# abandoned and the state re-established from Redis, a checkpoint, or the peers.
REDIS_TROUBLE = (OSError, TimeoutError, StoreError, RedisError)

# The seams (see the module docstring). A gradient source runs once this node's
# honest gradient for the round is in Redis (StateKeys.local) and may rewrite it; a
# publisher sends the gradient's body with its encoded GradientMeta.
GradientSource = Callable[["Trainer", int], Awaitable[None]]
GradientPublisher = Callable[["Trainer", int, bytes, GradientMeta], Awaitable[None]]


@dataclass
class TrainerEnv:
    """What a trainer needs of the node: the other services and this node's facts."""

    node_id: str
    store: TensorStore
    invoker: Invoker
    pubsub: PubSub
    redis_target: RedisTarget
    data: DataSlice  # shard and dataset location; seed and batch are filled per round
    task: Task  # this node's instance, for evaluation
    invoke_timeout_s: float
    min_slice_fraction: float
    round_config: RoundConfig
    sync: StateSync
    checkpoints: Checkpoints
    checkpoint_every: int
    sync_timeout_s: float
    counters: Counter[str] = field(default_factory=Counter)
    # (kind, detail): what the job's event log (train status, the report) shows.
    note: Callable[[str, str], None] = lambda kind, detail: None
    gradient_source: GradientSource | None = None
    gradient_publisher: GradientPublisher | None = None
    prices: Prices | None = None  # of function invocations (None: Lambda's x86_64)
    # (in, out) bytes over this node's peer links so far (a history row's wire bytes).
    wire_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)
    body_rounds: int = BODY_ROUNDS  # a closed round's bodies are released this many rounds on


@dataclass
class RoundRecord:
    round: int
    contributors: list[str]
    duration_s: float
    closed_by: str
    loss: float | None
    model_digest: str
    accuracy: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    wait_s: float = 0.0  # round begin to close: what the deadline bounds
    deadline_s: float = 0.0
    closed_at: float = field(default_factory=time.time)  # wall clock, for plots against time
    # Each contributor's minibatch loss, as its gradient message reported it.
    peer_losses: dict[str, float] = field(default_factory=dict)
    inner_steps: int = 1
    bytes_sent: int = 0  # over this node's peer links since the previous round closed
    bytes_received: int = 0
    cost: dict[str, Any] | None = None  # this peer's invocations for the round

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "contributors": self.contributors,
            "duration_s": round(self.duration_s, 4),
            "model_digest": self.model_digest,
            "closed_by": self.closed_by,
            "wait_s": round(self.wait_s, 4),
            "deadline_s": round(self.deadline_s, 3),
            "closed_at": round(self.closed_at, 3),
            "peer_losses": {k: round(v, 6) for k, v in self.peer_losses.items()},
            "inner_steps": self.inner_steps,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "cost": self.cost,
            "phases": {k: round(v, 5) for k, v in self.phases.items()},
        }


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
        self.history: deque[RoundRecord] = deque(maxlen=HISTORY_MAX)
        self.last_accuracy: float | None = None
        self.ledger = Ledger(job_id)  # first gradient announcement per (origin, round)
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
        self._samples = 0  # this node's sample count in its current gradient
        self.compute = LocalCompute(job_id, spec, env)
        self._wire_at = env.wire_bytes()  # link bytes when the last round closed
        self._state_lock = asyncio.Lock()  # state in Redis and its marks move together
        self._on_finish = on_finish
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()
        # A sync pass's state in hand: the newest checkpoint read, the download.
        self._checkpoint_read: Snapshot | None = None
        self._fetched: Snapshot | None = None
        # Per round: losses reported by contributors, phase timings, stored keys.
        self._losses: dict[int, dict[str, float]] = {}
        self._phases: dict[int, dict[str, float]] = {}
        self._stored: dict[int, set[str]] = {}
        # Closed rounds: the event, when we saw it, and the deadline the round had.
        self._closed: dict[int, tuple[RoundClosed, float, float]] = {}
        self._records: dict[int, RoundRecord] = {}
        # Gradient message ids per round (received and ours), released from the body
        # store once the round is body_rounds behind: retain_s would keep hundreds.
        self._bodies = RoundBodies(env.pubsub.release, env.body_rounds)

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

    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return self.job.status() | {
            "loss": last.loss if last else None,
            "accuracy": self.last_accuracy,
            "inner_steps_run": self.compute.inner_done,  # outer rounds: run by this peer
        }

    async def snapshot(self) -> Snapshot | None:
        """Our state now, for a peer that syncs from us; None while we have none."""
        if self.state not in (Lifecycle.RUNNING, Lifecycle.DONE) or not self.digest:
            return None
        async with self._state_lock:
            return await read_snapshot(self.env.store, self.job_id, self.spec, self.completed)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, initial: np.ndarray) -> None:
        """A new job: round 1 from the job's initial parameters."""
        async with self._state_lock:
            await state.initialise(self.env.store, self.job_id, self.spec, initial)
            digest = await state.digest_of(self.env.store, self.job_id, self.spec, 0)
            await self._mark_position(0, digest)
        self.job.start(digest, time.monotonic())
        self._loop_task = asyncio.create_task(
            self._run(), name=f"trainer-{self.job_id[:8]}", context=self._log_context()
        )

    async def start_elsewhere(self, why: str) -> None:
        """A job already under way (a late join, a restart): establish the state from
        this node's Redis or checkpoint if they still fit, else from the peers."""
        self._loop_task = asyncio.create_task(
            self._run(), name=f"trainer-{self.job_id[:8]}", context=self._log_context()
        )
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
                async with self._state_lock:
                    await self._checkpoint_locked(self.completed)

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

    def _spawn(self, coro: Any, name: str, round: int | None = None) -> None:
        # Its log lines carry the job and, for a round's work, the round.
        ctx = logs.task_context(job=self.job_id[:12], round=round)
        t = asyncio.create_task(coro, name=name, context=ctx)
        self._work.add(t)
        t.add_done_callback(self._work_done)

    def _log_context(self) -> contextvars.Context:
        return logs.task_context(job=self.job_id[:12])

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
            self._spawn(self._publish(b"", meta), f"heads-up-{a.round}", a.round)
        elif isinstance(a, PublishGradient):
            self._spawn(
                self._publish_gradient(a.round, a.base_digest), f"publish-{a.round}", a.round
            )
        elif isinstance(a, Aggregate):
            self._spawn(self._aggregate(a), f"aggregate-{a.round}", a.round)
        elif isinstance(a, Evaluate):
            self._spawn(self._evaluate(a.round), f"evaluate-{a.round}", a.round)
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
        c = self.env.counters
        if isinstance(ev, RoundClosed):
            self._closed[ev.round] = (ev, time.monotonic(), self.m.deadline_s)
            c[f"training.rounds_closed.{ev.reason}"] += 1
        elif isinstance(ev, GradientRejected):
            c[f"training.gradient_rejected.{ev.reason}"] += 1
            log.debug("gradient from %s for round %d rejected: %s", ev.origin, ev.round, ev.reason)
            self._forget_body(ev.round, ev.origin)
        elif isinstance(ev, Diverged):
            c["training.diverged_peers"] += 1
            log.warning(
                "peer %s holds another model at round %d (digest %s, ours %s)",
                ev.origin,
                ev.round,
                ev.digest.hex()[:12],
                self.digest.hex()[:12],
            )
        elif isinstance(ev, QuorumWait):
            c["training.quorum_waits"] += 1
            log.warning(
                "round %d: deadline passed with %d of the %d gradients a quorum needs; waiting",
                ev.round,
                ev.have,
                ev.need,
            )
        elif isinstance(ev, LeftView):
            c[f"training.left_view.{ev.why}"] += 1
            log.info("round %d: no longer waiting for %s (%s)", ev.round, ev.node_id, ev.why)
        elif isinstance(ev, SyncStarted):
            log.warning("job %s: syncing state (%s)", self.job_id[:12], ev.why)
            c["training.syncs_started"] += 1
            self.env.note("sync_started", ev.why)
        elif isinstance(ev, StateLoaded):
            self._on_loaded(ev)
        elif isinstance(ev, StateUnvouched):
            c["training.sync_unvouched"] += 1
            log.warning(
                "state from %s (round %d) is not vouched for by f+1 peers; not loaded",
                ev.peer,
                ev.completed,
            )
        elif isinstance(ev, Resumed):
            self._forget_before(ev.round)
        elif isinstance(ev, CaughtUp):
            log.info("caught up at round %d; contributing from round %d", ev.round - 1, ev.round)
        elif isinstance(ev, Unfollowed):
            c["training.unfollowed"] += 1
            log.info("round %d: no one is computing it; computing it here", ev.round)
        elif isinstance(ev, Excluded):
            self._on_excluded(ev)
        elif isinstance(ev, JobDone):
            if ev.via == "run":
                log.info(
                    "job %s done after %d rounds: accuracy=%s digest=%s",
                    self.job_id[:12],
                    ev.round,
                    "-" if self.last_accuracy is None else f"{self.last_accuracy:.4f}",
                    self.digest.hex()[:12],
                )
            self._wake.set()
            self._on_finish(self)
        elif isinstance(ev, JobFailed):
            log.error("job %s failed: %s", self.job_id[:12], ev.why)
            self._wake.set()
            self._on_finish(self)

    def _on_loaded(self, ev: StateLoaded) -> None:
        c = self.env.counters
        if ev.source == CHECKPOINT:
            log.info("state from checkpoint: round %d", ev.completed)
            c["training.checkpoint_loads"] += 1
            return
        c["training.syncs_done"] += 1
        self.env.note("synced", f"round {ev.completed} from {ev.source}")
        log.info(
            "synced job %s state from %s: round %d, digest %s",
            self.job_id[:12],
            ev.source,
            ev.completed,
            ev.digest.hex()[:12],
        )

    def _forget_before(self, round: int) -> None:
        """Rounds abandoned by a sync leave no per-round records behind."""
        for per_round in (self._losses, self._phases, self._closed, self._records):
            for old in [k for k in per_round if k < round]:
                del per_round[old]
        stale = [k for rr in [x for x in self._stored if x < round] for k in self._stored.pop(rr)]
        if stale:
            self._spawn(self.env.store.delete(*stale), "forget-abandoned")

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
        if info.origin not in self.excluded:
            proof = self.ledger.see(
                info.origin, meta.round, meta.base_digest, info.digest, info.size, info.wire
            )
            if proof is not None:
                self.convict(proof, "detected")
                return Verdict.IGNORE
        else:
            # Excluded origins are the machine's verdict; counted here as before.
            wrong = info.size != self.spec.body_size
            self.env.counters[f"training.gradient_rejected.{'size' if wrong else 'excluded'}"] += 1
        verdict = self.job.validate_gradient(
            info.origin, meta.job, meta.round, meta.base_digest, info.size, time.monotonic()
        )
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
        self._bodies.add(r, msg.msg_id)
        key = self.keys.peer(r, msg.origin)
        body = await msg.read()
        try:
            await self._store_body(key, body)
        except NonFinite as e:
            log.warning("gradient from %s for round %d refused: %s", msg.origin, r, e)
            job.gradient_refused(msg.origin, r, "nonfinite", time.monotonic())
            self._convict_nonfinite(msg, r, body)
            return
        except StoreError as e:
            # Not the sender's fault that we know of (Redis refused the write):
            # stop waiting for it this round, but prove nothing.
            log.warning("gradient from %s for round %d not stored: %s", msg.origin, r, e)
            job.gradient_refused(msg.origin, r, "unstored", time.monotonic())
            self._kick()
            return
        self._stored.setdefault(r, set()).add(key)
        reason = job.gradient_stored(
            msg.origin, meta.job, r, meta.base_digest, msg.size, time.monotonic()
        )
        if reason is None:
            self._losses.setdefault(r, {})[msg.origin] = meta.loss
        else:
            await self.env.store.delete(key)
        self._kick()

    async def _store_body(self, key: str, body: bytes) -> None:
        """A peer's body into ``key`` as float32: decoded inside the module, the same
        bits on every peer. Raises NonFinite for a body that decodes to a non-finite
        value (the sender is then proven Byzantine), StoreError otherwise."""
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

    def _forget_body(self, round: int, origin: str) -> None:
        key = self.keys.peer(round, origin)
        stored = self._stored.get(round)
        if stored is not None and key in stored:
            stored.discard(key)
            self._spawn(self.env.store.delete(key), f"forget-{round}")

    # --- proven Byzantine ---------------------------------------------------------------------

    def convict(self, proof: Evidence, how: str) -> None:
        """``proof.offender`` is proven Byzantine (it signed two gradients for one
        round, or a non-finite one). ``how``: "detected" here (the proof is then
        gossiped) or "evidence" (checked proof from a peer)."""
        fresh = self.job.convict(proof.offender, proof.round, proof.kind, how, time.monotonic())
        if fresh and how == "detected":
            self._spawn(
                self.env.pubsub.publish(EVIDENCE_TOPIC, proof.encode(), meta=proof.meta()),
                f"evidence-{proof.round}",
            )
        self._kick()

    def _on_excluded(self, ev: Excluded) -> None:
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

    def validate_evidence(self, info: Info) -> Verdict:
        """The hook for the evidence topic: pull a proof only if it is news."""
        try:
            job, offender, _ = decode_evidence_meta(info.meta)
        except DecodeError:
            return Verdict.REJECT
        if info.size > MAX_EVIDENCE:
            return Verdict.REJECT
        if job != self.job_id or offender in self.excluded or offender == self.env.node_id:
            return Verdict.IGNORE
        return Verdict.ACCEPT

    async def deliver_evidence(self, msg: Message) -> None:
        data = await msg.read()
        try:
            proof = verify_evidence(
                data,
                self.job_id,
                self.env.pubsub.config,
                self.spec.compression,
                self.spec.param_count,
            )
        except (EvidenceError, DecodeError) as e:
            self.env.counters["training.evidence_invalid"] += 1
            log.warning("equivocation evidence from %s refused: %s", msg.origin, e)
            return
        self.convict(proof, "evidence")

    def _convict_nonfinite(self, msg: Message, r: int, body: bytes) -> None:
        """A signed gradient with a NaN or an infinity in it: no honest peer sends
        one, so its origin is out for the rest of the job, here at once and, through
        the proof, at every peer (also those that closed the round before pulling
        it, and would otherwise go on waiting for the liar in later rounds)."""
        envelope = self.ledger.envelope(msg.origin, r, msg.msg_id)
        proof = None
        if envelope is not None:
            proof = nonfinite_proof(
                msg.origin,
                self.job_id,
                r,
                envelope,
                body,
                msg.body.chunk_size,
                self.spec.compression,
                self.spec.param_count,
            )
        if proof is None:
            self.job.convict(msg.origin, r, NONFINITE, "detected", time.monotonic())
            self._kick()
        else:
            self.convict(proof, "detected")

    # --- a round's work -----------------------------------------------------------------

    async def _publish(self, body: bytes, meta: bytes) -> None:
        await self.env.pubsub.publish(TRAIN_TOPIC, body, meta=meta)

    async def _warm_up(self, r: int) -> None:
        """After a restart or a join the local functions are cold (worker start,
        imports, dataset load: seconds). One throwaway invocation while following
        warms them, so the first round this node computes does not miss its deadline."""
        try:
            warm = await self.compute.warm_up(r)
        except BaseException:
            self.job.warm_up_done(False, time.monotonic())
            raise
        self.job.warm_up_done(warm, time.monotonic())
        self._kick()

    async def _compute(self, r: int) -> None:
        env, keys = self.env, self.keys
        try:
            v = await self.compute.vector(r)
        except SlicesFailed as e:
            self.job.local_gradient_failed(r, e.detail, time.monotonic(), warm=e.warm)
            self._kick()
            return
        self._stored.setdefault(r, set()).add(keys.local(r))
        self._losses.setdefault(r, {})[env.node_id] = v.loss
        self._phases[r] = v.phases
        self._samples = v.samples
        if env.gradient_source is not None:
            # Before the machine hears of it: the round cannot close on this peer
            # until the gradient it publishes is the one in Redis.
            await env.gradient_source(self, r)
        if self.spec.compression != "none":
            c0 = time.perf_counter()
            self._stored[r].add(keys.wire(r))
            await self.compute.compress(r)
            v.phases["compression_s"] = time.perf_counter() - c0
        self.job.local_gradient_ready(r, time.monotonic())
        self._kick()

    def gradient_meta(self, r: int, base: bytes) -> GradientMeta:
        return GradientMeta(self.job_id, r, base, self._samples, self._losses[r][self.env.node_id])

    async def _publish_gradient(self, r: int, base: bytes) -> None:
        # Everything about round r is read before the first await: when our gradient
        # is the last one the round waited for, the round closes (and its records
        # are dropped by the aggregation) while the body is still being fetched.
        meta = self.gradient_meta(r, base)
        phases = self._phases.get(r, {})
        t0 = time.perf_counter()
        key = self.keys.local(r) if self.spec.compression == "none" else self.keys.wire(r)
        body = await self.env.store.client.get(key)
        if body is None:
            # It is scratch: a Redis that restarted since it was written lost it. Redis
            # trouble, handled as such (the state is re-established), not a failed job.
            raise TensorNotFound(f"local gradient for round {r} vanished from Redis")
        if self.env.gradient_publisher is not None:
            await self.env.gradient_publisher(self, r, body, meta)
        else:
            sent = await self.env.pubsub.publish(TRAIN_TOPIC, body, meta=meta.encode())
            if sent:
                self._bodies.add(r, bytes.fromhex(sent["msg_id"]))
        phases["publish_s"] = time.perf_counter() - t0
        # A round that closed during the publish has its record made already (holding
        # this dict): the internal timestamp must not land in its history.
        if self._phases.get(r) is phases:
            phases["ready_at"] = time.monotonic()

    async def _aggregate(self, a: Aggregate) -> None:
        async with self._state_lock:
            await self._aggregate_locked(a)

    async def _aggregate_locked(self, a: Aggregate) -> None:
        """``a.f``: the round's Byzantine bound, lower than the job's when too few
        contributors are left for it (the machine decides from the contributor
        count, so it is the same on every honest peer with the same set)."""
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
        await self._mark_position(r, digest)
        t3 = time.perf_counter()
        stale = [k for rr in [x for x in self._stored if x <= r] for k in self._stored.pop(rr)]
        if stale:
            await env.store.delete(*stale)
        self._bodies.closed(r)
        closed, closed_at, deadline_s = self._closed.pop(r, (None, 0.0, 0.0))
        phases = self._phases.pop(r, {})
        ready_at = phases.pop("ready_at", None)
        if ready_at is not None and closed is not None:
            # From our gradient going out to the round closing: the wait for the others.
            phases["dissemination_s"] = max(0.0, closed_at - ready_at)
        phases |= {"aggregation_s": t1 - t0, "update_s": t2 - t1, "digest_s": t3 - t2}
        losses = self._losses.pop(r, {})
        picked = [losses[c] for c in contributors if c in losses]
        if a.checkpoint:
            c0 = time.perf_counter()
            await self._checkpoint_locked(r)
            phases["checkpoint_s"] = time.perf_counter() - c0
        wire_in, wire_out = env.wire_bytes()
        rec = RoundRecord(
            cost=self.compute.cost.round_json(r),
            inner_steps=spec.inner_steps,
            bytes_sent=wire_out - self._wire_at[1],
            bytes_received=wire_in - self._wire_at[0],
            round=r,
            contributors=list(contributors),
            duration_s=closed.duration_s + (t3 - t0) if closed else t3 - t0,
            closed_by=closed.reason if closed else "?",
            loss=float(np.mean(picked)) if picked else None,
            model_digest=digest.hex(),
            phases=phases,
            wait_s=closed.duration_s if closed else 0.0,
            deadline_s=deadline_s,
            peer_losses={c: float(losses[c]) for c in contributors if c in losses},
        )
        self._wire_at = (wire_in, wire_out)
        self.history.append(rec)
        metrics.for_node(env.node_id).observe_round(rec.duration_s, rec.phases)
        env.counters["training.rounds"] += 1
        if r % spec.eval_every == 0 or r == spec.rounds:
            self._records[r] = rec  # its accuracy comes with the evaluation
        else:
            self._log_round(rec)
        self.job.aggregated(r, digest, time.monotonic())
        self._kick()

    async def _evaluate(self, r: int) -> None:
        params = await self.env.store.get(self.keys.theta)
        ev = await asyncio.to_thread(self.env.task.evaluate, params)
        rec = self._records.pop(r, None)
        self.last_accuracy = ev.accuracy
        if rec is not None:
            rec.accuracy = ev.accuracy
            self._log_round(rec, test_loss=ev.loss)
        for old in [x for x in self._records if x < r]:
            del self._records[old]

    def _log_round(self, rec: RoundRecord, test_loss: float | None = None) -> None:
        acc = "" if rec.accuracy is None else f" accuracy={rec.accuracy:.4f}"
        if rec.inner_steps > 1:
            acc += (
                f" steps={rec.round * rec.inner_steps}"
                f" sent={rec.bytes_sent} received={rec.bytes_received}"
            )
        log.info(
            "round %d/%d loss=%s%s contributors=%d duration=%.3fs digest=%s%s",
            rec.round,
            self.spec.rounds,
            "-" if rec.loss is None else f"{rec.loss:.4f}",
            acc,
            len(rec.contributors),
            rec.duration_s,
            rec.model_digest[:12],
            "" if rec.closed_by == "complete" else f" closed_by={rec.closed_by}",
        )

    async def _finish(self) -> None:
        # The last round always evaluates; wait for it before saying done.
        pending = [t for t in self._work if t.get_name().startswith("evaluate-")]
        await asyncio.gather(*pending, return_exceptions=True)
        self.job.done(time.monotonic())
        self._kick()

    # --- state: marks, checkpoints, sync I/O -----------------------------------------------

    async def _mark_position(self, completed: int, digest: bytes) -> None:
        """Records (completed, digest) beside the state in Redis: a restarted daemon
        checks the state against it before trusting it."""
        await self.env.store.client.mset(
            {self.keys.completed: str(completed), self.keys.digest: digest.hex()}
        )

    async def _checkpoint_locked(self, completed: int) -> None:
        snap = await read_snapshot(
            self.env.store, self.job_id, self.spec, completed, own_step=self.compute.adam_step
        )
        await asyncio.to_thread(self.env.checkpoints.save, snap)
        self.env.counters["training.checkpoints"] += 1

    async def _read_local_state(self) -> None:
        """What state do we hold? This node's Redis if its marks match what it holds,
        and our newest checkpoint; the machine decides which (if any) to keep."""
        env, spec = self.env, self.spec
        while True:
            try:
                async with asyncio.timeout(5.0):
                    await env.store.client.ping()
                break
            except REDIS_TROUBLE as e:
                self.job.sync_detail = f"waiting for this node's Redis: {e}"
                await asyncio.sleep(REDIS_WAIT_S)
        redis: tuple[int, bytes] | None = None
        async with self._state_lock:
            marks = await env.store.client.mget([self.keys.completed, self.keys.digest])
            try:
                completed = int(marks[0]) if marks[0] is not None else -1
                mark = bytes.fromhex(marks[1].decode()) if marks[1] is not None else b""
            except ValueError:
                completed, mark = -1, b""
            # Hashing the state is not free: only when the machine could keep it.
            if completed >= 0 and (not self.digest or mark == self.digest):
                try:
                    held = await state.digest_of(env.store, self.job_id, spec, completed)
                except (StoreError, RedisError):
                    held = b""
                if held and held == mark:
                    redis = (completed, held)
        cp = await asyncio.to_thread(env.checkpoints.latest, self.job_id, spec)
        self._checkpoint_read = cp
        self.job.local_state(
            redis, None if cp is None else (cp.completed, cp.digest), time.monotonic()
        )
        self._kick()

    async def _fetch(self, a: FetchState) -> None:
        env, spec = self.env, self.spec
        self._fetched = None
        try:
            data = await env.sync.fetch(
                a.peer,
                self.job_id,
                max_encoded_size(spec),
                env.sync_timeout_s,
                want=Position(a.completed, a.digest),
            )
        except SyncError as e:
            env.counters["training.sync_failed"] += 1
            log.warning("no state from %s: %s", a.peer, e)
            self.job.fetch_failed(a.peer, str(e), time.monotonic())
            self._kick()
            return
        try:
            snap = Snapshot.decode(data, spec, job_id=self.job_id)
        except SnapshotError as e:
            # It does not match the digest it claims: a broken or lying peer.
            env.counters["training.sync_bad_state"] += 1
            log.warning("state from %s refused: %s", a.peer, e)
            self.job.fetch_failed(a.peer, str(e), time.monotonic())
            self._kick()
            return
        self._fetched = snap
        self.job.state_fetched(a.peer, snap.completed, snap.digest, time.monotonic())
        self._kick()

    async def _load(self, a: LoadState) -> None:
        snap = self._checkpoint_read if a.source == CHECKPOINT else self._fetched
        self._checkpoint_read = self._fetched = None
        if snap is None or (snap.completed, snap.digest) != (a.completed, a.digest):
            raise SnapshotError(f"no state in hand for round {a.completed} from {a.source}")
        async with self._state_lock:
            await load_snapshot(self.env.store, snap, self.spec, job_id=self.job_id)
            await self._mark_position(snap.completed, snap.digest)
            # The inner optimizer and the compression residual come back with our own
            # checkpoint; with a peer's state they start fresh (the events say so).
            self.compute.adam_step = snap.own_step if snap.own else 0
        if not snap.own and self.keys.own_state(self.spec):
            self.env.note(
                "local_state_fresh", "inner optimizer state and compression residual start fresh"
            )
        self.job.state_loaded(a.source, snap.completed, snap.digest, time.monotonic())
        self._kick()
