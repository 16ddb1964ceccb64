"""The trainer on its own: a real redis-server with fakes for the functions, pub/sub
and state sync, no spirtd process. It performs what the job machine asks and feeds
it results; these tests check that wiring (the decisions are test_job_machine's)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.rounds import RoundConfig
from spirtd.functions.event import DataSlice
from spirtd.functions.invoker import InvocationError, RoundResult, SliceResult
from spirtd.pubsub.service import Info
from spirtd.redis.binding import RedisTarget
from spirtd.redis.store import TensorStore
from spirtd.tasks.base import Evaluation
from spirtd.tasks.sharding import Shard
from spirtd.training import state
from spirtd.training.checkpoint import Checkpoints
from spirtd.training.job import JobSpec
from spirtd.training.messages import TRAIN_TOPIC, GradientMeta, StateMeta, decode_train_meta
from spirtd.training.statesync import SyncError
from spirtd.training.trainer import Trainer, TrainerEnv
from tests.fixtures_redis import RunningRedis

PARAMS = 8
ME = "a" * 64
PEER = "b" * 64
PEER2 = "c" * 64
JOB_ID = "j" * 32
CFG = RoundConfig(initial_deadline_s=30.0, deadline_floor_s=1.0, deadline_ceiling_s=60.0)
SHORT = RoundConfig(initial_deadline_s=1.0, deadline_floor_s=0.5, deadline_ceiling_s=5.0)
INITIAL = np.arange(PARAMS, dtype=np.float32)


class FakeInvoker:
    """Each slice's "function" writes a gradient of ``value`` into its output key."""

    def __init__(self, store: TensorStore, value: float = 1.0) -> None:
        self.store = store
        self.value = value
        self.rounds: list[int] = []
        self.warm_ups = 0  # warm-only calls: no parameters read, nothing written
        self.old_function = False  # deployed before warm-only calls: refuses them
        self.hold_after: int | None = None  # rounds past this one never finish

    async def invoke_round(
        self, events: list[dict[str, Any]], timeout_s: float, min_fraction: float = 1.0
    ) -> RoundResult:
        if events[0].get("warm"):
            self.warm_ups += 1
            if self.old_function:
                err = InvocationError("Unhandled", "unknown field(s) in event: warm")
                failed = [SliceResult(ev["slice"], None, err, 0.0) for ev in events]
                return RoundResult(failed, min_fraction)
            done = [SliceResult(ev["slice"], {"warm": True}, None, 0.0) for ev in events]
            return RoundResult(done, min_fraction)
        if self.hold_after is not None and events[0]["round"] > self.hold_after:
            await asyncio.Event().wait()  # until the trainer is stopped
        slices = []
        for ev in events:
            await self.store.put(ev["output_key"], np.full(PARAMS, self.value, np.float32))
            slices.append(SliceResult(ev["slice"], {"samples": 10, "loss": 0.5}, None, 0.0))
        self.rounds.append(events[0]["round"])
        return RoundResult(slices, min_fraction)


@dataclass
class FakePubSub:
    sent: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    config: Any = None

    async def publish(self, topic: str, body: bytes, *, meta: bytes = b"") -> None:
        self.sent.append((topic, bytes(body), meta))

    def release(self, msg_ids: Any) -> int:
        return len(list(msg_ids))

    def gradients(self) -> list[GradientMeta]:
        metas = [decode_train_meta(m) for t, _, m in self.sent if t == TRAIN_TOPIC]
        return [m for m in metas if isinstance(m, GradientMeta)]

    def heads_ups(self) -> list[StateMeta]:
        metas = [decode_train_meta(m) for t, _, m in self.sent if t == TRAIN_TOPIC]
        return [m for m in metas if isinstance(m, StateMeta)]


@dataclass
class FakeSync:
    """Serves ``states[peer]`` (encoded snapshots), or fails for unknown peers."""

    states: dict[str, bytes] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    async def fetch(
        self, peer: str, job: str, max_total: int, timeout_s: float, want: Any
    ) -> bytes:
        self.asked.append(peer)
        if peer not in self.states:
            raise SyncError(f"{peer} unreachable")
        return self.states[peer]


class FakeTask:
    def evaluate(self, params: np.ndarray) -> Evaluation:
        return Evaluation(loss=0.1, accuracy=0.75, samples=1)


@dataclass
class FakeBody:
    chunk_size: int = 1 << 20


@dataclass
class FakeMessage:
    origin: str
    data: bytes
    meta: bytes
    topic: str = TRAIN_TOPIC
    seq: int = 1
    ts_ms: int = 0
    msg_id: bytes = b"m" * 32
    digest: bytes = b"d" * 32
    body: FakeBody = field(default_factory=FakeBody)

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self) -> bytes:
        return self.data

    def info(self) -> Info:
        return Info(
            self.topic, self.origin, self.seq, self.ts_ms, self.size, self.digest, self.meta
        )


