"""The node's Redis reachable by remote functions (issue 24 A): a real redis-server
with a TLS listener on 127.0.0.1 beside its unix socket, certificates from
``spirtctl redis-tls``; plaintext on the TLS port gets nothing, and the functions'
ACL user gets NOPERM outside its model reads and its output keys."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError

from spirtd.config import ConfigError, load
from spirtd.control import ctl
from spirtd.functions import credentials
from spirtd.redis.binding import CredentialRef, RedisBinding
from spirtd.redis.process import (
    FUNCTION_USERNAME,
    ManagedRedis,
    RedisStartError,
    RedisTls,
    default_tls_files,
)
from tests.fixtures_redis import require_module, short_tmpdir

JOB = "spirt:job1:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_material(node_dir: Path, *extra: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def capture(argv: list[str]) -> int:
        import contextlib
        import io
        import json

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = ctl.main(argv)
        if code == 0:
            out.update(json.loads(buf.getvalue()))
        return code

    code = capture(
        ["redis-tls", "--data-dir", str(node_dir), "--name", "127.0.0.1", "--json", *extra]
    )
    assert code == 0
    return out


def tls_of(node_dir: Path, port: int, **kw: Any) -> RedisTls:
    cert, key, ca = default_tls_files(node_dir)
    return RedisTls(port=port, cert=cert, key=key, ca=ca, **kw)


@pytest.fixture
async def node_dir() -> AsyncIterator[Path]:
    d = short_tmpdir("spirt-tls-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fn_client(server: ManagedRedis, ca: Path | None, **kw: Any) -> aioredis.Redis:
    """The functions' user over TLS, as a remote gradient function logs in."""
    binding = RedisBinding(
        server.tls_url or "",
        FUNCTION_USERNAME,
        CredentialRef("file", str(server.function_password_file)),
    )
    creds = credentials.resolve(binding)
    opts: dict[str, Any] = {"ssl_cert_reqs": "required", "socket_connect_timeout": 10.0}
    if ca is not None:
        opts["ssl_ca_certs"] = str(ca)
    opts.update(kw)
    return aioredis.Redis.from_url(
        binding.url, username=creds.username, password=creds.password, **opts
    )


async def test_tls_listener_and_the_function_users_rights(node_dir: Path) -> None:
    require_module()
    made = make_material(node_dir)
    assert stat.S_IMODE(Path(made["key"]).stat().st_mode) == 0o600
    port = free_port()
    server = ManagedRedis(node_dir, tls=tls_of(node_dir, port))
    server.connection_info()  # makes the functions' password before the config is written
    await server.start()
    daemon = await server.client()
    try:
        assert server.tls_url == f"rediss://127.0.0.1:{port}/0"
        await daemon.set(JOB + "theta", b"\x00" * 16)
        await daemon.set(JOB + "g:1:peer", b"\x01" * 16)
        await daemon.set(JOB + "g:1:self", b"\x02" * 16)

        # Plaintext on the TLS port: the port is open, but a RESP command gets no RESP
        # answer (the TLS handshake fails and the server hangs up) ...
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(100), 30)
            except ConnectionResetError:
                got = b""
        finally:
            writer.close()
        assert not got.startswith((b"+", b"-")), got
        # ... and redis-py's plaintext client cannot log in there.
        password = server._password_of(server.function_password_file)
        plain = aioredis.Redis(
            host="127.0.0.1",
            port=port,
            username=FUNCTION_USERNAME,
            password=password,
            socket_connect_timeout=10.0,
            socket_timeout=10.0,
        )
        with pytest.raises((RedisConnectionError, OSError, TimeoutError)):
            await plain.ping()
        await plain.aclose()

        # TLS with the CA: the function reads the model, writes its output key ...
        fn = fn_client(server, Path(made["ca"]))
        try:
            assert await fn.ping()
            assert await fn.get(JOB + "theta") == b"\x00" * 16
            out_key = JOB + "fn:1:0:5f2a9c"
            assert await fn.set(out_key, b"\x03" * 16, ex=60)
            assert await daemon.get(out_key) == b"\x03" * 16
            # ... and nothing else: not the model, nor any gradient, its own node's or a peer's.
            for write in (
                fn.set(JOB + "theta", b"x"),
                fn.set(JOB + "g:1:peer", b"x"),
                fn.set(JOB + "g:1:self", b"x"),
                fn.get(JOB + "g:1:peer"),
                fn.set(JOB + "opt:m", b"x"),
                fn.delete(out_key),
                fn.flushall(),
                fn.execute_command("SPIRT.PUT", JOB + "theta", b"\x00" * 4, "SHAPE", 1),
                fn.execute_command("ACL", "LIST"),
            ):
                with pytest.raises(NoPermissionError):
                    await write
            assert await daemon.get(JOB + "theta") == b"\x00" * 16
            assert await daemon.get(JOB + "g:1:peer") == b"\x01" * 16
        finally:
            await fn.aclose()

        # A client that does not trust the node's CA refuses the server.
        stranger = fn_client(server, None)
        with pytest.raises((RedisConnectionError, ssl.SSLError, OSError)) as info:
            await stranger.ping()
        assert "certificate" in str(info.value).lower()
        await stranger.aclose()
    finally:
        await daemon.aclose()
        await server.stop()


