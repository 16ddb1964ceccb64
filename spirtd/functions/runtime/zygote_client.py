"""The runtime's side of a function's zygote (zygote.py): start it, fork workers
from it, follow their lives, restart it when it dies.

A forked worker is not the runtime's child, so it is followed through what the
zygote sends: a pidfd (to kill it without racing pid reuse) and its exit status
once the zygote has reaped it. When the zygote itself dies, its workers are
killed through their pidfds: nothing would report their exits any more.

The daemon starts its gradient function's zygote with the process (``prestart``),
before its own imports: the two torch imports then run side by side instead of one
after the other. The function's Redis binding is known only once Redis is up, so
the variables in ``LATE_ENV`` are not in the zygote's environment but go with each
fork request (the function reads them when invoked, never at import).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from spirtd.functions.credentials import TARGETS_ENV
from spirtd.functions.runtime import zygote as zygote_program
from spirtd.functions.runtime.config import FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.process import (
    FRAME_SLACK,
    OUTPUT_LINE_MAX,
    log_output,
    worker_env,
)

_EXIT_WAIT_S = 5.0
# A function's environment variables sent with each fork instead of set in the zygote.
LATE_ENV = frozenset({TARGETS_ENV})

log = logging.getLogger(__name__)


class ZygoteError(RuntimeError):
    pass


class ForkedProcess:
    """A worker forked by a zygote, with what the runtime uses of an
    ``asyncio.subprocess.Process``: pid, returncode, stdout, wait(), kill()."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout: asyncio.StreamReader | None = None
        self._pidfd: int | None = pidfd
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def _set_exit(self, code: int) -> None:
        if self._exited.done():
            return
        self.returncode = code
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._exited.set_result(code)

    def _orphaned(self) -> None:
        """The zygote is gone: kill the worker and take the pidfd's readability
        as its exit (the status is lost with the zygote)."""
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        asyncio.get_running_loop().add_reader(self._pidfd, self._set_exit, -signal.SIGKILL)

    def kill(self) -> None:
        if self._pidfd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class _Adopted:
    """A zygote started with ``subprocess.Popen`` before the event loop ran, with
    what ``Zygote`` uses of an ``asyncio.subprocess.Process``. It is this process's
    child: its exit is reaped here, seen through a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.pid = popen.pid
        self.stdout: asyncio.StreamReader | None = None
        self._popen = popen

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def kill(self) -> None:
        if self._popen.poll() is not None:
            raise ProcessLookupError(self.pid)
        self._popen.kill()

    async def wait(self) -> int:
        code = self._popen.poll()
        if code is not None:
            return code
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        pidfd = os.pidfd_open(self.pid)
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._popen.wait()


class _Prestarted:
    """A zygote process started before its runtime existed, waiting to be adopted."""

    def __init__(self, function: str, spec: FunctionSpec, cfg: RuntimeConfig) -> None:
        self.function = function
        self.args = _zygote_args(function, spec, cfg)
        self.env = worker_env(_early_spec(spec), cfg)
        self.t0 = time.perf_counter()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            command = [sys.executable, "-m", zygote_program.__name__, "--fd", str(child.fileno())]
            self.popen = subprocess.Popen(
                [*command, *self.args],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctrl = parent

    async def discard(self) -> None:
        self.ctrl.close()  # EOF: a zygote past its imports exits by itself
        proc = _Adopted(self.popen)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), _EXIT_WAIT_S)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    async def adopt(self) -> _Adopted:
        proc = _Adopted(self.popen)
        out = self.popen.stdout
        if out is not None:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=OUTPUT_LINE_MAX)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), out)
            proc.stdout = reader
        return proc


# function name -> its zygote started by ``prestart``, until a Zygote adopts it.
_prestarted: dict[str, _Prestarted] = {}


def prestart(function: str, spec: FunctionSpec, cfg: RuntimeConfig) -> None:
    """Starts ``function``'s zygote now, without an event loop: the daemon calls it
    first thing, so that the zygote's imports overlap the daemon's own. The
    runtime's Zygote for that function takes it over if it would have started the
    same process (arguments and environment, ``LATE_ENV`` aside); otherwise it ends
    it and starts its own. Nothing is started when pidfds are missing (Linux < 5.3)."""
    if not hasattr(os, "pidfd_open") or function in _prestarted:
        return
    try:
        _prestarted[function] = _Prestarted(function, spec, cfg)
    except OSError as e:
        log.warning("function %s: could not start its zygote early: %s", function, e)


def prestarted() -> bool:
    """A zygote started by ``prestart`` waits to be taken over."""
    return bool(_prestarted)


def _early_spec(spec: FunctionSpec) -> FunctionSpec:
    """``spec`` without the variables that go with each fork instead."""
    env = {k: v for k, v in spec.environment.items() if k not in LATE_ENV}
    return dataclasses.replace(spec, environment=env)


def _zygote_args(function: str, spec: FunctionSpec, cfg: RuntimeConfig) -> list[str]:
    return [
        "--handler",
        spec.handler,
        "--function",
        function,
        "--memory-mb",
        str(spec.memory_mb),
        "--max-frame",
        str(max(cfg.max_request_bytes, cfg.max_event_bytes) + FRAME_SLACK),
        "--max-response",
        str(cfg.max_response_bytes),
    ]


class Zygote:
    """One function's zygote process, started on the first fork() and again after
    it dies. ``fork`` returns None when no zygote can be had: the caller then
    starts a worker as a fresh process."""

    def __init__(self, function: str, spec: FunctionSpec, cfg: RuntimeConfig) -> None:
        self.function = function
        self.spec = spec
        self.cfg = cfg
        self.starts = 0
        self.disabled = False  # a zygote failed to start: fresh processes from now on
        self._proc: asyncio.subprocess.Process | _Adopted | None = None
        self._ctrl: socket.socket | None = None
        self._output: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._reply: asyncio.Future[dict[str, object]] | None = None
        self._children: dict[int, ForkedProcess] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._ctrl is not None else None

    def _args(self) -> list[str]:
        return _zygote_args(self.function, self.spec, self.cfg)

    async def fork(self) -> tuple[ForkedProcess, socket.socket] | None:
        """A new worker (not yet ready: it runs its handler's init) and the
        runtime's end of its request socket."""
        async with self._lock:
            if not await self._ensure_started():
                return None
            try:
                return await self._fork_one()
            except ZygoteError as e:
                log.warning("function %s: zygote fork failed: %s", self.function, e)
                await self._kill_zygote()
                return None

    async def start(self) -> bool:
        """Starts the zygote if it is not running; returns whether one is."""
        async with self._lock:
            return await self._ensure_started()

    async def _ensure_started(self) -> bool:
        if self.disabled:
            return False
        if self._ctrl is None:
            try:
                await self._start()
            except ZygoteError as e:
                log.warning(
                    "function %s: zygote failed to start (%s); workers start as fresh processes",
                    self.function,
                    e,
                )
                self.disabled = True
                return False
        return True

    async def _start(self) -> None:
        # The thread counts are read when torch is imported: in the zygote.
        env = worker_env(_early_spec(self.spec), self.cfg)
        pre = _prestarted.pop(self.function, None)
        if pre is not None:
            if pre.args == self._args() and pre.env == env:
                try:
                    await self._take(await pre.adopt(), pre.ctrl, pre.t0)
                    return
                except ZygoteError as e:
                    # Died before it was taken over, say: a new one may do better.
                    log.info(
                        "function %s: the zygote started with the process failed (%s); "
                        "starting another",
                        self.function,
                        e,
                    )
            else:
                log.info(
                    "function %s: the zygote started with the process has another "
                    "configuration; starting another",
                    self.function,
                )
                await pre.discard()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t0 = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spirtd.functions.runtime.zygote",
                "--fd",
                str(child.fileno()),
                *self._args(),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                limit=OUTPUT_LINE_MAX,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        await self._take(proc, parent, t0)

    async def _take(
        self, proc: asyncio.subprocess.Process | _Adopted, parent: socket.socket, t0: float
    ) -> None:
        """Follows the zygote ``proc`` (its channel ``parent``, started at ``t0``)
        until it says it is ready; raises ZygoteError (and ends it) otherwise."""
        self.starts += 1
        self._proc = proc
        self._ctrl = parent
        parent.setblocking(False)
        if proc.stdout is not None:
            self._output = asyncio.create_task(
                log_output(self.function, proc.stdout), context=contextvars.Context()
            )
        self._reply = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(parent, self._on_readable)
        try:
            msg = await asyncio.wait_for(self._reply, self.cfg.init_timeout_s)
        except TimeoutError as e:
            await self._kill_zygote()
            raise ZygoteError("no answer") from e
        except ZygoteError:
            await self._kill_zygote()
            raise
        except BaseException:
            await self._kill_zygote()
            raise
        finally:
            self._reply = None
        if msg.get("type") != "ready":
            await self._kill_zygote()
            raise ZygoteError(str(msg.get("message", msg.get("type"))))
        log.info(
            "function %s: zygote %d ready in %.0f ms (its imports: %.0f ms)%s",
            self.function,
            proc.pid,
            (time.perf_counter() - t0) * 1000,
            float(msg.get("preload_ms", 0.0)),  # type: ignore[arg-type]
            ", started with the process" if isinstance(proc, _Adopted) else "",
        )

    async def _fork_one(self) -> tuple[ForkedProcess, socket.socket]:
        assert self._ctrl is not None
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        r, w = os.pipe()
        self._reply = loop.create_future()
        try:
            late = {k: v for k, v in self.spec.environment.items() if k in LATE_ENV}
            request = json.dumps({"type": "fork", "env": late}, separators=(",", ":")).encode()
            if len(request) > zygote_program.MAX_MESSAGE:
                raise ZygoteError(f"fork request of {len(request)} bytes")
            try:
                socket.send_fds(self._ctrl, [request], [theirs.fileno(), w])
            except OSError as e:
                raise ZygoteError(f"fork request: {e}") from e
            finally:
                theirs.close()
                os.close(w)
            try:
                msg = await asyncio.wait_for(self._reply, self.cfg.init_timeout_s)
            except TimeoutError as e:
                raise ZygoteError("no answer to a fork request") from e
            if msg.get("type") != "forked":
                raise ZygoteError(str(msg.get("message", msg.get("type"))))
            # The process object comes with the answer, not from ``_children``: a worker
            # that dies at once (a handler that cannot import) has its "exit" read in
            # the same pass as its "forked", and is gone from there already.
            proc = msg.get("child")
            if not isinstance(proc, ForkedProcess):
                raise ZygoteError("fork answer without a worker")
            reader = asyncio.StreamReader(limit=OUTPUT_LINE_MAX)
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0)
            )
        except BaseException:
            ours.close()
            with contextlib.suppress(OSError):
                os.close(r)
            raise
        finally:
            self._reply = None
        proc.stdout = reader
        return proc, ours

    def _on_readable(self) -> None:
        ctrl = self._ctrl
        while ctrl is not None:
            try:
                data, fds, _, _ = socket.recv_fds(ctrl, zygote_program.MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._gone()
                return
            try:
                msg = json.loads(data)
            except ValueError:
                msg = None
            if not isinstance(msg, dict):
                msg = {"type": "invalid"}
            kind = msg.get("type")
            if kind == "forked" and fds and isinstance(msg.get("pid"), int):
                pid = msg["pid"]
                self._children[pid] = msg["child"] = ForkedProcess(pid, fds.pop(0))
                if self._reply is None or self._reply.done():
                    # Nobody waits for it any more (cancelled): it exits on EOF.
                    self._children.pop(pid)._orphaned()
            elif kind == "exit" and isinstance(msg.get("pid"), int):
                child = self._children.pop(msg["pid"], None)
                if child is not None:
                    child._set_exit(int(msg.get("code", -1)))
                continue
            for fd in fds:
                os.close(fd)
            if self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)

    def _gone(self) -> None:
        """The zygote closed its channel: it died (or is exiting)."""
        if self._ctrl is None:
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._ctrl)
        self._ctrl.close()
        self._ctrl = None
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(ZygoteError("zygote exited"))
        children, self._children = self._children, {}
        if children:
            log.warning(
                "function %s: zygote exited; killing its %d workers", self.function, len(children)
            )
        for child in children.values():
            child._orphaned()

    async def _kill_zygote(self) -> None:
        proc = self._proc
        self._gone()
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), _EXIT_WAIT_S)
        await self._output_drained()

    async def _output_drained(self) -> None:
        if self._output is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._output, _EXIT_WAIT_S)
            self._output = None

    async def close(self) -> None:
        """Ends the zygote: EOF on its channel makes it exit. Workers still running
        are the pool's to end first; they would see EOF on their own sockets."""
        proc = self._proc
        if self._ctrl is None or proc is None:
            await self._output_drained()
            return
        # Detach from the channel first: the zygote's exit is not a crash.
        children, self._children = self._children, {}
        self._gone()
        try:
            await asyncio.wait_for(proc.wait(), _EXIT_WAIT_S)
        except TimeoutError:
            await self._kill_zygote()
        await self._output_drained()
        for child in children.values():
            child._orphaned()
