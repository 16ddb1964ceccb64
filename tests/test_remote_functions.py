"""Functions off the node (issue 24 A + B together), on real processes on 127.0.0.1:
a spirtd whose managed Redis has a TLS listener ([redis] tls_port), with
``functions = "lambda"`` and ``[invoke] endpoint_url`` at a function host
(``python -m spirtd.functions.runtime``), whose gradient function logs in to the
node's Redis over TLS as the functions' user. The node trains; nothing about the
host differs, from the node's side, from AWS Lambda."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spirtd.control import ctl
from spirtd.functions.runtime import host
from spirtd.localcluster import LocalNode, wait_for
from spirtd.tls_material import issue, make_ca
from tests.test_redis_tls import free_port

pytestmark = pytest.mark.timeout(600)

ROUNDS = 30  # long enough to kill the function host in the middle


def spirtctl(*argv: str) -> dict[str, Any]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert ctl.main([*argv, "--json"]) == 0
    return json.loads(buf.getvalue())


def read_endpoint(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> str:
    """The endpoint line a function host prints once it listens."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"the function host exited with {proc.wait(10)}")
        buf += chunk
        for line in buf.decode().splitlines():
            if line.startswith("endpoint: "):
                return line.split(": ", 1)[1].strip()
    raise AssertionError("the function host did not start in time")


def test_a_node_trains_with_functions_on_a_function_host(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_dir, host_dir = short_tmp / "node", short_tmp / "fnhost"
    host_dir.mkdir()
    # The node's Redis TLS material, from spirtctl.
    made = spirtctl("redis-tls", "--data-dir", str(node_dir), "--name", "127.0.0.1")
    # The host's own HTTPS certificate (another CA: the two ends are separate services).
    host_ca = make_ca(host_dir / "ca")
    host_tls = issue(host_ca, host_dir / "host.crt", host_dir / "host.key", ["127.0.0.1"])
    key_file = host_dir / "access-key"
    host.new_access_key(key_file)
    redis_port, host_port = free_port(), free_port()

    # The node signs with the default AWS credential chain and trusts the host's CA,
    # exactly as for a Lambda endpoint.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(key_file))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(host_dir / "no-such-config"))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(host_ca.cert))
    node = LocalNode(
        node_dir,
        args=["--profile", "local"],
        config=(
            'functions = "lambda"\n'
            f"[redis]\ntls_port = {redis_port}\n"
            "[invoke]\nconcurrency = 2\ntimeout_s = 120.0\n"
            f'endpoint_url = "https://127.0.0.1:{host_port}"\n'
        ),
    ).start(timeout=60)
    proc = None
    try:
        st = node.status()
        assert st["functions"]["backend"] == "lambda"
        assert st["redis"]["tls"] == {
            "bind": "127.0.0.1",
            "port": redis_port,
            "client_certs": False,
        }

        # The host's gradient function: bound to the node's Redis over TLS, with the
        # functions' password (copied to the host in a real deployment) and the CA.
        config = host_dir / "host.toml"
        config.write_text(
            f'listen = "127.0.0.1:{host_port}"\naccess_key_file = "{key_file}"\n'
            "concurrency = 2\n"
            f'[tls]\ncert = "{host_tls.cert}"\nkey = "{host_tls.key}"\n'
            "[functions.spirt-gradient]\ntimeout_s = 120.0\nmemory_mb = 2048\n"
            "[functions.spirt-gradient.redis]\n"
            f'url = "rediss://127.0.0.1:{redis_port}/0"\nusername = "spirt-fn"\n'
            f'password_file = "{made["function_password"]}"\nca_file = "{made["ca"]}"\n'
        )

        def start_host() -> subprocess.Popen[bytes]:
            p = subprocess.Popen(
                [sys.executable, "-m", "spirtd.functions.runtime", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=open(host_dir / "host.log", "ab"),  # noqa: SIM115 - the child's
            )
            assert read_endpoint(p) == f"https://127.0.0.1:{host_port}"
            return p

        def train() -> dict[str, Any]:
            return node.call("GET", "/v1/train/status")

        proc = start_host()
        job = node.call("POST", "/v1/train/start", {"task": "digits", "rounds": ROUNDS})["job"]
        wait_for(lambda: train()["round"] >= 3, 300, "round 3")

        # The host dies mid-job: the node's invocations fail, it says so, and (alone,
        # so no round can close without it) computes the round again at each deadline.
        proc.kill()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
        proc = None
        wait_for(
            lambda: (
                node.status()["counters"].get("training.slice_failed", 0) > 0
                and train()["rounds"]["local"].get("local_retries", 0) > 0
            ),
            180,
            "failed slices and a retried round",
        )
        stalled_at = train()["round"]
        # Brought back, on the same address: contribution resumes by itself.
        proc = start_host()
        wait_for(lambda: train()["round"] >= stalled_at + 3, 300, "rounds after the restart")
        wait_for(lambda: train()["state"] in ("done", "stopped"), 600, "the job to finish")
        s = train()
        assert s["job"]["id"] == job and s["state"] == "done", node.log_tail()
        assert s["round"] == ROUNDS
        assert all(h["contributors"] == [node.node_id] for h in s["history"])
        assert all(h["loss"] is not None for h in s["history"])
    finally:
        if proc is not None:
            proc.terminate()
            try:
                assert proc.wait(timeout=60) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                assert proc.stdout is not None
                proc.stdout.close()
        assert node.stop(timeout=60) == 0
