"""The warm workers of one function: reuse, cold starts, timeouts, replacement."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from spirtd.functions.runtime import lambda_errors
from spirtd.functions.runtime.config import FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.process import WorkerDied, WorkerInitError, WorkerProcess
from spirtd.functions.runtime.zygote_client import Zygote

log = logging.getLogger(__name__)


@dataclass
class PoolStats:
    cold_starts: int = 0  # worker processes that initialised (Lambda "Init" phases)
    cold_invocations: int = 0  # invocations that had to wait for a new worker
    invocations: int = 0
    function_errors: int = 0
    timeouts: int = 0
    worker_deaths: int = 0  # killed or crashed mid-invocation (timeouts excluded)
    replacements: int = 0
    init_failures: int = 0
    # What the REPORT lines billed (worker-measured duration, plus a cold start's
    # init, rounded up to the ms), every invocation counted: the host's own account
    # of a job's cost, to check the node's against.
    billed_invocations: int = 0
    billed_ms: int = 0
    durations_ms: list[float] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Outcome:
    body: bytes
    error: bool  # True: a function error (HTTP 200 + X-Amz-Function-Error)
    cold: bool
    log: bytes | None = None  # the invocation's log tail, when asked for


def _runtime_log(request_id: str, message: str, ms: float, billed: int, memory_mb: int) -> bytes:
    """The log Lambda shows for an invocation its environment cut short."""
    return (
        f"START RequestId: {request_id} Version: $LATEST\n{message}\n"
        f"END RequestId: {request_id}\nREPORT RequestId: {request_id}\tDuration: {ms:.2f} ms\t"
        f"Billed Duration: {billed} ms\tMemory Size: {memory_mb} MB\t\n"
    ).encode()[-lambda_errors.LOG_TAIL_BYTES :]


class FunctionPool:
    def __init__(self, name: str, spec: FunctionSpec, cfg: RuntimeConfig) -> None:
        self.name = name
        self.spec = spec
        self.cfg = cfg
        self.stats = PoolStats()
        self._idle: list[WorkerProcess] = []
        self._all: set[WorkerProcess] = set()
        self._spares_starting = 0
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Workers are forked from it: their imports (torch) are paid once per function.
        self.zygote = Zygote(name, spec, cfg)

    @property
    def workers(self) -> tuple[WorkerProcess, ...]:
        return tuple(self._all)

    @property
    def worker_pids(self) -> list[int]:
        return sorted(w.pid for w in self._all if w.alive)

    async def _spawn(self) -> WorkerProcess:
        try:
            w = await WorkerProcess.spawn(self.name, self.spec, self.cfg, self.zygote)
        except WorkerInitError:
            self.stats.init_failures += 1
            raise
        self.stats.cold_starts += 1
        if self._closed:
            await w.close()
            raise WorkerInitError("Runtime.InitError", "runtime is stopping")
        self._all.add(w)
        return w

    def _start_spare(self) -> None:
        """Starts a worker in the background that joins the idle set when ready."""
        if self._closed:
            return
        self._spares_starting += 1

        async def run() -> None:
            try:
                w = await self._spawn()
                self._idle.append(w)
            except WorkerInitError as e:
                log.warning("function %s: spare worker failed to start: %s", self.name, e)
            finally:
                self._spares_starting -= 1
                async with self._changed:
                    self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_zygote(self) -> None:
        await self.zygote.start()

    def warm(self, count: int) -> None:
        """Starts workers in the background until ``count`` exist or are starting; an
        invocation that comes meanwhile waits for one of them instead of starting its
        own (a worker's init is seconds of imports: paid before the job needs it).
        The zygote starts even for ``count`` 0: a worker forked later is ready in a
        fraction of a second, as its imports are the zygote's."""
        if not self._closed and self.zygote.pid is None and not self.zygote.disabled:
            task = asyncio.get_running_loop().create_task(self._start_zygote())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for _ in range(count - len(self._all) - self._spares_starting):
            self._start_spare()

    async def prewarm(self, count: int) -> None:
        workers = await asyncio.gather(*(self._spawn() for _ in range(count)))
        self._idle.extend(workers)

    async def _acquire(self) -> tuple[WorkerProcess, bool]:
        while True:
            while self._idle:
                w = self._idle.pop()  # LIFO: the most recently used worker is the warmest
                if w.alive and w.proc.returncode is None:
                    return w, False
                # It died while idle (killed from outside): replace it, try the next.
                self._all.discard(w)
                if w.alive:
                    w.alive = False
                    self.stats.worker_deaths += 1
                    self._drop_and_replace(w)
            if self._spares_starting == 0:
                return await self._spawn(), True
            # A replacement is already starting: wait for it rather than start another.
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.cfg.init_timeout_s)

    def _release(self, w: WorkerProcess) -> None:
        if w.alive and not self._closed:
            self._idle.append(w)
        else:
            self._all.discard(w)

    def _drop_and_replace(self, w: WorkerProcess) -> None:
        self._all.discard(w)
        self.stats.replacements += 1
        self._start_spare()

    async def invoke(
        self,
        request_id: str,
        payload: bytes,
        *,
        log: bool = False,
        client_context: dict[str, object] | None = None,
        arn: str | None = None,
    ) -> Outcome:
        """Runs one invocation; ``log`` asks for its log tail (LogType=Tail)."""
        self.stats.invocations += 1
        memory = self.spec.memory_mb
        t_start = time.perf_counter()

        def cut_short(message: str) -> bytes | None:
            # Billed as Lambda bills an environment it cut short: the time it ran.
            ms = (time.perf_counter() - t_start) * 1000
            billed = self._bill(math.ceil(ms))
            return _runtime_log(request_id, message, ms, billed, memory) if log else None

        try:
            w, cold = await self._acquire()
        except WorkerInitError as e:
            self.stats.function_errors += 1
            body = lambda_errors.function_error(e.error_type, str(e))
            return Outcome(body, True, True, cut_short(f"{e.error_type}: {e}"))
        if cold:
            self.stats.cold_invocations += 1
        timeout = self.spec.timeout_s
        header: dict[str, object] = {
            "type": "invoke",
            "id": request_id,
            "deadline_ms": int(time.time() * 1000 + timeout * 1000),
            "log": log,
            "client_context": client_context,
            "arn": arn,
        }
        t0 = time.perf_counter()
        try:
            reply, body = await w.call(header, payload, timeout)
        except TimeoutError:
            await w.kill()
            self.stats.timeouts += 1
            self._drop_and_replace(w)
            msg = f"RequestId: {request_id} Error: Task timed out after {timeout:.2f} seconds"
            tail = cut_short(msg)
            body = lambda_errors.function_error(lambda_errors.TIMEOUT, msg)
            return Outcome(body, True, cold, tail)
        except WorkerDied as e:
            self.stats.worker_deaths += 1
            self._drop_and_replace(w)
            msg = f"RequestId: {request_id} Error: Runtime exited with error: {e}"
            tail = cut_short(msg)
            return Outcome(lambda_errors.function_error(lambda_errors.EXIT, msg), True, cold, tail)
        except BaseException:
            # Cancelled mid-call (runtime stopping): the worker's state is unknown.
            await w.kill()
            self._all.discard(w)
            raise
        finally:
            self.stats.durations_ms.append((time.perf_counter() - t0) * 1000)
            del self.stats.durations_ms[:-1000]
        billed = reply.get("billed_ms")
        if isinstance(billed, bool) or not isinstance(billed, int) or billed < 0:
            billed = math.ceil((time.perf_counter() - t0) * 1000)
        self._bill(billed)
        if reply.get("exit"):
            # The worker ran out of memory and is exiting: like Lambda, the
            # environment is discarded rather than reused.
            await w.close()
            self._drop_and_replace(w)
        else:
            self._release(w)
        ok = bool(reply.get("ok"))
        if not ok:
            self.stats.function_errors += 1
        tail: bytes | None = None
        if log:
            try:
                tail = base64.b64decode(str(reply.get("log", "")), validate=True)
            except binascii.Error:
                tail = b""
            tail = tail[-lambda_errors.LOG_TAIL_BYTES :]
        return Outcome(body, not ok, cold, tail)

    def _bill(self, billed_ms: int) -> int:
        self.stats.billed_invocations += 1
        self.stats.billed_ms += billed_ms
        return billed_ms

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        idle = set(self._idle)
        busy = [w for w in self._all if w not in idle]
        self._all.clear()
        self._idle.clear()
        # Idle workers exit cleanly on EOF; busy ones would first finish their
        # handler, which may take minutes, so they are killed.
        await asyncio.gather(
            *(w.close() for w in idle), *(w.kill() for w in busy), return_exceptions=True
        )
        await self.zygote.close()
