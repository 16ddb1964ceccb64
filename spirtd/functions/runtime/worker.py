"""A warm worker process: imports one handler once, then runs invocations.

Started by the pool as ``python -m spirtd.functions.runtime.worker``; it talks to
the runtime over an inherited socket (``--fd``) using framing.py. It applies
its own memory limit before importing anything heavy, so the limit covers the
handler's imports too.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import math
import os
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from spirtd import malloc_tuning
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


class LogCapture:
    """What the handler writes to fds 1 and 2 during one invocation, kept in a memfd
    (so output from C code is caught too) and passed on to the runtime's stderr
    afterwards, as it would go there without capture. The runtime's own START, END
    and REPORT lines are for the tail only: the node's invoker asks for a tail on
    every call (for the billed duration), and they would fill the daemon's log."""

    def __enter__(self) -> LogCapture:
        sys.stdout.flush()
        sys.stderr.flush()
        self.fd = os.memfd_create("spirt-invocation-log")
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        return self

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def mark(self) -> int:
        """The log's length so far (fds 1 and 2 flushed)."""
        sys.stdout.flush()
        sys.stderr.flush()
        return os.lseek(self.fd, 0, os.SEEK_END)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)

    def tail(self, n: int) -> bytes:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        return os.pread(self.fd, n, max(0, size - n))

    def forward_and_close(self, start: int = 0, end: int | None = None) -> None:
        """Passes bytes [start, end) of the log on to stderr and closes it."""
        size = os.lseek(self.fd, 0, os.SEEK_END) if end is None else end
        off = start
        while off < size:
            chunk = os.pread(self.fd, min(1 << 16, size - off), off)
            if not chunk:
                break
            off += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(2, view) :]
        os.close(self.fd)


