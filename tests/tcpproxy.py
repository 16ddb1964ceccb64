"""A loopback TCP proxy for tests that can flip one byte in transit."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FlipProxy:
    """Forwards 127.0.0.1:<port> to ``target``. On the first connection only, it
    flips one byte in the client→server direction, ``offset`` bytes into the
    first record that follows the client's two handshake messages (hello and
    finish, each ``u32 length || body``), i.e. inside the first encrypted record.
    """

    def __init__(self, target: tuple[str, int], offset: int = 20) -> None:
        self.target = target
        self.offset = offset
        self.flipped = threading.Event()
        self.connections = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self._srv.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            first = self.connections == 1
            threading.Thread(target=self._pump, args=(client, upstream, first), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = b""  # bytes forwarded so far, kept only until the flip point is found
        flip_at: int | None = None
        total = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if flip and not self.flipped.is_set():
                    if flip_at is None:
                        seen += data
                        flip_at = _after_two_records(seen)
                        if flip_at is not None:
                            flip_at += self.offset
                    if flip_at is not None and total <= flip_at < total + len(data):
                        buf = bytearray(data)
                        buf[flip_at - total] ^= 0x01
                        data = bytes(buf)
                        self.flipped.set()
                dst.sendall(data)
                total += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def _after_two_records(buf: bytes) -> int | None:
    pos = 0
    for _ in range(2):
        if len(buf) < pos + 4:
            return None
        (n,) = struct.unpack_from(">I", buf, pos)
        pos += 4 + n
    return pos
