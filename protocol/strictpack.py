"""Strict msgpack decoding for untrusted bytes.

msgpack's C unpacker allocates containers as it meets their headers. Before we
hand it anything we walk the raw bytes once, without building objects, and
check depth, declared lengths against the bytes actually present, and the total
item count. Only then does ``msgpack.unpackb`` run, itself capped by per-kind
length limits. Ext types, which could map to arbitrary objects, are refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import DecodeError


@dataclass(frozen=True, slots=True)
class Limits:
    max_size: int = 1 << 20
    max_depth: int = 8
    max_items: int = 4096  # total elements across all containers
    max_str: int = 4096
    max_bin: int = 1 << 20
    max_container: int = 1024  # elements in any one array or map


DEFAULT = Limits()

# Bytes that are a whole msgpack value on their own (fixints, nil, false, true).
# An array of nothing else is checked in one C-speed pass instead of a Python
# step per element: 16,000 small integers used to cost milliseconds to scan.
_SINGLE_BYTE_VALUES = bytes([*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3])

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def scan(data: bytes | memoryview, limits: Limits = DEFAULT) -> None:
    """Validates the structure of exactly one msgpack object filling ``data``."""
    n = len(data)
    if n > limits.max_size:
        raise DecodeError("oversized", f"{n} bytes > {limits.max_size}")
    if n == 0:
        raise DecodeError("malformed", "empty")
    pos = 0
    items = 0
    # Stack of remaining element counts of the open containers.
    stack: list[int] = []
    while True:
        if pos >= n:
            raise DecodeError("malformed", "truncated")
        b = data[pos]
        pos += 1
        length = -1  # payload bytes to skip
        count = -1  # container elements (maps count keys and values)
        kind = "scalar"
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            length = 0
        elif 0x80 <= b <= 0x8F:
            count, kind = 2 * (b & 0x0F), "map"
        elif 0x90 <= b <= 0x9F:
            count, kind = b & 0x0F, "array"
        elif 0xA0 <= b <= 0xBF:
            length, kind = b & 0x1F, "str"
        elif b in (0xCC, 0xD0):
            length = 1
        elif b in (0xCD, 0xD1):
            length = 2
        elif b in (0xCE, 0xD2, 0xCA):
            length = 4
        elif b in (0xCF, 0xD3, 0xCB):
            length = 8
        elif b in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
            width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[b]
            length = _read_uint(data, pos, width)
            pos += width
            kind = "bin" if b <= 0xC6 else "str"
        elif b in (0xDC, 0xDD):
            width = 2 if b == 0xDC else 4
            count, kind = _read_uint(data, pos, width), "array"
            pos += width
        elif b in (0xDE, 0xDF):
            width = 2 if b == 0xDE else 4
            count, kind = 2 * _read_uint(data, pos, width), "map"
            pos += width
        else:
            # 0xC1 is never used; 0xC7-0xC9 and 0xD4-0xD8 are ext types.
            raise DecodeError("malformed", f"unsupported msgpack type byte 0x{b:02x}")

        if kind == "str" and length > limits.max_str:
            raise DecodeError("oversized", f"string of {length} bytes > {limits.max_str}")
        if kind == "bin" and length > limits.max_bin:
            raise DecodeError("oversized", f"binary of {length} bytes > {limits.max_bin}")
        if length > 0:
            if pos + length > n:
                raise DecodeError("malformed", "truncated")
            pos += length

        if count >= 0:
            if count > 2 * limits.max_container or (
                kind == "array" and count > limits.max_container
            ):
                raise DecodeError("oversized", f"{kind} of {count} elements")
            items += count
            if items > limits.max_items:
                raise DecodeError("oversized", f"more than {limits.max_items} items")
            # Every element needs at least one byte: a cheap bound before any allocation.
            if count > n - pos:
                raise DecodeError("malformed", "truncated")
            if count > 0:
                if len(stack) >= limits.max_depth:
                    raise DecodeError("too_deep", f"nesting deeper than {limits.max_depth}")
                if kind == "array" and not bytes(data[pos : pos + count]).translate(
                    None, _SINGLE_BYTE_VALUES
                ):
                    pos += count  # every element is one byte: the array is complete
                else:
                    stack.append(count)
                    continue

        # One complete value: pop finished containers.
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
        if not stack:
            break
    if pos != n:
        raise DecodeError("malformed", f"{n - pos} trailing bytes")


def _read_uint(data: bytes | memoryview, pos: int, width: int) -> int:
    if pos + width > len(data):
        raise DecodeError("malformed", "truncated")
    fmt = {1: _U8, 2: _U16, 4: _U32}[width]
    return int(fmt.unpack_from(data, pos)[0])


def unpack(data: bytes | memoryview, limits: Limits = DEFAULT) -> Any:
    scan(data, limits)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_container,
            max_map_len=limits.max_container,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise DecodeError("malformed", str(e)[:200]) from None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- typed field access for decoded maps -------------------------------------------------


def field(obj: Any, key: str, typ: type | tuple[type, ...], *, what: str = "message") -> Any:
    if not isinstance(obj, dict):
        raise DecodeError("bad_field", f"{what} is not a map")
    if key not in obj:
        raise DecodeError("bad_field", f"{what} lacks {key!r}")
    value = obj[key]
    # bool is an int subclass; never accept it where an int is meant.
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise DecodeError("bad_field", f"{what}.{key} has the wrong type")
    if not isinstance(value, typ):
        raise DecodeError("bad_field", f"{what}.{key} has the wrong type")
    return value


def fixed_bytes(obj: Any, key: str, size: int, *, what: str = "message") -> bytes:
    value = field(obj, key, bytes, what=what)
    if len(value) != size:
        raise DecodeError("bad_field", f"{what}.{key} must be {size} bytes")
    return value
