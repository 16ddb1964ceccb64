"""Checks AWS Signature Version 4 on requests to the local runtime.

The local runtime listens on loopback, where any local user could reach it. The
gradient function reads Redis credentials from files named in its events, so an
unauthenticated runtime would let another user of the machine make the daemon's
workers send those secrets to a Redis of their choosing. The runtime therefore
makes a random access key pair at start and accepts only requests signed with it,
exactly as AWS checks Lambda calls; boto3 signs them with no extra code.

Follows the published SigV4 algorithm: canonical request -> string to sign ->
HMAC-SHA256 key chain (date, region, service, "aws4_request").
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 300  # AWS allows 5 minutes of clock difference
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/\s,]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9-]+)/aws4_request,\s*SignedHeaders=(?P<headers>[a-z0-9;-]+),\s*"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)


class SignatureError(ValueError):
    pass


@dataclass(frozen=True)
class AccessKey:
    key_id: str
    secret: str

    @classmethod
    def generate(cls) -> AccessKey:
        return cls("LOCAL" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))

    def as_tuple(self) -> tuple[str, str]:
        return self.key_id, self.secret


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(("AWS4" + secret).encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = [pair.partition("=")[::2] for pair in query.split("&")]
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def verify(
    key: AccessKey,
    *,
    method: str,
    raw_path: str,
    query: str,
    headers: Mapping[str, str],
    get_all: Callable[[str], list[str]],
    body: bytes,
    now: float | None = None,
) -> None:
    """Raises ``SignatureError`` unless the request is signed with ``key``.

    ``headers`` is case-insensitive; ``get_all(name)`` returns every value of a
    header (aiohttp's ``CIMultiDict.getall``).
    """
    m = _AUTH_RE.match(headers.get("Authorization", ""))
    if m is None:
        raise SignatureError("missing or malformed SigV4 Authorization header")
    if not hmac.compare_digest(m["key"], key.key_id):
        raise SignatureError("unknown access key")
    amz_date = headers.get("X-Amz-Date", "")
    try:
        t = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        raise SignatureError("missing or malformed X-Amz-Date") from None
    if abs((time.time() if now is None else now) - t) > MAX_SKEW_S:
        raise SignatureError("request time too far from the server's clock")
    if amz_date[:8] != m["date"]:
        raise SignatureError("credential scope date does not match X-Amz-Date")
    signed = m["headers"].split(";")
    if "host" not in signed or signed != sorted(set(signed)):
        raise SignatureError("signed headers must be sorted and include host")
    payload_hash = hashlib.sha256(body).hexdigest()
    declared = headers.get("X-Amz-Content-SHA256")
    if declared is not None and declared != payload_hash:
        raise SignatureError("payload hash does not match the body")
    try:
        canonical_headers = "".join(
            f"{h}:{','.join(' '.join(v.split()) for v in get_all(h))}\n" for h in signed
        )
    except KeyError:
        raise SignatureError("a signed header is missing from the request") from None
    canonical = "\n".join(
        [
            method.upper(),
            quote(raw_path, safe="/~"),
            _canonical_query(query),
            canonical_headers,
            m["headers"],
            payload_hash,
        ]
    )
    scope = f"{m['date']}/{m['region']}/{m['service']}/aws4_request"
    to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    k = signing_key(key.secret, m["date"], m["region"], m["service"])
    expected = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m["sig"]):
        raise SignatureError("signature does not match")
