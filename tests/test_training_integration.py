"""Training end to end on real processes: spirtd daemons on 127.0.0.1, each with its
own managed redis-server (SPIRT module loaded) and local function runtime.

Every job here is started through the control API that spirtctl uses (the CLI
itself is exercised in the refusal tests), and every assertion reads what an
operator reads: `train status` on each node.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from spirtd.tasks import remote
from spirtd.tasks.idx import write_idx
from tests.fixtures_s3 import s3_endpoint, upload_dir

# Training integration runs are real multi-process clusters: give each a minute or more.
pytestmark = pytest.mark.timeout(420)


def _cluster(make_cluster: Any, n: int, extra: list[list[str]] | None = None) -> LocalCluster:
    c: LocalCluster = make_cluster(0)
    for i in range(n):
        args = ["--profile", "local", "--shard", f"{i}/{n}", *(extra[i] if extra else [])]
        c.add_node(args=args, start=False, index=i)
    c.start()
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "every node to see every other alive")
    return c


def _status(n: LocalNode) -> dict[str, Any]:
    return n.call("GET", "/v1/train/status")


def _rounds_run(n: LocalNode) -> int:
    """Rounds this node has closed, in every job since it started."""
    return int(n.status()["counters"].get("training.rounds", 0))


def _wait_done(nodes: list[LocalNode], timeout: float = 300) -> list[dict[str, Any]]:
    wait_for(
        lambda: all(_status(n)["state"] in ("done", "stopped") for n in nodes),
        timeout,
        "every node to finish the job",
    )
    return [_status(n) for n in nodes]


def _ctl(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", *args, "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_trained(statuses: list[dict[str, Any]], min_accuracy: float) -> None:
    for s in statuses:
        assert s["state"] == "done", s["detail"]
        assert s["round"] == s["job"]["rounds"]
        assert s["accuracy"] is not None and s["accuracy"] >= min_accuracy, s["accuracy"]
    digests = {s["model_digest"] for s in statuses}
    assert len(digests) == 1, f"peers hold different models: {digests}"
    # A history's phases are durations, nothing internal (e.g. a monotonic timestamp).
    for s in statuses:
        for h in s["history"]:
            assert all(k.endswith("_s") and 0 <= v < 600 for k, v in h["phases"].items()), h


def test_four_peers_train_digits(make_cluster: Any) -> None:
    c = _cluster(make_cluster, 4)
    r = _ctl(c.nodes[2], "train", "start", "--task", "digits", "--json")
    assert r.returncode == 0, r.stderr
    statuses = _wait_done(c.nodes)
    _assert_trained(statuses, 0.95)
    ids = {n.node_id for n in c.nodes}
    for s in statuses:
        hist = s["history"]
        assert [h["round"] for h in hist] == list(range(1, s["round"] + 1))
        # Nobody crashed or lagged: every round aggregated all four, in node-id order.
        short = [
            {k: h.get(k) for k in ("round", "closed_by", "wait_s", "deadline_s")}
            | {"missing": sorted(ids - set(h["contributors"]))}
            for h in hist
            if h["contributors"] != sorted(ids) or h["closed_by"] != "complete"
        ]
        assert not short, (short[:5], s["events"][-10:])
        evaluated = [h["round"] for h in hist if h["accuracy"] is not None]
        assert evaluated[-1] == s["round"] and all(r % 10 == 0 for r in evaluated)
    # `spirtctl status` carries the same facts in its training block.
    st = c.nodes[0].status()["training"]
    assert st["state"] == "done" and st["model_digest"] == statuses[0]["model_digest"]
    assert st["accuracy"] == statuses[0]["accuracy"]


def _learnable_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """IDX files in MNIST's layout whose classes can be told apart: each class lights
    its own band of rows, plus noise."""
    rng = np.random.default_rng(7)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y + 3 : 2 * y + 6, 4:24] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_mnist_from_idx_files(make_cluster: Any, short_tmp: Path) -> None:
    (short_tmp / "mnist-data").mkdir()
    data = _learnable_mnist(short_tmp / "mnist-data")
    dataset = ["--dataset", f"mnist={data}"]
    c = _cluster(make_cluster, 2, [dataset, dataset])
    r = _ctl(c.nodes[0], "train", "start", "--task", "mnist", "--rounds", "30", "--json")
    assert r.returncode == 0, r.stderr
    statuses = _wait_done(c.nodes)
    _assert_trained(statuses, 0.9)
    assert statuses[0]["job"]["params"] == 784 * 128 + 128 + 128 * 10 + 10


def test_mnist_from_s3(make_cluster: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same job with the dataset in S3 (``--dataset mnist=s3://...``): each
    daemon copies it for its evaluation, each function for its slices."""
    (short_tmp / "mnist-data").mkdir()
    data = _learnable_mnist(short_tmp / "mnist-data")
    monkeypatch.setenv(remote.CACHE_ENV, str(short_tmp / "function-cache"))
    with s3_endpoint(monkeypatch, "spirt-data") as client:
        upload_dir(client, data, "spirt-data", "mnist")
        dataset = ["--dataset", "mnist=s3://spirt-data/mnist"]
        c = _cluster(make_cluster, 2, [dataset, dataset])
        r = _ctl(c.nodes[0], "train", "start", "--task", "mnist", "--rounds", "30", "--json")
        assert r.returncode == 0, r.stderr
        statuses = _wait_done(c.nodes)
    _assert_trained(statuses, 0.9)
    for n in c.nodes:  # the daemon's own copy, complete, in its data dir
        copies = list((n.data_dir / "datasets").iterdir())
        assert len(copies) == 1 and (copies[0] / remote.COMPLETE).is_file()
    assert (next((short_tmp / "function-cache").iterdir()) / remote.COMPLETE).is_file()


