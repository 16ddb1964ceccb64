"""The encrypted record layer of an established link (sans-IO).

Record on the wire::

    header (17 bytes, authenticated as AEAD associated data)
        u32 length of the ciphertext that follows
        u64 counter   — this direction's record number, from 0
        u8  kind      — what the payload is (FrameKind)
        u32 stream    — stream id for STREAM_* kinds, else 0
    ciphertext = AEAD(key, nonce = 0^4 || counter, aad = header, payload)

The AEAD is the one the handshake chose (protocol.aead): AES-256-GCM where both
ends have hardware AES, ChaCha20-Poly1305-IETF otherwise. Either takes a 96-bit
nonce, made here from the direction's record counter, so no nonce repeats under
a key. (ChaCha20-Poly1305 rather than SecretBox as the fallback: it measured
0.54 GB/s against 0.31 GB/s for SecretBox on this hardware class, DESIGN.md.)

The counter is sent in the clear and must equal the next expected value, so a
replayed or reordered record is told apart from a tampered one (which fails
authentication). Sizes are checked from the header before anything is read.
Keys roll forward on both sides in lock-step, after every ``rekey_every``
records and whenever ``rekey_bytes`` of payload (default 64 GiB, AES-GCM's safe
usage per key: protocol.aead.MAX_BYTES_PER_KEY) have gone under one key:
key' = BLAKE2b-256(key, personalisation "spirt-rekey"), the old key forgotten. Both
ends see every record's length, so no message is needed; and a key compromised
later reveals nothing sent before the last roll. The counter runs on across
rolls.

The AEAD is called through PyNaCl's own cffi binding of libsodium rather than
its ``nacl.bindings`` wrappers: those zero a fresh output buffer and then copy
it into a new ``bytes``, two extra passes over every byte of every record on
both ends of the link. Here the output is written once into uninitialised
memory (every byte is overwritten, or the record is discarded) and handed out
as a memoryview. tests/test_session.py checks interoperation with the wrappers.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from .aead import CHACHA20POLY1305, MAX_BYTES_PER_KEY, TAG_SIZE, cipher, ffi, uninit
from .errors import SessionError

HEADER = struct.Struct(">IQBI")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_PAYLOAD = (1 << 20) + 1024  # an envelope (1 MiB) or a stream chunk, whichever is larger
DEFAULT_REKEY_EVERY = 1 << 20


class FrameKind(IntEnum):
    MESSAGE = 1  # one signed envelope
    STREAM_OPEN = 2  # payload: msgpack [total_size, meta]
    STREAM_DATA = 3  # payload: the next bytes of the stream
    STREAM_END = 4  # payload: empty
    STREAM_ABORT = 5  # payload: reason (utf-8)
    PING = 6
    PONG = 7
    CLOSE = 8  # payload: reason (utf-8)


_KINDS = frozenset(int(k) for k in FrameKind)


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    stream: int
    payload: memoryview  # over a buffer of its own: kept or dropped, never reused


def record_buffer(n: int) -> memoryview:
    """A writable, uninitialised buffer of ``n`` bytes: where a reader lands a
    record's ciphertext straight from the socket before ``Session.open``."""
    return memoryview(ffi.buffer(uninit("unsigned char[]", max(n, 1)), n))


def aead_encrypt(
    payload: bytes | memoryview,
    aad: bytes,
    nonce: bytes,
    key: bytes,
    cipher_name: str = CHACHA20POLY1305,
) -> memoryview:
    n = len(payload)
    out = uninit("unsigned char[]", n + TAG_SIZE)
    rc = cipher(cipher_name).encrypt(
        out,
        ffi.NULL,
        ffi.from_buffer("unsigned char[]", payload),
        n,
        aad,
        len(aad),
        ffi.NULL,
        nonce,
        key,
    )
    if rc != 0:  # libsodium documents no failure for valid sizes
        raise RuntimeError("encryption failed")
    return memoryview(ffi.buffer(out)).toreadonly()


def aead_decrypt(
    ct: bytes | memoryview,
    aad: bytes,
    nonce: bytes,
    key: bytes,
    cipher_name: str = CHACHA20POLY1305,
) -> memoryview | None:
    """The plaintext, or None if the record fails authentication."""
    n = len(ct) - TAG_SIZE
    out = uninit("unsigned char[]", max(n, 1))
    rc = cipher(cipher_name).decrypt(
        out,
        ffi.NULL,
        ffi.NULL,
        ffi.from_buffer("unsigned char[]", ct),
        len(ct),
        aad,
        len(aad),
        nonce,
        key,
    )
    if rc != 0:
        return None
    return memoryview(ffi.buffer(out, n)).toreadonly()


