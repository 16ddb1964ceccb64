"""The Redis a gradient function may use, and the credentials bound to it.

Both come from the function's own configuration, never from its event: an event
is whatever the invoker sent, and on AWS anyone allowed ``lambda:InvokeFunction``
can send one. An event that could name the credential reference could make the
function read any secret it can reach (its ``AWS_SECRET_ACCESS_KEY``, a key file)
and send it to a Redis of the sender's choosing.

The configuration is the environment variable ``SPIRT_REDIS_TARGETS``: a JSON list
of bindings, each a Redis URL with the one credential reference it may be used with::

    [{"url": "rediss://10.0.1.15:6380/0", "username": "spirt-fn",
      "credentials": {"kind": "secretsmanager", "arn": "arn:aws:secretsmanager:..."}}]

An event names at most the URL (which must be one of these, exactly); with a single
binding it may name none. Credential kinds:

* ``none``: no password;
* ``file``: a password file on this machine. It must be a regular file, not readable
  by group or others (mode 0600), and small. Used by the local runtime, whose
  workers run as the daemon's user;
* ``env``: an environment variable of the function (e.g. a Lambda environment
  variable filled from a secret at deploy time). ``AWS_*`` variables are refused:
  they hold the function's own AWS credentials;
* ``secretsmanager``: an AWS Secrets Manager secret, fetched with the function's own
  IAM role. Its value is the password itself, or a JSON object with ``"password"``
  (and optionally ``"username"``, which then overrides the binding's).

A binding's URL is ``unix://``, ``rediss://`` (TLS), or ``redis://`` on a loopback
address: a password never crosses a network in clear text.

Resolved secrets are cached for a warm function for ``CACHE_S`` so a rotated secret
is picked up without a cold start.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# The binding types are the Redis side's (it makes them); resolution is ours.
from spirtd.redis.binding import (
    CredentialError,
    CredentialRef,
    RedisBinding,
    refuse_aws_variable,
)

__all__ = [
    "CACHE_S",
    "MAX_SECRET_BYTES",
    "MAX_TARGETS",
    "TARGETS_ENV",
    "CredentialError",
    "CredentialRef",
    "Credentials",
    "RedisBinding",
    "binding_for",
    "bindings_env",
    "configured",
    "forget",
    "resolve",
]

TARGETS_ENV = "SPIRT_REDIS_TARGETS"
MAX_TARGETS = 16
MAX_SECRET_BYTES = 4096
CACHE_S = 300.0


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None


def bindings_env(bindings: Iterable[RedisBinding]) -> dict[str, str]:
    """The function environment that allows exactly ``bindings``."""
    return {TARGETS_ENV: json.dumps([b.to_json() for b in bindings], separators=(",", ":"))}


_parsed: tuple[str, tuple[RedisBinding, ...]] | None = None


def configured(environ: Mapping[str, str] | None = None) -> tuple[RedisBinding, ...]:
    """The bindings in the function's environment (empty when none are configured)."""
    global _parsed
    text = (os.environ if environ is None else environ).get(TARGETS_ENV, "")
    hit = _parsed
    if hit is not None and hit[0] == text:
        return hit[1]
    if not text.strip():
        return ()
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CredentialError(f"{TARGETS_ENV} is not JSON: {e}") from None
    if not isinstance(doc, list) or not (1 <= len(doc) <= MAX_TARGETS):
        raise CredentialError(f"{TARGETS_ENV} must be a list of 1..{MAX_TARGETS} bindings")
    out = tuple(RedisBinding.from_json(b, f"{TARGETS_ENV}[{i}]") for i, b in enumerate(doc))
    if len({b.url for b in out}) != len(out):
        raise CredentialError(f"{TARGETS_ENV} binds one URL twice")
    _parsed = (text, out)
    return out


def binding_for(url: str | None, environ: Mapping[str, str] | None = None) -> RedisBinding:
    """The configured binding for the event's ``url`` (None: the only one configured)."""
    bindings = configured(environ)
    if not bindings:
        raise CredentialError(
            f"this function has no Redis configured: set {TARGETS_ENV} in its environment"
        )
    if url is None:
        if len(bindings) != 1:
            raise CredentialError(
                f"the event names no Redis and {len(bindings)} are configured; name one"
            )
        return bindings[0]
    for b in bindings:
        if b.url == url:
            return b
    raise CredentialError(
        f"event.redis.url {url[:200]!r} is not a Redis this function is configured for "
        f"({TARGETS_ENV})"
    )


_cache: dict[RedisBinding, tuple[float, Credentials]] = {}
_lock = threading.Lock()


def _read_password_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise CredentialError(f"cannot open password file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"password file {path} is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise CredentialError(
                f"password file {path} is readable by others (mode "
                f"{stat.S_IMODE(st.st_mode):o}); it must be 0600"
            )
        if st.st_size > MAX_SECRET_BYTES:
            raise CredentialError(f"password file {path} is too large")
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    password = data.decode("utf-8", "strict").strip()
    if not password:
        raise CredentialError(f"password file {path} is empty")
    return password


def _from_secrets_manager(arn: str) -> Credentials:
    import boto3  # only the AWS path needs it, and it is slow to import

    try:
        value = boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    except Exception as e:
        raise CredentialError(f"cannot read secret {arn}: {type(e).__name__}") from e
    if not isinstance(value, str) or len(value) > MAX_SECRET_BYTES:
        raise CredentialError(f"secret {arn} is not a string of at most {MAX_SECRET_BYTES} bytes")
    if value.lstrip().startswith("{"):
        try:
            doc = json.loads(value)
        except ValueError as e:
            raise CredentialError(f"secret {arn} looks like JSON but does not parse") from e
        password = doc.get("password") if isinstance(doc, dict) else None
        if not isinstance(password, str):
            raise CredentialError(f"secret {arn} has no string 'password' field")
        user = doc.get("username")
        return Credentials(user if isinstance(user, str) else None, password)
    return Credentials(None, value)


def _resolve_uncached(ref: CredentialRef) -> Credentials:
    """The secret behind ``ref``; ``username`` is set only when the secret names one."""
    if ref.kind == "none":
        return Credentials(None, None)
    if ref.kind == "file":
        return Credentials(None, _read_password_file(ref.value))
    if ref.kind == "env":
        refuse_aws_variable(ref.value)
        value = os.environ.get(ref.value)
        if not value:
            raise CredentialError(f"environment variable {ref.value} is not set")
        return Credentials(None, value)
    if ref.kind == "secretsmanager":
        return _from_secrets_manager(ref.value)
    raise CredentialError(f"unknown credentials kind {ref.kind!r}")


def resolve(binding: RedisBinding) -> Credentials:
    """Username and password for ``binding``'s Redis; a username stored with the
    secret wins over the binding's."""
    now = time.monotonic()
    with _lock:
        hit = _cache.get(binding)
    if hit is not None and now - hit[0] < CACHE_S:
        secret = hit[1]
    else:
        secret = _resolve_uncached(binding.credentials)
        with _lock:
            if len(_cache) >= MAX_TARGETS:
                _cache.clear()
            _cache[binding] = (now, secret)
    return Credentials(secret.username or binding.username, secret.password)


def forget(binding: RedisBinding) -> None:
    """Drops a cached secret (after Redis rejected it, e.g. it was rotated)."""
    with _lock:
        _cache.pop(binding, None)
