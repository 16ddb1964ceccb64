"""A standalone function host (issue 24 B): ``python -m spirtd.functions.runtime``
as a real process on 127.0.0.1, serving the Invoke API over HTTPS with its own
access key, driven by boto3 and by the node's own invoker."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import signal
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, SSLError

from spirtd.functions.invoker import Invoker
from spirtd.functions.runtime import host
from spirtd.tls_material import Issued, issue, make_ca
from tests.test_runtime import PROBE

START_TIMEOUT_S = 120.0


@dataclass
class Host:
    proc: asyncio.subprocess.Process
    endpoint: str
    ca: Issued
    key: tuple[str, str]
    dir: Path


def write_config(tmp: Path, text: str) -> Path:
    path = tmp / "host.toml"
    path.write_text(text)
    return path


def new_key(path: Path) -> tuple[str, str]:
    key_id = host.new_access_key(path)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    assert parser["default"]["aws_access_key_id"] == key_id
    return key_id, parser["default"]["aws_secret_access_key"]


async def start_host(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spirtd.functions.runtime",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"host exited before listening: {err.decode()[-2000:]}")
                if line.startswith("endpoint: "):
                    return proc, line.split(": ", 1)[1].strip()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


async def run_fails(config: Path) -> str:
    """The host's stderr when it refuses to start (it must exit non-zero)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spirtd.functions.runtime",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT_S)
    assert proc.returncode == 1
    return err.decode()


def host_toml(tmp: Path, key_file: Path, tls: Issued | None, extra: str = "") -> str:
    text = f'listen = "127.0.0.1:0"\naccess_key_file = "{key_file}"\nconcurrency = 2\n{extra}\n'
    if tls is not None:
        text += f'[tls]\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
    text += (
        f'[functions.probe]\nhandler = "{PROBE}"\nmemory_mb = 256\ntimeout_s = 20\n'
        f'[functions.probe.environment]\nSPIRT_PROBE_DIR = "{tmp}"\n'
    )
    return text


@pytest.fixture
async def fn_host(tmp_path: Path) -> AsyncIterator[Host]:
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "host.crt", tmp_path / "host.key", ["127.0.0.1", "localhost"])
    key = new_key(tmp_path / "access-key")
    config = write_config(tmp_path, host_toml(tmp_path, tmp_path / "access-key", server))
    proc, endpoint = await start_host(config)
    try:
        yield Host(proc, endpoint, ca, key, tmp_path)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def client(h: Host, key: tuple[str, str] | None = None, **cfg: Any) -> Any:
    k = key or h.key
    return boto3.client(
        "lambda",
        endpoint_url=h.endpoint,
        region_name="us-east-1",
        aws_access_key_id=k[0],
        aws_secret_access_key=k[1],
        verify=str(h.ca.cert),
        config=Config(retries={"total_max_attempts": 1}, read_timeout=60, **cfg),
    )


async def call(c: Any, event: Any, name: str = "probe") -> dict[str, Any]:
    def run() -> dict[str, Any]:
        resp = c.invoke(FunctionName=name, Payload=json.dumps(event).encode())
        return json.loads(resp["Payload"].read())

    return await asyncio.to_thread(run)


async def test_boto3_invokes_over_https_with_the_hosts_key(fn_host: Host) -> None:
    assert fn_host.endpoint.startswith("https://127.0.0.1:")
    c = client(fn_host)
    assert (await call(c, {"action": "echo", "value": 7}))["echo"] == 7
    # A plain client may repeat an identical call (no replay check without the nonce).
    for _ in range(2):
        assert (await call(c, {"action": "echo", "value": "same"}))["echo"] == "same"
    stranger = client(fn_host, key=("SPIRTSTRANGER0000000", "x" * 40))
    with pytest.raises(ClientError) as info:
        await call(stranger, {"action": "echo"})
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"


async def test_plain_http_and_untrusted_certificates_get_nothing(fn_host: Host) -> None:
    port = fn_host.endpoint.rsplit(":", 1)[1]

    def plain() -> int:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/2015-03-31/functions/probe/invocations",
            data=b"{}",
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    # A TLS server answers plain HTTP with no HTTP response at all.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as info:
        await asyncio.to_thread(plain)
    assert not isinstance(info.value, urllib.error.HTTPError)
    # A client that trusts only the system CAs refuses the host's certificate.
    trusting_system = boto3.client(
        "lambda",
        endpoint_url=fn_host.endpoint,
        region_name="us-east-1",
        aws_access_key_id=fn_host.key[0],
        aws_secret_access_key=fn_host.key[1],
        config=Config(retries={"total_max_attempts": 1}),
    )
    with pytest.raises(SSLError):
        await call(trusting_system, {"action": "echo"})


