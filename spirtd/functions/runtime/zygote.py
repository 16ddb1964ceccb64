"""A function's zygote: imports what its handler imports once, then forks workers.

Started by the runtime (zygote_client.py) as ``python -m spirtd.functions.runtime.zygote``
with the worker's environment (thread counts included: OpenMP reads them when
torch is imported, here). It imports the modules the handler's module imports at
its top level (torch, numpy, ...) but not the handler's module itself: that
module's code is the worker's init (gradient.py runs torch's first backward
there), and a torch op here could start thread pools that a fork does not copy.
It checks that it is still single-threaded before it says ready.

Control channel: a SOCK_SEQPACKET socket (``--fd``), one JSON object per message.
The runtime sends ``{"type": "fork"}`` with two fds (SCM_RIGHTS): the worker's end
of its request socket and the write end of its output pipe, and optionally
``"env"``: variables (strings) the worker sets before it imports its handler, for
what the runtime learns only after the zygote started (zygote_client.LATE_ENV). The zygote answers
``{"type": "forked", "pid"}`` with a pidfd of the worker (so the runtime can signal
it without racing pid reuse), or ``{"type": "fork_error"}``, and reports each
worker's end as ``{"type": "exit", "pid", "code"}`` once it has reaped it. Nothing
on this channel is executed or unpickled; the only code a worker runs is the
handler named on the command line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import os
import selectors
import socket
import sys
import time
import traceback

from spirtd.functions.runtime import worker

# A fork request's late environment included (a Redis binding is a few hundred bytes).
MAX_MESSAGE = 65536
# fds a fork request carries: the request socket and the output pipe.
FORK_FDS = 2


def handler_imports(module_name: str) -> list[str]:
    """The absolute module names the handler's module imports at its top level,
    read from its source without running it."""
    try:
        spec = importlib.util.find_spec(module_name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return []
        with open(spec.origin, "rb") as f:
            tree = ast.parse(f.read(), spec.origin)
    except (ImportError, ValueError, SyntaxError, OSError):
        return []  # the worker's own import says what is wrong, as a cold worker's would
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            # ``from pkg import submodule``: the submodule is worth loading too.
            names.extend(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return [n for n in dict.fromkeys(names) if n != "__future__"]


def preload(module_name: str) -> list[str]:
    """Imports what ``handler_imports`` lists; a failure is left for the worker's
    own import to report, as a cold worker would. Returns what was loaded."""
    loaded = []
    for name in handler_imports(module_name):
        try:
            importlib.import_module(name)
        except Exception:
            # An attribute, not a module (``from pkg import name``): a package that
            # loads its names on first use (spirtd.tasks) loads that one now.
            parent, _, attr = name.rpartition(".")
            module = sys.modules.get(parent)
            if module is not None:
                with contextlib.suppress(Exception):  # broken: the worker's import says so
                    getattr(module, attr, None)
            continue
        loaded.append(name)
    return loaded


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _send(ctrl: socket.socket, msg: dict[str, object], fds: list[int] | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(ctrl, [data], fds)
    else:
        ctrl.sendall(data)


def _reseed() -> None:
    """A forked worker would otherwise share the zygote's RNG states with its
    siblings (Python's ``random`` reseeds itself after a fork; these do not)."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


def late_env(req: dict[str, object]) -> dict[str, str] | None:
    """A fork request's ``env``: a dict of strings, or None when malformed."""
    env = req.get("env", {})
    if not isinstance(env, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) and k for k, v in env.items()):
        return None
    return env


def _child(
    args: argparse.Namespace,
    ctrl: socket.socket,
    sock_fd: int,
    out_fd: int,
    close: list[int],
    env: dict[str, str],
) -> None:
    """Runs in the forked worker; never returns."""
    code = 1
    try:
        ctrl.close()
        for fd in close:
            os.close(fd)
        # Own session, as a spawned worker had: a Ctrl-C on a terminal hits neither.
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        _reseed()
        os.environ.update(env)
        sock = socket.socket(fileno=sock_fd)
        code = worker.serve(
            sock, args.handler, args.function, args.memory_mb, args.max_frame, args.max_response
        )
    except BaseException:  # whatever happens, the child must not return
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(args: argparse.Namespace, ctrl: socket.socket) -> int:
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pidfd -> pid
    while True:
        for key, _ in sel.select():
            if key.data is not None:
                pidfd, pid = key.fd, key.data
                _, status = os.waitpid(pid, 0)
                sel.unregister(pidfd)
                os.close(pidfd)
                del children[pidfd]
                _send(ctrl, {"type": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
                continue
            msg, fds, _, _ = socket.recv_fds(ctrl, MAX_MESSAGE, FORK_FDS)
            if not msg:
                return 0  # the runtime is gone; workers see EOF on their own sockets
            try:
                req = json.loads(msg)
            except ValueError:
                req = None
            env = late_env(req) if isinstance(req, dict) else None
            if env is None or req.get("type") != "fork" or len(fds) != FORK_FDS:
                for fd in fds:
                    os.close(fd)
                _send(ctrl, {"type": "fork_error", "message": "bad fork request"})
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                _send(ctrl, {"type": "fork_error", "message": f"fork: {e}"})
                continue
            if pid == 0:
                sel.close()
                _child(args, ctrl, fds[0], fds[1], list(children), env)
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            sel.register(pidfd, selectors.EVENT_READ, pid)
            _send(ctrl, {"type": "forked", "pid": pid}, [pidfd])


def main(argv: list[str] | None = None) -> int:
    args = worker.arguments("spirtd.functions.runtime.zygote").parse_args(argv)
    ctrl = socket.socket(fileno=args.fd)
    t0 = time.perf_counter()
    worker.prepare(args.memory_mb)
    module_name = args.handler.partition(":")[0]
    loaded = preload(module_name)
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as e:  # Linux before 5.3: no pidfds
        _send(ctrl, {"type": "init_error", "message": f"pidfd_open: {e}"})
        return 1
    threads = thread_count()
    if threads != 1:
        msg = f"{threads} threads after importing {', '.join(loaded)}: forking is unsafe"
        _send(ctrl, {"type": "init_error", "message": msg})
        return 1
    _send(
        ctrl,
        {"type": "ready", "preload_ms": (time.perf_counter() - t0) * 1000, "modules": loaded},
    )
    return serve(args, ctrl)


if __name__ == "__main__":
    sys.exit(main())