def spec(rounds: int = 3) -> JobSpec:
    return JobSpec(
        "synthetic",
        {},
        rounds=rounds,
        functions_per_round=2,
        eval_every=10,
        param_count=PARAMS,
        lr=0.5,
    )


@dataclass
class Rig:
    store: TensorStore
    pubsub: FakePubSub
    invoker: FakeInvoker
    sync: FakeSync
    checkpoints: Checkpoints
    finished: list[Trainer] = field(default_factory=list)

    def trainer(
        self, members: list[str], rounds: int = 3, config: RoundConfig = CFG, **env: Any
    ) -> Trainer:
        e = TrainerEnv(
            node_id=ME,
            store=self.store,
            invoker=self.invoker,  # type: ignore[arg-type]
            pubsub=self.pubsub,  # type: ignore[arg-type]
            redis_target=RedisTarget(),
            data=DataSlice(shard=Shard(0, 1), batch_size=4),
            task=FakeTask(),  # type: ignore[arg-type]
            invoke_timeout_s=5.0,
            min_slice_fraction=1.0,
            round_config=config,
            sync=self.sync,  # type: ignore[arg-type]
            checkpoints=self.checkpoints,
            checkpoint_every=2,
            sync_timeout_s=5.0,
            **env,
        )
        return Trainer(JOB_ID, spec(rounds), e, members, self.finished.append)


@pytest.fixture
async def rig(managed_redis: RunningRedis, tmp_path: Path) -> AsyncIterator[Rig]:
    store = await TensorStore.open(managed_redis.client)
    yield Rig(store, FakePubSub(), FakeInvoker(store), FakeSync(), Checkpoints(tmp_path / "cp"))


async def until(cond: Callable[[], bool], timeout: float = 20.0, t: Any = None) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        if t is not None:
            print("trainer at the timeout:", t.status(), [x.get_name() for x in t._work])
        raise


async def test_alone_it_runs_every_round_in_redis_and_finishes(rig: Rig) -> None:
    t = rig.trainer([ME], rounds=3)
    await t.start(INITIAL)
    try:
        await until(lambda: t.state == "done")
        assert rig.finished == [t]
        assert [r.round for r in t.history] == [1, 2, 3]
        assert rig.invoker.rounds == [1, 2, 3]
        # Mean of two slices of 1.0, SGD with lr 0.5: theta drops by 0.5 a round.
        theta = await rig.store.get(t.keys.theta)
        assert np.allclose(theta, INITIAL - 1.5)
        assert t.digest == await state.digest_of(rig.store, JOB_ID, t.spec, 3)
        assert [g.round for g in rig.pubsub.gradients()] == [1, 2, 3]
        assert t.last_accuracy == 0.75 and t.history[-1].accuracy == 0.75
        # Checkpointed every 2 rounds and at the last.
        assert "checkpoint_s" in t.history[1].phases and "checkpoint_s" in t.history[2].phases
        cp = rig.checkpoints.latest(JOB_ID, t.spec)
        assert cp is not None and (cp.completed, cp.digest) == (3, t.digest)
        assert t.status()["state"] == "done" and t.status()["round"] == 3
    finally:
        await t.stop("test over")


async def test_a_round_waits_for_the_peer_and_aggregates_its_gradient(rig: Rig) -> None:
    t = rig.trainer([ME, PEER], rounds=1)
    await t.start(INITIAL)
    try:
        await until(lambda: bool(rig.pubsub.gradients()))
        assert t.state == "running" and not t.history  # waiting for the peer
        base = rig.pubsub.gradients()[0].base_digest
        grad = np.full(PARAMS, 3.0, np.float32).tobytes()
        msg = FakeMessage(PEER, grad, GradientMeta(JOB_ID, 1, base, 10, 0.25).encode())
        meta = decode_train_meta(msg.meta)
        assert t.validate(msg.info(), meta).value == "accept"
        await t.deliver(msg, meta)
        await until(lambda: t.state == "done")
        assert t.history[0].contributors == sorted([ME, PEER])
        theta = await rig.store.get(t.keys.theta)
        assert np.allclose(theta, INITIAL - 0.5 * 2.0)  # mean of 1.0 and 3.0
    finally:
        await t.stop("test over")


