"""One warm worker process, seen from the runtime: spawn, call, kill."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import spirtd
from spirtd.functions.runtime import framing
from spirtd.functions.runtime.config import FunctionSpec, RuntimeConfig

if TYPE_CHECKING:
    from spirtd.functions.runtime.zygote_client import ForkedProcess, Zygote

# Room for the reply header around the largest response body.
FRAME_SLACK = 64 * 1024
_EXIT_WAIT_S = 5.0
# Longer worker output lines are logged in pieces of this size.
OUTPUT_LINE_MAX = 16 * 1024

log = logging.getLogger(__name__)


class WorkerInitError(RuntimeError):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class WorkerDied(RuntimeError):
    pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"signal: {signal.Signals(-code).name.removeprefix('SIG').lower()}"
        except ValueError:
            return f"signal: {-code}"
    return f"exit status {code}"


def worker_env(spec: FunctionSpec, cfg: RuntimeConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.environment)
    threads = str(cfg.threads_per_worker)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = threads
    # The worker must import this same spirtd even when it is not installed.
    root = str(Path(spirtd.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


async def log_output(function: str, out: asyncio.StreamReader) -> None:
    """Logs what a worker writes on stdout/stderr (handler prints, warnings, a
    crash's traceback), a line at a time, until EOF: the daemon's own stderr
    carries only lines in its log format, rate-limited like the rest."""
    while True:
        try:
            line = await out.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            line = e.partial  # EOF: what is left has no newline
        except asyncio.LimitOverrunError:
            line = await out.read(OUTPUT_LINE_MAX)
        if not line:
            return
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        log.info("function %s: %s", function, text)


class WorkerProcess:
    def __init__(
        self,
        function: str,
        spec: FunctionSpec,
        proc: asyncio.subprocess.Process | ForkedProcess,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int,
    ) -> None:
        self.function = function
        self.spec = spec
        self.proc = proc
        self._reader = reader
        self._writer = writer
        self._max_frame = max_frame
        self.invocations = 0
        self.alive = True
        # A fresh context: the output is the worker's, not the round that started it.
        self._output = (
            asyncio.create_task(log_output(function, proc.stdout), context=contextvars.Context())
            if proc.stdout is not None
            else None
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    async def _exec(
        function: str, spec: FunctionSpec, cfg: RuntimeConfig
    ) -> tuple[asyncio.subprocess.Process, socket.socket]:
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spirtd.functions.runtime.worker",
                "--fd",
                str(child.fileno()),
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
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                # Handler prints become our log lines (Lambda would send them to its logs).
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                limit=OUTPUT_LINE_MAX,
                env=worker_env(spec, cfg),
                # Own session: a Ctrl-C on the daemon's terminal does not hit workers;
                # stop() ends them. If the daemon dies, they see EOF and exit.
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return proc, parent

    @classmethod
    async def spawn(
        cls, function: str, spec: FunctionSpec, cfg: RuntimeConfig, zygote: Zygote | None = None
    ) -> WorkerProcess:
        """A ready worker: forked from ``zygote`` when there is one that works (its
        imports are done), else a fresh process."""
        max_frame = cfg.max_response_bytes + FRAME_SLACK
        forked = await zygote.fork() if zygote is not None else None
        proc: asyncio.subprocess.Process | ForkedProcess
        if forked is not None:
            proc, parent = forked
        else:
            proc, parent = await cls._exec(function, spec, cfg)
        try:
            reader, writer = await asyncio.open_connection(sock=parent)
        except BaseException:
            # Cancelled (the runtime stopping) before there is a worker to kill: end it here.
            parent.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), _EXIT_WAIT_S)
            raise
        worker = cls(function, spec, proc, reader, writer, max_frame)
        try:
            hello, _ = await asyncio.wait_for(
                framing.read_async(reader, max_frame), cfg.init_timeout_s
            )
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            framing.FrameError,
        ) as e:
            await worker.kill()
            msg = f"worker for {function} failed to start: {type(e).__name__}"
            raise WorkerInitError("Runtime.InitError", msg) from e
        except BaseException:
            await worker.kill()
            raise
        if hello.get("type") != "ready":
            await worker.kill()
            raise WorkerInitError(
                str(hello.get("errorType", "Runtime.InitError")),
                str(hello.get("errorMessage", "worker failed to start")),
            )
        return worker

    async def call(
        self, header: dict[str, Any], body: bytes, timeout: float
    ) -> tuple[dict[str, Any], bytes]:
        """One request/response. Raises TimeoutError (worker left running: the caller
        kills it) or WorkerDied."""
        self.invocations += 1
        try:
            self._writer.write(framing.encode(header, body))
            await self._writer.drain()
            return await asyncio.wait_for(
                framing.read_async(self._reader, self._max_frame), timeout
            )
        except (asyncio.IncompleteReadError, ConnectionError, framing.FrameError) as e:
            self.alive = False
            code = await self._exit_code()
            raise WorkerDied(_describe_exit(code)) from e

    async def _exit_code(self) -> int | None:
        try:
            code = await asyncio.wait_for(self.proc.wait(), _EXIT_WAIT_S)
        except TimeoutError:
            await self.kill()
            return self.proc.returncode
        await self._output_drained()
        return code

    async def kill(self) -> None:
        self.alive = False
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), _EXIT_WAIT_S)
        await self._output_drained()

    async def _output_drained(self) -> None:
        # The worker's last lines (a traceback) are read before it counts as gone;
        # a grandchild holding the pipe open must not hold us.
        if self._output is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._output, _EXIT_WAIT_S)

    async def close(self) -> None:
        """Graceful: closing the socket makes the worker exit after its current call."""
        self.alive = False
        self._writer.close()
        try:
            await asyncio.wait_for(self.proc.wait(), _EXIT_WAIT_S)
        except TimeoutError:
            await self.kill()
            return
        await self._output_drained()