def _roll(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=32, person=b"spirt-rekey").digest()


class _Direction:
    __slots__ = ("counter", "key", "key_bytes", "rekey_bytes", "rekey_every")

    def __init__(self, key: bytes, rekey_every: int, rekey_bytes: int) -> None:
        self.key = key
        self.counter = 0
        self.key_bytes = 0  # payload bytes sealed under the current key
        self.rekey_every = rekey_every
        self.rekey_bytes = rekey_bytes

    def advance(self, nbytes: int) -> None:
        self.counter += 1
        self.key_bytes += nbytes
        if self.counter % self.rekey_every == 0 or self.key_bytes >= self.rekey_bytes:
            self.key = _roll(self.key)
            self.key_bytes = 0


class Session:
    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        *,
        cipher_name: str = CHACHA20POLY1305,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        rekey_every: int = DEFAULT_REKEY_EVERY,
        rekey_bytes: int = MAX_BYTES_PER_KEY,
    ) -> None:
        if rekey_every < 1 or rekey_bytes < 1:
            raise ValueError("rekey_every and rekey_bytes must be positive")
        self.cipher_name = cipher_name
        c = cipher(cipher_name)  # refuses a cipher this host cannot run
        self._encrypt = c.encrypt
        self._decrypt = c.decrypt
        self.max_payload = max_payload
        self._send = _Direction(send_key, rekey_every, min(rekey_bytes, MAX_BYTES_PER_KEY))
        self._recv = _Direction(recv_key, rekey_every, min(rekey_bytes, MAX_BYTES_PER_KEY))
        self._buffer = bytearray()
        self.records_sent = 0
        self.records_received = 0

    # -- sending -------------------------------------------------------------------------

    def seal(
        self, kind: FrameKind, payload: bytes | memoryview, stream: int = 0
    ) -> tuple[bytes, memoryview]:
        """Returns (header, ciphertext); write them back to back (writelines avoids a copy)."""
        if len(payload) > self.max_payload:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {self.max_payload}")
        d = self._send
        n = len(payload)
        header = HEADER.pack(n + TAG_SIZE, d.counter, int(kind), stream)
        out = uninit("unsigned char[]", n + TAG_SIZE)
        rc = self._encrypt(
            out,
            ffi.NULL,
            ffi.from_buffer("unsigned char[]", payload),
            n,
            header,
            HEADER_SIZE,
            ffi.NULL,
            _nonce(d.counter),
            d.key,
        )
        if rc != 0:  # libsodium documents no failure for valid sizes
            raise RuntimeError("encryption failed")
        d.advance(n)
        self.records_sent += 1
        return header, memoryview(ffi.buffer(out)).toreadonly()

    # -- receiving -----------------------------------------------------------------------

    def check_header(self, header: bytes) -> int:
        """Validates a header before its body is read; returns the body length."""
        length, _counter, _kind, _stream = HEADER.unpack(header)
        if length > self.max_payload + TAG_SIZE:
            raise SessionError("oversized_frame", f"{length} bytes > {self.max_payload + TAG_SIZE}")
        if length < TAG_SIZE:
            raise SessionError("malformed_frame", "shorter than the tag")
        return int(length)

    def open(self, header: bytes, ciphertext: bytes | memoryview) -> Frame:
        length = self.check_header(header)
        _, counter, kind, stream = HEADER.unpack(header)
        if len(ciphertext) != length:
            raise SessionError("malformed_frame", "length does not match header")
        d = self._recv
        if counter < d.counter:
            raise SessionError("replayed_frame", f"counter {counter} < expected {d.counter}")
        if counter > d.counter:
            raise SessionError("reordered_frame", f"counter {counter} > expected {d.counter}")
        payload = aead_decrypt(ciphertext, header, _nonce(counter), d.key, self.cipher_name)
        if payload is None:
            raise SessionError("tampered_frame", f"record {counter} fails authentication")
        if kind not in _KINDS:
            raise SessionError("unknown_frame", f"kind {kind}")
        d.advance(length - TAG_SIZE)
        self.records_received += 1
        return Frame(FrameKind(kind), stream, payload)

    def receive_data(self, data: bytes) -> list[Frame]:
        """Buffered decoding for callers that get bytes in arbitrary pieces.

        The buffer never holds more than one record, whose size the header
        already bounded."""
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= HEADER_SIZE:
            header = bytes(self._buffer[:HEADER_SIZE])
            length = self.check_header(header)
            if len(self._buffer) < HEADER_SIZE + length:
                break
            body = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            frames.append(self.open(header, body))
        return frames


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")
