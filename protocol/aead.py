"""The record ciphers a link may use, and how two peers settle on one (sans-IO).

Two AEADs, both libsodium's, called through PyNaCl's own cffi binding:

* ``aes256gcm``: AES-256-GCM. Several times faster than ChaCha20-Poly1305
  where the CPU has AES and carry-less multiply instructions (bench.link
  measures both), and only offered there: libsodium says at run time whether
  it can (``crypto_aead_aes256gcm_is_available``), and without that hardware it
  has no implementation at all.
* ``chacha20poly1305``: ChaCha20-Poly1305-IETF, fast in software everywhere;
  every peer offers it.

Each side of a handshake offers the names it supports; the link uses the first
name in ``PREFERENCE`` that both offered (``choose``), so both ends reach the
same answer from the same two offers without another message. The offers are
part of the handshake transcript that both sides sign and derive their keys
from (protocol.handshake), so a third party who strips AES-256-GCM from an
offer breaks the handshake instead of downgrading it.

Both functions have libsodium's same signature: 32-byte key, 96-bit nonce,
16-byte tag. The session makes every nonce from its per-direction record
counter, so a nonce is never used twice under one key (protocol.session).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

AES256GCM = "aes256gcm"
CHACHA20POLY1305 = "chacha20poly1305"
# Most preferred first: the link takes the first one both ends offered.
PREFERENCE: tuple[str, ...] = (AES256GCM, CHACHA20POLY1305)
KNOWN = frozenset(PREFERENCE)
# An offer longer than this is malformed (names we do not know are skipped, so a
# later version may offer more).
MAX_OFFER = 8
MAX_NAME = 32

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

# Data under one key before the session rolls it (protocol.session). The bound
# is AES-GCM's: after 2^32 AES blocks (64 GiB) under one key an attacker's
# advantage in telling the ciphertext from random stays below 2^-64 (the
# birthday bound on the keystream blocks, q^2 / 2^129), well inside TLS 1.3's
# own AES-GCM limit (RFC 8446 §5.5: 2^24.5 full records, about 2^34.5 blocks).
# ChaCha20-Poly1305 could go far longer; it rolls on the same rule so that the
# rule does not depend on the cipher.
MAX_BYTES_PER_KEY = 1 << 36

# libsodium picks its SIMD implementations in sodium_init (idempotent); PyNaCl
# calls it when nacl.bindings is imported, which this module does not rely on.
# Without it ChaCha20 runs the portable code, a third of the speed here.
if _lib.sodium_init() < 0:
    raise ImportError("libsodium failed to initialise")


@dataclass(frozen=True, slots=True)
class Cipher:
    name: str
    encrypt: Any  # libsodium's crypto_aead_*_encrypt
    decrypt: Any  # libsodium's crypto_aead_*_decrypt


def _hardware_aes() -> bool:
    probe = getattr(_lib, "crypto_aead_aes256gcm_is_available", None)
    return probe is not None and probe() == 1


HARDWARE_AES = _hardware_aes()

_CIPHERS: dict[str, Cipher] = {
    CHACHA20POLY1305: Cipher(
        CHACHA20POLY1305,
        _lib.crypto_aead_chacha20poly1305_ietf_encrypt,
        _lib.crypto_aead_chacha20poly1305_ietf_decrypt,
    ),
}
if HARDWARE_AES:
    _CIPHERS[AES256GCM] = Cipher(
        AES256GCM, _lib.crypto_aead_aes256gcm_encrypt, _lib.crypto_aead_aes256gcm_decrypt
    )


def available() -> tuple[str, ...]:
    """What this host can run, most preferred first."""
    return tuple(n for n in PREFERENCE if n in _CIPHERS)


def offer(allow_aes: bool = True) -> tuple[str, ...]:
    """What this host offers in a handshake; ``allow_aes=False`` keeps AES-GCM out
    (the transport's ``aes_gcm`` setting)."""
    return tuple(n for n in available() if allow_aes or n != AES256GCM)


def cipher(name: str) -> Cipher:
    try:
        return _CIPHERS[name]
    except KeyError:
        raise ValueError(f"cipher {name!r} is not available on this host") from None


def choose(ours: Sequence[str], theirs: Sequence[str]) -> str | None:
    """The first cipher in PREFERENCE both offers name, or None if they share none.

    Symmetric in its arguments, so both ends agree; neither side's order of
    its own offer matters."""
    for name in PREFERENCE:
        if name in ours and name in theirs:
            return name
    return None


def valid_offer(value: object) -> bool:
    """The shape an offer must have on the wire: a short list of short strings."""
    return (
        isinstance(value, list)
        and 0 < len(value) <= MAX_OFFER
        and all(isinstance(v, str) and 0 < len(v) <= MAX_NAME for v in value)
    )


# Buffers every byte of which the AEAD overwrites: zeroing them first is waste.
uninit = _ffi.new_allocator(should_clear_after_alloc=False)
ffi = _ffi
