"""A function host: the Lambda-compatible runtime as a service of its own, on a
machine other than the node's (a GPU box, a bigger CPU host).

``python -m spirtd.functions.runtime --config host.toml`` serves the same Invoke
API as the node's embedded runtime, over HTTPS with its own certificate and its
own access key, so a node points ``[invoke] endpoint_url`` at it exactly as it
would at a Lambda endpoint (``functions = "lambda"``, the key in the node's AWS
credentials). The functions reach the node's Redis over TLS with the credentials
this file binds them to; an event can only pick one of those by URL.

``python -m spirtd.functions.runtime --new-access-key FILE`` writes a fresh key
pair, in the AWS shared-credentials format (mode 0600), for both ends.

The configuration (TOML; unknown keys are errors)::

    listen = "0.0.0.0:9443"
    access_key_file = "/etc/spirt-functions/access-key"   # 0600
    region = "us-east-1"
    concurrency = 2
    prewarm = 0
    [tls]
    cert = "/etc/spirt-functions/host.crt"
    key = "/etc/spirt-functions/host.key"
    client_ca = ""            # set: callers must present a certificate it signed
    [functions.spirt-gradient]
    timeout_s = 60.0
    memory_mb = 1024
    task_modules = []
    [functions.spirt-gradient.redis]
    url = "rediss://node1.example:6380/0"
    username = "spirt-fn"
    password_file = "/etc/spirt-functions/redis.password"   # 0600
    ca_file = "/etc/spirt-functions/node-ca.pem"
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import os
import secrets
import signal
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

from spirtd.functions.runtime.config import (
    GRADIENT_FUNCTION,
    FunctionSpec,
    RuntimeConfig,
    RuntimeConfigError,
)

MAX_KEY_FILE_BYTES = 4096
CREDENTIALS_SECTION = "default"
_TOP_KEYS = {"listen", "access_key_file", "region", "account_id", "concurrency", "prewarm"}
_TOP_KEYS |= {"tls", "functions", "log_level", "event_queue"}
_FUNCTION_KEYS = {"handler", "timeout_s", "memory_mb", "environment", "task_modules", "redis"}
_REDIS_KEYS = {"url", "username", "password_file", "ca_file"}
_TLS_KEYS = {"cert", "key", "client_ca"}
# The gradient function's environment variables (functions/gradient.py, which this
# process does not import: it would load torch here for nothing).
TASK_MODULES_ENV = "SPIRT_TASK_MODULES"
CA_FILE_ENV = "SPIRT_REDIS_CA_FILE"


class HostConfigError(ValueError):
    """The host's configuration cannot run; the message names the key."""


