"""Checks AWS Signature Version 4 on requests to the local runtime.

The local runtime listens on loopback, where any local user could reach it. Its
workers run as the daemon's user and write into the daemon's Redis, so an
unauthenticated runtime would let another user of the machine run them (and write
gradients) at will. The runtime therefore makes a random access key pair at start
and accepts only requests signed with it, exactly as AWS checks Lambda calls; boto3
signs them with no extra code.

Follows the published SigV4 algorithm: canonical request -> string to sign ->
HMAC-SHA256 key chain (date, region, service, "aws4_request").

The check is in two steps so the runtime does no work for a stranger:
``check_header`` looks only at the headers (a known access key, a date within the
clock window, a scope for this region and service) before the body is read;
``verify_signature`` then checks the signature over the body. The signature of a
verified request that signs ``NONCE_HEADER`` is remembered until its date leaves
the window (``ReplayCache``), so a captured request of spirtd's invoker cannot be
sent again; any other request is bounded by the window alone, as on AWS.
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


# Lambda's error codes for the ways a request can fail authentication.
MISSING_TOKEN = "MissingAuthenticationTokenException"
UNRECOGNIZED = "UnrecognizedClientException"
INVALID = "InvalidSignatureException"
SERVICE = "lambda"

# The random header spirtd's invoker signs into every request (invoker.py
# add_request_nonce). Only requests that sign it are held to the replay check:
# Lambda has no replay rule, and a plain SDK client's two identical calls in one
# second sign to the same bytes, so refusing the second would break callers that
# work against AWS. Such a request can still be replayed only until its
# X-Amz-Date leaves the MAX_SKEW_S window, as against AWS. The invoker's requests
# lose nothing: the header's name is in SignedHeaders, which the signature covers,
# so a captured request cannot be stripped of its nonce to dodge the check.
NONCE_HEADER = "x-spirt-nonce"


class SignatureError(ValueError):
    def __init__(self, message: str, code: str = INVALID) -> None:
        super().__init__(message)
        self.code = code


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


@dataclass(frozen=True)
class SignedHeader:
    """An Authorization header that passed the cheap checks."""

    match: re.Match[str]
    amz_date: str
    timestamp: int

    @property
    def signature(self) -> str:
        return self.match["sig"]

    @property
    def has_nonce(self) -> bool:
        """Whether the signature covers spirtd's random per-request header."""
        return NONCE_HEADER in self.match["headers"].split(";")


def check_header(
    key: AccessKey,
    headers: Mapping[str, str],
    *,
    region: str | None = None,
    service: str = SERVICE,
    now: float | None = None,
) -> SignedHeader:
    """Checks what can be checked without the body; raises ``SignatureError`` (with
    Lambda's error code) otherwise. ``region=None`` accepts any region."""
    auth = headers.get("Authorization")
    if not auth:
        raise SignatureError("Missing Authentication Token", MISSING_TOKEN)
    m = _AUTH_RE.match(auth)
    if m is None:
        raise SignatureError("missing or malformed SigV4 Authorization header")
    if not hmac.compare_digest(m["key"], key.key_id):
        raise SignatureError(
            "unknown access key: the security token included in the request is invalid",
            UNRECOGNIZED,
        )
    if m["service"] != service:
        raise SignatureError(f"Credential should be scoped to correct service: '{service}'.")
    if region is not None and m["region"] != region:
        raise SignatureError(
            f"Credential should be scoped to a valid region ({region}), not '{m['region']}'."
        )
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
    return SignedHeader(m, amz_date, t)


def verify_signature(
    key: AccessKey,
    head: SignedHeader,
    *,
    method: str,
    raw_path: str,
    query: str,
    headers: Mapping[str, str],
    get_all: Callable[[str], list[str]],
    body: bytes,
) -> None:
    """Raises ``SignatureError`` unless ``head``'s signature covers this request."""
    m = head.match
    payload_hash = hashlib.sha256(body).hexdigest()
    declared = headers.get("X-Amz-Content-SHA256")
    if declared is not None and declared != payload_hash:
        raise SignatureError("payload hash does not match the body")
    try:
        canonical_headers = "".join(
            f"{h}:{','.join(' '.join(v.split()) for v in get_all(h))}\n"
            for h in m["headers"].split(";")
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
        [ALGORITHM, head.amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    k = signing_key(key.secret, m["date"], m["region"], m["service"])
    expected = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m["sig"]):
        raise SignatureError("signature does not match")


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
    region: str | None = None,
) -> SignedHeader:
    """Both checks at once. ``headers`` is case-insensitive; ``get_all(name)`` returns
    every value of a header (aiohttp's ``CIMultiDict.getall``)."""
    head = check_header(key, headers, region=region, now=now)
    verify_signature(
        key,
        head,
        method=method,
        raw_path=raw_path,
        query=query,
        headers=headers,
        get_all=get_all,
        body=body,
    )
    return head


class ReplayCache:
    """Signatures of requests already acted on, each kept until its request's date
    is out of the clock window (after which check_header refuses the request
    anyway). Bounded: when every slot holds a live signature, new requests are
    refused rather than an old signature forgotten (that would re-open it to replay)."""

    def __init__(self, capacity: int = 32768) -> None:
        self.capacity = capacity
        self._seen: dict[str, float] = {}  # signature -> when it may be forgotten

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, head: SignedHeader) -> bool:
        return head.signature in self._seen

    def add(self, head: SignedHeader, now: float | None = None) -> bool:
        """Records ``head``'s signature: False if it was already there (a replay).
        Raises ``OverflowError`` when full of live signatures."""
        sig = head.signature
        if sig in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            now = time.time() if now is None else now
            # Only when full, so the scan is rare; requests arrive out of date order.
            for old, until in list(self._seen.items()):
                if until < now:
                    del self._seen[old]
            if len(self._seen) >= self.capacity:
                raise OverflowError("too many signed requests within the clock window")
        self._seen[sig] = head.timestamp + MAX_SKEW_S + 1
        return True
