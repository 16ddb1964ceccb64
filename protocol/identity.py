"""Node identities and admission: Ed25519 keys, libp2p-style node ids,
CA-signed certificates with expiry, revocation lists, and the trust decision.

Pure: keys come in as bytes, time comes in as ``now`` (unix seconds). Reading and
writing key files is the daemon's job (spirtd/keyfiles.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.signing

from . import base58, strictpack
from .errors import DecodeError, TrustError

# Domain-separation prefixes: a signature made for one purpose can never be
# replayed as another. Each ends in NUL so no prefix is a prefix of another.
DOMAIN_CERT = b"spirt/v1/cert\0"
DOMAIN_CRL = b"spirt/v1/crl\0"

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32

# libp2p encodes a peer's key as protobuf PublicKey{Type=Ed25519(1), Data=32 bytes}
# and, being under 42 bytes, wraps it in an identity multihash (code 0x00). Base58
# of that is the familiar "12D3KooW..." id, so our ids read like libp2p's.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_IDENTITY_MULTIHASH = bytes([0x00, len(_LIBP2P_ED25519_PREFIX) + PUBLIC_KEY_SIZE])

MAX_CERT_BYTES = 1024  # an encoded certificate is about 200 bytes
CRL_VALIDITY_DAYS = 30.0  # default time until a revocation list's next update is due

_CERT_LIMITS = strictpack.Limits(
    max_size=MAX_CERT_BYTES, max_depth=2, max_items=32, max_str=128, max_bin=512
)
_CRL_LIMITS = strictpack.Limits(
    max_size=1 << 20,
    max_depth=3,
    max_items=20_000,
    max_str=128,
    max_bin=1 << 20,
    max_container=16_384,
)


def node_id(public_key: bytes) -> str:
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return base58.encode(_IDENTITY_MULTIHASH + _LIBP2P_ED25519_PREFIX + public_key)


def public_key_from_node_id(nid: str) -> bytes:
    raw = base58.decode(nid)
    head = _IDENTITY_MULTIHASH + _LIBP2P_ED25519_PREFIX
    if len(raw) != len(head) + PUBLIC_KEY_SIZE or not raw.startswith(head):
        raise ValueError(f"not an Ed25519 node id: {nid!r}")
    return raw[len(head) :]


def parse_public_key(text: str) -> bytes:
    """Accepts a key as 64 hex digits or as a node id."""
    text = text.strip()
    if len(text) == 2 * PUBLIC_KEY_SIZE:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        return public_key_from_node_id(text)
    except ValueError:
        raise ValueError(
            f"not a public key: {text[:80]!r} (expected 64 hex digits or a node id)"
        ) from None


def verify(public_key: bytes, domain: bytes, message: bytes | memoryview, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(domain + bytes(message), signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False


class NodeKey:
    """An Ed25519 signing key. ``seed`` is the 32-byte secret."""

    __slots__ = ("_sk", "node_id", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._sk = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._sk.verify_key)
        self.node_id: str = node_id(self.public_key)

    @property
    def seed(self) -> bytes:
        return bytes(self._sk)

    def sign(self, domain: bytes, message: bytes | memoryview) -> bytes:
        return self._sk.sign(domain + bytes(message)).signature


@dataclass(frozen=True, slots=True)
class Certificate:
    """A CA's statement: ``public_key`` belongs to ``cluster`` from issued_at to expires_at."""

    cluster: str
    public_key: bytes
    issuer: bytes  # the CA's public key
    serial: int
    issued_at: int
    expires_at: int
    signature: bytes = b""

    def body(self) -> bytes:
        return strictpack.pack(
            {
                "v": 1,
                "cluster": self.cluster,
                "key": self.public_key,
                "issuer": self.issuer,
                "serial": self.serial,
                "nbf": self.issued_at,
                "exp": self.expires_at,
            }
        )

    @classmethod
    def issue(
        cls, ca: NodeKey, cluster: str, public_key: bytes, *, now: float, days: float, serial: int
    ) -> Certificate:
        unsigned = cls(
            cluster, public_key, ca.public_key, serial, int(now), int(now + days * 86400)
        )
        return cls(**{**_fields(unsigned), "signature": ca.sign(DOMAIN_CERT, unsigned.body())})

    def encode(self) -> bytes:
        return strictpack.pack({"body": self.body(), "sig": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        body_raw, sig, body = _open_signed(data, _CERT_LIMITS, "certificate")
        cert = cls(
            cluster=strictpack.field(body, "cluster", str, what="certificate"),
            public_key=strictpack.fixed_bytes(body, "key", PUBLIC_KEY_SIZE, what="certificate"),
            issuer=strictpack.fixed_bytes(body, "issuer", PUBLIC_KEY_SIZE, what="certificate"),
            serial=strictpack.field(body, "serial", int, what="certificate"),
            issued_at=strictpack.field(body, "nbf", int, what="certificate"),
            expires_at=strictpack.field(body, "exp", int, what="certificate"),
            signature=sig,
        )
        if cert.body() != body_raw:
            # We sign the exact bytes, and re-encoding must reproduce them; a body with
            # extra or reordered fields is not one we issued.
            raise DecodeError("bad_field", "certificate body is not canonical")
        return cert

    def signature_valid(self) -> bool:
        return verify(self.issuer, DOMAIN_CERT, self.body(), self.signature)


def _open_signed(
    data: bytes, limits: strictpack.Limits, what: str
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Unpacks a ``{"body": bytes, "sig": 64 bytes}`` container and its version-1
    body. Returns (exact body bytes, signature, decoded body); the caller checks
    the signature over the exact bytes."""
    outer = strictpack.unpack(data, limits)
    body_raw = strictpack.field(outer, "body", bytes, what=what)
    sig = strictpack.fixed_bytes(outer, "sig", SIGNATURE_SIZE, what=what)
    body = strictpack.unpack(body_raw, limits)
    if strictpack.field(body, "v", int, what=what) != 1:
        raise DecodeError("bad_version", f"{what} version")
    return body_raw, sig, body


def _fields(cert: Certificate) -> dict[str, Any]:
    return {k: getattr(cert, k) for k in Certificate.__slots__}


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The CA's signed list of revoked node keys. ``version`` only grows, so a node
    can always tell the newer of two lists and an old one cannot be replayed.
    ``next_update`` (unix seconds) is when the CA promises a fresh list: a node
    holding one past it warns that it may be missing revocations."""

    issuer: bytes
    version: int
    revoked: frozenset[bytes]
    next_update: int
    signature: bytes = b""

    def body(self) -> bytes:
        return strictpack.pack(
            {
                "v": 1,
                "issuer": self.issuer,
                "version": self.version,
                "next": self.next_update,
                "revoked": sorted(self.revoked),
            }
        )

    @classmethod
    def issue(
        cls,
        ca: NodeKey,
        version: int,
        revoked: frozenset[bytes],
        *,
        now: float,
        days: float = CRL_VALIDITY_DAYS,
    ) -> RevocationList:
        unsigned = cls(ca.public_key, version, revoked, int(now + days * 86400))
        return cls(
            ca.public_key,
            version,
            revoked,
            unsigned.next_update,
            ca.sign(DOMAIN_CRL, unsigned.body()),
        )

    def encode(self) -> bytes:
        return strictpack.pack({"body": self.body(), "sig": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> RevocationList:
        body_raw, sig, body = _open_signed(data, _CRL_LIMITS, "revocation list")
        keys = strictpack.field(body, "revoked", list, what="revocation list")
        if not all(isinstance(k, bytes) and len(k) == PUBLIC_KEY_SIZE for k in keys):
            raise DecodeError("bad_field", "revocation list holds a malformed key")
        crl = cls(
            issuer=strictpack.fixed_bytes(body, "issuer", PUBLIC_KEY_SIZE, what="revocation list"),
            version=strictpack.field(body, "version", int, what="revocation list"),
            revoked=frozenset(keys),
            next_update=strictpack.field(body, "next", int, what="revocation list"),
            signature=sig,
        )
        if crl.body() != body_raw:
            raise DecodeError("bad_field", "revocation list body is not canonical")
        return crl

    def signature_valid(self) -> bool:
        return verify(self.issuer, DOMAIN_CRL, self.body(), self.signature)


@dataclass(slots=True)
class TrustStore:
    """Who may join. Empty means nobody: admission is closed unless configured."""

    cluster: str
    ca_keys: set[bytes] = field(default_factory=set)
    allowlist: set[bytes] = field(default_factory=set)
    # Revocation lists by issuing CA; only lists signed by a trusted CA are kept.
    crls: dict[bytes, RevocationList] = field(default_factory=dict)

    def add_crl(self, crl: RevocationList) -> bool:
        """Installs ``crl`` if it is valid and newer than the one held. Returns True if taken."""
        if crl.issuer not in self.ca_keys or not crl.signature_valid():
            return False
        held = self.crls.get(crl.issuer)
        if held is not None and held.version >= crl.version:
            return False
        self.crls[crl.issuer] = crl
        return True

    def is_revoked(self, public_key: bytes) -> bool:
        return any(public_key in crl.revoked for crl in self.crls.values())

    def stale_crls(self, now: float, warn_before: float) -> list[tuple[RevocationList, float]]:
        """Held lists whose next update is due within ``warn_before`` seconds (or
        overdue), with the seconds left (negative when overdue). A stale list is
        still enforced: revocations are never forgotten, only a newer list replaces it."""
        out = []
        for crl in self.crls.values():
            left = crl.next_update - now
            if left <= warn_before:
                out.append((crl, left))
        return out

    def check(
        self,
        public_key: bytes,
        cert: Certificate | None,
        now: float,
        *,
        signature_checked: bool = False,
    ) -> str:
        """Admits a peer or raises TrustError. Returns how it was admitted.
        ``signature_checked``: this process already verified the certificate's
        signature (the one expensive step); everything that can change over time
        is checked again."""
        if self.is_revoked(public_key):
            raise TrustError("peer_revoked", f"key of {node_id(public_key)} is revoked")
        if public_key in self.allowlist:
            return "allowlist"
        if cert is None:
            raise TrustError(
                "peer_untrusted", f"{node_id(public_key)} has no certificate and is not allowlisted"
            )
        if cert.public_key != public_key:
            raise TrustError("peer_untrusted", "certificate is for another key")
        if cert.issuer not in self.ca_keys:
            raise TrustError("peer_untrusted", "certificate is from an untrusted CA")
        if not signature_checked and not cert.signature_valid():
            raise TrustError("peer_untrusted", "certificate signature is invalid")
        if cert.cluster != self.cluster:
            raise TrustError("wrong_cluster", f"certificate is for cluster {cert.cluster!r}")
        if now >= cert.expires_at:
            raise TrustError("peer_expired", "certificate has expired")
        if now < cert.issued_at - 300:  # tolerate modest clock skew
            raise TrustError("peer_untrusted", "certificate is not yet valid")
        return "certificate"


class Admission:
    """The link's trust decision applied to identities that arrive *inside*
    messages: gossip origins and the subjects and accusers of membership records.
    An admitted member could otherwise speak for any number of made-up keys.

    Certificates travel with what they vouch for (in announcements and alive
    records) and are also learnt from links. One that verifies is cached by key,
    so a relayed message costs a byte comparison, not a signature check or a round
    trip. Revocation, expiry, the CA set and the allowlist are re-read from the
    current TrustStore on every decision, so a revoked or expired member is refused
    from the next message on. Pure: time comes in as ``now``.
    """

    __slots__ = ("_certs", "max_certs", "trust")

    def __init__(self, trust: TrustStore, *, max_certs: int = 16_384) -> None:
        self.trust = trust
        self.max_certs = max_certs
        # key -> (certificate whose signature verified, its exact encoding)
        self._certs: OrderedDict[bytes, tuple[Certificate, bytes]] = OrderedDict()

    def update(self, trust: TrustStore) -> None:
        """Swaps the policy; cached certificates are re-judged by it at each use."""
        self.trust = trust

    def learn(self, cert: Certificate | None, now: float) -> bool:
        """Caches ``cert`` (from a link's handshake, say) if it admits its key now."""
        if cert is None:
            return False
        try:
            self.trust.check(cert.public_key, cert, now)
        except TrustError:
            return False
        self._remember(cert, cert.encode())
        return True

    def check(self, public_key: bytes, now: float, cert: bytes = b"") -> str | None:
        """None if ``public_key`` is admitted, else the refusal's reason token.
        ``cert`` is the encoded certificate that came with the message, if any."""
        try:
            self._judge(public_key, cert, now)
        except TrustError as e:
            return e.reason
        return None

    def check_node(self, nid: str, now: float, cert: bytes = b"") -> str | None:
        """check() for a node id; an id that is not an Ed25519 key is untrusted."""
        try:
            public_key = public_key_from_node_id(nid)
        except ValueError:
            return "peer_untrusted"
        return self.check(public_key, now, cert)

    def _judge(self, public_key: bytes, raw: bytes, now: float) -> None:
        held = self._certs.get(public_key)
        if held is not None:
            self._certs.move_to_end(public_key)
        if held is not None and (not raw or raw == held[1]):
            self.trust.check(public_key, held[0], now, signature_checked=True)
            return
        carried = _decode_certificate(raw)
        if carried is not None:
            try:
                self.trust.check(public_key, carried, now)
            except TrustError:
                if held is None:
                    raise
            else:
                # Only certificates that admit their key are cached, so the cache
                # holds at most what the CA issued and cannot be flooded; a relayed
                # older certificate does not displace a newer one.
                if held is None or carried.expires_at >= held[0].expires_at:
                    self._remember(carried, raw)
                return
        cert = held[0] if held is not None else None
        self.trust.check(public_key, cert, now, signature_checked=True)

    def _remember(self, cert: Certificate, raw: bytes) -> None:
        self._certs[cert.public_key] = (cert, raw)
        self._certs.move_to_end(cert.public_key)
        while len(self._certs) > self.max_certs:
            self._certs.popitem(last=False)

    def certificates(self) -> int:
        return len(self._certs)


def _decode_certificate(raw: bytes) -> Certificate | None:
    if not raw:
        return None
    try:
        return Certificate.decode(raw)
    except DecodeError:
        return None