async def test_the_seams_replace_the_gradient_and_its_publish(rig: Rig) -> None:
    published: list[tuple[int, bytes]] = []

    async def source(t: Trainer, r: int) -> None:
        await t.env.store.put(t.keys.local(r), np.full(PARAMS, -2.0, np.float32))

    async def publisher(t: Trainer, r: int, body: bytes, meta: GradientMeta) -> None:
        published.append((r, body))

    t = rig.trainer([ME], rounds=1, gradient_source=source, gradient_publisher=publisher)
    await t.start(INITIAL)
    try:
        await until(lambda: t.state == "done")
        assert published == [(1, np.full(PARAMS, -2.0, np.float32).tobytes())]
        assert not rig.pubsub.gradients()  # the honest publish did not run
        theta = await rig.store.get(t.keys.theta)
        assert np.allclose(theta, INITIAL + 1.0)  # it aggregated the crafted one
    finally:
        await t.stop("test over")


async def test_a_restart_resumes_on_the_state_left_in_redis(rig: Rig) -> None:
    first = rig.trainer([ME], rounds=4)
    rig.invoker.hold_after = 2
    await first.start(INITIAL)
    await until(lambda: first.completed == 2)
    await first.stop("killed")
    assert first.completed == 2
    digest = first.digest
    shutil.rmtree(rig.checkpoints.directory)  # the state in Redis is all it has
    rig.invoker.rounds.clear()
    rig.invoker.hold_after = None
    # Alone it follows its first round, and computes it once the deadline passes.
    second = rig.trainer([ME], rounds=4, config=SHORT)
    await second.start_elsewhere("restarted")
    try:
        await until(lambda: second.state == "done", t=second)
        # It went on from where Redis was (its functions warmed up once, while it
        # read its state): no round done twice, none from round 1.
        assert rig.invoker.warm_ups == 1
        assert sorted(set(rig.invoker.rounds)) == [3, 4]
        assert [h.round for h in second.history] == [3, 4]
        assert digest != second.digest
    finally:
        await second.stop("test over")


async def test_a_function_that_refuses_warm_only_calls_is_warmed_by_a_full_one(
    rig: Rig,
) -> None:
    """A Lambda deployed before warm-only calls refuses the one sent while syncing;
    once the state is loaded, a full throwaway call warms it, and the node computes."""
    async with asyncio.timeout(120):  # a hang fails here, with the trainer's status
        first = rig.trainer([ME], rounds=4)
        rig.invoker.hold_after = 2
        await first.start(INITIAL)
        await until(lambda: first.completed == 2)
        await first.stop("killed")
        rig.invoker.rounds.clear()
        rig.invoker.hold_after, rig.invoker.old_function = None, True
        second = rig.trainer([ME], rounds=4, config=SHORT)
        await second.start_elsewhere("restarted")
        try:
            await until(lambda: second.state == "done", t=second)
            assert rig.invoker.warm_ups == 1  # refused
            # One full warm-up call (on whichever round was open when it went out),
            # then rounds 3 and 4 for real.
            assert len(rig.invoker.rounds) == 3 and rig.invoker.rounds[1:] == [3, 4]
        finally:
            await second.stop("test over")


async def _peers_state(rig: Rig, value: float = 1.0, rounds: int = 2) -> Any:
    """The state the peers hold after ``rounds`` rounds of gradients of ``value``,
    made on this same Redis by a job run alone; then this node loses its Redis and
    its checkpoints. Returns the snapshot and its encoding."""
    other = rig.trainer([ME], rounds=5)
    rig.invoker.value, rig.invoker.hold_after = value, rounds
    await other.start(INITIAL)
    await until(lambda: other.completed == rounds)
    await other.stop("made the peers' state")
    rig.invoker.value, rig.invoker.hold_after = 1.0, None
    snap = rig.checkpoints.latest(JOB_ID, other.spec)  # saved at stop
    assert snap is not None
    await rig.store.client.flushall()
    shutil.rmtree(rig.checkpoints.directory)
    return snap, b"".join(bytes(x) for x in snap.encode())


async def _vouch(t: Trainer, peers: tuple[str, ...], round: int, digest: bytes) -> None:
    """Each of ``peers`` announces that it computes ``round`` on ``digest``."""
    for p in peers:
        heads_up = StateMeta(JOB_ID, round, digest, True).encode()
        await t.deliver(FakeMessage(p, b"", heads_up), decode_train_meta(heads_up))


async def test_sync_loads_a_vouched_state_from_a_peer_and_follows(rig: Rig) -> None:
    # This node lost everything (its Redis and its checkpoints); PEER2 serves the
    # peers' state after 2 rounds.
    snap, encoded = await _peers_state(rig)
    rig.sync.states[PEER2] = encoded
    t = rig.trainer([ME, PEER, PEER2], rounds=5)
    await t.start_elsewhere("joining")
    try:
        await until(lambda: "no usable state" in t.job.sync_detail, t=t)
        await _vouch(t, (PEER, PEER2), snap.completed + 1, snap.digest)
        await until(lambda: t.state == "running")
        assert rig.sync.asked == [PEER, PEER2]  # PEER is unreachable: the next voucher
        assert (t.completed, t.digest) == (snap.completed, snap.digest)
        assert t.status()["state"] == "syncing"  # following round 3, not computing
        held = await state.digest_of(rig.store, JOB_ID, t.spec, snap.completed)
        assert held == snap.digest
        following = StateMeta(JOB_ID, snap.completed + 1, snap.digest, False)
        assert following in rig.pubsub.heads_ups()
    finally:
        await t.stop("test over")


