"""Which Redis a gradient function may use and how it logs in there: the binding
types that the node's Redis hands out and the functions read.

They live on the Redis side because the node's Redis (:mod:`spirtd.redis.process`,
:mod:`spirtd.redis.service`) makes them and :mod:`spirtd.functions` consumes them;
the secret resolution that turns a binding into a password stays with the functions
(:mod:`spirtd.functions.credentials`). Import-light: a Lambda container imports it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}$"
)
_USER_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_URL_SCHEMES = ("unix://", "redis://", "rediss://")


class CredentialError(RuntimeError):
    """A binding is malformed or its secret could not be resolved; the message says
    why (never the secret)."""


@dataclass(frozen=True)
class CredentialRef:
    kind: str  # "none" | "file" | "env" | "secretsmanager"
    value: str = ""  # path, variable name or ARN

    def to_json(self) -> dict[str, str]:
        key = {"file": "path", "env": "name", "secretsmanager": "arn"}.get(self.kind)
        return {"kind": self.kind} | ({key: self.value} if key else {})

    @classmethod
    def from_json(cls, obj: Any, where: str) -> CredentialRef:
        c = _obj(obj, where, {"kind", "path", "name", "arn"})
        kind = c.get("kind")
        if kind == "none":
            return cls("none")
        if kind == "file":
            path = c.get("path")
            if (
                not isinstance(path, str)
                or not path.startswith("/")
                or len(path) > 1024
                or "\x00" in path
            ):
                raise CredentialError(f"{where}.path must be an absolute path")
            return cls("file", path)
        if kind == "env":
            name = c.get("name")
            if not isinstance(name, str) or not _ENV_RE.match(name):
                raise CredentialError(f"{where}.name must be an environment variable name")
            refuse_aws_variable(name)
            return cls("env", name)
        if kind == "secretsmanager":
            arn = c.get("arn")
            if not isinstance(arn, str) or not _ARN_RE.match(arn):
                raise CredentialError(f"{where}.arn must be a Secrets Manager secret ARN")
            return cls("secretsmanager", arn)
        raise CredentialError(f"{where}.kind must be none, file, env or secretsmanager")


@dataclass(frozen=True)
class RedisBinding:
    """One Redis a function may use and how it logs in there."""

    url: str
    username: str | None
    credentials: CredentialRef

    def __post_init__(self) -> None:
        check_url(self.url)
        if self.username is not None and not _USER_RE.match(self.username):
            raise CredentialError("a Redis binding's username is malformed")
        if self.credentials.kind == "env":
            refuse_aws_variable(self.credentials.value)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "username": self.username,
            "credentials": self.credentials.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RedisBinding:
        b = _obj(obj, where, {"url", "username", "credentials"})
        url, user = b.get("url"), b.get("username")
        if not isinstance(url, str):
            raise CredentialError(f"{where}.url must be a string")
        if user is not None and not isinstance(user, str):
            raise CredentialError(f"{where}.username must be a string or null")
        creds = b.get("credentials", {"kind": "none"})
        ref = CredentialRef.from_json(creds, f"{where}.credentials")
        return cls(url, user, ref)


def _obj(v: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise CredentialError(f"{where} must be a JSON object")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise CredentialError(f"{where} has unknown field(s): {', '.join(map(str, unknown))[:200]}")
    return v


def refuse_aws_variable(name: str) -> None:
    if name.upper().startswith("AWS_"):
        raise CredentialError(
            f"environment variable {name} cannot be a Redis password: AWS_* variables "
            "hold the function's own AWS credentials"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> None:
    """Raises ``CredentialError`` unless ``url`` may carry a password: a unix socket,
    TLS, or plain TCP to this machine's loopback."""
    if len(url) > 1024 or not url.startswith(_URL_SCHEMES):
        raise CredentialError("a Redis URL must be unix://, redis:// or rediss:// (at most 1024)")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as e:
        raise CredentialError(f"malformed Redis URL: {e}") from None
    if parts.password is not None or "password=" in parts.query:
        raise CredentialError("a Redis URL must not hold a password; bind a credential instead")
    if url.startswith("redis://") and not _is_loopback(host):
        raise CredentialError(
            f"Redis at {host or '?'} is not on this machine: use TLS (rediss://) so the "
            "password and the tensors are not sent in clear text"
        )


@dataclass(frozen=True)
class RedisTarget:
    """Which of the function's configured Redis to use; None: its only one."""

    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {} if self.url is None else {"url": self.url}
