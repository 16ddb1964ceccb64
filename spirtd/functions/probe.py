"""``spirt-probe``: a diagnostic function for checking a functions backend.

It exercises what a deployment must handle (a plain reply, a handler error, a
slow call, a crash, memory pressure, a large reply) so tests and operators can
check a local runtime or a Lambda deployment without touching Redis or data.

Event: ``{"action": "echo"|"sleep"|"raise"|"exit"|"allocate"|"reply"|"flaky"|"print"|
"context", ...}``. ``print`` writes ``lines`` to stdout (and one line to stderr and
one through ``logging``), for the log an invocation returns with LogType=Tail;
``context`` returns what the handler sees of its context.

``flaky`` misbehaves (``"mode"``: sleep, exit or raise) the first time it sees a
``marker`` name and succeeds after, to check that a client retries. Its markers
live only in the directory the function's environment names in
``SPIRT_PROBE_DIR``; the event gives a bare name, never a path.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

MAX_SLEEP_S = 900.0
MAX_ALLOCATE_MB = 16_384
MAX_REPLY_BYTES = 16 * 1024 * 1024
MAX_PRINT_LINES = 100_000
PROBE_DIR_ENV = "SPIRT_PROBE_DIR"
_MARKER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ProbeError(RuntimeError):
    """The error the ``raise`` action raises, with the event's message."""


def _number(event: dict[str, Any], key: str, hi: float) -> float:
    v = event.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not (0 <= v <= hi):
        raise ValueError(f"{key} must be a number in [0, {hi}]")
    return float(v)


def handler(event: Any, context: Any) -> Any:
    if not isinstance(event, dict):
        raise ValueError("the probe event must be a JSON object")
    action = event.get("action", "echo")
    if action == "echo":
        return {
            "echo": event.get("value"),
            "pid": os.getpid(),
            "request_id": getattr(context, "aws_request_id", None),
        }
    if action == "sleep":
        seconds = _number(event, "seconds", MAX_SLEEP_S)
        time.sleep(seconds)
        return {"slept": seconds, "pid": os.getpid()}
    if action == "raise":
        raise ProbeError(str(event.get("message", "probe error")))
    if action == "exit":
        # Simulates a crash mid-invocation: no reply is ever sent.
        os._exit(int(event.get("code", 1)) if event.get("code", 1) in range(256) else 1)
    if action == "allocate":
        mb = int(_number(event, "mb", MAX_ALLOCATE_MB))
        block = bytearray(mb * 1024 * 1024)
        return {"allocated_mb": mb, "len": len(block)}
    if action == "reply":
        size = int(_number(event, "bytes", MAX_REPLY_BYTES))
        return {"data": "x" * size}
    if action == "flaky":
        return _flaky(event, context)
    if action == "print":
        lines = event.get("lines", [])
        if not isinstance(lines, list) or len(lines) > MAX_PRINT_LINES:
            raise ValueError(f"lines must be a list of at most {MAX_PRINT_LINES}")
        for line in lines:
            print(str(line))
        print("probe stderr line", file=sys.stderr)
        logging.getLogger("spirt.probe").warning("probe logging line")
        return {"printed": len(lines)}
    if action == "context":
        cc = context.client_context
        return {
            "arn": context.invoked_function_arn,
            "identity": None if context.identity is None else vars(context.identity),
            "client_context": None
            if cc is None
            else {
                "custom": cc.custom,
                "env": cc.env,
                "client": None if cc.client is None else vars(cc.client),
            },
        }
    raise ValueError(f"unknown probe action {action!r}")


def _flaky(event: dict[str, Any], context: Any) -> Any:
    directory = os.environ.get(PROBE_DIR_ENV)
    if not directory:
        raise ValueError(f"flaky needs {PROBE_DIR_ENV} in the function's environment")
    marker = event.get("marker")
    if not isinstance(marker, str) or not _MARKER_RE.match(marker):
        raise ValueError("flaky needs a marker name of 1..64 letters, digits, - or _")
    path = os.path.join(directory, marker)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return {"recovered": True, "pid": os.getpid()}
    os.close(fd)
    mode = event.get("mode", "raise")
    if mode == "sleep":
        time.sleep(_number(event, "seconds", MAX_SLEEP_S))
        return {"recovered": False}
    if mode == "exit":
        os._exit(1)
    raise ProbeError(f"flaky failure for {marker}")
