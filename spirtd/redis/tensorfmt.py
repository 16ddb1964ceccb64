"""The one tensor format SPIRT keeps in Redis.

A tensor lives at two plain Redis string keys:

* ``KEY``        raw little-endian float32 values, C order, no header;
* ``KEY:shape``  its shape as ASCII decimal dims joined by ``,`` (``"784,10"``;
                 ``""`` for a scalar).

Plain strings mean GET/SET, AOF persistence and replication work unchanged, and
the C module reads the values in place. Models and gradients are stored as one
flat vector each; the task knows how to split it into parameters.

Everything that reads or writes tensors (the store, the gradient function, the
module's replies) goes through this file's rules, so the two can never drift.
"""

from __future__ import annotations

import numpy as np

SHAPE_SUFFIX = ":shape"
DTYPE = np.dtype("<f4")
# A single tensor above this is refused before anything is allocated (2 GiB of
# float32); callers may pass a tighter limit.
MAX_ELEMENTS = 512 * 1024 * 1024
MAX_DIMS = 8


class TensorFormatError(ValueError):
    pass


def shape_key(key: str) -> str:
    return key + SHAPE_SUFFIX


def encode_shape(shape: tuple[int, ...]) -> bytes:
    return ",".join(str(int(d)) for d in shape).encode("ascii")


def parse_shape(raw: bytes | str | None, *, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    if raw is None:
        raise TensorFormatError("missing shape")
    text = raw.decode("ascii", "strict") if isinstance(raw, bytes) else raw
    if text == "":
        return ()
    parts = text.split(",")
    if len(parts) > MAX_DIMS:
        raise TensorFormatError(f"too many dimensions ({len(parts)} > {MAX_DIMS})")
    dims: list[int] = []
    total = 1
    for p in parts:
        if not p.isdigit() or len(p) > 12:
            raise TensorFormatError(f"bad dimension {p!r}")
        d = int(p)
        dims.append(d)
        total *= d
        if total > max_elements:
            raise TensorFormatError(f"tensor too large ({total} > {max_elements} elements)")
    return tuple(dims)


def encode(array: np.ndarray) -> tuple[bytes, bytes]:
    """Returns (values, shape) ready for SET. Copies only if not already <f4 contiguous."""
    a = np.ascontiguousarray(array, dtype=DTYPE)
    return a.tobytes(), encode_shape(a.shape)


def decode(
    values: bytes | bytearray | memoryview | None,
    shape: bytes | str | None,
    *,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    """Builds an array over ``values`` (no copy; read-only when ``values`` is bytes)."""
    if values is None:
        raise TensorFormatError("missing values")
    dims = parse_shape(shape, max_elements=max_elements)
    n = 1
    for d in dims:
        n *= d
    if len(values) != n * DTYPE.itemsize:
        raise TensorFormatError(
            f"length mismatch: shape {dims} needs {n * DTYPE.itemsize} bytes, got {len(values)}"
        )
    return np.frombuffer(values, dtype=DTYPE).reshape(dims)