async def test_a_state_that_fails_its_digest_is_refused_and_the_next_voucher_asked(
    rig: Rig,
) -> None:
    # What test_training_elastic's tampered-state scenario checks on real daemons
    # (run with -m long): the first voucher serves bytes that do not match the
    # digest; they are refused, counted, and the next voucher's state is loaded.
    snap, good = await _peers_state(rig)
    tampered = bytearray(good)
    tampered[-5] ^= 0x40  # inside the parameters, past the header
    rig.sync.states = {PEER: bytes(tampered), PEER2: good}
    t = rig.trainer([ME, PEER, PEER2], rounds=5)
    await t.start_elsewhere("joining")
    try:
        await until(lambda: "no usable state" in t.job.sync_detail, t=t)
        await _vouch(t, (PEER, PEER2), snap.completed + 1, snap.digest)
        await until(lambda: t.state == "running" and t.completed == snap.completed, t=t)
        assert rig.sync.asked == [PEER, PEER2]
        assert t.env.counters["training.sync_bad_state"] == 1
        assert (t.completed, t.digest) == (snap.completed, snap.digest)
        assert await state.digest_of(rig.store, JOB_ID, t.spec, snap.completed) == snap.digest
    finally:
        await t.stop("test over")


async def test_a_peer_on_another_model_than_the_others_syncs_to_theirs(rig: Rig) -> None:
    # What test_training_elastic's diverged-peer scenario checks on real daemons (run
    # with -m long): the others announce another model for the round this peer is
    # in; it is on the minority side, syncs to theirs, and follows.
    snap, encoded = await _peers_state(rig, value=3.0)
    rig.sync.states = {PEER: encoded}
    notes: list[tuple[str, str]] = []
    t = rig.trainer([ME], rounds=5, note=lambda kind, detail: notes.append((kind, detail)))
    rig.invoker.hold_after = 2  # it computes round 3 for ever
    await t.start(INITIAL)
    try:
        await until(lambda: t.completed == 2 and 3 not in rig.invoker.rounds, t=t)
        assert t.digest != snap.digest
        await _vouch(t, (PEER, PEER2), snap.completed + 1, snap.digest)
        await until(lambda: t.digest == snap.digest, t=t)
        assert rig.sync.asked[0] == PEER
        started = [detail for kind, detail in notes if kind == "sync_started"]
        assert started and "diverged at round 3" in started[-1], notes
        assert t.status()["state"] == "syncing"  # following round 3 on their model
        assert await state.digest_of(rig.store, JOB_ID, t.spec, 2) == snap.digest
    finally:
        await t.stop("test over")


async def test_proofs_go_again_to_a_peer_that_synced_from_us(rig: Rig) -> None:
    """A peer that syncs from us missed the proofs gossiped before (it joined late,
    restarted, or had not started the job yet): serving it our state sends ours again."""
    from protocol.gossip import GossipConfig
    from spirtd.training.evidence import EVIDENCE_TOPIC, decode_evidence_meta, nonfinite_proof
    from tests.test_equivocation import CHUNK, _body_with_nan_at, _key, _signed_body

    liar = _key(9)
    body = _body_with_nan_at(3)
    env = _signed_body(liar, body, job=JOB_ID, round=1)
    proof = nonfinite_proof(liar.node_id, JOB_ID, 1, env, body, CHUNK)
    assert proof is not None
    rig.pubsub.config = GossipConfig()
    t = rig.trainer([ME, liar.node_id])
    await t.start(INITIAL)
    try:
        t.state_served()  # nothing proven yet: nothing to send
        t.convict(proof, "evidence")  # a checked proof from a peer: not sent on by us
        await asyncio.sleep(0)
        assert [m for m in rig.pubsub.sent if m[0] == EVIDENCE_TOPIC] == []
        assert [e["node_id"] for e in t.status()["excluded"]] == [liar.node_id]
        t.state_served()
        await until(lambda: any(m[0] == EVIDENCE_TOPIC for m in rig.pubsub.sent))
        (sent,) = [m for m in rig.pubsub.sent if m[0] == EVIDENCE_TOPIC]
        assert sent[1] == proof.encode()
        assert decode_evidence_meta(sent[2])[:2] == (JOB_ID, liar.node_id)
    finally:
        await t.stop("test over")
