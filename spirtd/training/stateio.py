"""The job state's I/O outside a round's work: the position marks beside the state
in Redis, checkpoints, snapshots for peers that sync from us, and a sync pass's
reads, fetches and loads. The trainer feeds what comes of them to the job machine.

``lock``: the state in Redis and its marks move together (the aggregation holds it
too), so a snapshot or a checkpoint never sees one without the other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import numpy as np
from redis.exceptions import RedisError

from protocol.rounds import CHECKPOINT, FetchState, JobMachine, LoadState
from spirtd.redis.store import StoreError
from spirtd.training import state
from spirtd.training.checkpoint import (
    Snapshot,
    SnapshotError,
    load_snapshot,
    max_encoded_size,
    read_snapshot,
)
from spirtd.training.compute import LocalCompute
from spirtd.training.job import JobSpec
from spirtd.training.state import StateKeys
from spirtd.training.statesync import Position, SyncError

if TYPE_CHECKING:
    from spirtd.training.trainerenv import TrainerEnv

log = logging.getLogger("spirtd.training")

REDIS_WAIT_S = 1.0  # between pings while this node's Redis is away
# Trouble with this node's Redis (down, restarted, flushed): the round's work is
# abandoned and the state re-established from Redis, a checkpoint, or the peers.
REDIS_TROUBLE = (OSError, TimeoutError, StoreError, RedisError)


class StateIO:
    def __init__(self, job_id: str, spec: JobSpec, env: TrainerEnv, compute: LocalCompute) -> None:
        self.job_id = job_id
        self.spec = spec
        self.env = env
        self.keys = StateKeys(job_id)
        self.compute = compute
        self.lock = asyncio.Lock()
        # A sync pass's state in hand: the newest checkpoint read, the download.
        self._checkpoint_read: Snapshot | None = None
        self._fetched: Snapshot | None = None

    async def initialise(self, initial: np.ndarray) -> bytes:
        """A new job's state from its initial parameters; returns its digest."""
        async with self.lock:
            await state.initialise(self.env.store, self.job_id, self.spec, initial)
            digest = await state.digest_of(self.env.store, self.job_id, self.spec, 0)
            await self.mark_position(0, digest)
        return digest

    async def mark_position(self, completed: int, digest: bytes) -> None:
        """Records (completed, digest) beside the state in Redis: a restarted daemon
        checks the state against it before trusting it."""
        await self.env.store.client.mset(
            {self.keys.completed: str(completed), self.keys.digest: digest.hex()}
        )

    async def checkpoint_locked(self, completed: int) -> None:
        snap = await read_snapshot(
            self.env.store, self.job_id, self.spec, completed, own_step=self.compute.adam_step
        )
        await asyncio.to_thread(self.env.checkpoints.save, snap)
        self.env.counters["training.checkpoints"] += 1

    async def read_local(
        self, job: JobMachine
    ) -> tuple[tuple[int, bytes] | None, tuple[int, bytes] | None]:
        """What state do we hold? This node's Redis if its marks match what it holds,
        and our newest checkpoint, as (completed, digest) each; the machine decides
        which (if any) to keep."""
        env, spec = self.env, self.spec
        while True:
            try:
                async with asyncio.timeout(5.0):
                    await env.store.client.ping()
                break
            except REDIS_TROUBLE as e:
                job.sync_detail = f"waiting for this node's Redis: {e}"
                await asyncio.sleep(REDIS_WAIT_S)
        redis: tuple[int, bytes] | None = None
        async with self.lock:
            marks = await env.store.client.mget([self.keys.completed, self.keys.digest])
            try:
                completed = int(marks[0]) if marks[0] is not None else -1
                mark = bytes.fromhex(marks[1].decode()) if marks[1] is not None else b""
            except ValueError:
                completed, mark = -1, b""
            # Hashing the state is not free: only when the machine could keep it.
            if completed >= 0 and (not job.digest or mark == job.digest):
                try:
                    held = await state.digest_of(env.store, self.job_id, spec, completed)
                except (StoreError, RedisError):
                    held = b""
                if held and held == mark:
                    redis = (completed, held)
        cp = await asyncio.to_thread(env.checkpoints.latest, self.job_id, spec)
        self._checkpoint_read = cp
        return redis, None if cp is None else (cp.completed, cp.digest)

    async def fetch(self, a: FetchState) -> Snapshot | str:
        """The state ``a`` asks of a peer, checked against its digest; or why not."""
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
            return str(e)
        try:
            snap = Snapshot.decode(data, spec, job_id=self.job_id)
        except SnapshotError as e:
            # It does not match the digest it claims: a broken or lying peer.
            env.counters["training.sync_bad_state"] += 1
            log.warning("state from %s refused: %s", a.peer, e)
            return str(e)
        self._fetched = snap
        return snap

    async def load(self, a: LoadState) -> Snapshot:
        """The state in hand that ``a`` names, into Redis with its marks."""
        snap = self._checkpoint_read if a.source == CHECKPOINT else self._fetched
        self._checkpoint_read = self._fetched = None
        if snap is None or (snap.completed, snap.digest) != (a.completed, a.digest):
            raise SnapshotError(f"no state in hand for round {a.completed} from {a.source}")
        async with self.lock:
            await load_snapshot(self.env.store, snap, self.spec, job_id=self.job_id)
            await self.mark_position(snap.completed, snap.digest)
            # The inner optimizer and the compression residual come back with our own
            # checkpoint; with a peer's state they start fresh (the events say so).
            self.compute.adam_step = snap.own_step if snap.own else 0
        if not snap.own and self.keys.own_state(self.spec):
            self.env.note(
                "local_state_fresh", "inner optimizer state and compression residual start fresh"
            )
        return snap
