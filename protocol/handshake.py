"""Mutual authentication and key agreement for a link (sans-IO).

A SIGMA-style exchange over ephemeral X25519 keys; three messages:

  1. hello  (I→R, clear)     proto, cluster, e_i, nonce_i, ts, I's cipher offer
  2. reply  (R→I)            clear: proto, cluster, e_r, nonce_r, R's cipher offer
                             sealed under k_hs: R's key, certificate, and R's
                             signature over the transcript so far
  3. finish (I→R)            sealed under k_hs: I's key, certificate, and I's
                             signature over the whole transcript, reply included
  4. welcome (R→I)           sealed under k_hs: R admits I. Without it an initiator
                             refused at step 3 could not tell a refusal (and its
                             reason) from a broken link.

k_hs and the two session keys come from DH(e_i, e_r) bound to the transcript
hash, so a signature can only ever vouch for the session it was made in. The
identities travel encrypted, so a passive observer does not learn who talks.

The record cipher follows from the two offers (protocol.aead.choose: AES-256-GCM
only if both ends offered it, ChaCha20-Poly1305 otherwise). Both offers are in
the transcript (the hello whole, the reply's clear part whole), so k_hs, both
signatures and the session keys cover them: a third party who edits either
offer to force the slower cipher makes the handshake fail, not downgrade.

A replayed ``hello`` is refused by the responder's replay cache (ephemeral keys
seen recently) and its freshness window; a replayed ``finish`` fails because the
responder's ephemeral key — and therefore the transcript — is new each time.

Either side may answer with ``reject`` carrying a reason, so the refused party
can log why.

A hello costs its sender nothing, so the responder does no key work for it
until it has passed every cheap check (``screen_hello``: size, exact shape,
protocol version, cluster, clock freshness). Even the responder's ephemeral
key is made only then. The shell may budget the expensive step per source
between the two (spirtd.net.transport does).

The shell frames these messages; this module never touches I/O, clocks or
randomness it was not handed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import nacl.bindings as sodium
import nacl.exceptions

from . import aead, strictpack
from .errors import DecodeError, HandshakeError, TrustError
from .identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Certificate,
    NodeKey,
    TrustStore,
    node_id,
    verify,
)

# The wire protocol's version: a peer that speaks another is refused at the handshake
# (bad_version), so an incompatible pair never links. spirt/2: gossip controls travel
# as bytes inside their envelope (0.1.0 spoke spirt/1 and sent them as maps), and the
# hello and reply carry cipher offers (added before any release spoke spirt/2).
PROTOCOL = "spirt/2"
DOMAIN_RESPONDER = b"spirt/v1/handshake/responder\0"
DOMAIN_INITIATOR = b"spirt/v1/handshake/initiator\0"
MAX_MESSAGE = 4096  # a handshake message carries two keys and a certificate at most
# A hello is seven short fields: a cluster name of at most 128 bytes and a cipher
# offer of at most 8 names of 32 bytes the longest (about 500 bytes in all).
MAX_HELLO = 512
_HELLO_KEYS = frozenset({"k", "p", "c", "e", "n", "t", "a"})
NONCE_SIZE = 16
MAX_CLOCK_SKEW_S = 120.0

_LIMITS = strictpack.Limits(
    max_size=MAX_MESSAGE,
    max_depth=2,
    max_items=16 + aead.MAX_OFFER,
    max_str=128,
    max_bin=2048,
    max_container=16,
)
_ZERO12 = bytes(12)
_NONCE_FINISH = bytes(11) + b"\1"
_NONCE_WELCOME = bytes(11) + b"\2"


class Role(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    peer_key: bytes
    peer_id: str
    peer_cert: Certificate | None
    admitted_by: str  # "certificate" or "allowlist"
    peer_addr: str  # the address the peer says it listens on ("" if none)
    send_key: bytes
    recv_key: bytes
    session_id: str  # short transcript digest, for logs on both ends
    cipher: str = aead.CHACHA20POLY1305  # the record AEAD both ends chose (protocol.aead)


class ReplayCache:
    """Initiator ephemeral keys seen within the freshness window, bounded."""

    def __init__(self, max_entries: int = 65_536, window_s: float = MAX_CLOCK_SKEW_S) -> None:
        self.max_entries = max_entries
        self.window_s = window_s
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check_and_add(self, ephemeral: bytes, ts: float, now: float) -> None:
        if abs(now - ts) > self.window_s:
            raise HandshakeError("handshake_stale", f"hello timestamp {now - ts:+.0f}s off")
        # Entries older than the window can no longer pass the freshness check.
        while self._seen:
            oldest, when = next(iter(self._seen.items()))
            if now - when <= 2 * self.window_s and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        if ephemeral in self._seen:
            raise HandshakeError("handshake_replay", "hello was seen before")
        self._seen[ephemeral] = now


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"spirt-transcript")
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def _kdf(secret: bytes, transcript: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(
        transcript, key=secret, person=label.ljust(16, b"\0"), digest_size=32
    ).digest()


class Handshake:
    """One side of one handshake. Feed it the peer's messages with ``receive``;
    send what ``start``/``receive`` return. ``result`` is set when complete."""

    def __init__(
        self,
        role: Role,
        identity: NodeKey,
        certificate: Certificate | None,
        trust: TrustStore,
        *,
        random_bytes: Callable[[int], bytes],
        now: float,
        replay_cache: ReplayCache | None = None,
        expected_peer: str | None = None,
        advertise: str = "",
        ciphers: tuple[str, ...] | None = None,
    ) -> None:
        """``ciphers``: the record ciphers this side offers (default: all this host
        can run, protocol.aead.offer)."""
        self.role = role
        self.identity = identity
        self.certificate = certificate
        self.trust = trust
        self.expected_peer = expected_peer
        self.advertise = advertise
        self._pending: HandshakeResult | None = None
        self.replay_cache = replay_cache
        self.result: HandshakeResult | None = None
        self._random = random_bytes
        self._e_secret = random_bytes(32)
        # The public half costs a scalar multiplication: made when first sent,
        # so a responder spends nothing on a connection that never says hello.
        self._e_public = b""
        self._nonce = random_bytes(NONCE_SIZE)
        self._now = now
        self._transcript = b""
        self._hs_key = b""
        self._dh = b""
        self._stage = "start"
        self._offer = list(aead.offer() if ciphers is None else ciphers)
        if not aead.valid_offer(self._offer):
            raise ValueError(f"bad cipher offer {self._offer!r}")
        self._cipher = ""

    # -- outgoing ------------------------------------------------------------------------

    def start(self) -> bytes:
        if self.role is not Role.INITIATOR or self._stage != "start":
            raise RuntimeError("only a fresh initiator starts")
        self._e_public = sodium.crypto_scalarmult_base(self._e_secret)
        hello = strictpack.pack(
            {
                "k": "hello",
                "p": PROTOCOL,
                "c": self.trust.cluster,
                "e": self._e_public,
                "n": self._nonce,
                "t": int(self._now * 1000),
                "a": self._offer,
            }
        )
        self._transcript = _h(hello)
        self._stage = "await_reply"
        return hello

    @staticmethod
    def reject(reason: str) -> bytes:
        return strictpack.pack({"k": "reject", "r": reason[:64]})

    # -- incoming ------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> bytes | None:
        """Processes one peer message; returns the reply to send, if any.

        Raises HandshakeError (reason says why); the caller should then send
        ``Handshake.reject(e.reason)`` where that is useful, and close."""
        self._now = now
        if self.role is Role.RESPONDER and self._stage == "start" and len(data) > MAX_HELLO:
            raise HandshakeError("handshake_oversized", f"hello of {len(data)} bytes > {MAX_HELLO}")
        try:
            msg = strictpack.unpack(data, _LIMITS)
        except DecodeError as e:
            raise HandshakeError("handshake_malformed", e.detail) from None
        kind = _get(msg, "k", str)
        if kind == "reject":
            raise HandshakeError("rejected_by_peer", _get(msg, "r", str))
        if self.role is Role.RESPONDER and self._stage == "start" and kind == "hello":
            return self._on_hello(data, msg)
        if self.role is Role.INITIATOR and self._stage == "await_reply" and kind == "reply":
            return self._on_reply(msg)
        if self.role is Role.RESPONDER and self._stage == "await_finish" and kind == "finish":
            return self._on_finish(msg)
        if self.role is Role.INITIATOR and self._stage == "await_welcome" and kind == "welcome":
            self._on_welcome(msg)
            return None
        raise HandshakeError("handshake_unexpected", f"{kind!r} at stage {self._stage}")

    def _on_hello(self, raw: bytes, msg: dict) -> bytes:
        e_i, ts = _check_hello(raw, msg, self.trust.cluster, self._now)
        self._cipher = _choose(self._offer, msg["a"])
        if self.replay_cache is not None:
            self.replay_cache.check_and_add(e_i, ts, self._now)
        # Every cheap check has passed: only now the key work.
        self._e_public = sodium.crypto_scalarmult_base(self._e_secret)
        self._dh = self._shared(e_i)
        clear = strictpack.pack(
            {
                "p": PROTOCOL,
                "c": self.trust.cluster,
                "e": self._e_public,
                "n": self._nonce,
                "a": self._offer,
            }
        )
        h2 = _h(_h(raw), clear)
        self._hs_key = _kdf(self._dh, h2, b"spirt-hs-key")
        sealed = self._seal_identity(DOMAIN_RESPONDER, h2, _ZERO12)
        self._transcript = _h(h2, sealed)
        self._stage = "await_finish"
        return strictpack.pack({"k": "reply", "h": clear, "x": sealed})

    def _on_reply(self, msg: dict) -> bytes:
        clear_raw = _get(msg, "h", bytes)
        sealed = _get(msg, "x", bytes)
        try:
            clear = strictpack.unpack(clear_raw, _LIMITS)
        except DecodeError as e:
            raise HandshakeError("handshake_malformed", e.detail) from None
        self._check_proto_and_cluster(clear)
        e_r = _get_bytes(clear, "e", 32)
        _get_bytes(clear, "n", NONCE_SIZE)
        self._cipher = _choose(self._offer, _get_offer(clear))
        self._dh = self._shared(e_r)
        h2 = _h(self._transcript, clear_raw)
        self._hs_key = _kdf(self._dh, h2, b"spirt-hs-key")
        peer = self._open_identity(sealed, h2, _ZERO12, DOMAIN_RESPONDER)
        h3 = _h(h2, sealed)
        finish_sealed = self._seal_identity(DOMAIN_INITIATOR, h3, _NONCE_FINISH)
        h4 = _h(h3, finish_sealed)
        self._pending = self._make_result(peer, h4)
        self._transcript = h4
        self._stage = "await_welcome"
        return strictpack.pack({"k": "finish", "x": finish_sealed})

    def _on_finish(self, msg: dict) -> bytes:
        sealed = _get(msg, "x", bytes)
        h3 = self._transcript
        peer = self._open_identity(sealed, h3, _NONCE_FINISH, DOMAIN_INITIATOR)
        h4 = _h(h3, sealed)
        welcome = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            b"welcome", h4, _NONCE_WELCOME, self._hs_key
        )
        self._finish(self._make_result(peer, h4))
        return strictpack.pack({"k": "welcome", "x": welcome})

    def _on_welcome(self, msg: dict) -> None:
        sealed = _get(msg, "x", bytes)
        try:
            sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
                sealed, self._transcript, _NONCE_WELCOME, self._hs_key
            )
        except nacl.exceptions.CryptoError:
            raise HandshakeError("handshake_tampered", "welcome does not decrypt") from None
        assert self._pending is not None
        self._finish(self._pending)

    # -- pieces --------------------------------------------------------------------------

    def _check_proto_and_cluster(self, msg: dict) -> None:
        proto = _get(msg, "p", str)
        if proto != PROTOCOL:
            raise HandshakeError("bad_version", f"peer speaks {proto!r}")
        cluster = _get(msg, "c", str)
        if cluster != self.trust.cluster:
            raise HandshakeError("wrong_cluster", f"peer is in cluster {cluster!r}")

    def _shared(self, peer_ephemeral: bytes) -> bytes:
        try:
            dh = sodium.crypto_scalarmult(self._e_secret, peer_ephemeral)
        except nacl.exceptions.RuntimeError:
            dh = bytes(32)
        if dh == bytes(32):
            # A low-order point would give a key the attacker knows.
            raise HandshakeError("handshake_malformed", "degenerate ephemeral key")
        return dh

    def _seal_identity(self, domain: bytes, transcript: bytes, nonce: bytes) -> bytes:
        cert = self.certificate.encode() if self.certificate else None
        body = strictpack.pack(
            {
                "key": self.identity.public_key,
                "cert": cert,
                "addr": self.advertise,
                "sig": self.identity.sign(domain, transcript),
            }
        )
        return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            body, transcript, nonce, self._hs_key
        )

    def _open_identity(
        self, sealed: bytes, transcript: bytes, nonce: bytes, domain: bytes
    ) -> tuple[bytes, Certificate | None, str, str]:
        try:
            body = sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
                sealed, transcript, nonce, self._hs_key
            )
        except nacl.exceptions.CryptoError:
            raise HandshakeError("handshake_tampered", "identity does not decrypt") from None
        try:
            ident = strictpack.unpack(body, _LIMITS)
        except DecodeError as e:
            raise HandshakeError("handshake_malformed", e.detail) from None
        peer_key = _get_bytes(ident, "key", PUBLIC_KEY_SIZE)
        sig = _get_bytes(ident, "sig", SIGNATURE_SIZE)
        cert_raw = _get(ident, "cert", (bytes, type(None)))
        addr = _get(ident, "addr", str)
        if not verify(peer_key, domain, transcript, sig):
            raise HandshakeError("handshake_bad_signature", "transcript signature is invalid")
        if peer_key == self.identity.public_key:
            raise HandshakeError("self_connect", "connected to ourselves")
        pid = node_id(peer_key)
        if self.expected_peer is not None and pid != self.expected_peer:
            raise HandshakeError("unexpected_peer", f"expected {self.expected_peer}, met {pid}")
        cert = None
        if cert_raw is not None:
            try:
                cert = Certificate.decode(cert_raw)
            except DecodeError as e:
                raise HandshakeError("peer_untrusted", f"bad certificate: {e}") from None
        try:
            admitted = self.trust.check(peer_key, cert, self._now)
        except TrustError as e:
            raise HandshakeError(e.reason, e.detail) from None
        return peer_key, cert, admitted, addr

    def _make_result(
        self, peer: tuple[bytes, Certificate | None, str, str], h4: bytes
    ) -> HandshakeResult:
        peer_key, cert, admitted, addr = peer
        i2r = _kdf(self._dh, h4, b"spirt-i2r")
        r2i = _kdf(self._dh, h4, b"spirt-r2i")
        send, recv = (i2r, r2i) if self.role is Role.INITIATOR else (r2i, i2r)
        return HandshakeResult(
            peer_key,
            node_id(peer_key),
            cert,
            admitted,
            addr,
            send,
            recv,
            h4[:8].hex(),
            self._cipher,
        )

    def _finish(self, result: HandshakeResult) -> None:
        self.result = result
        self._stage = "done"
        self._e_secret = b""
        self._hs_key = b""
        self._dh = b""

    @property
    def complete(self) -> bool:
        return self.result is not None


def screen_hello(data: bytes, cluster: str, now: float) -> None:
    """The responder's cheap checks on a first message, without key work:
    size, exact shape, protocol version, cluster and clock freshness. Raises
    HandshakeError; a hello that passes may still fail the replay check and
    everything after it. A reject message passes (the caller reads it next)."""
    if len(data) > MAX_HELLO:
        raise HandshakeError("handshake_oversized", f"hello of {len(data)} bytes > {MAX_HELLO}")
    try:
        msg = strictpack.unpack(data, _LIMITS)
    except DecodeError as e:
        raise HandshakeError("handshake_malformed", e.detail) from None
    kind = _get(msg, "k", str)
    if kind == "reject":
        return
    if kind != "hello":
        raise HandshakeError("handshake_unexpected", f"{kind!r} as a first message")
    _check_hello(data, msg, cluster, now)


def _check_hello(raw: bytes, msg: dict, cluster: str, now: float) -> tuple[bytes, float]:
    """(initiator ephemeral key, timestamp) of a hello that passes the cheap checks."""
    if len(raw) > MAX_HELLO:
        raise HandshakeError("handshake_oversized", f"hello of {len(raw)} bytes > {MAX_HELLO}")
    if set(msg) != _HELLO_KEYS:
        raise HandshakeError("handshake_malformed", "hello fields are not the expected set")
    proto = _get(msg, "p", str)
    if proto != PROTOCOL:
        raise HandshakeError("bad_version", f"peer speaks {proto!r}")
    peer_cluster = _get(msg, "c", str)
    if peer_cluster != cluster:
        raise HandshakeError("wrong_cluster", f"peer is in cluster {peer_cluster!r}")
    e_i = _get_bytes(msg, "e", 32)
    _get_bytes(msg, "n", NONCE_SIZE)
    _get_offer(msg)
    ts = _get(msg, "t", int) / 1000.0
    if abs(now - ts) > MAX_CLOCK_SKEW_S:
        raise HandshakeError("handshake_stale", f"hello timestamp {now - ts:+.0f}s off")
    return e_i, ts


def _get_offer(msg: object) -> list[str]:
    offer = _get(msg, "a", list)
    if not aead.valid_offer(offer):
        raise HandshakeError("handshake_malformed", "cipher offer is not a short list of names")
    return offer  # type: ignore[return-value]


def _choose(ours: list[str], theirs: list[str]) -> str:
    chosen = aead.choose(ours, theirs)
    if chosen is None:
        raise HandshakeError("no_common_cipher", f"peer offers {theirs!r}, we {ours!r}")
    return chosen


def _get(msg: object, key: str, typ: type | tuple[type, ...]) -> object:
    try:
        return strictpack.field(msg, key, typ, what="handshake message")
    except DecodeError as e:
        raise HandshakeError("handshake_malformed", e.detail) from None


def _get_bytes(msg: object, key: str, size: int) -> bytes:
    try:
        return strictpack.fixed_bytes(msg, key, size, what="handshake message")
    except DecodeError as e:
        raise HandshakeError("handshake_malformed", e.detail) from None