# Frames kept from the innermost end of a handler's traceback.
MAX_TRACE_FRAMES = 50
# The whole package, not just this module: whichever of the runtime's modules ends
# up calling the handler, a user should not see it in the trace.
_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def handler_trace(exc: BaseException) -> list[str]:
    """The handler's frames of ``exc``'s traceback, one formatted entry per frame,
    as Lambda's ``stackTrace`` lists them: the runtime's own frames, which called
    the handler, are left out. The handler is called directly (no stdlib frame in
    between); runtime frames further in (the handler calling the context, say) are
    kept, as Lambda's Python runtime keeps them."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = 0
    while start < len(frames) and os.path.abspath(frames[start].filename).startswith(_RUNTIME_DIR):
        start += 1
    return traceback.format_list(frames[start:][-MAX_TRACE_FRAMES:])


def billed_ms(duration_ms: float, init_ms: float | None) -> int:
    """What Lambda bills: the duration, plus a cold start's init (billed since
    August 2025), rounded up to the millisecond."""
    return math.ceil(duration_ms + (init_ms or 0.0))


def _report(rid: str, ms: float, memory_mb: int, init_ms: float | None) -> str:
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    init = f"Init Duration: {init_ms:.2f} ms\t" if init_ms is not None else ""
    return (
        f"END RequestId: {rid}\nREPORT RequestId: {rid}\tDuration: {ms:.2f} ms\t"
        f"Billed Duration: {billed_ms(ms, init_ms)} ms\tMemory Size: {memory_mb} MB\t"
        f"Max Memory Used: {used} MB\t{init}\n"
    )


def run_one(
    handler: Handler,
    header: dict[str, Any],
    body: bytes,
    function: str,
    memory_mb: int,
    max_response: int,
    init_ms: float | None = None,
) -> tuple[dict[str, Any], bytes, bool]:
    """Runs one invocation. Returns (reply header, reply body, worker must exit).

    The reply carries ``billed_ms``, what the REPORT line bills (``init_ms``: this
    worker's init, on its first invocation). With ``header["log"]`` it also carries
    ``log``: the base64 of the last 4 KB of the invocation's log (Lambda's START /
    output / END / REPORT lines)."""
    t0 = time.perf_counter()
    if not header.get("log"):
        reply, out, must_exit = _run(handler, header, body, function, memory_mb, max_response, None)
        reply["billed_ms"] = billed_ms((time.perf_counter() - t0) * 1000, init_ms)
        return reply, out, must_exit
    rid = str(header.get("id", ""))
    with LogCapture() as cap:
        cap.write(f"START RequestId: {rid} Version: $LATEST\n")
        begin = cap.mark()
        reply, out, must_exit = _run(handler, header, body, function, memory_mb, max_response, cap)
        ms = (time.perf_counter() - t0) * 1000
        end = cap.mark()
        cap.write(_report(rid, ms, memory_mb, init_ms))
    reply["billed_ms"] = billed_ms(ms, init_ms)
    reply["log"] = base64.b64encode(cap.tail(lambda_errors.LOG_TAIL_BYTES)).decode()
    cap.forward_and_close(begin, end)
    return reply, out, must_exit


def _run(
    handler: Handler,
    header: dict[str, Any],
    body: bytes,
    function: str,
    memory_mb: int,
    max_response: int,
    log: LogCapture | None,
) -> tuple[dict[str, Any], bytes, bool]:
    rid = str(header.get("id", ""))
    client_context = header.get("client_context")
    ctx = LambdaContext(
        function,
        rid,
        memory_mb,
        int(header.get("deadline_ms", 0)),
        invoked_function_arn=header.get("arn") if isinstance(header.get("arn"), str) else None,
        client_context=client_context if isinstance(client_context, dict) else None,
    )
    reply: dict[str, Any] = {"type": "result", "id": rid, "ok": False}
    try:
        event = json.loads(body)
        result = handler(event, ctx)
    except Exception as e:
        trace = handler_trace(e)
        if log is not None:
            # Lambda's Python runtime logs a handler's exception like this.
            log.write(
                f"[ERROR] {type(e).__name__}: {e}\nTraceback (most recent call last):\n"
                + "".join(trace)
            )
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


def serve(
    sock: socket.socket,
    handler_spec: str,
    function: str,
    memory_mb: int,
    max_frame: int,
    max_response: int,
) -> int:
    """Imports the handler (its module's code is the worker's init), says ready or
    why not, then runs invocations until the runtime closes the socket. Returns the
    exit status. Also the body of a worker forked from a zygote (zygote.py)."""
    t0 = time.perf_counter()
    try:
        handler = import_handler(handler_spec)
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
    init_ms: float | None = (time.perf_counter() - t0) * 1000
    sock.sendall(framing.encode({"type": "ready", "pid": os.getpid(), "init_ms": init_ms}))
    while True:
        try:
            header, body = framing.read_sync(sock, max_frame)
        except (EOFError, ConnectionError):
            return 0
        if header.get("type") != "invoke":
            return 0
        reply, out, must_exit = run_one(
            handler, header, body, function, memory_mb, max_response, init_ms
        )
        init_ms = None  # as on Lambda, a cold start's init is billed with its first call
        sock.sendall(framing.encode(reply, out))
        if must_exit:
            return 1


def prepare(memory_mb: int) -> None:
    """What a worker does before importing anything heavy: a zygote does it once
    for the workers it forks."""
    # A handler that moves tensors of a few MB per invocation would otherwise get each
    # as a fresh mmap, faulted in page by page and unmapped after use.
    malloc_tuning.tune()
    set_memory_limit(memory_mb)


def arguments(prog: str) -> argparse.ArgumentParser:
    """The command line of a worker, and of the zygote that forks workers."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--function", required=True)
    ap.add_argument("--memory-mb", type=int, required=True)
    ap.add_argument("--max-frame", type=int, required=True)
    ap.add_argument("--max-response", type=int, required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = arguments("spirtd.functions.runtime.worker").parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    prepare(args.memory_mb)
    return serve(
        sock, args.handler, args.function, args.memory_mb, args.max_frame, args.max_response
    )


if __name__ == "__main__":
    sys.exit(main())