async def test_the_nodes_invoker_reaches_it_as_it_would_lambda(
    fn_host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``functions = "lambda"`` with ``[invoke] endpoint_url``: the node's invoker
    signs with the default AWS credential chain and checks the host's certificate
    against AWS_CA_BUNDLE; nothing else differs from Lambda."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(fn_host.dir / "access-key"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(fn_host.dir / "no-such-config"))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(fn_host.ca.cert))
    async with Invoker(fn_host.endpoint, "probe", concurrency=2) as inv:
        got = await inv.invoke({"action": "echo", "value": "from the node"}, timeout=60)
        assert got["echo"] == "from the node"
        # The same event twice at once: the invoker's nonce keeps them apart.
        both = await asyncio.gather(
            *(inv.invoke({"action": "echo", "value": 1}, timeout=60) for _ in range(2))
        )
        assert [b["echo"] for b in both] == [1, 1]


async def test_client_certificates_when_configured(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "host.crt", tmp_path / "host.key", ["127.0.0.1"])
    node = issue(ca, tmp_path / "node.crt", tmp_path / "node.key", ["node1"], client=True)
    key = new_key(tmp_path / "access-key")
    text = host_toml(tmp_path, tmp_path / "access-key", server)
    text = text.replace("[functions.probe]\n", f'client_ca = "{ca.cert}"\n[functions.probe]\n', 1)
    proc, endpoint = await start_host(write_config(tmp_path, text))
    try:
        h = Host(proc, endpoint, ca, key, tmp_path)
        # Refused in the handshake: the client sees an SSL error, or (when the
        # refusal lands after its request went out) the connection closed under it.
        with pytest.raises((SSLError, ConnectionClosedError, ClientError, OSError)):
            await call(client(h), {"action": "echo"})
        with_cert = client(h, client_cert=(str(node.cert), str(node.key)))
        assert (await call(with_cert, {"action": "echo", "value": 3}))["echo"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_refuses_to_start_when_misconfigured(tmp_path: Path) -> None:
    key_file = tmp_path / "access-key"
    new_key(key_file)
    # Off loopback without TLS: the events and results would cross the network in clear.
    text = host_toml(tmp_path, key_file, None).replace("127.0.0.1:0", "0.0.0.0:0")
    assert "tls_cert" in await run_fails(write_config(tmp_path, text))
    os.chmod(key_file, 0o644)
    assert "chmod 600" in await run_fails(
        write_config(tmp_path, host_toml(tmp_path, key_file, None))
    )
    os.chmod(key_file, 0o600)
    text = host_toml(tmp_path, key_file, None, extra="concurency = 4")
    assert "concurency: unknown setting" in await run_fails(write_config(tmp_path, text))
    text = host_toml(tmp_path, key_file, None).replace(
        "[functions.probe.environment]",
        '[functions.probe.redis]\nurl = "redis://10.1.2.3:6379/0"\n[functions.probe.environment]',
    )
    assert "rediss://" in await run_fails(write_config(tmp_path, text))


def test_redis_binding_reaches_the_functions_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "access-key"
    new_key(key_file)
    pw = tmp_path / "redis.password"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    ca = make_ca(tmp_path / "ca")
    text = host_toml(tmp_path, key_file, None).replace(
        "[functions.probe.environment]",
        "[functions.probe.redis]\n"
        'url = "rediss://10.1.2.3:6380/0"\nusername = "spirt-fn"\n'
        f'password_file = "{pw}"\nca_file = "{ca.cert}"\n'
        "[functions.probe.environment]",
    )
    cfg, _ = host.load(write_config(tmp_path, text))
    env = cfg.functions["probe"].environment
    from spirtd.functions.credentials import configured
    from spirtd.functions.gradient import CA_FILE_ENV, TASK_MODULES_ENV

    (binding,) = configured(env)
    assert binding.url == "rediss://10.1.2.3:6380/0" and binding.username == "spirt-fn"
    assert binding.credentials.kind == "file" and binding.credentials.value == str(pw)
    assert env[CA_FILE_ENV] == str(ca.cert) and env[TASK_MODULES_ENV] == ""
    assert host.CA_FILE_ENV == CA_FILE_ENV and host.TASK_MODULES_ENV == TASK_MODULES_ENV
    assert "secret" not in json.dumps(dict(env))


def test_tls_context_refuses_old_protocols(tmp_path: Path) -> None:
    from spirtd.functions.runtime.config import RuntimeConfig
    from spirtd.functions.runtime.server import server_tls_context

    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "host.crt", tmp_path / "host.key", ["127.0.0.1"])
    ctx = server_tls_context(RuntimeConfig(tls_cert=str(server.cert), tls_key=str(server.key)))
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_the_sample_configurations_load(tmp_path: Path) -> None:
    """deploy/function-host.toml and deploy/aws/spirtd.toml as an operator fills them in:
    only the paths change."""
    from spirtd.config import load as load_node

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    text = (deploy / "function-host.toml").read_text()
    new_key(tmp_path / "access-key")
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "host.crt", tmp_path / "host.key", ["10.0.1.20"])
    pw = tmp_path / "node1.password"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    for name, path in (
        ("access-key", tmp_path / "access-key"),
        ("host.crt", server.cert),
        ("host.key", server.key),
        ("node1.password", pw),
        ("node1-ca.crt", ca.cert),
    ):
        text = text.replace(f"/etc/spirt-functions/{name}", str(path))
    cfg, level = host.load(write_config(tmp_path, text))
    assert cfg.host == "0.0.0.0" and cfg.port == 9443 and cfg.tls and level == "info"
    assert cfg.functions["spirt-gradient"].memory_mb == 4096
    node = load_node(deploy / "aws" / "spirtd.toml", {"data_dir": str(tmp_path)})
    assert node.functions == "lambda" and node.redis.tls_port == 6380
    assert node.datasets == {"mnist": "s3://spirt-data/datasets/mnist"}
