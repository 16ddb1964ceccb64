"""A job is sized before anything of it is built, and refused over the node's
``[training] max_model_mb``: on the node where it is started (spirtctl exits 1
naming the size and the limit) and on a member that receives its record by
gossip. The record is the one of security finding 1: ~300 bytes asking every
member for a synthetic model of 69 billion parameters (258 GiB a copy).

The sizing itself is checked against models actually built: the count taken on
torch's meta device equals the built model's sum of numel.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from spirtd.config import ConfigError, load
from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from spirtd.tasks import Task, TaskError, load_task
from spirtd.tasks.synthetic import MAX_DATA_BYTES, SyntheticTask, data_peak_bytes
from spirtd.training import job as jobs
from spirtd.training import jobsize
from spirtd.training.job import JobError, JobSpec
from spirtd.training.messages import JOBS_TOPIC, encode_jobs_meta

HUGE = {"features": 65536, "hidden": 65536, "depth": 16, "classes": 10000}
# Counted by hand: the first layer, 15 hidden-to-hidden layers, the output layer.
HUGE_PARAMS = (65536 * 65536 + 65536) + 15 * (65536 * 65536 + 65536) + (65536 * 10000 + 10000)
# A daemon with torch loaded peaks well under this; building any one layer of
# HUGE (16 GiB) would not.
RSS_CEILING = 2 << 30
TASK_MODULES = 'task_modules = ["tests"]\n'


# --- the arithmetic, against real models -------------------------------------------------


@pytest.mark.parametrize(
    ("task", "options"),
    [
        ("synthetic", {}),
        ("synthetic", {"depth": 0, "features": 3, "classes": 2}),
        ("synthetic", {"depth": 4, "hidden": 17, "features": 9, "classes": 5}),
        ("digits", {}),
        ("digits", {"model": "cnn", "hidden": 40}),
        ("mnist", {"path": "/nonexistent", "hidden": 33}),
        ("mnist", {"path": "/nonexistent", "model": "cnn", "hidden": 12}),
    ],
)
def test_counted_on_meta_equals_the_built_model(task: str, options: dict[str, Any]) -> None:
    t = load_task(task, **options)
    built = t.build_model()
    assert t.count_params() == sum(p.numel() for p in built.parameters())
    assert t.count_params() == t.param_count


def test_the_finding_is_counted_without_allocating_it() -> None:
    task = load_task("synthetic", **HUGE)
    tracemalloc.start()
    try:
        count = task.count_params()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == HUGE_PARAMS
    assert peak < 64 << 20, peak


class _NeedsStorage(Task):
    name = "needs_storage"

    def build_model(self) -> nn.Module:
        m = nn.Linear(2, 2)
        m.weight.detach().numpy()  # a meta tensor has no storage to show
        return m

    def load_splits(self) -> Any:
        raise AssertionError("never loaded")


def test_a_model_that_cannot_be_sized_is_an_error_that_says_how() -> None:
    with pytest.raises(TaskError, match=r"cannot be sized.*count_params"):
        _NeedsStorage().count_params()


def _spec(**kw: Any) -> JobSpec:
    return jobs.from_request({"task": "synthetic", **kw}, now_ms=1)


@pytest.mark.parametrize(
    ("kw", "members", "expected"),
    [
        # parameters, aggregate, 3 gradients + 2 slices + 2 bodies, 3 working copies
        ({"momentum": 0.0}, 3, 1 + 0 + 1 + 3 + 2 + 2 + 3),
        ({"momentum": 0.9}, 3, 1 + 1 + 1 + 3 + 2 + 2 + 3),
        ({"optimizer": "adam", "momentum": 0.0}, 1, 1 + 2 + 1 + 1 + 2 + 0 + 3),
        ({"aggregator": "cclip", "f": 1, "momentum": 0.0}, 5, 1 + 0 + 2 + 5 + 2 + 4 + 3),
        ({"momentum": 0.0, "functions_per_round": 8}, 10, 1 + 0 + 1 + 10 + 8 + 9 + 3),
        # a node that sees no member (not even itself yet) counts itself
        ({"momentum": 0.0}, 0, 1 + 0 + 1 + 1 + 2 + 0 + 3),
    ],
)
def test_copies_per_job(kw: dict[str, Any], members: int, expected: int) -> None:
    assert jobsize.copies(_spec(**kw), members) == expected


def test_the_limit_names_the_size_and_the_limit() -> None:
    spec = _spec(momentum=0.0)  # 12 copies at 3 members
    fits = (100 << 20) // (4 * 12)
    assert jobsize.check(spec, fits, 3, 100).bytes <= 100 << 20
    with pytest.raises(JobError) as e:
        jobsize.check(spec, fits + 1, 3, 100)
    msg = str(e.value)
    assert f"{fits + 1:,} parameters" in msg and "12 copies" in msg
    assert "100 MiB" in msg and "max_model_mb" in msg
    with pytest.raises(JobError, match=r"258\.4 GiB each copy.*1024 MiB"):
        jobsize.check(_spec(), HUGE_PARAMS, 1, 1024)


def test_max_model_mb_is_a_checked_setting(tmp_path: Path) -> None:
    f = tmp_path / "spirtd.toml"
    assert load(None, {}).training.max_model_mb == 1024
    f.write_text("[training]\nmax_model_mb = 4096\n")
    assert load(f, {}).training.max_model_mb == 4096
    for bad, allowed in (("0", ">= 1"), ("1.5", "an integer"), ("'1G'", "an integer")):
        f.write_text(f"[training]\nmax_model_mb = {bad}\n")
        with pytest.raises(ConfigError, match=rf"training\.max_model_mb: .*{allowed}"):
            load(f, {})


# --- synthetic's data is bounded by what generating it really holds ----------------------


@pytest.mark.parametrize(
    ("samples", "features", "classes"), [(20000, 200, 4), (3000, 100, 500), (50000, 8, 10)]
)
def test_synthetic_data_estimate_covers_the_real_peak(
    samples: int, features: int, classes: int
) -> None:
    task = SyntheticTask(samples=samples, features=features, classes=classes)
    tracemalloc.start()
    try:
        task.load_splits()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= data_peak_bytes(samples, features, classes)


def test_synthetic_refuses_its_data_before_making_it() -> None:
    task = SyntheticTask(**HUGE)  # 10000 classes x 65536 features of centres alone: 7.3 GiB
    assert data_peak_bytes(512, 65536, 10000) > MAX_DATA_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(TaskError, match="MiB to generate"):
            task.train  # noqa: B018 - loading is the test
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


# --- real daemons ------------------------------------------------------------------------


def _ctl(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", *args, "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _peak_rss(node: LocalNode) -> int:
    """The daemon's resident-memory high-water mark since it started."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _ready(node: LocalNode) -> bool:
    return bool(node.status()["redis"]["ok"])


