"""The training service without processes: its evidence hook while a job is being
prepared (a proof for that job is kept, bounded, until the trainer starts, not
ignored for good), and a stop while this peer syncs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from protocol.gossip import Verdict
from protocol.rounds import Lifecycle
from spirtd.training.evidence import EVIDENCE_TOPIC, nonfinite_proof
from spirtd.training.service import EARLY_PROOFS, TrainingService
from tests.test_equivocation import CHUNK, _body_with_nan_at, _key, _signed_body
from tests.test_trainer_unit import FakeMessage

PENDING = "p" * 32
OTHER = "q" * 32


def _proof_message(job: str, liar: int = 9) -> FakeMessage:
    key = _key(liar)
    body = _body_with_nan_at(3)
    proof = nonfinite_proof(key.node_id, job, 1, _signed_body(key, body, job=job), body, CHUNK)
    assert proof is not None
    return FakeMessage("n" * 64, proof.encode(), proof.meta(), topic=EVIDENCE_TOPIC)


def _service(tmp_path: Path) -> TrainingService:
    node: Any = SimpleNamespace(data=SimpleNamespace(root=tmp_path))
    fake: Any = None
    return TrainingService(node, redis=fake, functions=fake, membership=fake, pubsub=fake)


async def test_a_proof_for_the_job_being_prepared_is_kept_until_it_starts(
    tmp_path: Path,
) -> None:
    svc = _service(tmp_path)
    mine, other = _proof_message(PENDING), _proof_message(OTHER)
    # No job at all: nothing to judge a proof by.
    assert svc._validate_evidence(mine.info()) is Verdict.IGNORE
    svc._pending = PENDING
    assert svc._validate_evidence(mine.info()) is Verdict.ACCEPT
    assert svc._validate_evidence(other.info()) is Verdict.IGNORE
    await svc._on_evidence(mine)  # type: ignore[arg-type]
    await svc._on_evidence(other)  # type: ignore[arg-type]
    assert list(svc._early_evidence) == [mine]
    for _ in range(2 * EARLY_PROOFS):
        await svc._on_evidence(mine)  # type: ignore[arg-type]
    assert len(svc._early_evidence) == EARLY_PROOFS  # bounded


class _SyncingTrainer:
    def __init__(self) -> None:
        self.state = Lifecycle.SYNCING
        self.job_id = PENDING
        self.stopped: list[str] = []
        self.completed, self.digest = 4, b"\x05" * 32
        self.records = SimpleNamespace(status=lambda: {"loss": None, "accuracy": None})

    async def stop(self, why: str) -> None:
        self.stopped.append(why)


async def test_a_job_is_stopped_while_this_peer_syncs(tmp_path: Path) -> None:
    """`train stop` on a peer that is syncing its state (a fork, a join) stops the
    job; it used to answer "no job is running" (a bench run died on it)."""
    published: list[tuple[str, Any]] = []

    async def publish(topic: str, body: bytes, meta: bytes) -> None:
        published.append((topic, meta))

    svc = _service(tmp_path)
    svc.pubsub = SimpleNamespace(publish=publish)  # type: ignore[assignment]
    svc.node.key = SimpleNamespace(node_id="n" * 64)
    trainer = _SyncingTrainer()
    svc.trainer, svc.job_id, svc.state = trainer, PENDING, "running"  # type: ignore[assignment]
    out = await svc._api_stop({})
    assert out == {"job": PENDING, "state": "stopped"}
    assert trainer.stopped and len(published) == 1
    assert '"state": "stopped"' in (tmp_path / "training" / "job.json").read_text()


def _mnist_service(tmp_path: Path, **overrides: Any) -> TrainingService:
    from spirtd.config import load
    from tests.test_tasks_mnist import _mnist_dir

    data = _mnist_dir(tmp_path / "mnist")
    cfg = load(None, {"data_dir": str(tmp_path / "d"), "datasets": [f"mnist={data}"], **overrides})
    svc = _service(tmp_path)
    svc.node.config = cfg
    return svc


def test_functions_are_told_where_they_find_the_dataset(tmp_path: Path) -> None:
    """By default the node's own location; with [function_datasets], that one (a
    path on a function host, or S3), while the node still loads its own copy."""
    from spirtd.training.job import JobSpec

    (tmp_path / "mnist").mkdir()
    svc = _mnist_service(tmp_path)
    spec = JobSpec("mnist", {})
    task, uri = svc._build_task(spec, 3)
    assert uri == f"file://{tmp_path / 'mnist'}" and len(task.train) == 24
    svc.node.config.function_datasets = {"mnist": "/srv/fn/mnist"}
    assert svc._build_task(spec, 3)[1] == "file:///srv/fn/mnist"
    svc.node.config.function_datasets = {"mnist": "s3://spirt-data/mnist"}
    assert svc._build_task(spec, 3)[1] == "s3://spirt-data/mnist"