def _table(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HostConfigError(f"{where}: must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise HostConfigError(f"{where}.{unknown[0]}: unknown setting".lstrip("."))
    return value


def _get(table: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HostConfigError(f"{where}{key}: expected {kind.__name__}, got {value!r}")
    return value


def _check_private(path: str, what: str) -> bytes:
    """A small regular file only its owner may read; its bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise HostConfigError(f"{what}: cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE_BYTES:
            raise HostConfigError(f"{what}: {path} is not a small regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise HostConfigError(
                f"{what}: {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run: chmod 600 {path}"
            )
        return os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)


def read_access_key(path: str) -> tuple[str, str]:
    """(key id, secret) from an AWS shared-credentials file's ``[default]`` section."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(_check_private(path, "access_key_file").decode())
        section = parser[CREDENTIALS_SECTION]
        key, secret = section["aws_access_key_id"], section["aws_secret_access_key"]
    except (configparser.Error, KeyError, UnicodeDecodeError):
        raise HostConfigError(
            f"access_key_file: {path} needs [{CREDENTIALS_SECTION}] with aws_access_key_id "
            "and aws_secret_access_key"
        ) from None
    if not (16 <= len(key) <= 128 and key.isalnum()) or not (20 <= len(secret) <= 128):
        raise HostConfigError(f"access_key_file: {path} holds a malformed key")
    return key, secret


def new_access_key(path: Path) -> str:
    """Writes a fresh key pair to ``path`` (0600); returns its key id."""
    from spirtd.keyfiles import write_secret

    key_id = "SPIRT" + secrets.token_hex(8).upper()
    text = (
        f"[{CREDENTIALS_SECTION}]\naws_access_key_id = {key_id}\n"
        f"aws_secret_access_key = {secrets.token_urlsafe(30)}\n"
    )
    write_secret(path, text.encode())
    return key_id


def _function(name: str, t: dict[str, Any]) -> FunctionSpec:
    where = f"functions.{name}."
    _table(t, where.rstrip("."), _FUNCTION_KEYS)
    env = _get(t, "environment", dict, {}, where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise HostConfigError(f"{where}environment: values must be strings")
    env = dict(env)
    modules = _get(t, "task_modules", list, [], where)
    if not all(isinstance(m, str) and m for m in modules):
        raise HostConfigError(f"{where}task_modules: must be a list of module names")
    # Set even when empty, so an inherited variable cannot widen it.
    env[TASK_MODULES_ENV] = ",".join(modules)
    if "redis" in t:
        env |= _redis_env(_table(t["redis"], f"{where}redis", _REDIS_KEYS), f"{where}redis.")
    try:
        return FunctionSpec(
            handler=_get(t, "handler", str, FunctionSpec.handler, where),
            timeout_s=_get(t, "timeout_s", float, FunctionSpec.timeout_s, where),
            memory_mb=_get(t, "memory_mb", int, FunctionSpec.memory_mb, where),
            environment=env,
        )
    except RuntimeConfigError as e:
        raise HostConfigError(f"{where.rstrip('.')}: {e}") from None


def _redis_env(t: dict[str, Any], where: str) -> dict[str, str]:
    """The function environment binding it to one Redis (credentials.py)."""
    from spirtd.functions.credentials import CredentialError, bindings_env
    from spirtd.redis.binding import CredentialRef, RedisBinding

    url = _get(t, "url", str, "", where)
    username = t.get("username")
    password_file = _get(t, "password_file", str, "", where)
    ca_file = _get(t, "ca_file", str, "", where)
    if username is not None and not isinstance(username, str):
        raise HostConfigError(f"{where}username: expected str, got {username!r}")
    if password_file:
        _check_private(password_file, f"{where}password_file")
        ref = CredentialRef("file", str(Path(password_file).resolve()))
    else:
        ref = CredentialRef("none")
    try:
        env = bindings_env([RedisBinding(url, username, ref)])
    except CredentialError as e:
        raise HostConfigError(f"{where}url: {e}") from None
    if ca_file:
        if not Path(ca_file).is_file():
            raise HostConfigError(f"{where}ca_file: {ca_file} is not a file")
        env[CA_FILE_ENV] = str(Path(ca_file).resolve())
    return env


def load(path: Path) -> tuple[RuntimeConfig, str]:
    """The runtime configuration from ``path``, and the log level."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise HostConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise HostConfigError(f"config: {path} is not valid TOML: {e}") from None
    _table(doc, "", _TOP_KEYS)
    listen = _get(doc, "listen", str, "127.0.0.1:9001", "")
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise HostConfigError(f"listen: expected HOST:PORT, got {listen!r}")
    key_file = _get(doc, "access_key_file", str, "", "")
    if not key_file:
        raise HostConfigError("access_key_file: required (make one with --new-access-key FILE)")
    tls = _table(doc.get("tls", {}), "tls", _TLS_KEYS)
    functions = doc.get("functions", {GRADIENT_FUNCTION: {}})
    if not isinstance(functions, dict) or not functions:
        raise HostConfigError("functions: must be a table of at least one [functions.NAME]")
    specs = {name: _function(name, t) for name, t in functions.items()}
    kw: dict[str, Any] = {}
    for key, kind in (("region", str), ("account_id", str), ("concurrency", int)):
        if key in doc:
            kw[key] = _get(doc, key, kind, None, "")
    for key in ("prewarm", "event_queue"):
        if key in doc:
            kw[key] = _get(doc, key, int, None, "")
    try:
        cfg = RuntimeConfig(
            functions=specs,
            host=host,
            port=int(port),
            access_key=read_access_key(key_file),
            tls_cert=_get(tls, "cert", str, "", "tls."),
            tls_key=_get(tls, "key", str, "", "tls."),
            tls_client_ca=_get(tls, "client_ca", str, "", "tls."),
            **kw,
        )
    except RuntimeConfigError as e:
        raise HostConfigError(str(e)) from None
    return cfg, _get(doc, "log_level", str, "info", "")


async def serve(cfg: RuntimeConfig, ready: Any = None) -> None:
    """Runs the runtime until SIGTERM or SIGINT; ``ready(endpoint)`` once it listens.
    What each function billed is logged (``BILLED`` lines) on SIGUSR1 and at exit."""
    from spirtd.functions.runtime.server import LocalRuntime

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = LocalRuntime(cfg)
    endpoint = await runtime.start()
    # SIGUSR1: log what each function billed so far; it is logged at exit too.
    loop.add_signal_handler(signal.SIGUSR1, runtime.log_billing)
    try:
        runtime.warm(cfg.prewarm)
        if ready is not None:
            ready(endpoint)
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        await runtime.stop()
        runtime.log_billing()


def main(argv: list[str] | None = None) -> int:
    from spirtd import logs

    ap = argparse.ArgumentParser(
        prog="python -m spirtd.functions.runtime",
        description="Serve the Lambda Invoke API for spirtd nodes on other hosts.",
    )
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", type=Path, help="the host's TOML configuration")
    group.add_argument(
        "--new-access-key", type=Path, metavar="FILE", help="write a fresh access key (0600)"
    )
    ap.add_argument("--log-format", choices=("text", "json"), default="text")
    args = ap.parse_args(argv)
    if args.new_access_key is not None:
        if args.new_access_key.exists():
            logs.fatal(f"--new-access-key: {args.new_access_key} exists; not overwritten")
            return 1
        print(new_access_key(args.new_access_key))
        return 0
    try:
        cfg, level = load(args.config)
        logs.setup(args.log_format, level)
    except (HostConfigError, ValueError) as e:
        logs.fatal(str(e), args.log_format)
        return 1

    def ready(endpoint: str) -> None:
        logs.identity({"endpoint": endpoint, "access key": cfg.access_key[0]})  # type: ignore[index]

    try:
        asyncio.run(serve(cfg, ready))
    except (RuntimeConfigError, OSError) as e:
        logs.fatal(f"listen: {e}")
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