async def test_client_certificates_when_required(node_dir: Path) -> None:
    client_dir = node_dir / "fn-host"
    made = make_material(node_dir, "--client-dir", str(client_dir))
    port = free_port()
    server = ManagedRedis(
        node_dir, load_module=False, tls=tls_of(node_dir, port, client_certs=True)
    )
    await server.start()
    try:
        without = fn_client(server, Path(made["ca"]))
        with pytest.raises((RedisError, OSError)):
            await without.ping()
        await without.aclose()
        with_cert = fn_client(
            server,
            Path(made["ca"]),
            ssl_certfile=made["client_cert"],
            ssl_keyfile=made["client_key"],
        )
        try:
            assert await with_cert.ping()
        finally:
            await with_cert.aclose()
    finally:
        await server.stop()


async def test_missing_or_loose_material_is_named(node_dir: Path) -> None:
    with pytest.raises(RedisStartError, match="certificate"):
        await ManagedRedis(node_dir, load_module=False, tls=tls_of(node_dir, 1)).start()
    made = make_material(node_dir)
    Path(made["key"]).chmod(0o644)
    with pytest.raises(RedisStartError, match="chmod 600"):
        await ManagedRedis(node_dir, load_module=False, tls=tls_of(node_dir, 1)).start()
    Path(made["key"]).chmod(0o600)
    # The plain port binds wherever the TLS listener does: not both off loopback.
    m = ManagedRedis(node_dir, load_module=False, port=1, tls=tls_of(node_dir, 2, bind="0.0.0.0"))
    with pytest.raises(RedisStartError, match="cannot be on together"):
        await m.start()


def test_redis_table_is_validated(tmp_path: Path) -> None:
    def load_text(text: str) -> None:
        f = tmp_path / "spirtd.toml"
        f.write_text(text)
        load(f, {"data_dir": str(tmp_path)})

    load_text('[redis]\ntls_port = 6380\ntls_bind = "0.0.0.0"\n')
    for text, key in (
        ("[redis]\ntls_port = 70000\n", "redis.tls_port"),
        ('[redis]\ntls_bind = "node1.example"\n', "redis.tls_bind"),
        ('[redis]\ntls_cert = "relative.pem"\n', "redis.tls_cert"),
        ('[redis]\ntls_client_certs = "yes"\n', "redis.tls_client_certs"),
        ("[redis]\nextra_config = []\n", "redis.extra_config"),
        ('redis_url = "unix:///tmp/r.sock"\n[redis]\ntls_port = 6380\n', "redis.tls_port"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_text(text)
