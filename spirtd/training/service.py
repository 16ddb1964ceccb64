"""The training service: jobs in and out, one trainer at a time, and its control API.

``spirtctl train start`` on any member builds a job record, checks it here
(task, options, dataset, f against the live membership, ranges, no job running),
and only then publishes it; a refused job starts nowhere. Every member checks a
received record again against its own configuration before it runs anything;
a member that cannot run it says so (log, status) and tells the others, with a
heads-up, not to wait for it. The job is kept in DATA_DIR/training (mode 0600)
so a restarted daemon knows it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.errors import DecodeError
from protocol.gossip import Verdict
from protocol.membership import EventKind
from spirtd import tasks
from spirtd.functions.event import DataSlice
from spirtd.keyfiles import write_secret
from spirtd.nodeapi import ApiError
from spirtd.pubsub.service import Info, Message
from spirtd.tasks import remote
from spirtd.tasks.sharding import ALL, Shard
from spirtd.training import job as jobs
from spirtd.training import jobfiles, jobsize
from spirtd.training.aggregators import AggregatorError
from spirtd.training.checkpoint import Checkpoints, Snapshot
from spirtd.training.evidence import EVIDENCE_TOPIC, decode_evidence_meta
from spirtd.training.job import JobError, JobSpec
from spirtd.training.messages import (
    DIGEST_SIZE,
    JOBS_TOPIC,
    TRAIN_TOPIC,
    GradientMeta,
    StateMeta,
    decode_jobs_meta,
    decode_train_meta,
    encode_jobs_meta,
)
from spirtd.training.statesync import StateSync
from spirtd.training.trainer import GradientPublisher, GradientSource, Trainer, TrainerEnv

if TYPE_CHECKING:
    from spirtd.functions.service import FunctionsService
    from spirtd.membership.service import MembershipService
    from spirtd.nodeapi import NodeApi
    from spirtd.pubsub.service import PubSub
    from spirtd.redis.service import RedisService
    from spirtd.tasks import Task

log = logging.getLogger("spirtd.training")

# Training messages for a job whose record is still being checked, kept until it starts.
EARLY_MAX = 256
EARLY_PROOFS = 16  # proofs held likewise (each up to evidence.MAX_EVIDENCE)
EVENTS_MAX = 1000  # the job's event log kept for `train status` and the report
PREPARE_TIMEOUT_S = 300.0


class TrainingService:
    name = "training"

    def __init__(
        self,
        node: NodeApi,
        *,
        redis: RedisService,
        functions: FunctionsService,
        membership: MembershipService,
        pubsub: PubSub,
    ) -> None:
        self.node = node
        self.redis = redis
        self.functions = functions
        self.membership = membership
        self.pubsub = pubsub
        self.dir = jobfiles.job_dir(node.data.root)
        self.trainer: Trainer | None = None
        # The trainer's seams (for experiments; the daemon leaves them unset): see TrainerEnv.
        self.gradient_source: GradientSource | None = None
        self.gradient_publisher: GradientPublisher | None = None
        self.job_id: str | None = None
        self.spec: JobSpec | None = None
        self.state = "idle"
        self.detail = ""
        self._pending: str | None = None  # a received job being checked
        self._early: deque[tuple[Message, GradientMeta | StateMeta]] = deque(maxlen=EARLY_MAX)
        self._early_evidence: deque[Message] = deque(maxlen=EARLY_PROOFS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one job decision at a time
        self._saved: dict[str, Any] = {}  # what the data dir said of the job at start-up
        self._record_bytes: bytes | None = None
        self._refused: set[str] = set()  # jobs this node cannot run: not asked for again
        self.sync: StateSync | None = None
        self.checkpoints = Checkpoints(self.dir)
        # What happened to the job as this node saw it: joins, departures, syncs,
        # transfers served. Wall-clock stamped, for the report's markers.
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_MAX)
        self._gone: set[str] = set()  # members last seen dead or gone (for those events)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.sync = StateSync(
            self.node,
            snapshot=self._snapshot_for,
            record=lambda job: self._record_bytes if job == self.job_id else None,
            on_record=self._on_record,
            max_serves=self.node.config.training.max_state_serves,
            on_served=self._on_served,
        )
        self._load_persisted()
        if self._saved.get("state") in jobfiles.RESUMABLE and self.spec is not None:
            # Killed while training: pick the job up again (state from Redis, a
            # checkpoint or the peers) without restarting it anywhere. It runs from
            # now on as far as ``train status`` goes: "stopped" would tell a waiting
            # operator (or script) that it is over.
            self.state, self.detail = "running", "resuming after a daemon restart"
            self._spawn(self._resume_persisted(), "resume")
        self.pubsub.subscribe(JOBS_TOPIC, self._on_jobs, validator=self._validate_jobs)
        self.pubsub.subscribe(TRAIN_TOPIC, self._on_train, validator=self._validate_train)
        self.pubsub.subscribe(EVIDENCE_TOPIC, self._on_evidence, validator=self._validate_evidence)
        self.membership.add_listener(self._on_member)
        api = self.node.api
        if api is not None:
            api.route("POST", "/v1/train/start", self._api_start)
            api.route("POST", "/v1/train/stop", self._api_stop)
            api.route("GET", "/v1/train/status", self._api_status)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.sync is not None:
            self.sync.close()
        if self.trainer is not None:
            await self.trainer.stop("daemon shutting down")
            self._persist()

    def _spawn(self, coro: Any, name: str) -> None:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # --- checking a job against this node --------------------------------------------------

    def _live_members(self) -> list[str]:
        return [
            m["node_id"] for m in self.membership.members() if m["state"] in ("alive", "suspect")
        ]

    def _shard(self) -> Shard:
        s = self.node.config.shard
        return Shard.parse(s) if s else ALL

    def _build_task(self, spec: JobSpec, members: int) -> tuple[Task, str | None]:
        """This node's instance of the job's task, and where its dataset lives. The
        model is sized and checked against this node's limit before anything of the
        task is allocated (its data, its model)."""
        if tasks.DATASET_OPTION in spec.task_options:
            raise JobError(
                f"task option {tasks.DATASET_OPTION}: a job never carries a path; use --dataset"
            )
        allowed = set(self.node.config.task_modules)
        location = self.node.config.datasets.get(spec.task)
        options = dict(spec.task_options)
        if location is not None:
            # An S3 copy is disk, bounded by its listing's checks (spirtd/tasks/remote.py),
            # and cached: only a new listing downloads again.
            options[tasks.DATASET_OPTION] = self._local_copy(location)
        try:
            needs_dataset = tasks.task_class(spec.task, allowed_modules=allowed).needs_dataset
        except tasks.TaskError as e:
            raise JobError(_one_line(e)) from None
        if needs_dataset and location is None:
            raise JobError(
                f"task {spec.task} needs its dataset on this node: start spirtd with "
                f"--dataset {spec.task}=DIR"
            )
        try:
            task = tasks.load_task(spec.task, self._shard(), allowed_modules=allowed, **options)
            count = task.count_params()
        except (tasks.TaskError, ValueError, OSError) as e:
            raise JobError(_one_line(e)) from None
        if spec.param_count and count != spec.param_count:
            raise JobError(
                f"this node's model has {count:,} parameters, the job's has "
                f"{spec.param_count:,} (a different torch or task version?)"
            )
        jobsize.check(spec, count, members, self.node.config.training.max_model_mb)
        try:
            task.train  # noqa: B018 - load the data now: a missing file fails the job here
        except (tasks.TaskError, ValueError, OSError) as e:
            raise JobError(_one_line(e)) from None
        # The functions get where they find it ([function_datasets]), by default the
        # node's own location; an S3 one they copy for themselves.
        theirs = self.node.config.function_datasets.get(spec.task, location)
        if theirs is None:
            return task, None
        return task, theirs if remote.is_s3(theirs) else f"file://{theirs}"

    def _local_copy(self, location: str) -> str:
        """The directory to load a dataset from: ``location``, or this node's copy of
        an S3 one (under the data dir, made once per listing: spirtd/tasks/remote.py)."""
        if not remote.is_s3(location):
            return location
        try:
            return str(remote.localize(location, self.node.data.root / "datasets"))
        except remote.RemoteDataError as e:
            raise JobError(f"dataset: {e}") from None

    async def _prepare(self, spec: JobSpec) -> tuple[Task, str | None, np.ndarray, str]:
        """The job's task and initial parameters on this node, or a JobError: whatever
        goes wrong while preparing (a timeout, MemoryError, an error in a user's task)
        is a refusal of this job, never a failure of the daemon."""
        members = len(self._live_members())
        # Its workers start meanwhile: a joiner or a restarted node needs them right
        # after its state sync, and a cold start is seconds of imports.
        self.functions.warm()
        try:
            return await asyncio.wait_for(self._prepare_unchecked(spec, members), PREPARE_TIMEOUT_S)
        except JobError:
            raise
        except TimeoutError:
            raise JobError(f"preparing the task took over {PREPARE_TIMEOUT_S:.0f} s") from None
        except Exception as e:  # any failure is the job's: see the docstring
            log.warning("preparing task %s failed", spec.task, exc_info=True)
            raise JobError(f"preparing the task failed: {_one_line(e)}") from None

    async def _prepare_unchecked(
        self, spec: JobSpec, members: int
    ) -> tuple[Task, str | None, np.ndarray, str]:
        task, uri = await asyncio.to_thread(self._build_task, spec, members)
        params = await asyncio.to_thread(task.initial_params, spec.seed)
        digest = hashlib.blake2b(params.tobytes(), digest_size=32).hexdigest()
        return task, uri, params, digest

    def _check_can_start(self, spec: JobSpec) -> None:
        if self.trainer is not None and self.trainer.state.active:
            raise JobError(
                f"job {self.job_id} is already running; stop it first with `spirtctl train stop`"
            )
        try:
            spec.rule.check_membership(len(self._live_members()))
        except AggregatorError as e:
            raise JobError(str(e)) from None
        if self.redis.store is None or self.functions.invoker is None:
            raise JobError("this node's Redis or functions are not up yet")

    # --- starting and stopping ------------------------------------------------------------

    async def _api_start(self, body: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            try:
                # A user's task is imported to read its defaults: off the event loop.
                spec = await asyncio.to_thread(
                    jobs.from_request,
                    body,
                    now_ms=int(time.time() * 1000),
                    allowed_modules=set(self.node.config.task_modules),
                )
                self._check_can_start(spec)
                task, uri, params, digest = await self._prepare(spec)
            except JobError as e:
                raise ApiError(400, f"job refused: {e}") from None
            spec = jobs.with_model(spec, int(params.size), digest)
            record = spec.to_record()
            job_id = JobSpec.job_id(record)
            self._pending = job_id
            await self.pubsub.publish(JOBS_TOPIC, record, meta=encode_jobs_meta("start", job_id))
            await self._run(job_id, spec, record, task, uri, params, origin=self.node.key.node_id)
        log.info("started job %s: %s", job_id, _describe(spec))
        return {"job": job_id, **spec.summary()}

    async def _api_stop(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.job_id is None or self.trainer is None or not self.trainer.state.active:
            raise ApiError(400, "no job is running")
        job_id = self.job_id
        await self.pubsub.publish(JOBS_TOPIC, b"", meta=encode_jobs_meta("stop", job_id))
        await self._stop_job(job_id, f"stopped by {self.node.key.node_id} (this node)")
        return {"job": job_id, "state": self.state}

    async def _run(
        self,
        job_id: str,
        spec: JobSpec,
        record: bytes,
        task: Task,
        uri: str | None,
        params: np.ndarray | None,
        *,
        origin: str,
        join: str | None = None,
    ) -> None:
        """Runs ``job_id``: from its initial ``params``, or (``join``: why) from a state
        established from this node's Redis, its checkpoint or the peers."""
        if self.trainer is not None:
            await self.trainer.stop("replaced by a new job")
        if job_id != self.job_id:
            self.events.clear()
        self.job_id, self.spec = job_id, spec
        self.state, self.detail = "running", f"started by {origin}"
        self._record_bytes = record
        write_secret(jobfiles.record_path(self.node.data.root), record)
        cfg = self.node.config
        assert self.redis.store is not None and self.functions.invoker is not None
        env = TrainerEnv(
            node_id=self.node.key.node_id,
            store=self.redis.store,
            invoker=self.functions.invoker,
            pubsub=self.pubsub,
            redis_target=self.redis.function_target(),
            data=DataSlice(shard=self._shard(), batch_size=spec.batch_size, uri=uri),
            task=task,
            invoke_timeout_s=cfg.invoke.timeout_s,
            min_slice_fraction=cfg.training.min_slice_fraction,
            round_config=cfg.round_config(),
            sync=self.sync,
            checkpoints=self.checkpoints,
            checkpoint_every=cfg.training.checkpoint_every,
            sync_timeout_s=cfg.training.sync_timeout_s,
            counters=self.node.counters,
            note=self.note,
            gradient_source=self.gradient_source,
            gradient_publisher=self.gradient_publisher,
            wire_bytes=self.node.wire_bytes,
            prices=self.functions.prices,
            body_rounds=cfg.training.body_rounds,
        )
        assert self.sync is not None
        self.trainer = Trainer(job_id, spec, env, self._live_members(), self._finished)
        if params is None or join is not None:
            await self.trainer.start_elsewhere(join or "joining")
        else:
            await self.trainer.start(params)
        self._persist()
        self._pending = None
        early, self._early = list(self._early), deque(maxlen=EARLY_MAX)
        proofs, self._early_evidence = list(self._early_evidence), deque(maxlen=EARLY_PROOFS)
        # Accepted unchecked while the job was pending: checked now, proofs first (a
        # held gradient may be from a peer they convict).
        for msg in proofs:
            if self.trainer.validate_evidence(_info(msg)) is Verdict.ACCEPT:
                await self.trainer.deliver_evidence(msg)
        for msg, meta in early:
            if meta.job == job_id and self.trainer.validate(_info(msg), meta) is Verdict.ACCEPT:
                await self.trainer.deliver(msg, meta)

    async def _stop_job(self, job_id: str, why: str) -> None:
        if self.job_id != job_id or self.trainer is None or self.state == "done":
            # A finished job stays finished: a stop that arrives after the last
            # round (from a member still catching up) changes nothing.
            return
        await self.trainer.stop(why)
        self.state, self.detail = "stopped", why
        log.info("job %s %s", job_id, why)
        self._persist()

    def _finished(self, trainer: Trainer) -> None:
        if trainer is not self.trainer:
            return
        self.state = "done" if trainer.state == "done" else "stopped"
        self.detail = trainer.detail
        self._persist()

    def _persist(self) -> None:
        if self.job_id is None:
            return
        info = {"job": self.job_id, "state": self.state, "detail": self.detail}
        if self.trainer is not None:
            # Loss and accuracy too: a restarted daemon reports a done job as it ended.
            info |= self.trainer.records.status() | {
                "round": self.trainer.completed,
                "model_digest": self.trainer.digest.hex() if self.trainer.digest else None,
            }
        write_secret(jobfiles.info_path(self.node.data.root), json.dumps(info).encode())

    def _load_persisted(self) -> None:
        """A restarted daemon knows its job (resuming it is state sync's business)."""
        root = self.node.data.root
        if not jobfiles.record_path(root).exists():
            return
        try:
            record = jobfiles.read_small(jobfiles.record_path(root), jobs.MAX_RECORD)
            spec = JobSpec.from_record(record)
            info = jobfiles.read_info(root)
        except (OSError, ValueError, JobError) as e:
            log.warning("ignoring the saved job in %s: %s", self.dir, e)
            return
        self.job_id, self.spec = JobSpec.job_id(record), spec
        self._record_bytes = record
        saved = info.get("state")
        self.state = "done" if saved == "done" else "stopped"
        self.detail = "daemon restarted" if saved == "running" else str(info.get("detail", ""))
        self._saved = info
        log.info("known job %s (%s) from the data dir: %s", self.job_id, spec.task, self.state)

    # --- gossip ----------------------------------------------------------------------------

    def _validate_jobs(self, info: Info) -> Verdict:
        try:
            kind, job_id = decode_jobs_meta(info.meta)
        except DecodeError:
            return Verdict.REJECT
        if kind == "start":
            if info.size > jobs.MAX_RECORD:
                return Verdict.REJECT
            if self._pending is None and (self.trainer is None or not self.trainer.state.active):
                # Known before the body arrives: this job's first gradients may be
                # validated before its record has been checked.
                self._pending = job_id
        return Verdict.ACCEPT

    async def _on_jobs(self, msg: Message) -> None:
        try:
            kind, job_id = decode_jobs_meta(msg.meta)
        except DecodeError:
            return
        if kind == "stop":
            await self._stop_job(job_id, f"stopped by {msg.origin}")
            return
        record = await msg.read()
        async with self._lock:
            await self._accept_remote(job_id, record, msg.origin)

    async def _accept_remote(
        self, job_id: str, record: bytes, origin: str, join: str | None = None
    ) -> None:
        if job_id in self._refused or (job_id == self.job_id and self.trainer is not None):
            return
        try:
            if JobSpec.job_id(record) != job_id:
                raise JobError("the record does not hash to its job id")
            spec = JobSpec.from_record(record)
            self._check_can_start(spec)
            task, uri, params, digest = await self._prepare(spec)
            if params.size != spec.param_count or digest != spec.init_digest:
                raise JobError(
                    "this node builds different initial parameters than the starter "
                    "(a different torch or task version?)"
                )
        except JobError as e:
            why = str(e)
            self.node.counters["training.jobs_refused"] += 1
            log.warning("refusing job %s from %s: %s", job_id, origin, why)
            if self._pending == job_id:
                self._pending = None
            self._refused.add(job_id)
            if self.trainer is None or not self.trainer.state.active:
                self.detail = f"refused job {job_id}: {why}"
            # Tell the others not to wait for this node's gradients.
            meta = StateMeta(job_id, 1, bytes(DIGEST_SIZE), False).encode()
            await self.pubsub.publish(TRAIN_TOPIC, b"", meta=meta)
            return
        await self._run(job_id, spec, record, task, uri, params, origin=origin, join=join)
        log.info("joined job %s from %s: %s", job_id, origin, _describe(spec))

    def _validate_train(self, info: Info) -> Verdict:
        try:
            meta = decode_train_meta(info.meta)
        except DecodeError:
            return Verdict.REJECT
        if (
            self.trainer is not None
            and meta.job == self.job_id
            and self.state in ("running", "done")
        ):
            return self.trainer.validate(info, meta)
        if meta.job == self._pending:
            return Verdict.ACCEPT  # kept in _early until the job starts, then validated
        if (
            self.sync is not None
            and meta.job != self.job_id
            and meta.job not in self._refused
            and (self.trainer is None or not self.trainer.state.active)
        ):
            # A job under way that this node does not know (it joined late, or was
            # down when the job started): ask for its record.
            self.sync.ask_job(info.origin, meta.job, time.monotonic())
        self.node.counters["training.gradient_rejected.job"] += 1
        return Verdict.IGNORE

    async def _on_train(self, msg: Message) -> None:
        try:
            meta = decode_train_meta(msg.meta)
        except DecodeError:
            return
        if (
            self.trainer is not None
            and meta.job == self.job_id
            and self.state in ("running", "done")
        ):
            await self.trainer.deliver(msg, meta)
        elif meta.job == self._pending:
            self._early.append((msg, meta))

    def _validate_evidence(self, info: Info) -> Verdict:
        if self._pending is not None and self._evidence_job(info.meta) == self._pending:
            # A proof that went round while this node prepared the job (it learned of
            # it late, or the others are quicker): kept until the job starts.
            return Verdict.ACCEPT
        t = self.trainer
        if t is not None and t.job_id == self.job_id and self.state in ("running", "done"):
            return t.validate_evidence(info)
        return Verdict.IGNORE

    async def _on_evidence(self, msg: Message) -> None:
        if self._pending is not None and self._evidence_job(msg.meta) == self._pending:
            self._early_evidence.append(msg)
            return
        t = self.trainer
        if t is not None and t.job_id == self.job_id and self.state in ("running", "done"):
            await t.deliver_evidence(msg)

    @staticmethod
    def _evidence_job(meta: bytes) -> str | None:
        try:
            return decode_evidence_meta(meta)[0]
        except DecodeError:
            return None

    async def _on_record(self, job_id: str, record: bytes, origin: str) -> None:
        """A job record we asked a peer for: join that job, through state sync."""
        async with self._lock:
            await self._accept_remote(job_id, record, origin, join="joining a running job")

    async def _snapshot_for(self, job_id: str) -> Snapshot | None:
        t = self.trainer
        if t is None or job_id != self.job_id:
            return None
        return await t.snapshot()

    async def _resume_persisted(self) -> None:
        assert self.spec is not None and self.job_id is not None and self._record_bytes
        spec, job_id = self.spec, self.job_id
        async with self._lock:
            try:
                task, uri, _, digest = await self._prepare(spec)
                if digest != spec.init_digest:
                    raise JobError("this node now builds different initial parameters")
            except JobError as e:
                self.state, self.detail = "stopped", f"cannot resume after restart: {e}"
                log.error("job %s: %s", job_id, self.detail)
                return
            log.info("resuming job %s after a restart", job_id)
            await self._run(
                job_id,
                spec,
                self._record_bytes,
                task,
                uri,
                None,
                origin="restart",
                join="restarted",
            )

    def note(self, kind: str, detail: str = "", **extra: Any) -> None:
        """Adds an event to the job's log (nothing while no job is known)."""
        if self.job_id is None:
            return
        t = self.trainer
        round_ = t.completed if t is not None else 0
        self.events.append(
            {"t": round(time.time(), 3), "round": round_, "kind": kind, "detail": detail, **extra}
        )

    def _on_served(self, job: str, peer: str, started: float, nbytes: int) -> None:
        if job == self.job_id:
            self.note("served", f"{nbytes} bytes to {peer}", start=round(started, 3))
            if self.trainer is not None:
                self.trainer.state_served()

    def _on_member(self, ev: Any) -> None:
        t = self.trainer
        gone = ev.kind in (EventKind.DEAD, EventKind.LEFT, EventKind.REMOVED)
        came = ev.kind in (EventKind.JOINED, EventKind.ALIVE)
        # A suspicion refuted (suspect -> alive) changes nobody's membership: only
        # a first sighting, a departure, and a return from one are events.
        if gone and ev.node_id not in self._gone:
            self._gone.add(ev.node_id)
            self.note("member_left", ev.node_id)
        elif ev.kind is EventKind.JOINED or (came and ev.node_id in self._gone):
            self._gone.discard(ev.node_id)
            self.note("member_joined", ev.node_id)
        if t is None or not t.job.hears_members:
            return
        if gone:
            t.member_gone(ev.node_id)
        elif came:
            t.member_alive(ev.node_id)

    # --- status ----------------------------------------------------------------------------

    def _block(self) -> dict[str, Any]:
        t = self.trainer
        st = t.status() if t is not None else {}
        saved = self._saved if t is None else {}
        h = self.spec.inner_steps if self.spec is not None else 1
        state, detail = self.state, self.detail
        if self.state in ("running", "done") and st.get("state") == "syncing":
            # The job runs; this node is (re)establishing its state or catching up.
            state, detail = "syncing", st.get("detail") or detail
        return {
            "job": self.job_id,
            "state": state,
            "detail": detail,
            "round": st.get("round", saved.get("round", 0)),
            "model_digest": st.get("model_digest", saved.get("model_digest")),
            "loss": st.get("loss", saved.get("loss")),
            "accuracy": st.get("accuracy", saved.get("accuracy")),
            # Peers proven Byzantine (equivocation), out of this job for good.
            "excluded": st.get("excluded", []),
            # Outer rounds: inner steps per round, the steps the agreed model has
            # taken (round x H), and how many this peer ran itself.
            "inner_steps": h,
            "steps": int(st.get("round", saved.get("round", 0)) or 0) * h,
            "inner_steps_run": st.get("inner_steps_run", 0),
        }

    def status(self) -> dict[str, Any]:
        return {"training": self._block()}

    async def _api_status(self, body: dict[str, Any]) -> dict[str, Any]:
        t = self.trainer
        out = self._block()
        out["job"] = (
            {"id": self.job_id, **self.spec.summary()}
            if self.job_id is not None and self.spec is not None
            else None
        )
        out["history"] = [r.to_json() for r in t.history] if t is not None else []
        out["events"] = list(self.events)
        # What this peer's invocations of the job cost so far (each row: its round's).
        out["cost"] = t.compute.cost.total_json() if t is not None else None
        out["rounds"] = t.m.status() if t is not None else None
        return out


def _describe(spec: JobSpec) -> str:
    return (
        f"task={spec.task} rounds={spec.rounds} aggregator={spec.aggregator} f={spec.f} "
        f"batch={spec.batch_size} functions={spec.functions_per_round} "
        f"optimizer={spec.optimizer} lr={spec.lr} inner_steps={spec.inner_steps} "
        f"compression={spec.compression}"
    )


def _one_line(e: BaseException) -> str:
    """An exception as one line for a refusal (its type when it has no message)."""
    lines = str(e).splitlines()
    return lines[0] if lines and lines[0] else type(e).__name__


def _info(msg: Message) -> Info:
    """What a validator would have seen of ``msg``."""
    return Info(msg.topic, msg.origin, msg.seq, msg.ts_ms, msg.size, msg.digest, msg.meta)
