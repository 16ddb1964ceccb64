"""Workers forked from a function's zygote: who their parent is, what the zygote
imported, and what happens when the zygote dies or cannot be used."""

from __future__ import annotations

import logging
import os
import signal
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from spirtd.functions.credentials import TARGETS_ENV
from spirtd.functions.runtime import zygote_client
from spirtd.functions.runtime.config import GRADIENT_FUNCTION, FunctionSpec, RuntimeConfig
from spirtd.functions.runtime.pool import FunctionPool
from spirtd.functions.runtime.server import LocalRuntime
from spirtd.functions.runtime.zygote import handler_imports
from spirtd.localcluster import async_wait_for
from tests.test_runtime import invoke, lambda_client, probe_config


def parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def modules_mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_zygote_preloads_what_the_handler_imports_not_the_handler() -> None:
    names = handler_imports("spirtd.functions.gradient")
    assert "torch" in names and "numpy" in names
    assert "spirtd.functions.gradient" not in names and "__future__" not in names
    assert handler_imports("spirtd.functions.no_such_module") == []


async def test_gradient_workers_fork_from_a_single_threaded_zygote() -> None:
    spec = FunctionSpec()
    pool = FunctionPool(GRADIENT_FUNCTION, spec, RuntimeConfig(functions={GRADIENT_FUNCTION: spec}))
    try:
        await pool.prewarm(2)
        zygote = pool.zygote.pid
        assert zygote is not None and pool.zygote.starts == 1
        for pid in pool.worker_pids:
            assert parent_of(pid) == zygote
        # torch is loaded in the zygote, but its workers' inits (a backward pass each)
        # started no thread there: a later fork is as safe as the first.
        assert "libtorch" in modules_mapped(zygote)
        assert threads_of(zygote) == 1
        await pool.prewarm(1)
        assert len(pool.worker_pids) == 3 and pool.zygote.starts == 1
    finally:
        await pool.close()
    assert pool.zygote.pid is None


async def test_zygote_death_kills_its_workers_and_a_new_one_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with LocalRuntime(probe_config(concurrency=2)) as rt:
        c = lambda_client(rt)
        pool = rt.pools["probe"]
        first = await invoke(c, {"action": "echo"})
        worker = first["body"]["pid"]
        zygote = pool.zygote.pid
        assert zygote is not None and parent_of(worker) == zygote
        with caplog.at_level(logging.WARNING, logger="spirtd.functions.runtime.zygote_client"):
            os.kill(zygote, signal.SIGKILL)
            await async_wait_for(lambda: pool.zygote.pid is None, 30, "the zygote's death seen")
        # Its worker is killed with it: nothing would report its exit any more.
        await async_wait_for(
            lambda: pool.workers[0].proc.returncode is not None, 30, "the orphaned worker's end"
        )
        assert "zygote exited" in caplog.text
        again = await invoke(c, {"action": "echo"})
        assert again["error"] is None and again["body"]["pid"] != worker
        assert pool.zygote.starts == 2
        assert parent_of(again["body"]["pid"]) == pool.zygote.pid != zygote


async def test_forked_worker_output_becomes_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    async with LocalRuntime(probe_config()) as rt:
        c = lambda_client(rt)
        with caplog.at_level(logging.INFO, logger="spirtd.functions.runtime.process"):
            await invoke(c, {"action": "print", "lines": ["forked says hello"]})
            (pid,) = rt.pools["probe"].worker_pids
            assert parent_of(pid) == rt.pools["probe"].zygote.pid
            await async_wait_for(
                lambda: "function probe: forked says hello" in caplog.text, 30, "the line"
            )


async def test_a_zygote_that_would_fork_threads_is_not_used(tmp_path: Path) -> None:
    """A handler whose imports start a thread: forking that process could copy a
    lock held by the thread, so its workers start as fresh processes."""
    (tmp_path / "threaded_dep.py").write_text(
        textwrap.dedent(
            """
            import threading
            threading.Thread(target=threading.Event().wait, daemon=True).start()
            """
        )
    )
    (tmp_path / "threaded_handler.py").write_text(
        textwrap.dedent(
            """
            import os
            import threaded_dep

            def handler(event, context):
                return {"pid": os.getpid(), "ppid": os.getppid()}
            """
        )
    )
    spec = FunctionSpec(
        handler="threaded_handler:handler",
        memory_mb=256,
        environment={"PYTHONPATH": str(tmp_path)},
    )
    async with LocalRuntime(RuntimeConfig(functions={"threaded": spec})) as rt:
        r = await invoke(lambda_client(rt), {}, name="threaded")
        assert r["error"] is None, r
        assert r["body"]["ppid"] == os.getpid()
        assert rt.pools["threaded"].zygote.disabled