def _cluster(make_cluster: Any, n: int) -> LocalCluster:
    # tests.failing_task is importable by the daemons: localcluster puts the
    # checkout on their PYTHONPATH.
    c: LocalCluster = make_cluster(n, args=["--profile", "local"], config=TASK_MODULES)
    c.start()
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "every node to see every other alive")
    for node in c.nodes:
        wait_for(lambda node=node: _ready(node), 60, f"{node.data_dir.name}'s Redis")
    return c


@pytest.mark.timeout(300)
def test_train_start_refuses_the_finding_and_the_daemon_stays_healthy(make_cluster: Any) -> None:
    node = _cluster(make_cluster, 1).nodes[0]
    args = [a for k, v in HUGE.items() for a in ("--task-arg", f"{k}={v}")]
    r = _ctl(node, "train", "start", "--task", "synthetic", *args)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{HUGE_PARAMS:,} parameters" in err and "258.4 GiB each copy" in err, err
    assert "1024 MiB" in err and "max_model_mb" in err, err
    # Healthy after it: status answers, no job, and the daemon never held the model.
    st = _ctl(node, "status", "--json")
    assert st.returncode == 0, st.stderr
    train = node.call("GET", "/v1/train/status")
    assert train["job"] is None and train["state"] == "idle"
    assert node.running
    assert _peak_rss(node) < RSS_CEILING
    # Whatever else fails while a job is prepared is its refusal, not the daemon's
    # trouble (an HTTP 500 before): MemoryError loading data, torch's allocator failing.
    for fail, why in (("data", "MemoryError"), ("model", "DefaultCPUAllocator: no memory")):
        r = _ctl(
            node,
            "train",
            "start",
            "--task",
            "tests.failing_task:Failing",
            "--task-arg",
            f"fail={fail}",
        )
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "job refused: preparing the task failed: " in r.stderr and why in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # The limit is the node's setting: a job that fits starts.
    ok = _ctl(node, "train", "start", "--task", "synthetic", "--rounds", "2")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.timeout(300)
def test_a_member_refuses_the_finding_received_by_gossip(make_cluster: Any) -> None:
    c = _cluster(make_cluster, 2)
    sender, receiver = c.nodes
    specs = {
        # The record as a starter that skipped its own checks would send it.
        "sized": JobSpec("synthetic", dict(HUGE), param_count=HUGE_PARAMS, created_ms=1),
        # One that lies about its size: refused on the count, still before building.
        "lying": JobSpec("synthetic", dict(HUGE), param_count=10, created_ms=2),
        # One that fits, but whose preparation fails like an oversized one.
        "failing": JobSpec("tests.failing_task:Failing", {"fail": "data"}, param_count=10),
    }
    ids = {}
    for name, spec in specs.items():
        record = spec.check().to_record()
        assert len(record) < 400
        ids[name] = JobSpec.job_id(record)
        sender.call(
            "POST",
            "/v1/pubsub/publish",
            {
                "topic": JOBS_TOPIC,
                "data_hex": record.hex(),
                "meta_hex": encode_jobs_meta("start", ids[name]).hex(),
            },
        )

    def refusals() -> int:
        return int(receiver.status()["counters"].get("training.jobs_refused", 0))

    wait_for(lambda: refusals() >= len(specs), 60, "the receiver to refuse every record")
    log = receiver.log_path.read_text(errors="replace")
    sized = f"refusing job {ids['sized']} from {sender.node_id}: the model is too large"
    assert sized in log and "1024 MiB ([training] max_model_mb)" in log
    lying = f"refusing job {ids['lying']} from {sender.node_id}: this node's model has"
    assert lying in log and "the job's has 10 " in log
    failing = f"refusing job {ids['failing']} from {sender.node_id}: preparing the task failed"
    assert f"{failing}: MemoryError" in log
    train = receiver.call("GET", "/v1/train/status")
    assert train["job"] is None and train["state"] == "idle"
    assert train["detail"].startswith("refused job ")
    assert receiver.running and _peak_rss(receiver) < RSS_CEILING
