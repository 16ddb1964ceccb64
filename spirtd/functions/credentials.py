"""Resolves the Redis credentials reference an event carries into a password.

* ``file``: a password file on this machine. It must be a regular file, not
  readable by group or others (mode 0600), and small. Used by the local runtime,
  whose workers run as the daemon's user.
* ``env``: an environment variable of the function (set from the deployment,
  e.g. a Lambda environment variable filled from a secret at deploy time).
* ``secretsmanager``: an AWS Secrets Manager secret, fetched with the function's
  own IAM role. Its value is the password itself, or a JSON object with
  ``"password"`` (and optionally ``"username"``, which then overrides the event's).

Resolved secrets are cached for a warm function for ``CACHE_S`` so a rotated
secret is picked up without a cold start.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from dataclasses import dataclass

from spirtd.functions.event import CredentialRef

MAX_SECRET_BYTES = 4096
CACHE_S = 300.0


class CredentialError(RuntimeError):
    """A credentials reference could not be resolved; the message says why (never the secret)."""


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None


_cache: dict[CredentialRef, tuple[float, Credentials]] = {}
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
        value = os.environ.get(ref.value)
        if not value:
            raise CredentialError(f"environment variable {ref.value} is not set")
        return Credentials(None, value)
    if ref.kind == "secretsmanager":
        return _from_secrets_manager(ref.value)
    raise CredentialError(f"unknown credentials kind {ref.kind!r}")


def resolve(ref: CredentialRef, username: str | None) -> Credentials:
    """Username and password for Redis; a username stored with the secret wins."""
    now = time.monotonic()
    with _lock:
        hit = _cache.get(ref)
    if hit is not None and now - hit[0] < CACHE_S:
        secret = hit[1]
    else:
        secret = _resolve_uncached(ref)
        with _lock:
            if len(_cache) >= 16:
                _cache.clear()
            _cache[ref] = (now, secret)
    return Credentials(secret.username or username, secret.password)


def forget(ref: CredentialRef) -> None:
    """Drops a cached secret (after Redis rejected it, e.g. it was rotated)."""
    with _lock:
        _cache.pop(ref, None)
