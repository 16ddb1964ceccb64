"""The gradient function's Redis credentials come from its own configuration, bound to
one Redis URL each; an event cannot redirect them (issue 13, finding 5).

The attack this reproduces: an event that names both a Redis it controls and a
credential reference (the function's AWS secret key, a node key file). The attacker's
"Redis" is a listener on 127.0.0.1 that records every byte it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from spirtd.functions import credentials, gradient
from spirtd.functions.credentials import (
    TARGETS_ENV,
    CredentialError,
    CredentialRef,
    RedisBinding,
    bindings_env,
)
from spirtd.functions.event import EventError, RedisTarget
from spirtd.functions.runtime.context import local_context
from spirtd.tasks import load_task
from tests.fixtures_redis import RunningRedis
from tests.test_functions import make_event, put_params

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@dataclass
class Listener:
    url: str
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0


@pytest_asyncio.fixture
async def attacker() -> AsyncIterator[Listener]:
    """A stand-in for a Redis the attacker runs: answers every command with an error."""
    listener = Listener("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections += 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                listener.received += data
                writer.write(b"-ERR no\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    listener.url = f"redis://127.0.0.1:{port}/0"
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def bind(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_bindings(*bindings: RedisBinding) -> None:
        monkeypatch.setenv(TARGETS_ENV, bindings_env(bindings)[TARGETS_ENV])

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    return set_bindings


async def call(payload: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(gradient.handler, payload, local_context())


async def test_event_cannot_name_a_credential(
    plain_redis: RunningRedis, attacker: Listener, bind: Any, tmp_path: Path
) -> None:
    bind(plain_redis.server.function_binding())
    key_file = tmp_path / "node.key"
    key_file.write_text("node-secret-key-material")
    key_file.chmod(0o600)
    ev = make_event(plain_redis).to_json()
    for creds in (
        {"kind": "env", "name": "AWS_SECRET_ACCESS_KEY"},
        {"kind": "file", "path": str(key_file)},
        {"kind": "file", "path": str(plain_redis.server.function_password_file)},
    ):
        evil = dict(ev, redis={"url": attacker.url, "username": "x", "credentials": creds})
        with pytest.raises(EventError, match="only the url"):
            await call(evil)
    assert attacker.connections == 0 and not attacker.received


async def test_event_cannot_redirect_to_an_unbound_redis(
    plain_redis: RunningRedis, attacker: Listener, bind: Any
) -> None:
    bind(plain_redis.server.function_binding())
    ev = make_event(plain_redis).to_json()
    for url in (attacker.url, plain_redis.url + "x", "rediss://evil.example:6380/0"):
        with pytest.raises(CredentialError, match="not a Redis this function is configured"):
            await call(dict(ev, redis={"url": url}))
    assert attacker.connections == 0


async def test_each_secret_goes_only_to_its_own_redis(
    plain_redis: RunningRedis, attacker: Listener, bind: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two bindings: the event picks the attacker's, which has no secret; the other
    binding's password never reaches it."""
    own = plain_redis.server.function_binding()
    password = Path(own.credentials.value).read_text().strip()
    monkeypatch.setenv("SPIRT_OTHER_PW", "other-password-for-the-attacker")
    bind(own, RedisBinding(attacker.url, "spirt-fn", CredentialRef("none")))
    await put_params(plain_redis, "spirt:job1:theta", load_task("synthetic").initial_params(0))
    ev = make_event(plain_redis).to_json()
    assert (await call(ev))["samples"] == 16  # the bound Redis works
    with pytest.raises(Exception):  # noqa: B017 - whatever the fake server's replies cause
        await call(dict(ev, redis={"url": attacker.url}))
    assert attacker.connections >= 1
    for secret in (password, AWS_SECRET, "other-password"):
        assert secret.encode() not in attacker.received


def test_aws_variables_are_never_redis_passwords(bind: Any) -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_access_key_id"):
        with pytest.raises(CredentialError, match="AWS_"):
            RedisBinding("unix:///run/r.sock", None, CredentialRef("env", name))
        with pytest.raises(CredentialError, match="AWS_"):
            CredentialRef.from_json({"kind": "env", "name": name}, "x")
    # Nor through a hand-written configuration.
    doc = (
        '[{"url": "unix:///r.sock", '
        '"credentials": {"kind": "env", "name": "AWS_SECRET_ACCESS_KEY"}}]'
    )
    with pytest.raises(CredentialError, match="AWS_"):
        credentials.configured({TARGETS_ENV: doc})


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.5:6379/0",
        "redis://cache.internal/0",
        "redis://0.0.0.0:6379",
        "redis://[fe80::1]/0",
    ],
)
def test_non_local_redis_needs_tls(url: str) -> None:
    with pytest.raises(CredentialError, match=r"use TLS \(rediss://\)"):
        RedisBinding(url, "spirt-fn", CredentialRef("none"))
    with pytest.raises(CredentialError, match="use TLS"):
        credentials.configured({TARGETS_ENV: f'[{{"url": "{url}"}}]'})


@pytest.mark.parametrize(
    "url",
    [
        "rediss://10.0.0.5:6380/0",
        "redis://127.0.0.1:6379/0",
        "redis://127.8.0.1/0",
        "redis://localhost:6379",
        "redis://[::1]:6379/0",
        "unix:///run/spirt/redis.sock",
    ],
)
def test_local_or_tls_redis_is_accepted(url: str) -> None:
    b = RedisBinding(url, "spirt-fn", CredentialRef("file", "/run/pw"))
    assert credentials.configured(bindings_env([b])) == (b,)


@pytest.mark.parametrize(
    "url", ["redis://:pw@127.0.0.1:6379/0", "rediss://u:pw@h:6380/0", "unix:///r.sock?password=pw"]
)
def test_a_url_never_holds_the_password(url: str) -> None:
    with pytest.raises(CredentialError, match="must not hold a password"):
        RedisBinding(url, None, CredentialRef("none"))


def test_configuration_errors_are_clear(plain_redis: RunningRedis) -> None:
    with pytest.raises(CredentialError, match="no Redis configured"):
        credentials.binding_for("unix:///x", {})
    with pytest.raises(CredentialError, match="not JSON"):
        credentials.configured({TARGETS_ENV: "{nope"})
    with pytest.raises(CredentialError, match=r"list of 1\.\.16"):
        credentials.configured({TARGETS_ENV: "{}"})
    b1 = RedisBinding("unix:///a.sock", None, CredentialRef("none"))
    b2 = RedisBinding("unix:///b.sock", None, CredentialRef("none"))
    env = bindings_env([b1, b2])
    assert credentials.binding_for("unix:///b.sock", env) == b2
    with pytest.raises(CredentialError, match="names no Redis and 2 are configured"):
        credentials.binding_for(None, env)
    assert credentials.binding_for(None, bindings_env([b1])) == b1
    with pytest.raises(CredentialError, match="binds one URL twice"):
        credentials.configured(bindings_env([b1, b1]))


async def test_event_without_url_uses_the_only_binding(
    plain_redis: RunningRedis, bind: Any
) -> None:
    bind(plain_redis.server.function_binding())
    await put_params(plain_redis, "spirt:job1:theta", load_task("synthetic").initial_params(0))
    ev = replace(make_event(plain_redis), redis=RedisTarget())
    assert ev.to_json()["redis"] == {}
    assert (await call(ev.to_json()))["samples"] == 16
