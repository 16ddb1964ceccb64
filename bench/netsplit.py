"""A network partition between real daemons on one host, for benchmarks.

Every node listens on a port of its own and advertises the port of a proxy in front
of it, so every link between two nodes passes through the proxy of the node that
was dialled. ``isolate(pid)`` cuts the links of the daemon with that pid in both
directions: its own proxy drops every connection and refuses new ones, and the
other proxies drop and refuse the connections that daemon opened (found by the
socket's inode among the process's open files). ``heal()`` lets connections through
again; the daemons must find each other by themselves, as after a real partition.

Bytes are moved with ``os.splice`` through a pipe, so the proxies cost the kernel's
copy, not Python's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

CHUNK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open."""
    out = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    out.add(target[8:-1])
    return out


def _inode_of(local_port: int, remote_port: int) -> str | None:
    """The inode of the loopback TCP socket 127.0.0.1:local_port -> :remote_port."""
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == want_local and parts[2] == want_remote:
                return parts[9]
    return None


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket, client_port: int) -> None:
        self.client = client
        self.upstream = upstream
        self.client_port = client_port

    def close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class Proxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, for one node."""

    def __init__(self, split: NetSplit, target: int) -> None:
        self.split = split
        self.target = target
        self.pid: int | None = None  # the daemon behind it, once started
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self.conns: set[_Conn] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            conns, self.conns = set(self.conns), set()
        for c in conns:
            c.close()

    def _accept(self) -> None:
        while True:
            try:
                client, (_, cport) = self._srv.accept()
            except OSError:
                return
            if self.split.cut(self, cport):
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            conn = _Conn(client, upstream, cport)
            with self._lock:
                self.conns.add(conn)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(conn, src, dst), daemon=True).start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        try:
            while True:
                n = os.splice(src.fileno(), w, CHUNK)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with self._lock:
                self.conns.discard(conn)
            conn.close()

    def drop(self, client_pid: int | None) -> int:
        """Closes the connections (all, or those ``client_pid`` opened); how many."""
        with self._lock:
            conns = list(self.conns)
        owned = _socket_inodes(client_pid) if client_pid is not None else set()
        n = 0
        for c in conns:
            if client_pid is None or _inode_of(c.client_port, self.port) in owned:
                c.close()
                n += 1
        return n


class NetSplit:
    """The proxies of a local cluster, and the one partition they can make."""

    def __init__(self) -> None:
        self.proxies: list[Proxy] = []
        self.isolated: int | None = None  # the pid cut off, if any

    def proxy(self, target: int) -> Proxy:
        p = Proxy(self, target)
        self.proxies.append(p)
        return p

    def cut(self, proxy: Proxy, client_port: int) -> bool:
        """Whether a new connection to ``proxy`` from ``client_port`` crosses the split."""
        pid = self.isolated
        if pid is None:
            return False
        if proxy.pid == pid:
            return True
        inode = _inode_of(client_port, proxy.port)
        return inode is not None and inode in _socket_inodes(pid)

    def isolate(self, pid: int) -> int:
        """Cuts daemon ``pid`` off from the others; returns the connections dropped."""
        self.isolated = pid
        n = 0
        for p in self.proxies:
            n += p.drop(None if p.pid == pid else pid)
        return n

    def heal(self) -> None:
        self.isolated = None

    def close(self) -> None:
        for p in self.proxies:
            p.close()
