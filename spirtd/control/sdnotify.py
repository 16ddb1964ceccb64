"""systemd readiness (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET.

Under ``Type=notify`` systemd considers spirtd started only once it says
``READY=1``, so units ordered after it (and `systemctl start` itself) wait until
the control socket answers rather than until the process exists.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("spirtd.sdnotify")


def notify(state: str) -> bool:
    """Sends ``state`` (e.g. "READY=1") to the service manager; False when there is none."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # an abstract socket: the name starts with a NUL byte
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET %r: not a unix socket path", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        # Readiness is a courtesy to the supervisor; failing it must not stop the node.
        log.warning("sd_notify to %s failed: %s", addr, e)
        return False
    return True
