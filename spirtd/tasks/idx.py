"""Strict reader (and a small writer) for the IDX format MNIST ships in.

Layout: two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension, then the values big-endian in C order. Every
field is checked, and the exact data size is known and checked against the file
(or the stream, for .gz), before anything is allocated for the values.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 4
# Refuse one file above this many bytes of values (MNIST's biggest is 47 MB).
DEFAULT_MAX_BYTES = 1 << 30


class IdxError(ValueError):
    pass


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IdxError(f"truncated {what}: wanted {n} bytes, got {len(data)}")
    return data


def _read_header(f: BinaryIO, max_bytes: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    magic = _read_exact(f, 4, "magic")
    if magic[0] != 0 or magic[1] != 0:
        raise IdxError(f"bad magic {magic.hex()}: an IDX file starts with two zero bytes")
    dtype = IDX_TYPES.get(magic[2])
    if dtype is None:
        raise IdxError(f"unknown IDX type code 0x{magic[2]:02x}")
    ndim = magic[3]
    if not (1 <= ndim <= MAX_DIMS):
        raise IdxError(f"IDX dimension count must be 1..{MAX_DIMS}, got {ndim}")
    dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, "dimensions"))
    nbytes = dtype.itemsize
    for d in dims:
        nbytes *= d
        if nbytes > max_bytes:
            raise IdxError(f"IDX data too large: dims {dims} exceed {max_bytes} bytes")
    return dtype, tuple(dims), 4 + 4 * ndim, nbytes


def read_idx(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Reads an IDX file (``.gz`` is decompressed on the fly) into a native-endian array."""
    p = Path(path)
    compressed = p.suffix == ".gz"
    # Checked before open() so a FIFO or device never blocks or streams forever.
    if not p.is_file():
        raise IdxError(f"{p} is not a regular file")
    with open(p, "rb") as raw:
        f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        try:
            dtype, dims, header_len, nbytes = _read_header(f, max_bytes)
            if not compressed:
                size = os.fstat(raw.fileno()).st_size
                if size != header_len + nbytes:
                    raise IdxError(
                        f"{p.name}: header says {header_len + nbytes} bytes, file has {size}"
                    )
            out = np.empty(dims, dtype=dtype)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:
                    raise IdxError(f"{p.name}: truncated data ({got} of {nbytes} bytes)")
                got += n
            if f.read(1):
                raise IdxError(f"{p.name}: trailing bytes after the data")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IdxError(f"{p.name}: cannot read: {e}") from e
        finally:
            if compressed:
                f.close()
    return out.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes ``array`` as IDX (for tools and tests that make small files)."""
    codes = {v.newbyteorder("="): k for k, v in IDX_TYPES.items()}
    a = np.asarray(array)
    code = codes.get(a.dtype.newbyteorder("="))
    if code is None or not (1 <= a.ndim <= MAX_DIMS):
        raise IdxError(f"cannot write dtype {a.dtype} with {a.ndim} dims as IDX")
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    body = np.ascontiguousarray(a, dtype=IDX_TYPES[code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)
