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

The three train digits to the task's accuracy with one digest; from the function
host's namespace, a plaintext connection to the node's Redis port gets no answer
and the functions' user is refused every key but a function output.
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
from spirtd.tls_material import issue, make_ca
from tests.test_remote_functions import read_endpoint, spirtctl

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="making network namespaces needs root and iproute2 (CI runs as root)",
    ),
]

NET = "10.213.0"
NODE, FN, PEERS = f"{NET}.1", f"{NET}.2", f"{NET}.3"
REDIS_TLS_PORT, HOST_PORT = 6380, 9443


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


def test_functions_on_another_host_reach_the_node_only_over_tls(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = str(os.getpid() % 100000)
    cluster = LocalCluster(short_tmp / "c", 0)
    fn_dir = short_tmp / "fnhost"
    fn_dir.mkdir()
    with lan(tag) as ns:
        dirs = [short_tmp / "c" / f"node{i}" for i in range(3)]
        for d in dirs:
            cluster.ca.enroll(DataDir(d), now=time.time(), days=30)
        made = spirtctl("redis-tls", "--data-dir", str(dirs[0]), "--name", NODE)
        host_ca = make_ca(fn_dir / "ca")
        host_tls = issue(host_ca, fn_dir / "host.crt", fn_dir / "host.key", [FN])
        key_file = fn_dir / "access-key"
        host.new_access_key(key_file)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(key_file))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(fn_dir / "no-such-config"))
        monkeypatch.setenv("AWS_CA_BUNDLE", str(host_ca.cert))

        config = fn_dir / "host.toml"
        config.write_text(
            f'listen = "{FN}:{HOST_PORT}"\naccess_key_file = "{key_file}"\nconcurrency = 2\n'
            f'[tls]\ncert = "{host_tls.cert}"\nkey = "{host_tls.key}"\n'
            "[functions.spirt-gradient]\ntimeout_s = 120.0\nmemory_mb = 2048\n"
            "[functions.spirt-gradient.redis]\n"
            f'url = "rediss://{NODE}:{REDIS_TLS_PORT}/0"\nusername = "spirt-fn"\n'
            f'password_file = "{made["function_password"]}"\nca_file = "{made["ca"]}"\n'
        )
        nodes: list[LocalNode] = []
        fn_host: subprocess.Popen[bytes] | None = None
        try:
            remote = NsNode(
                ns["node"],
                dirs[0],
                listen=f"{NODE}:7946",
                args=["--profile", "local", "--shard", "0/3"],
                config=(
                    'functions = "lambda"\n'
                    f'[redis]\ntls_port = {REDIS_TLS_PORT}\ntls_bind = "{NODE}"\n'
                    "[invoke]\nconcurrency = 2\ntimeout_s = 120.0\n"
                    f'endpoint_url = "https://{FN}:{HOST_PORT}"\n'
                ),
            ).start(timeout=90)
            nodes.append(remote)
            # Its functions' password exists once its Redis has started.
            fn_host = subprocess.Popen(
                ["ip", "netns", "exec", ns["fn"], sys.executable, "-m", "spirtd.functions.runtime",
                 "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=open(fn_dir / "host.log", "ab"),  # noqa: SIM115 - the child's
            )  # fmt: skip
            assert read_endpoint(fn_host) == f"https://{FN}:{HOST_PORT}"
            for i, port in ((1, 7946), (2, 7947)):
                nodes.append(
                    NsNode(
                        ns["peers"],
                        dirs[i],
                        listen=f"{PEERS}:{port}",
                        bootstrap=[f"{NODE}:7946"],
                        args=["--profile", "local", "--shard", f"{i}/3"],
                    ).start(timeout=90)
                )
            everyone = {n.node_id: "alive" for n in nodes}
            wait_for(lambda: all_see(nodes, everyone), 120, "every node to see the others alive")
            assert remote.status()["functions"]["backend"] == "lambda"
            nodes[1].call("POST", "/v1/train/start", {"task": "digits"})

            def train(n: LocalNode) -> dict[str, Any]:
                return n.call("GET", "/v1/train/status")

            wait_for(
                lambda: all(train(n)["state"] in ("done", "stopped") for n in nodes),
                600,
                "the job to finish on every node",
            )
            statuses = [train(n) for n in nodes]
            for s in statuses:
                assert s["state"] == "done", s["detail"]
                assert s["accuracy"] is not None and s["accuracy"] >= 0.95, s["accuracy"]
            assert len({s["model_digest"] for s in statuses}) == 1
            # The node behind the function host contributed (its gradients came from there).
            assert any(remote.node_id in h["contributors"] for h in statuses[0]["history"])

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
            if fn_host is not None:
                fn_host.terminate()
                try:
                    fn_host.wait(timeout=60)
                finally:
                    if fn_host.poll() is None:
                        fn_host.kill()
                    assert fn_host.stdout is not None
                    fn_host.stdout.close()
