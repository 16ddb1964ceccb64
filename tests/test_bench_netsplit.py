"""bench.netsplit: the proxies forward bytes, cut one process off both ways, and heal."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from bench.netsplit import NetSplit
from spirtd.localcluster import wait_for

# A client in its own process (the split finds a process's connections by pid): it
# sends each line it reads on stdin through the proxy and prints what comes back,
# or "closed" when the connection is gone.
CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        got = s.recv(100)
    except OSError:
        got = b""
    print(got.decode().strip() or "closed", flush=True)
"""


@pytest.fixture
def echo() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(c: socket.socket) -> None:
        with c:
            while data := c.recv(100):
                c.sendall(data)

    def accept() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _client(port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "connected"
    return p


def _say(p: subprocess.Popen[str], word: str) -> str:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(word + "\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def test_isolate_cuts_one_process_both_ways_and_heal_lets_it_back(echo: int) -> None:
    split = NetSplit()
    into_victim = split.proxy(echo)  # the victim's own proxy: everyone dials it
    elsewhere = split.proxy(echo)  # another node's proxy: the victim dials it
    victim, other = _client(elsewhere.port), _client(elsewhere.port)
    caller = _client(into_victim.port)
    try:
        into_victim.pid = victim.pid
        assert _say(victim, "a") == "a" and _say(other, "b") == "b" and _say(caller, "c") == "c"
        split.isolate(victim.pid)
        assert _say(victim, "a") == "closed"  # what it had dialled is cut
        assert _say(caller, "c") == "closed"  # and so is what dialled it
        assert _say(other, "b") == "b"  # the rest of the world is not
        # A new connection to the victim is accepted and closed at once.
        with socket.create_connection(("127.0.0.1", into_victim.port), timeout=5) as s:
            with contextlib.suppress(OSError):
                s.sendall(b"x")
            got = b""
            with contextlib.suppress(ConnectionResetError):
                got = s.recv(1)
            assert got == b""
        split.heal()
        again = _client(into_victim.port)
        try:
            wait_for(lambda: _say(again, "d") == "d", 10, "the healed proxy to forward")
        finally:
            again.kill()
    finally:
        for p in (victim, other, caller):
            p.kill()
            p.wait()
        split.close()
