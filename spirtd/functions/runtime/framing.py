"""Frames between the runtime and its worker processes.

One frame is ``u32 total_len | u32 header_len | header JSON | body bytes`` (big
endian). The header is a small JSON object; the body is the invocation payload or
result, passed through untouched. Nothing here is pickled: a worker only ever
receives JSON and bytes. Both sizes are checked against a limit before any
buffer is allocated.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

_PREFIX = struct.Struct(">II")
MAX_HEADER = 64 * 1024


class FrameError(ValueError):
    pass


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if len(h) > MAX_HEADER:
        raise FrameError("frame header too large")
    return _PREFIX.pack(len(h) + len(body), len(h)) + h + body


def _check(total: int, hlen: int, max_frame: int) -> None:
    if total > max_frame or hlen > MAX_HEADER or hlen > total:
        raise FrameError(f"bad frame sizes (total {total}, header {hlen}, limit {max_frame})")


def _split(data: bytes, hlen: int) -> tuple[dict[str, Any], bytes]:
    try:
        header = json.loads(data[:hlen])
    except ValueError as e:
        raise FrameError(f"frame header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise FrameError("frame header is not a JSON object")
    return header, data[hlen:]


async def read_async(reader: asyncio.StreamReader, max_frame: int) -> tuple[dict[str, Any], bytes]:
    """Raises ``asyncio.IncompleteReadError`` when the peer closed (e.g. it died)."""
    total, hlen = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
    _check(total, hlen, max_frame)
    return _split(await reader.readexactly(total), hlen)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("runtime closed the connection")
        got += k
    return bytes(buf)


def read_sync(sock: socket.socket, max_frame: int) -> tuple[dict[str, Any], bytes]:
    total, hlen = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    _check(total, hlen, max_frame)
    return _split(_recv_exact(sock, total), hlen)
