"""The trainer: one job's rounds on this node, the asyncio shell around protocol.rounds.

The round machine decides; this file does what it asks and tells it what
happened. Per round:

1. ``InvokeFunctions``: W gradient functions on slices of this peer's minibatch
   (drawn from job seed, round and node id), each writing to a key of its own
   (StateKeys.fn_output, the only keys the functions may write), then SPIRT.MEAN
   weighted by each slice's sample count gives the local gradient;
2. ``PublishState`` / ``PublishGradient``: the heads-up and the gradient go out on
   the training topic (the body on the large-payload path);
3. incoming gradients are checked by the machine before their bodies move, then
   written into Redis (non-finite values refused there) and counted;
4. ``Aggregate``: the job's rule over the contributors in node-id order, the
   optimizer step, and the new state digest, all inside Redis;
5. ``Evaluate``: test accuracy on the due rounds.

Nothing here blocks the loop: Redis calls are awaited, torch evaluation runs on
a thread, and every wait is bounded.

Every tensor a round writes (gradients, aggregate, the updated state) is SCRATCH:
Redis keeps it out of its AOF. Writing the gradients there cost Redis more CPU than
all its tensor work, and the state would put the whole model on disk every round.
The state is made durable by the checkpoints (every ``checkpoint_every`` rounds and
at stop) and by the peers; after a restart of Redis it is taken from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from protocol.errors import DecodeError
from protocol.gossip import Verdict
from protocol.rounds import (
    Aggregate,
    Diverged,
    Evaluate,
    Finished,
    GradientRejected,
    InvokeFunctions,
    LeftView,
    PublishGradient,
    PublishState,
    QuorumWait,
    RoundClosed,
    RoundConfig,
    RoundMachine,
    VouchTable,
    caught_up,
    sync_decision,
)
from spirtd import logs, metrics
from spirtd.functions.event import DataSlice, GradientEvent, RedisTarget
from spirtd.functions.invoker import Invoker
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
SLICE_TTL_S = 600
TICK_MAX_S = 1.0  # the timer wakes at least this often, deadline or not
SYNC_RETRY_S = 0.5  # between sync decisions while nothing can be done yet
SYNC_CHECK_S = 1.0  # how often a running trainer asks whether it must sync
VOUCH_WAIT_S = 2.0  # a fetched state newer than the vouches seen may wait this long for them
BUFFER_MAX = 512  # gradients kept while syncing, replayed once the state is loaded
# Trouble with this node's Redis (down, restarted, flushed): the round's work is
# abandoned and the state re-established from Redis, a checkpoint, or the peers.
REDIS_TROUBLE = (OSError, TimeoutError, StoreError, RedisError)


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
            "phases": {k: round(v, 5) for k, v in self.phases.items()},
        }


def minibatch_seed(job_seed: int, round: int, node_id: str) -> int:
    """The seed of this node's minibatch in ``round``: fixed by the job, different per peer."""
    h = hashlib.blake2b(f"{job_seed}:{round}:{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


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
        self.state = "starting"
        self.detail = ""
        self.history: deque[RoundRecord] = deque(maxlen=HISTORY_MAX)
        self.digest = b""
        self.completed = 0
        self.last_accuracy: float | None = None
        self.following = False  # caught up by sync; computing again from the next round start
        self._sync_ahead = False  # syncing because stuck where the others had moved on
        self._warmed = False  # the functions answered once (a cold start is behind us)
        self._checked_at = 0.0
        self._samples = 0  # this node's sample count in its current gradient
        self.vouch = VouchTable(f=spec.f)
        self.sync_detail = ""
        self._state_lock = asyncio.Lock()  # state in Redis and (completed, digest) move together
        self._buffer: deque[tuple[Message, GradientMeta]] = deque(maxlen=BUFFER_MAX)
        self._sync_task: asyncio.Task[None] | None = None
        self.m = RoundMachine(
            self_id=env.node_id,
            job_id=job_id,
            rounds=spec.rounds,
            min_contributors=self.rule.min_peers(),
            eval_every=spec.eval_every,
            param_count=spec.param_count,
            members=members,
            config=env.round_config,
            f=spec.f,
            min_for_f=lambda f: replace(self.rule, f=f).min_peers(),
        )
        # Equivocation: first gradient announcement per (origin, round), and the
        # peers proven to have signed two (node id -> how and when we learned it).
        self.ledger = Ledger(job_id)
        self.excluded: dict[str, dict[str, Any]] = {}
        self._on_finish = on_finish
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()
        # Per round: losses reported by contributors, phase timings, stored keys.
        self._losses: dict[int, dict[str, float]] = {}
        self._phases: dict[int, dict[str, float]] = {}
        self._stored: dict[int, set[str]] = {}
        # Closed rounds: the event, when we saw it, and the deadline the round had.
        self._closed: dict[int, tuple[RoundClosed, float, float]] = {}
        self._records: dict[int, RoundRecord] = {}

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, initial: np.ndarray) -> None:
        """A new job: round 1 from the job's initial parameters."""
        async with self._state_lock:
            await state.initialise(self.env.store, self.job_id, self.spec, initial)
            self.digest = await state.digest_of(self.env.store, self.job_id, self.spec, 0)
            await self._mark_position()
        self.state = "running"
        self.m.begin(1, self.digest, time.monotonic())
        self._loop_task = asyncio.create_task(
            self._run(), name=f"trainer-{self.job_id[:8]}", context=self._log_context()
        )

    async def start_elsewhere(self, why: str) -> None:
        """A job already under way (a late join, a restart): establish the state from
        this node's Redis or checkpoint if they still fit, else from the peers."""
        self._loop_task = asyncio.create_task(
            self._run(), name=f"trainer-{self.job_id[:8]}", context=self._log_context()
        )
        self._enter_sync(why)

    async def stop(self, why: str) -> None:
        was = self.state
        if self.state in ("running", "starting", "syncing"):
            self.state = "stopped"
            self.detail = why
        tasks = [*self._work, *(x for x in (self._loop_task, self._sync_task) if x is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if was == "running" and self.digest:
            with contextlib.suppress(*REDIS_TROUBLE, SnapshotError):
                await self._checkpoint()

    async def _run(self) -> None:
        # A done trainer keeps listening: a split in the last round shows in the final
        # positions the others announce, and is repaired like any other.
        while self.state in ("running", "syncing", "done"):
            self._pump()
            dl = self.m.next_deadline()
            wait = TICK_MAX_S if dl is None else min(TICK_MAX_S, max(0.0, dl - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            now = time.monotonic()
            self.m.tick(now)
            if now - self._checked_at >= SYNC_CHECK_S:
                # A follower stuck on a round whose gradients it never got, or a peer
                # left far behind, finds out here even when no round closes.
                self._checked_at = now
                dl = self.m.deadline_at
                stuck = self.state == "running" and dl is not None and now > dl
                self._check_sync(stuck=stuck)
                if stuck and self.state == "running":
                    self._unfollow(now)

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
        if isinstance(exc, REDIS_TROUBLE) and self.state == "running":
            self.env.counters["training.redis_trouble"] += 1
            log.warning("%s: %s; re-establishing the state", t.get_name(), exc)
            self._enter_sync(f"redis trouble during {t.get_name()}: {exc}")
            return
        if t.get_name().startswith("evaluate-"):
            log.warning("%s failed: %s", t.get_name(), exc)
            return
        self._fail(f"{t.get_name()} failed: {exc}")

    def _fail(self, why: str) -> None:
        if self.state != "running":
            return
        log.error("job %s failed: %s", self.job_id[:12], why)
        self.state = "failed"
        self.detail = why
        # The others must not wait for this node's gradients any more.
        meta = StateMeta(self.job_id, max(1, self.m.round), self.digest or bytes(32), False)
        self._spawn(self._publish(b"", meta.encode()), "heads-up-failed")
        self._wake.set()
        self._on_finish(self)

    # --- the machine ----------------------------------------------------------------------

    def _pump(self) -> None:
        actions = self.m.drain_actions()
        if self.state == "syncing":
            # No valid state to compute on; whatever the machine asks is moot (it is
            # begun afresh once the state is back). Its events still count.
            actions = []
        for a in actions:
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
                self._spawn(
                    self._aggregate(a.round, a.contributors, a.f), f"aggregate-{a.round}", a.round
                )
            elif isinstance(a, Evaluate):
                self._spawn(self._evaluate(a.round), f"evaluate-{a.round}", a.round)
            elif isinstance(a, Finished):
                self._finished(a.round)
        for ev in self.m.drain_events():
            self._on_event(ev)

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
            self.vouch.note(ev.origin, ev.round, ev.digest)
            self._check_sync()
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

    def _kick(self) -> None:
        self._pump()
        self._wake.set()

    # --- inputs from the node -------------------------------------------------------------

    def member_alive(self, node_id: str) -> None:
        self.m.member_alive(node_id, time.monotonic())
        self._kick()

    def member_gone(self, node_id: str) -> None:
        self.m.member_gone(node_id, time.monotonic())
        self.vouch.forget(node_id)
        self._kick()

    def validate(self, info: Info, meta: GradientMeta | StateMeta) -> Verdict:
        """The pub/sub validation hook: runs on the announcement, before any body byte."""
        if isinstance(meta, StateMeta):
            return Verdict.ACCEPT if info.size == 0 else Verdict.REJECT
        if info.origin in self.excluded:
            # Proven Byzantine: nothing of it is pulled again. IGNORE, not REJECT:
            # the neighbour that relayed it need not know yet. A wrong size is
            # wrong whatever one knows, so its relay is charged as for anyone's.
            if info.size != self.spec.param_count * 4:
                self.env.counters["training.gradient_rejected.size"] += 1
                return Verdict.REJECT
            self.env.counters["training.gradient_rejected.excluded"] += 1
            return Verdict.IGNORE
        proof = self.ledger.see(
            info.origin, meta.round, meta.base_digest, info.digest, info.size, info.wire
        )
        if proof is not None:
            self.convict(proof, "detected")
            return Verdict.IGNORE
        self.vouch.note(info.origin, meta.round, meta.base_digest)
        if self._buffers(meta.round):
            # Kept for the rounds we will follow once the state is loaded, or that a
            # follower reaches soon (the machine checks them then); far older ones
            # can never be used.
            newest = self.vouch.newest_round() or 0
            if info.size != self.spec.param_count * 4:
                return Verdict.REJECT
            return Verdict.ACCEPT if meta.round >= min(newest - 1, self.m.round) else Verdict.IGNORE
        reason = self.m.validate(
            info.origin, meta.job, meta.round, meta.base_digest, info.size, time.monotonic()
        )
        self._kick()
        if reason is None:
            return Verdict.ACCEPT
        # Wrong size or a second gradient for one round is misbehaviour; the rest
        # (late, early, another model) happens to honest peers too.
        return Verdict.REJECT if reason in ("size", "duplicate") else Verdict.IGNORE

    # --- proven Byzantine ---------------------------------------------------------------------

    def convict(self, proof: Evidence, how: str) -> None:
        """``proof.offender`` is proven Byzantine (it signed two gradients for one
        round, or a non-finite one): out of every round from now on, its vouches
        void. ``how``: "detected" here (the proof is then gossiped) or "evidence"
        (checked proof from a peer)."""
        if self._exclude(proof.offender, proof.round, proof.kind, how) and how == "detected":
            self._spawn(
                self.env.pubsub.publish(EVIDENCE_TOPIC, proof.encode(), meta=proof.meta()),
                f"evidence-{proof.round}",
            )

    def _exclude(self, origin: str, round: int, kind: str, how: str) -> bool:
        """Excludes ``origin``; False if it was already out (or is this node)."""
        if origin == self.env.node_id or origin in self.excluded:
            return False
        self.excluded[origin] = {
            "node_id": origin,
            "reason": kind,  # "equivocation" or "nonfinite"
            "round": round,  # the round it misbehaved in
            "at_round": self.m.round,  # ours when we excluded it
            "how": how,
        }
        c = self.env.counters
        c["training.excluded"] += 1
        c[f"training.{kind}.{how}"] += 1
        what = "equivocated" if kind == EQUIVOCATION else "sent a non-finite gradient"
        log.warning(
            "peer %s %s in round %d (%s); excluded for the rest of job %s",
            origin,
            what,
            round,
            "seen here" if how == "detected" else "proof from a peer",
            self.job_id[:12],
        )
        self.m.exclude(origin, time.monotonic())
        self.vouch.bar(origin)
        self.ledger.forget(origin)
        self._kick()
        return True

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
            proof = verify_evidence(data, self.job_id, self.env.pubsub.config)
        except (EvidenceError, DecodeError) as e:
            self.env.counters["training.evidence_invalid"] += 1
            log.warning("equivocation evidence from %s refused: %s", msg.origin, e)
            return
        self.convict(proof, "evidence")

    async def deliver(self, msg: Message, meta: GradientMeta | StateMeta) -> None:
        now = time.monotonic()
        if isinstance(meta, StateMeta):
            if meta.participating or meta.round > self.spec.rounds:
                self.vouch.note(msg.origin, meta.round, meta.digest)
            self.m.announce(msg.origin, meta.job, meta.round, meta.digest, meta.participating, now)
            self._kick()
            return
        if self._buffers(meta.round):
            self._buffer.append((msg, meta))
            return
        r = meta.round
        key = self.keys.peer(r, msg.origin)
        body = await msg.read()
        try:
            await self.env.store.put(key, np.frombuffer(body, dtype="<f4"), scratch=True)
        except NonFinite as e:
            log.warning("gradient from %s for round %d refused: %s", msg.origin, r, e)
            self.m.reject(msg.origin, r, "nonfinite", time.monotonic())
            self._convict_nonfinite(msg, r, body)
            return
        except StoreError as e:
            # Not the sender's fault that we know of (Redis refused the write):
            # stop waiting for it this round, but prove nothing.
            log.warning("gradient from %s for round %d not stored: %s", msg.origin, r, e)
            self.m.reject(msg.origin, r, "unstored", time.monotonic())
            self._kick()
            return
        self._stored.setdefault(r, set()).add(key)
        reason = self.m.receive(
            msg.origin, meta.job, r, meta.base_digest, msg.size, time.monotonic()
        )
        if reason is None:
            self._losses.setdefault(r, {})[msg.origin] = meta.loss
        else:
            await self.env.store.delete(key)
        self._kick()

    def _convict_nonfinite(self, msg: Message, r: int, body: bytes) -> None:
        """A signed gradient with a NaN or an infinity in it: no honest peer sends
        one, so its origin is out for the rest of the job, here at once and, through
        the proof, at every peer (also those that closed the round before pulling
        it, and would otherwise go on waiting for the liar in later rounds)."""
        envelope = self.ledger.envelope(msg.origin, r, msg.msg_id)
        proof = None
        if envelope is not None:
            proof = nonfinite_proof(msg.origin, self.job_id, r, envelope, body, msg.body.chunk_size)
        if proof is None:
            self._exclude(msg.origin, r, NONFINITE, "detected")
        else:
            self.convict(proof, "detected")

    def _buffers(self, round: int) -> bool:
        """Whether a gradient for ``round`` waits in the buffer rather than going to the
        machine: while syncing, and while following for rounds past the machine's
        window (a follower replays rounds faster than the others run them, so it
        needs the gradients of every round between its state and theirs)."""
        if self.state == "syncing":
            return True
        return self.following and round > self.m.round + self.env.round_config.future_window

    def _replay(self) -> None:
        """Hands buffered gradients that now fit the machine's window to it."""
        keep: deque[tuple[Message, GradientMeta]] = deque(maxlen=BUFFER_MAX)
        for msg, meta in self._buffer:
            if self._buffers(meta.round):
                keep.append((msg, meta))
                continue
            info = Info(msg.topic, msg.origin, msg.seq, msg.ts_ms, msg.size, msg.digest, msg.meta)
            if self.validate(info, meta) is Verdict.ACCEPT:
                self._spawn(self.deliver(msg, meta), f"replay-{meta.round}", meta.round)
        self._buffer = keep

    def _forget_body(self, round: int, origin: str) -> None:
        key = self.keys.peer(round, origin)
        stored = self._stored.get(round)
        if stored is not None and key in stored:
            stored.discard(key)
            self._spawn(self.env.store.delete(key), f"forget-{round}")

    # --- actions --------------------------------------------------------------------------

    async def _publish(self, body: bytes, meta: bytes) -> None:
        await self.env.pubsub.publish(TRAIN_TOPIC, body, meta=meta)

    def _events(self, r: int) -> tuple[list[dict[str, Any]], list[str]]:
        """The W function events of round ``r``'s minibatch, and the key each writes its
        slice's gradient to. Each key holds a fresh nonce: it is read once and deleted,
        and no other invocation (nor a replayed event) can know it."""
        env, spec = self.env, self.spec
        outputs = [
            self.keys.fn_output(r, i, secrets.token_hex(16))
            for i in range(spec.functions_per_round)
        ]
        data = DataSlice(
            shard=env.data.shard,
            batch_size=spec.batch_size,
            seed=minibatch_seed(spec.seed, r, env.node_id),
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
                params_key=self.keys.theta,
                data=data,
                output_key=output,
                ttl_seconds=SLICE_TTL_S,
            ).to_json()
            for i, output in enumerate(outputs)
        ]
        return events, outputs

    async def _warm_up(self, r: int) -> None:
        """After a restart or a join the local functions are cold (worker start,
        imports, dataset load: seconds). One throwaway invocation while following
        warms them, so the first round this node computes does not miss its deadline."""
        events, outputs = self._events(r)
        res = await self.env.invoker.invoke_round(events, self.env.invoke_timeout_s)
        await self.env.store.delete(*outputs)
        self._warmed = bool(res.succeeded)
        self._kick()

    async def _compute(self, r: int) -> None:
        env = self.env
        t0 = time.perf_counter()
        events, outputs = self._events(r)
        res = await env.invoker.invoke_round(events, env.invoke_timeout_s, env.min_slice_fraction)
        t1 = time.perf_counter()
        ok = res.succeeded
        self._warmed = self._warmed or bool(ok)
        for s in res.slices:
            if s.error is not None:
                env.counters["training.slice_failed"] += 1
                log.warning("round %d slice %d failed: %s", r, s.index, s.error)
        if not res.met_quorum or not ok:
            self.m.local_gradient_failed(
                r, f"{len(ok)} of {len(res.slices)} slices", time.monotonic()
            )
            self._kick()
            await env.store.delete(*outputs)
            return
        weights = [float(s.result["samples"]) for s in ok]  # type: ignore[index]
        # The functions cannot write the local gradient key: it is ours to fill.
        slice_keys = [outputs[s.index] for s in ok]
        await env.store.mean(self.keys.local(r), slice_keys, weights=weights, scratch=True)
        await env.store.delete(*outputs)
        t2 = time.perf_counter()
        loss = sum(float(s.result["loss"]) * w for s, w in zip(ok, weights, strict=True))  # type: ignore[index]
        self._losses.setdefault(r, {})[env.node_id] = loss / sum(weights)
        self._stored.setdefault(r, set()).add(self.keys.local(r))
        self._phases[r] = {"functions_s": t1 - t0, "averaging_s": t2 - t1}
        self._samples = int(sum(weights))
        self.m.local_gradient_ready(r, time.monotonic())
        self._kick()

    async def _publish_gradient(self, r: int, base: bytes) -> None:
        # Everything about round r is read before the first await: when our gradient
        # is the last one the round waited for, the round closes (and its records
        # are dropped by the aggregation) while the body is still being fetched.
        meta = GradientMeta(self.job_id, r, base, self._samples, self._losses[r][self.env.node_id])
        phases = self._phases.get(r, {})
        t0 = time.perf_counter()
        body = await self.env.store.client.get(self.keys.local(r))
        if body is None:
            # It is scratch: a Redis that restarted since it was written lost it. Redis
            # trouble, handled as such (the state is re-established), not a failed job.
            raise TensorNotFound(f"local gradient for round {r} vanished from Redis")
        await self.env.pubsub.publish(TRAIN_TOPIC, body, meta=meta.encode())
        phases["publish_s"] = time.perf_counter() - t0
        # A round that closed during the publish has its record made already (holding
        # this dict): the internal timestamp must not land in its history.
        if self._phases.get(r) is phases:
            phases["ready_at"] = time.monotonic()

    async def _aggregate(self, r: int, contributors: tuple[str, ...], f: int | None = None) -> None:
        async with self._state_lock:
            await self._aggregate_locked(r, contributors, f)

    async def _aggregate_locked(
        self, r: int, contributors: tuple[str, ...], f: int | None = None
    ) -> None:
        """``f``: the round's Byzantine bound, lower than the job's when too few
        contributors are left for it (the machine decides from the contributor
        count, so it is the same on every honest peer with the same set)."""
        env, spec, keys = self.env, self.spec, self.keys
        rule = self.rule if f is None or f == self.rule.f else replace(self.rule, f=f)
        me = env.node_id
        t0 = time.perf_counter()
        inputs = [keys.local(r) if c == me else keys.peer(r, c) for c in contributors]
        previous = keys.agg_prev if await env.store.exists(keys.agg_prev) else None
        await rule.run(env.store, keys.agg, inputs, previous=previous, scratch=True)
        t1 = time.perf_counter()
        if spec.optimizer == "adam":
            await env.store.adam(
                keys.theta,
                keys.agg,
                m=keys.m,
                v=keys.v,
                step=r,
                lr=spec.lr,
                weight_decay=spec.weight_decay,
                scratch=True,
            )
        else:
            await env.store.sgd(
                keys.theta,
                keys.agg,
                lr=spec.lr,
                momentum=spec.momentum,
                buf=keys.buf if spec.momentum > 0 else None,
                weight_decay=spec.weight_decay,
                scratch=True,
            )
        if self.rule.keeps_previous:
            await env.store.mean(keys.agg_prev, [keys.agg], scratch=True)
        t2 = time.perf_counter()
        digest = await state.digest_of(env.store, self.job_id, spec, r)
        self.digest, self.completed = digest, r
        await self._mark_position()
        t3 = time.perf_counter()
        stale = [k for rr in [x for x in self._stored if x <= r] for k in self._stored.pop(rr)]
        if stale:
            await env.store.delete(*stale)
        closed, closed_at, deadline_s = self._closed.pop(r, (None, 0.0, 0.0))
        phases = self._phases.pop(r, {})
        ready_at = phases.pop("ready_at", None)
        if ready_at is not None and closed is not None:
            # From our gradient going out to the round closing: the wait for the others.
            phases["dissemination_s"] = max(0.0, closed_at - ready_at)
        phases |= {"aggregation_s": t1 - t0, "update_s": t2 - t1, "digest_s": t3 - t2}
        losses = self._losses.pop(r, {})
        picked = [losses[c] for c in contributors if c in losses]
        if self.env.checkpoint_every and (r % self.env.checkpoint_every == 0 or r == spec.rounds):
            c0 = time.perf_counter()
            await self._checkpoint_locked()
            phases["checkpoint_s"] = time.perf_counter() - c0
        rec = RoundRecord(
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
        self.history.append(rec)
        metrics.for_node(env.node_id).observe_round(rec.duration_s, rec.phases)
        env.counters["training.rounds"] += 1
        due = r % spec.eval_every == 0 or r == spec.rounds
        if due:
            self._records[r] = rec  # its accuracy comes with the evaluation
        else:
            self._log_round(rec)
        participate = None
        if self.following and self._warmed and caught_up(self.vouch, self.env.node_id, r):
            # Caught up: nobody is past the next round, so from its start on the
            # others' views take this node in and it computes again.
            self.following, participate = False, True
            log.info("caught up at round %d; contributing from round %d", r, r + 1)
        self.m.aggregated(r, digest, time.monotonic(), participate=participate)
        if self._buffer:
            self._replay()
        self._kick()
        self._check_sync()

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

    def _finished(self, r: int) -> None:
        async def finish() -> None:
            # The last round always evaluates; wait for it before saying done.
            pending = [t for t in self._work if t.get_name().startswith("evaluate-")]
            await asyncio.gather(*pending, return_exceptions=True)
            self.state = "done"
            log.info(
                "job %s done after %d rounds: accuracy=%s digest=%s",
                self.job_id[:12],
                r,
                "-" if self.last_accuracy is None else f"{self.last_accuracy:.4f}",
                self.digest.hex()[:12],
            )
            self._wake.set()
            self._on_finish(self)

        self._spawn(finish(), f"finish-{r}", r)

    # --- state: marks, checkpoints, snapshots -----------------------------------------------

    async def _mark_position(self) -> None:
        """Records (completed, digest) beside the state in Redis: a restarted daemon
        checks the state against it before trusting it."""
        await self.env.store.client.mset(
            {self.keys.completed: str(self.completed), self.keys.digest: self.digest.hex()}
        )

    async def _checkpoint(self) -> None:
        async with self._state_lock:
            await self._checkpoint_locked()

    async def _checkpoint_locked(self) -> None:
        snap = await read_snapshot(self.env.store, self.job_id, self.spec, self.completed)
        await asyncio.to_thread(self.env.checkpoints.save, snap)
        self.env.counters["training.checkpoints"] += 1

    async def snapshot(self) -> Snapshot | None:
        """Our state now, for a peer that syncs from us; None while we have none."""
        if self.state not in ("running", "done") or not self.digest:
            return None
        async with self._state_lock:
            return await read_snapshot(self.env.store, self.job_id, self.spec, self.completed)

    # --- state sync -------------------------------------------------------------------------

    def _check_sync(self, *, stuck: bool = False) -> None:
        """After a round or a divergence, and every second: are we the ones who must
        sync? ``stuck``: the open round is past its deadline; then a final
        position the others announce counts however close it is (there are no more
        rounds in which to catch up with them)."""
        if self.state not in ("running", "done") or not self.digest:
            return
        d = sync_decision(
            self.vouch,
            self_id=self.env.node_id,
            round=self.completed + 1,
            digest=self.digest,
            final_round=self.spec.rounds + 1 if stuck else None,
            # Past the deadline for want of a quorum (not merely slow functions):
            # a position the others moved on to is out of reach by rounds.
            stuck=stuck and self.m.waiting_for_quorum,
        )
        if d.action == "sync":
            # The sync pass must take a position ahead, not resume into the round
            # we were stuck in (which would only get us stuck again).
            self._sync_ahead = stuck and self.m.waiting_for_quorum
            self._enter_sync(d.reason)

    def _unfollow(self, now: float) -> None:
        """A follower whose round is past its deadline while nobody is past it may be
        waiting for other followers, which wait for it in turn: compute this round
        after all (a wrong guess shows as a divergence and is repaired by sync)."""
        r = self.m.round
        if self.following and self._warmed and caught_up(self.vouch, self.env.node_id, r - 1):
            self.following = False
            self.env.counters["training.unfollowed"] += 1
            log.info("round %d: no one is computing it; computing it here", r)
            self.m.begin(r, self.digest, now, participating=True)
            self._kick()

    def _enter_sync(self, why: str) -> None:
        if self.state not in ("running", "syncing", "starting", "done"):
            return
        if self.state != "syncing":
            log.warning("job %s: syncing state (%s)", self.job_id[:12], why)
            self.env.counters["training.syncs_started"] += 1
            self.env.note("sync_started", why)
        self.state, self.sync_detail = "syncing", why
        self.following = False
        # Tell the others not to wait for us meanwhile.
        meta = StateMeta(self.job_id, max(1, self.m.round), self.digest or bytes(32), False)
        self._spawn(self._publish(b"", meta.encode()), "heads-up-sync")
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(
                self._sync_loop(), name="sync", context=self._log_context()
            )

    async def _sync_loop(self) -> None:
        try:
            await self._establish_own()
            while self.state == "syncing":
                if await self._sync_once():
                    return
                await asyncio.sleep(SYNC_RETRY_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a sync that cannot go on must say so, not hang
            self._fail(f"state sync failed: {e}")

    async def _establish_own(self) -> None:
        """What state do we hold? This node's Redis if it matches what we last knew
        (or its own marks, after a restart); else our newest checkpoint; else none."""
        env, spec = self.env, self.spec
        while True:
            try:
                async with asyncio.timeout(5.0):
                    await env.store.client.ping()
                break
            except REDIS_TROUBLE as e:
                self.sync_detail = f"waiting for this node's Redis: {e}"
                await asyncio.sleep(1.0)
        async with self._state_lock:
            marks = await env.store.client.mget([self.keys.completed, self.keys.digest])
            try:
                completed = int(marks[0]) if marks[0] is not None else -1
                mark = bytes.fromhex(marks[1].decode()) if marks[1] is not None else b""
            except ValueError:
                completed, mark = -1, b""
            if completed >= 0 and (not self.digest or mark == self.digest):
                try:
                    held = await state.digest_of(env.store, self.job_id, spec, completed)
                except (StoreError, RedisError):
                    held = b""
                if held and held == mark:
                    self.digest, self.completed = held, completed
                    return
            cp = await asyncio.to_thread(env.checkpoints.latest, self.job_id, spec)
            if cp is not None and (
                not self.digest
                or cp.digest == self.digest
                or self.vouch.vouched(cp.completed + 1, cp.digest)
            ):
                await load_snapshot(env.store, cp, spec, job_id=self.job_id)
                self.digest, self.completed = cp.digest, cp.completed
                await self._mark_position()
                log.info("state from checkpoint: round %d", cp.completed)
                env.counters["training.checkpoint_loads"] += 1
                return
            self.digest, self.completed = b"", 0

    async def _sync_once(self) -> bool:
        """One decision and, if it says so, one transfer. True once we are running."""
        env, spec = self.env, self.spec
        own = self.completed + 1 if self.digest else None
        d = sync_decision(
            self.vouch,
            self_id=env.node_id,
            round=own,
            digest=self.digest or None,
            # Already out of the rounds: once the others have finished there is no
            # round left to catch up in, so their final model is the only way out.
            final_round=self.spec.rounds + 1,
            stuck=self._sync_ahead,
        )
        self.sync_detail = d.reason
        alone = len(self.m.status().get("view", [])) <= 1 and not self.vouch.newest_round()
        if own is not None and (d.action == "in_sync" or (d.action == "wait" and alone)):
            self._resume(own)
            return True
        if d.action != "sync" or d.target is None:
            return False
        max_total = max_encoded_size(spec)
        want = Position(d.target.round - 1, d.target.digest)
        for peer in d.target.vouchers:
            if peer == env.node_id:
                continue
            try:
                data = await env.sync.fetch(
                    peer, self.job_id, max_total, env.sync_timeout_s, want=want
                )
            except SyncError as e:
                env.counters["training.sync_failed"] += 1
                log.warning("no state from %s: %s", peer, e)
                continue
            try:
                snap = Snapshot.decode(data, spec, job_id=self.job_id)
            except SnapshotError as e:
                # It does not match the digest it claims: a broken or lying peer.
                env.counters["training.sync_bad_state"] += 1
                log.warning("state from %s refused: %s", peer, e)
                continue
            waited = 0.0
            while not self.vouch.vouched(snap.completed + 1, snap.digest) and waited < VOUCH_WAIT_S:
                await asyncio.sleep(0.1)  # the others' heads-ups for that round may be in flight
                waited += 0.1
            if not self.vouch.vouched(snap.completed + 1, snap.digest):
                env.counters["training.sync_unvouched"] += 1
                log.warning(
                    "state from %s (round %d) is not vouched for by f+1 peers; not loaded",
                    peer,
                    snap.completed,
                )
                continue
            async with self._state_lock:
                await load_snapshot(env.store, snap, spec, job_id=self.job_id)
                self.digest, self.completed = snap.digest, snap.completed
                await self._mark_position()
            env.counters["training.syncs_done"] += 1
            env.note("synced", f"round {snap.completed} from {peer}")
            log.info(
                "synced job %s state from %s: round %d, digest %s",
                self.job_id[:12],
                peer,
                snap.completed,
                snap.digest.hex()[:12],
            )
            self._resume(snap.completed + 1)
            return True
        return False

    def _resume(self, round: int) -> None:
        """Runs again from ``round`` with the state we hold: following that round
        (others' gradients only), computing again from the next round start."""
        if round > self.spec.rounds:
            self.state = "done"
            self._on_finish(self)
            return
        self.state, self.sync_detail, self.following = "running", "", True
        self._sync_ahead = False
        # Rounds abandoned by the sync leave no per-round records behind.
        for per_round in (self._losses, self._phases, self._closed, self._records):
            for old in [k for k in per_round if k < round]:
                del per_round[old]
        stale = [k for rr in [x for x in self._stored if x < round] for k in self._stored.pop(rr)]
        if stale:
            self._spawn(self.env.store.delete(*stale), "forget-abandoned")
        self.m.begin(round, self.digest, time.monotonic(), participating=False)
        if not self._warmed:
            self._spawn(self._warm_up(round), "warm-up")
        self._replay()
        self._kick()

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "state": "syncing" if self.following else self.state,
            "detail": self.sync_detail if self.state == "syncing" else self.detail,
            "round": self.completed,
            "model_digest": self.digest.hex() if self.digest else None,
            "loss": last.loss if last else None,
            "accuracy": self.last_accuracy,
            "excluded": [self.excluded[k] for k in sorted(self.excluded)],
            "machine": self.m.status(),
        }
