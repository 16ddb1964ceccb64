"""The wire formats of a published vector (a gradient, or an outer round's Δ).

A job fixes one format for every message (``--compression``), so a body's size is
known before a byte of it moves: :func:`encoded_size` is what the validation hook
compares the announced size with.

* ``none``: ``count`` little-endian float32.
* ``fp16``: ``count`` little-endian IEEE binary16. Decoding is exact; an infinite
  or NaN half is refused.
* ``int8``: blockwise affine 8-bit codes. The vector is cut into blocks of
  :data:`BLOCK` values (the last may be shorter). The body is every block's header
  (``scale``, ``offset``: two little-endian float32) back to back, then every
  value's code (one unsigned byte) back to back. A value decodes to
  ``float32(float64(offset) + float64(code) * float64(scale))``: the product is
  exact in float64 (8 bits times 24), so there is one rounding and no room for a
  fused multiply-add to change a bit; the module and :func:`decode` agree bit for
  bit. A header is malformed if ``scale`` or ``offset`` is not finite, ``scale``
  is negative, or the block's largest value (``offset + 255 * scale``) is not
  finite in float32.

Why headers first: a header is what a liar can make non-finite, and with the
headers in one region a proof of it (``training.evidence``) is one chunk of the
body whose floats are checked exactly as a float32 gradient's are.

Encoding is each peer's own business (only its decoded bytes must agree
everywhere); :func:`encode` is the reference the module's ``SPIRT.PACK`` follows.
"""

from __future__ import annotations

import numpy as np

FORMATS = ("none", "fp16", "int8")
BLOCK = 4096  # values per int8 block: a header of 8 bytes costs 0.2%
HEADER = 8  # scale and offset, float32 each
CODES = 255  # largest code
FP16_MAX = 65504.0


class CompressionError(ValueError):
    """A body that is not a valid encoding; ``reason`` is a counter token."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def blocks(count: int) -> int:
    return -(-count // BLOCK)


def encoded_size(fmt: str, count: int) -> int:
    """The exact byte size of ``count`` values in ``fmt``."""
    if fmt == "none":
        return 4 * count
    if fmt == "fp16":
        return 2 * count
    if fmt == "int8":
        return HEADER * blocks(count) + count
    raise ValueError(f"unknown compression {fmt!r}; choose one of {', '.join(FORMATS)}")


def _headers(body: bytes | memoryview, count: int) -> tuple[np.ndarray, np.ndarray]:
    h = np.frombuffer(body, dtype="<f4", count=2 * blocks(count)).reshape(-1, 2)
    return h[:, 0], h[:, 1]


def _bad_headers(scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        top = (offset.astype(np.float64) + CODES * scale.astype(np.float64)).astype(np.float32)
        return ~(np.isfinite(scale) & np.isfinite(offset) & (scale >= 0) & np.isfinite(top))


def check(fmt: str, body: bytes | memoryview, count: int) -> None:
    """Raises CompressionError (``size``, ``nonfinite``) unless ``body`` decodes to
    ``count`` finite float32 values."""
    want = encoded_size(fmt, count)
    if len(body) != want:
        raise CompressionError("size", f"{len(body)} bytes where {fmt} of {count} needs {want}")
    bad = first_bad(fmt, body, count)
    if bad is not None:
        raise CompressionError("nonfinite", f"{fmt} body holds a non-finite value at {bad}")


def first_bad(fmt: str, body: bytes | memoryview, count: int, at: int = 0) -> int | None:
    """The byte offset (in the whole body) of the first element that makes ``body``
    decode to a non-finite value, or None. ``body`` may be one chunk of a body of
    ``count`` values, starting at byte ``at`` (a multiple of 4): the evidence of a
    non-finite value is such a chunk."""
    if at % 4:
        raise ValueError("a chunk starts at a multiple of 4 bytes")
    if fmt == "none":
        a = np.frombuffer(body, dtype="<f4", count=len(body) // 4)
        width = 4
    elif fmt == "fp16":
        a = np.frombuffer(body, dtype="<f2", count=len(body) // 2)
        width = 2
    elif fmt == "int8":
        end = HEADER * blocks(count) - at  # the header region within this chunk
        if end <= 0:
            return None  # codes only: every code decodes to a finite value
        h = np.frombuffer(body, dtype="<f4", count=min(len(body), end) // 4)
        if h.size % 2:  # the chunk splits a header: only whole ones can be judged
            h = h[:-1]
        if not h.size:
            return None
        pairs = h.reshape(-1, 2)
        bad = np.flatnonzero(_bad_headers(pairs[:, 0], pairs[:, 1]))
        return None if not bad.size else at + int(bad[0]) * HEADER
    else:
        raise ValueError(f"unknown compression {fmt!r}")
    bad = np.flatnonzero(~np.isfinite(a))
    return None if not bad.size else at + int(bad[0]) * width


def decode(fmt: str, body: bytes | memoryview, count: int) -> np.ndarray:
    """float32 values of a checked body (call :func:`check` first on untrusted bytes)."""
    if fmt == "none":
        return np.frombuffer(body, dtype="<f4", count=count).astype(np.float32)
    if fmt == "fp16":
        return np.frombuffer(body, dtype="<f2", count=count).astype(np.float32)
    if fmt != "int8":
        raise ValueError(f"unknown compression {fmt!r}")
    scale, offset = _headers(body, count)
    codes = np.frombuffer(body, dtype=np.uint8, count=count, offset=HEADER * blocks(count))
    which = np.arange(count) // BLOCK
    out = (
        offset.astype(np.float64)[which]
        + codes.astype(np.float64) * scale.astype(np.float64)[which]
    )
    return out.astype(np.float32)


def encode(fmt: str, values: np.ndarray) -> bytes:
    """The reference encoding of finite float32 ``values`` (the module's SPIRT.PACK
    may round a code differently; what matters is that the residual is taken
    against the decoded bytes). An int8 block spanning nearly all of float32 gives
    a header whose top value does not decode: ``first_bad`` finds it, and the
    store's pack refuses such a vector, as the module does."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if not np.isfinite(v).all():
        raise CompressionError("nonfinite", "cannot encode a non-finite value")
    if fmt == "none":
        return v.astype("<f4").tobytes()
    if fmt == "fp16":
        if v.size and float(np.abs(v).max()) > FP16_MAX:
            raise CompressionError("range", f"a value beyond fp16's {FP16_MAX:g}")
        return v.astype("<f2").tobytes()
    if fmt != "int8":
        raise ValueError(f"unknown compression {fmt!r}")
    n = v.size
    nb = blocks(n)
    pad = np.full(nb * BLOCK, np.nan, dtype=np.float32)
    pad[:n] = v
    b = pad.reshape(nb, BLOCK)
    lo = np.nanmin(b, axis=1)
    hi = np.nanmax(b, axis=1)
    scale = ((hi.astype(np.float64) - lo) / CODES).astype(np.float32)
    # A scale rounded down could put the top value one step past 255: clip.
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    with np.errstate(invalid="ignore"):
        q = np.rint((b.astype(np.float64) - lo[:, None]) / safe[:, None])
    codes = np.clip(np.nan_to_num(q), 0, CODES).astype(np.uint8).reshape(-1)[:n]
    head = np.stack([scale, lo], axis=1).astype("<f4")
    return head.tobytes() + codes.tobytes()