def env_handler(tmp_path: Path) -> FunctionSpec:
    """A handler that reports the late variable and its parent, on PYTHONPATH."""
    (tmp_path / "env_handler.py").write_text(
        textwrap.dedent(
            f"""
            import os

            def handler(event, context):
                return {{"late": os.environ.get({TARGETS_ENV!r}), "ppid": os.getppid()}}
            """
        )
    )
    return FunctionSpec(
        handler="env_handler:handler",
        memory_mb=256,
        environment={"PYTHONPATH": str(tmp_path), TARGETS_ENV: "a late binding"},
    )


@pytest.fixture
def no_prestarted() -> Iterator[None]:
    yield
    for pre in zygote_client._prestarted.values():
        pre.popen.kill()
        pre.popen.wait(30)
    zygote_client._prestarted.clear()


@pytest.mark.usefixtures("no_prestarted")
async def test_a_zygote_started_with_the_process_is_taken_over_and_forks_with_late_env(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon starts its zygote before its own imports, without the Redis
    binding (known later); the runtime takes that process over and each fork
    carries the binding."""
    spec = env_handler(tmp_path)
    early = FunctionSpec(
        handler=spec.handler,
        memory_mb=spec.memory_mb,
        environment={"PYTHONPATH": str(tmp_path)},
    )
    cfg = RuntimeConfig(functions={"env": spec})
    zygote_client.prestart("env", early, cfg)
    pid = zygote_client._prestarted["env"].popen.pid
    with caplog.at_level(logging.INFO, logger="spirtd.functions.runtime.zygote_client"):
        async with LocalRuntime(cfg) as rt:
            r = await invoke(lambda_client(rt), {}, name="env")
            assert r["error"] is None, r
            assert r["body"] == {"late": "a late binding", "ppid": pid}
            assert rt.pools["env"].zygote.pid == pid and rt.pools["env"].zygote.starts == 1
            # The binding was never in the zygote's own environment.
            assert TARGETS_ENV.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert "started with the process" in caplog.text
    assert zygote_client._prestarted == {}


@pytest.mark.usefixtures("no_prestarted")
async def test_a_zygote_started_with_another_configuration_is_ended(tmp_path: Path) -> None:
    spec = env_handler(tmp_path)
    cfg = RuntimeConfig(functions={"env": spec})
    zygote_client.prestart("env", replace(spec, memory_mb=512), cfg)
    early = zygote_client._prestarted["env"].popen
    async with LocalRuntime(cfg) as rt:
        r = await invoke(lambda_client(rt), {}, name="env")
        assert r["error"] is None, r
        assert r["body"]["late"] == "a late binding"
        assert r["body"]["ppid"] == rt.pools["env"].zygote.pid != early.pid
        assert early.returncode is not None


@pytest.mark.usefixtures("no_prestarted")
async def test_a_zygote_started_with_the_process_that_died_is_replaced(tmp_path: Path) -> None:
    """Not a reason to give up on zygotes: the runtime starts one of its own."""
    spec = env_handler(tmp_path)
    cfg = RuntimeConfig(functions={"env": spec})
    zygote_client.prestart("env", spec, cfg)
    early = zygote_client._prestarted["env"].popen
    early.kill()
    early.wait(30)
    async with LocalRuntime(cfg) as rt:
        r = await invoke(lambda_client(rt), {}, name="env")
        assert r["error"] is None, r
        pool = rt.pools["env"]
        assert not pool.zygote.disabled
        assert r["body"]["ppid"] == pool.zygote.pid != early.pid


async def test_a_worker_that_exits_at_once_is_still_handed_back() -> None:
    # A handler that cannot import exits right after the fork: the zygote's "forked"
    # and "exit" can be read in one pass, and the runtime looked the worker up by pid
    # after the exit had removed it (a KeyError, a 500 to the caller; seen in CI).
    import asyncio
    import json
    import socket

    z = zygote_client.Zygote("f", FunctionSpec(handler="x:y"), RuntimeConfig())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    z._ctrl = ours
    loop = asyncio.get_running_loop()
    loop.add_reader(ours, z._on_readable)
    pidfd = os.pidfd_open(os.getpid())
    try:
        task = asyncio.create_task(z._fork_one())
        # The fake zygote: take the request, then answer both at once.
        await asyncio.sleep(0)
        _, fds, _, _ = socket.recv_fds(theirs, 1024, 2)
        for fd in fds:
            os.close(fd)
        socket.send_fds(theirs, [json.dumps({"type": "forked", "pid": 4242}).encode()], [pidfd])
        theirs.send(json.dumps({"type": "exit", "pid": 4242, "code": 3}).encode())
        proc, sock = await asyncio.wait_for(task, 10)
        assert proc.pid == 4242 and proc.returncode == 3
        sock.close()
    finally:
        loop.remove_reader(ours)
        ours.close()
        theirs.close()
        os.close(pidfd)
