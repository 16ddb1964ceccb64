"""Every spirtctl command against a live two-node cluster, with and without
--json, with its exit code: 0 success, 1 the daemon refused (or a followed job
did not finish), 2 usage, 3 unreachable. The control API's TCP listener is on
here too, so its token check runs against the real daemon."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from tests.fixtures_cluster import FAST_TRANSPORT

CONFIG = (
    FAST_TRANSPORT
    + """
[control]
listen_tcp = "127.0.0.1:0"
"""
)


def spirtctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    r = spirtctl(*args)
    assert r.returncode == 0, f"spirtctl {' '.join(args)}: {r.returncode}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="spt-"))
    c = LocalCluster(root, 2, args=["--profile", "local"], config=CONFIG)
    try:
        c.start()
        a, b = c.nodes
        wait_for(lambda: all_see(c.nodes, {a.node_id: "alive", b.node_id: "alive"}), 60, "join")
        yield c
    finally:
        c.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def d(node: LocalNode) -> list[str]:
    return ["--data-dir", str(node.data_dir)]


def test_status_peers_metrics_both_ways(cluster: LocalCluster) -> None:
    a, b = cluster.nodes
    assert (a.data_dir / "api.sock").stat().st_mode & 0o777 == 0o600
    s = json.loads(ok("status", "--json", *d(a)).stdout)
    for key in ("node_id", "address", "members", "training", "redis", "functions"):
        assert key in s
    assert {m["node_id"] for m in s["members"]} == {a.node_id, b.node_id}
    text = ok("status", *d(a)).stdout
    assert a.node_id in text and "NODE_ID" in text and "redis" in text

    peers = json.loads(ok("peers", "--json", *d(b)).stdout)["members"]
    assert {m["state"] for m in peers} == {"alive"}
    text = ok("peers", *d(b)).stdout
    assert "STATE" in text and "INCARNATION" in text and b.node_id + " (self)" in text

    assert "spirt_members" in ok("metrics", *d(a)).stdout
    fams = json.loads(ok("metrics", "--json", *d(a)).stdout)["families"]
    assert any(f["name"] == "spirt_members" for f in fams)


def test_training_commands(cluster: LocalCluster) -> None:
    a, b = cluster.nodes
    # Nothing started yet.
    r = ok("train", "status", *d(a))
    assert "no training job" in r.stdout
    assert json.loads(ok("train", "status", "--json", *d(a)).stdout)["job"] is None
    r = spirtctl("train", "stop", *d(a))
    assert r.returncode == 1 and "no job is running" in r.stderr and "train status" in r.stderr
    r = spirtctl("train", "stop", "--json", *d(a))
    assert r.returncode == 1
    r = spirtctl("train", "report", "--out", str(a.data_dir / "none.png"), *d(a))
    assert r.returncode == 1 and "no training job" in r.stderr
    assert not (a.data_dir / "none.png").exists()

    # Refused jobs: exit 1, one line that says why, nothing starts.
    r = spirtctl("train", "start", "--task", "no_such_task", *d(a))
    assert r.returncode == 1 and "job refused" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = spirtctl("train", "start", "--task", "synthetic", "--aggregator", "krum", "--f", "1", *d(a))
    assert r.returncode == 1 and "job refused" in r.stderr and "krum" in r.stderr
    assert json.loads(ok("train", "status", "--json", *d(b)).stdout)["job"] is None

    # Started and followed to the end: every round is shown as it completes.
    r = ok("train", "start", "--task", "synthetic", "--rounds", "3", "--follow", *d(b))
    assert "started job" in r.stdout
    for i in (1, 2, 3):
        assert f"round {i}/3 loss=" in r.stdout
    assert "done: round 3" in r.stdout

    # --json: the job id, and (following) progress on stderr, the final status on stdout.
    r = ok("train", "start", "--task", "synthetic", "--rounds", "2", "--json", "--follow", *d(a))
    doc = json.loads(r.stdout)
    assert len(doc["job"]) == 32 and doc["final"]["state"] == "done"
    assert "round 2/2" in r.stderr
    r = ok("train", "status", "--follow", "--json", *d(b))
    assert json.loads(r.stdout)["job"]["id"] == doc["job"]
    assert "done: round 2" in ok("train", "status", "--follow", *d(b)).stdout

    st = json.loads(ok("train", "status", "--json", *d(b)).stdout)
    assert st["round"] == 2 and [h["round"] for h in st["history"]] == [1, 2]
    text = ok("train", "status", *d(b)).stdout
    assert "ROUND" in text and "CONTRIBUTORS" in text and doc["job"] in text
    # The report of that job, both ways (its pixels are checked in the training tests).
    png = b.data_dir / "report.png"
    assert (
        f"wrote {png} (1200x800): 2 rounds, 2 peers"
        in ok("train", "report", "--out", str(png), *d(b)).stdout
    )
    out = json.loads(ok("train", "report", "--out", str(png), "--json", *d(b)).stdout)
    assert out["job"] == doc["job"] and out["rounds"] == 2 and png.stat().st_size > 10_000

    # A long job, stopped from the other node: followers exit 1 saying so.
    r = ok("train", "start", "--task", "synthetic", "--rounds", "100000", "--json", *d(a))
    job = json.loads(r.stdout)["job"]
    r = spirtctl("train", "start", "--task", "synthetic", *d(b))
    assert r.returncode == 1 and "job refused" in r.stderr  # one job at a time
    assert "stopped job" in ok("train", "stop", *d(b)).stdout
    wait_for(
        lambda: json.loads(ok("train", "status", "--json", *d(a)).stdout)["state"] == "stopped",
        60,
        "the stop to reach a",
    )
    r = spirtctl("train", "status", "--follow", *d(a))
    assert r.returncode == 1 and f"job {job} stopped" in r.stderr
    r = ok("train", "start", "--task", "synthetic", "--rounds", "100000", *d(a))
    assert json.loads(ok("train", "stop", "--json", *d(a)).stdout)["job"]


def test_pubsub_commands(cluster: LocalCluster) -> None:
    a, b = cluster.nodes
    assert "subscribed" in ok("pubsub", "subscribe", "--topic", "t1", *d(b)).stdout
    ok("pubsub", "subscribe", "--topic", "t2", "--json", *d(b))
    r = ok("pubsub", "publish", "--topic", "t1", "--random-size", "1000", *d(a))
    assert "published 1000 bytes" in r.stdout
    r = ok("pubsub", "publish", "--topic", "t2", "--random-size", "10", "--json", *d(a))
    msg = json.loads(r.stdout)["msg_id"]

    def arrived() -> bool:
        inbox = json.loads(ok("pubsub", "inbox", "--json", *d(b)).stdout)["messages"]
        return any(m["msg_id"] == msg for m in inbox)

    wait_for(arrived, 30, "the message to arrive")
    assert "TOPIC" in ok("pubsub", "inbox", *d(b)).stdout
    r = spirtctl("pubsub", "publish", "--topic", "t1", *d(a))
    assert r.returncode == 2  # --file or --random-size is required


def test_control_api_over_tcp_needs_the_token(cluster: LocalCluster) -> None:
    a, _ = cluster.nodes
    api = (a.data_dir / "api.tcp").read_text().strip()
    token = a.data_dir / "api.token"
    assert token.stat().st_mode & 0o777 == 0o600
    # The default token file is the data dir's.
    s = json.loads(ok("status", "--json", "--api", api, *d(a)).stdout)
    assert s["node_id"] == a.node_id
    assert "spirt_members" in ok("metrics", "--api", api, "--token-file", str(token)).stdout
    wrong = a.data_dir.parent / "wrong.token"
    wrong.write_text("0" * 64 + "\n")
    r = spirtctl("status", "--api", api, "--token-file", str(wrong))
    assert r.returncode == 1 and "token" in r.stderr
    # A missing token file is a failure, not a usage error: the command line was right.
    r = spirtctl("status", "--api", api, "--token-file", str(a.data_dir.parent / "missing"))
    assert r.returncode == 1 and "--token-file" in r.stderr
    # No token at all: refused by the daemon itself, not just by spirtctl.
    host, _, port = api.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v1/status")
    resp = conn.getresponse()
    assert resp.status == 401 and b"token" in resp.read()
    conn.close()


def test_offline_ca_and_trust_commands(cluster: LocalCluster, short_tmp: Path) -> None:
    ca = str(short_tmp / "ca")
    assert "created CA" in ok("ca", "init", "--ca-dir", ca).stdout
    out = json.loads(ok("ca", "init", "--ca-dir", str(short_tmp / "ca2"), "--json").stdout)
    assert len(bytes.fromhex(out["public_key"])) == 32
    n1, n2, n3 = (str(short_tmp / n) for n in ("n1", "n2", "n3"))
    assert "enrolled" in ok("ca", "enroll", "--ca-dir", ca, "--data-dir", n1).stdout
    pub = json.loads(ok("ca", "enroll", "--ca-dir", ca, "--data-dir", n2, "--json").stdout)[
        "public_key"
    ]
    cert = ok("ca", "sign", "--ca-dir", ca, pub).stdout.strip()
    signed = json.loads(ok("ca", "sign", "--ca-dir", ca, pub, "--json").stdout)
    assert signed["certificate"] and signed["node_id"].startswith("12D3KooW")
    assert "installed" in ok("ca", "install", "--data-dir", n3, cert).stdout
    inst = json.loads(ok("ca", "install", "--data-dir", n3, cert, "--json").stdout)
    assert inst["installed"] == signed["node_id"]
    assert "revoked" in ok("ca", "revoke", "--ca-dir", ca, pub).stdout
    assert json.loads(ok("ca", "revoke", "--ca-dir", ca, pub, "--json").stdout)["crl_version"] >= 2
    peer = cluster.nodes[0].public_key
    assert "added" in ok("trust", "--data-dir", str(short_tmp / "m"), peer).stdout
    again = json.loads(ok("trust", "--data-dir", str(short_tmp / "m"), peer, "--json").stdout)
    assert again["added"] is False
    # Usage errors: exit 2.
    assert spirtctl("ca", "enroll", "--ca-dir", ca).returncode == 2  # needs --data-dir
    r = spirtctl("trust", "--data-dir", str(short_tmp / "m"), "nothex")
    assert r.returncode == 2 and "not a public key" in r.stderr
    r = spirtctl("ca", "sign", "--ca-dir", ca, "nothex")
    assert r.returncode == 2 and "not a public key" in r.stderr
    r = spirtctl("ca", "install", "--data-dir", n3, "00ff")
    assert r.returncode == 2 and "not a certificate" in r.stderr
    # A command that was given right but cannot be done: exit 1, one line, no traceback.
    failures = [
        (("ca", "init", "--ca-dir", ca), "already exists"),
        (("ca", "sign", "--ca-dir", str(short_tmp / "noca"), pub), "noca"),
        (("ca", "revoke", "--ca-dir", str(short_tmp / "noca"), pub), "noca"),
        (("ca", "enroll", "--ca-dir", str(short_tmp / "noca"), "--data-dir", n1), "noca"),
    ]
    for args, says in failures:
        r = spirtctl(*args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_usage_and_unreachable_exit_codes(short_tmp: Path) -> None:
    assert spirtctl().returncode == 2
    assert spirtctl("frobnicate").returncode == 2
    assert spirtctl("train", "start").returncode == 2  # --task is required
    assert spirtctl("status", "--api", "no-port").returncode == 2
    for args in (["status"], ["peers", "--json"], ["metrics"], ["train", "status"]):
        r = spirtctl(*args, "--data-dir", str(short_tmp / "none"))
        assert r.returncode == 3, args
        sock = str(short_tmp / "none" / "api.sock")
        assert sock in r.stderr and f"spirtd --data-dir {short_tmp / 'none'}" in r.stderr
    # SPIRT_DATA_DIR stands in for --data-dir.
    env = {**os.environ, "SPIRT_DATA_DIR": str(short_tmp / "envdir")}
    r = subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert r.returncode == 3 and str(short_tmp / "envdir" / "api.sock") in r.stderr


# Runs spirtctl's main() as a user the kernel refuses: as root (whom file modes do
# not stop) it drops to nobody after Python has started, since the interpreter may
# live where nobody cannot read; as anyone else, a mode-000 directory refuses even
# its owner. Either way the denial is the kernel's, not a simulation.
_AS_UNPRIVILEGED = """
import os, sys
from pathlib import Path
from spirtd.control import ctl
system_dir, *argv = sys.argv[1:]
if system_dir:
    ctl.SYSTEM_DATA_DIR = Path(system_dir)
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(ctl.main(argv))
"""


def _unprivileged_ctl(
    system_dir: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _AS_UNPRIVILEGED, system_dir, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def locked_data_dir(short_tmp: Path) -> Iterator[Path]:
    """A data dir holding a live listening api.sock that this user may not search."""
    short_tmp.chmod(0o755)  # only the data dir itself is what refuses
    data = short_tmp / "locked"
    data.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(data / "api.sock"))
    listener.listen(1)
    data.chmod(0)
    try:
        yield data
    finally:
        data.chmod(0o700)
        listener.close()


def test_permission_denied_is_unreachable_not_a_traceback(
    locked_data_dir: Path, short_tmp: Path
) -> None:
    sock = str(locked_data_dir / "api.sock")
    for args in (["status"], ["train", "status", "--json"], ["metrics"]):
        r = _unprivileged_ctl("", *args, "--data-dir", str(locked_data_dir))
        assert r.returncode == 3, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert sock in r.stderr and "Permission denied" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Without --data-dir, spirtctl looks for the system daemon's socket; a system
    # data dir it may not search must lead there too, not to a crash.
    home = short_tmp / "home"
    home.mkdir(mode=0o777)
    env = {**os.environ, "XDG_DATA_HOME": str(home), "HOME": str(home)}
    env.pop("SPIRT_DATA_DIR", None)
    r = _unprivileged_ctl(str(locked_data_dir), "status", env=env)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert sock in r.stderr and "Permission denied" in r.stderr, r.stderr
