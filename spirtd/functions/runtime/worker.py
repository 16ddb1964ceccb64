"""A warm worker process: imports one handler once, then runs invocations.

Started by the pool as ``python -m spirtd.functions.runtime.worker``; it talks to
the runtime over an inherited socket (``--fd``) using framing.py. It applies
its own memory limit before importing anything heavy, so the limit covers the
handler's imports too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from spirtd.functions.runtime import framing, lambda_errors
from spirtd.functions.runtime.context import LambdaContext

Handler = Callable[[Any, LambdaContext], Any]


def set_memory_limit(memory_mb: int) -> None:
    # RLIMIT_DATA (heap + private anonymous mappings) tracks what a process really
    # allocates; RLIMIT_AS would also count torch's large reserved-but-unused
    # address space and fail long before the process uses memory_mb.
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def import_handler(spec: str) -> Handler:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler must be 'module:function', got {spec!r}")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn  # type: ignore[no-any-return]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def run_one(
    handler: Handler,
    header: dict[str, Any],
    body: bytes,
    function: str,
    memory_mb: int,
    max_response: int,
) -> tuple[dict[str, Any], bytes, bool]:
    """Runs one invocation. Returns (reply header, reply body, worker must exit)."""
    rid = str(header.get("id", ""))
    ctx = LambdaContext(function, rid, memory_mb, int(header.get("deadline_ms", 0)))
    reply: dict[str, Any] = {"type": "result", "id": rid, "ok": False}
    try:
        event = json.loads(body)
        result = handler(event, ctx)
    except Exception as e:
        trace = traceback.format_exception(e)[-20:]
        if _is_oom(e):
            msg = f"RequestId: {rid} Error: Runtime exited with error: out of memory ({e})"
            reply["exit"] = True
            return reply, lambda_errors.function_error(lambda_errors.OUT_OF_MEMORY, msg), True
        return reply, lambda_errors.function_error(type(e).__name__, str(e), trace), False
    try:
        out = json.dumps(result, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        msg = f"Unable to marshal response: {e}"
        return reply, lambda_errors.function_error(lambda_errors.MARSHAL, msg), False
    if len(out) > max_response:
        msg = (
            f"Response payload size ({len(out)} bytes) exceeded maximum allowed payload "
            f"size ({max_response} bytes)."
        )
        return reply, lambda_errors.function_error(lambda_errors.RESPONSE_TOO_LARGE, msg), False
    reply["ok"] = True
    return reply, out, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spirtd.functions.runtime.worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--function", required=True)
    ap.add_argument("--memory-mb", type=int, required=True)
    ap.add_argument("--max-frame", type=int, required=True)
    ap.add_argument("--max-response", type=int, required=True)
    args = ap.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    t0 = time.perf_counter()
    try:
        set_memory_limit(args.memory_mb)
        handler = import_handler(args.handler)
    except Exception as e:
        sock.sendall(
            framing.encode(
                {
                    "type": "init_error",
                    "errorType": lambda_errors.IMPORT,
                    "errorMessage": f"{type(e).__name__}: {e}",
                }
            )
        )
        return 1
    sock.sendall(
        framing.encode(
            {"type": "ready", "pid": os.getpid(), "init_ms": (time.perf_counter() - t0) * 1000}
        )
    )
    while True:
        try:
            header, body = framing.read_sync(sock, args.max_frame)
        except (EOFError, ConnectionError):
            return 0
        if header.get("type") != "invoke":
            return 0
        reply, out, must_exit = run_one(
            handler, header, body, args.function, args.memory_mb, args.max_response
        )
        sock.sendall(framing.encode(reply, out))
        if must_exit:
            return 1


if __name__ == "__main__":
    sys.exit(main())