MARKER_TOPIC = "test-marker"


def _published_after(origin: LocalNode, nodes: list[LocalNode]) -> None:
    """Publishes a marker from ``origin`` and waits until every other node has it: what
    ``origin`` published before (a job, say) has had the same way to the others."""
    sent = origin.call("POST", "/v1/pubsub/publish", {"topic": MARKER_TOPIC, "random_size": 16})

    def arrived(n: LocalNode) -> bool:
        inbox = n.call("GET", "/v1/pubsub/inbox")["messages"]
        return any(m["msg_id"] == sent["msg_id"] for m in inbox)

    others = [n for n in nodes if n is not origin]
    wait_for(lambda: all(map(arrived, others)), 30, "the marker to reach every other node")


@pytest.fixture(scope="module")
def shared_peers() -> Iterator[LocalCluster]:
    """Three peers shared by the tests that start jobs through the CLI: a refused job
    leaves nothing behind, and a stopped or finished one leaves the peers free."""
    root = Path(tempfile.mkdtemp(prefix="spt-"))
    made: list[LocalCluster] = []

    def make(n: int) -> LocalCluster:
        made.append(LocalCluster(root, n))
        return made[-1]

    try:
        c = _cluster(make, 3)
        for n in c.nodes:
            n.call("POST", "/v1/pubsub/subscribe", {"topic": MARKER_TOPIC})
        yield c
    finally:
        for c in made:
            c.kill_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["--task", "digits", "--task-arg", "colour=red"], "unknown option(s) colour"),
        (["--task", "digits", "--task-arg", "path=/etc"], "a job never carries a path"),
        (["--task", "mnist"], "--dataset mnist=DIR"),
        (["--task", "os:system"], "not in the allowed task modules"),
        (["--task", "digits", "--aggregator", "krum", "--f", "1"], "needs at least 5 peers"),
        (["--task", "digits", "--aggregator", "median", "--f", "2"], "needs at least 5 peers"),
        (["--task", "digits", "--aggregator", "bogus"], "unknown rule 'bogus'"),
        (["--task", "digits", "--lr", "-1"], "lr: must be a number"),
        (["--task", "digits", "--rounds", "0"], "rounds: must be an integer"),
        (["--task", "digits", "--batch-size", "2", "--functions-per-round", "3"], "cannot split"),
    ],
)
def test_bad_jobs_are_refused_everywhere(
    shared_peers: LocalCluster, args: list[str], message: str
) -> None:
    nodes = shared_peers.nodes
    # Whatever the peers last ran (nothing, or an earlier test's finished job) stays.
    before = [(_status(n)["job"], _status(n)["state"]) for n in nodes]
    assert all(state != "running" for _, state in before), before
    r = _ctl(nodes[1], "train", "start", *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "job refused" in lines[0] and message in lines[0], lines
    _published_after(nodes[1], nodes)
    assert [(_status(n)["job"], _status(n)["state"]) for n in nodes] == before


def test_second_job_refused_and_stop_reaches_everyone(shared_peers: LocalCluster) -> None:
    a, b, c = shared_peers.nodes
    r = _ctl(a, "train", "start", "--task", "digits", "--rounds", "100000", "--json")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: all(_status(n)["round"] >= 2 for n in (a, b, c)), 120, "round 2 everywhere")
    r2 = _ctl(b, "train", "start", "--task", "digits")
    assert r2.returncode == 1 and "already running" in r2.stderr
    r3 = _ctl(c, "train", "stop")
    assert r3.returncode == 0, r3.stderr
    wait_for(lambda: all(_status(n)["state"] == "stopped" for n in (a, b, c)), 30, "stop")
    ran = [_rounds_run(n) for n in (a, b, c)]
    # A stopped job frees the node for the next one ...
    assert _ctl(b, "train", "start", "--task", "digits", "--rounds", "3").returncode == 0
    statuses = _wait_done([a, b, c])
    # ... and while that one ran its rounds, the stopped one ran none.
    for n, before, s in zip((a, b, c), ran, statuses, strict=True):
        assert s["job"]["rounds"] == 3
        assert _rounds_run(n) - before == len(s["history"]) > 0, (before, s["history"])


def test_training_without_the_module(make_cluster: Any, short_tmp: Path) -> None:
    """Plain redis-servers (no SPIRT module): averaging, aggregation and the update run
    client-side with torch, and the peers still agree bit for bit."""
    servers, extra = [], []
    try:
        for i in range(2):
            d = short_tmp / f"plain{i}"
            d.mkdir()
            sock = d / "redis.sock"
            servers.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        "0",
                        "--unixsocket",
                        str(sock),
                        "--unixsocketperm",
                        "700",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(d),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            wait_for(sock.exists, 10, "redis-server socket")
            extra.append(["--redis-url", f"unix://{sock}"])
        c = _cluster(make_cluster, 2, extra)
        assert all(n.status()["redis"]["module"] is False for n in c.nodes)
        c.nodes[1].call("POST", "/v1/train/start", {"task": "digits", "rounds": 40})
        statuses = _wait_done(c.nodes)
        _assert_trained(statuses, 0.85)
    finally:
        for s in servers:
            s.kill()
            s.wait()
