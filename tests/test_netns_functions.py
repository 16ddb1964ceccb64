"""Functions on another host, across real network interfaces (issue 24).

The test makes its own network: four namespaces joined by veth pairs to a bridge
in the first (``hub``), 10.213.0.0/24, nothing in the host's own namespace.

* ``node``, 10.213.0.1: a spirtd whose gradient functions run on the function host
  (``functions = "lambda"``, ``[invoke] endpoint_url``), its managed Redis with a
  TLS listener on that address;
* ``fn``, 10.213.0.2: the function host (``python -m spirtd.functions.runtime``),
  whose gradient function logs in to the node's Redis over TLS as the functions'
  user;
* ``peers``, 10.213.0.3: two more spirtd with their own local functions.

The node runs deploy/aws/spirtd.toml and the host deploy/function-host.toml, as an
operator fills them in (addresses and file paths only), so every key of both
samples is exercised; an S3 API (moto's server) in the host's namespace holds the
mnist files the node's sample names. The three train digits to the task's accuracy
with one digest, then mnist from S3 (the node and the host's function each copy
it); from the function host's namespace, a plaintext connection to the node's
Redis port gets no answer and the functions' user is refused every key but a
function output, and cannot list keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from spirtd.functions.runtime import host
from spirtd.keyfiles import DataDir
from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from spirtd.tasks import remote
from spirtd.tls_material import issue, make_ca
from tests.test_remote_functions import read_endpoint, spirtctl
from tests.test_training_integration import _learnable_mnist

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="making network namespaces needs root and iproute2 (CI runs as root)",
    ),
]

NET = "10.213.0"
NODE, FN, PEERS = f"{NET}.1", f"{NET}.2", f"{NET}.3"
REDIS_TLS_PORT, HOST_PORT, S3_PORT = 6380, 9443, 5000  # the first two: the samples'
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def lan(tag: str) -> Iterator[dict[str, str]]:
    """The namespaces by role (names carry ``tag``: parallel runs do not meet)."""
    names = {role: f"spt{tag}-{role}" for role in ("hub", "node", "fn", "peers")}
    made: list[str] = []
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        hub = names["hub"]
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for role, addr in (("node", NODE), ("fn", FN), ("peers", PEERS)):
            ns = names[role]
            _ip("-n", hub, "link", "add", f"v{role}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)  # fmt: skip
            _ip("-n", hub, "link", "set", f"v{role}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield names
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class NsNode(LocalNode):
    """A spirtd started inside a network namespace (``ip netns exec`` execs it, so
    the process is spirtd itself: signals reach it)."""

    def __init__(self, ns: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ns = ns

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super().command()]


def in_ns(ns: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Python ``code`` run in namespace ``ns``."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _sample(name: str, swaps: dict[str, str]) -> str:
    """A sample configuration from deploy/ as an operator fills it in."""
    text = (DEPLOY / name).read_text()
    for old, new in swaps.items():
        assert old in text, f"{name} no longer holds {old!r}"
        text = text.replace(old, new)
    return text


def test_functions_on_another_host_reach_the_node_only_over_tls(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = str(os.getpid() % 100000)
    cluster = LocalCluster(short_tmp / "c", 0)
    fn_dir = short_tmp / "fnhost"
    fn_dir.mkdir()
    (short_tmp / "mnist-data").mkdir()
    mnist = _learnable_mnist(short_tmp / "mnist-data")
    with lan(tag) as ns:
        dirs = [short_tmp / "c" / f"node{i}" for i in range(3)]
        for d in dirs:
            cluster.ca.enroll(DataDir(d), now=time.time(), days=30)
        made = spirtctl("redis-tls", "--data-dir", str(dirs[0]), "--name", NODE)
        host_ca = make_ca(fn_dir / "ca")
        host_tls = issue(host_ca, fn_dir / "host.crt", fn_dir / "host.key", [FN])
        key_file = fn_dir / "access-key"
        host.new_access_key(key_file)
        # The node signs its invocations with the host's access key through boto3's
        # usual chain (which its S3 client, for the dataset, uses too); S3 is an S3 API
        # in the function host's namespace.
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(key_file))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(fn_dir / "no-such-config"))
        monkeypatch.setenv("AWS_CA_BUNDLE", str(host_ca.cert))
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{FN}:{S3_PORT}")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
        monkeypatch.setenv(remote.CACHE_ENV, str(fn_dir / "datasets"))

        procs: list[subprocess.Popen[bytes]] = []
        nodes: list[LocalNode] = []
        try:
            # The two peers, with their own functions and a local copy of the data.
            for i, port in ((1, 7946), (2, 7947)):
                nodes.append(
                    NsNode(
                        ns["peers"],
                        dirs[i],
                        listen=f"{PEERS}:{port}",
                        bootstrap=[f"{PEERS}:7946"] if i == 2 else [],
                        args=["--profile", "local", "--shard", f"{i}/3", "--dataset",
                              f"mnist={mnist}"],
                    ).start(timeout=90)
                )  # fmt: skip
            # The node: deploy/aws/spirtd.toml, every key of it, with this network's
            # addresses and the function host as its endpoint.
            remote_node = NsNode(
                ns["node"],
                dirs[0],
                listen="0.0.0.0:7946",  # the sample's own (a flag LocalNode always passes)
                args=["--profile", "local", "--shard", "0/3"],
                config=_sample(
                    "aws/spirtd.toml",
                    {
                        "10.0.1.15": NODE,
                        "10.0.1.11": PEERS,
                        'endpoint_url = ""': f'endpoint_url = "https://{FN}:{HOST_PORT}"',
                    },
                ),
            ).start(timeout=90)
            nodes.insert(0, remote_node)
            # The S3 API, and the dataset the sample names, in the function host's namespace.
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns["fn"], sys.executable, "-m", "moto.server",
                     "-H", FN, "-p", str(S3_PORT)],
                    stdout=subprocess.DEVNULL,
                    stderr=open(fn_dir / "s3.log", "ab"),  # noqa: SIM115 - the child's
                )
            )  # fmt: skip
            upload = in_ns(
                ns["fn"],
                "import boto3, pathlib, time\n"
                "s3 = boto3.client('s3', aws_access_key_id='x', aws_secret_access_key='x',"
                " region_name='eu-west-1')\n"
                "for _ in range(300):\n"
                "    try:\n"
                "        s3.create_bucket(Bucket='spirt-data', CreateBucketConfiguration="
                "{'LocationConstraint': 'eu-west-1'})\n        break\n"
                "    except Exception:\n        time.sleep(0.1)\n"
                f"for f in sorted(pathlib.Path('{mnist}').iterdir()):\n"
                "    s3.upload_file(str(f), 'spirt-data', 'datasets/mnist/' + f.name)\n"
                "print('uploaded')\n",
            )
            assert upload.stdout.strip() == "uploaded", upload.stderr
            # The function host: deploy/function-host.toml, every key of it, with the
            # files made above (its process has the S3 endpoint in its environment).
            config = fn_dir / "host.toml"
            config.write_text(
                _sample(
                    "function-host.toml",
                    {
                        "10.0.1.15": NODE,
                        '"0.0.0.0:9443"': f'"{FN}:{HOST_PORT}"',
                        "/etc/spirt-functions/access-key": str(key_file),
                        "/etc/spirt-functions/host.crt": str(host_tls.cert),
                        "/etc/spirt-functions/host.key": str(host_tls.key),
                        "/etc/spirt-functions/node1.password": made["function_password"],
                        "/etc/spirt-functions/node1-ca.crt": made["ca"],
                    },
                )
            )
            fn_host = subprocess.Popen(
                ["ip", "netns", "exec", ns["fn"], sys.executable, "-m", "spirtd.functions.runtime",
                 "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=open(fn_dir / "host.log", "ab"),  # noqa: SIM115 - the child's
            )  # fmt: skip
            procs.append(fn_host)
            assert read_endpoint(fn_host) == f"https://{FN}:{HOST_PORT}"
            everyone = {n.node_id: "alive" for n in nodes}
            wait_for(lambda: all_see(nodes, everyone), 120, "every node to see the others alive")
            assert remote_node.status()["functions"]["backend"] == "lambda"

            def train(n: LocalNode) -> dict[str, Any]:
                return n.call("GET", "/v1/train/status")

            def run(body: dict[str, Any], accuracy: float) -> list[dict[str, Any]]:
                job = nodes[1].call("POST", "/v1/train/start", body)["job"]
                wait_for(
                    lambda: all(
                        (train(n)["job"] or {}).get("id") == job
                        and train(n)["state"] in ("done", "stopped")
                        for n in nodes
                    ),
                    600,
                    f"job {body['task']} to finish on every node",
                )
                statuses = [train(n) for n in nodes]
                for st in statuses:
                    assert st["state"] == "done", st["detail"]
                    assert st["accuracy"] is not None and st["accuracy"] >= accuracy, st
                assert len({st["model_digest"] for st in statuses}) == 1
                # The node behind the function host contributed: its gradients came
                # from there.
                hist = statuses[0]["history"]
                assert any(remote_node.node_id in h["contributors"] for h in hist)
                return statuses

            statuses = run({"task": "digits"}, 0.95)
            # mnist: the node and its functions read the sample's S3 location.
            run({"task": "mnist", "rounds": 30}, 0.9)
            assert any((dirs[0] / "datasets").iterdir())
            assert any((fn_dir / "datasets").iterdir())
            # From the function host's namespace: no answer in plaintext on the TLS port...
            plain = in_ns(
                ns["fn"],
                "import redis\n"
                f"r = redis.Redis(host='{NODE}', port={REDIS_TLS_PORT}, socket_timeout=5)\n"
                "try:\n    r.ping()\nexcept redis.RedisError as e:\n"
                "    print('refused', type(e).__name__)\nelse:\n    print('answered')\n",
            )
            assert plain.stdout.startswith("refused"), plain.stdout + plain.stderr
            # ... and over TLS, as the functions' user, no key but a function output.
            job = statuses[0]["job"]["id"]
            password = Path(made["function_password"]).read_text().strip()
            probe = in_ns(
                ns["fn"],
                "import json, redis\n"
                f"r = redis.Redis(host='{NODE}', port={REDIS_TLS_PORT}, ssl=True, "
                f"ssl_ca_certs='{made['ca']}', username='spirt-fn', password={password!r}, "
                "socket_timeout=10)\n"
                "out = {}\n"
                f"for key in ['spirt:{job}:theta', 'spirt:{job}:g:1:x', 'spirt:{job}:agg', "
                f"'other', 'spirt:{job}:fn:1:0:nonce']:\n"
                "    try:\n        r.set(key, b'x')\n        out[key] = 'written'\n"
                "    except redis.exceptions.NoPermissionError:\n        out[key] = 'NOPERM'\n"
                # Nor can it list keys: an invocation's output key (a fresh nonce in it)
                # is known only to the node and that invocation.
                "for name, call in (('scan', lambda: r.scan(0)), ('keys', lambda: r.keys('*'))):\n"
                "    try:\n        call()\n        out[name] = 'listed'\n"
                "    except redis.exceptions.NoPermissionError:\n        out[name] = 'NOPERM'\n"
                "print(json.dumps(out))\n",
            )
            got = json.loads(probe.stdout or "{}") if probe.returncode == 0 else probe.stderr
            assert got == {
                f"spirt:{job}:theta": "NOPERM",
                f"spirt:{job}:g:1:x": "NOPERM",
                f"spirt:{job}:agg": "NOPERM",
                "other": "NOPERM",
                f"spirt:{job}:fn:1:0:nonce": "written",
                "scan": "NOPERM",
                "keys": "NOPERM",
            }, got
        finally:
            for n in nodes:
                if n.running:
                    n.stop(timeout=60)
            for p in procs:
                p.terminate()
                try:
                    p.wait(timeout=60)
                finally:
                    if p.poll() is None:
                        p.kill()
                    if p.stdout is not None:
                        p.stdout.close()
