"""Real spirtd processes on 127.0.0.1: one launcher for the demo, the
integration tests and the benchmarks.

Each node gets its own data dir, enrolled with one throwaway CA, and logs to
DATA_DIR/spirtd.log. Nothing here is a fake: the processes are the installed
daemon, talking over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from spirtd.control import ctl
from spirtd.keyfiles import CaDir, DataDir

_REPO_ROOT = Path(__file__).resolve().parent.parent


class NodeError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Works from a source checkout as well as from an install.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class LocalNode:
    def __init__(
        self,
        data_dir: Path,
        *,
        listen: str = "127.0.0.1:0",
        bootstrap: Sequence[str] = (),
        args: Sequence[str] = (),
        config: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.listen = listen
        self.bootstrap = list(bootstrap)
        self.args = list(args)
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = ""
        self.address = ""
        self.public_key = ""
        self.log_path = data_dir / "spirtd.log"
        # What spirtd wrote on stdout while starting, as read (a test checks its format).
        self.stdout_head = b""

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "spirtd",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.listen,
        ]
        if self.config is not None:
            cfg = self.data_dir / "spirtd.toml"
            cfg.write_text(self.config)
            cmd += ["--config", str(cfg)]
        for b in self.bootstrap:
            cmd += ["--bootstrap", b]
        return cmd + self.args

    def start(self, timeout: float = 30.0) -> LocalNode:
        self.spawn()
        return self.wait_started(timeout)

    def spawn(self) -> None:
        """Starts the process without waiting for it (see wait_started)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=log, env=_env(), start_new_session=True
        )
        log.close()

    def wait_started(self, timeout: float = 30.0) -> LocalNode:
        """Waits for the identity lines spirtd prints once it is up."""
        fields = self._read_identity(timeout)
        self.node_id = fields["node_id"]
        self.address = fields["listen"]
        self.public_key = fields["public_key"]
        # A restart on the same port must reuse it, so later starts keep the address.
        self.listen = self.address
        return self

    def _read_identity(self, timeout: float) -> dict[str, str]:
        assert self.proc is not None and self.proc.stdout is not None
        fields: dict[str, str] = {}
        buf = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while len(fields) < 3:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise NodeError(
                    f"spirtd in {self.data_dir} did not start in {timeout}s:\n{self.log_tail()}"
                )
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                code = self.proc.wait(timeout=5)
                raise NodeError(f"spirtd in {self.data_dir} exited with {code}:\n{self.log_tail()}")
            buf += chunk
            self.stdout_head += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode()
                if text.startswith("{"):  # --log-format json: each is a log line, msg "KEY: VALUE"
                    text = str(json.loads(text).get("msg", ""))
                key, _, value = text.partition(": ")
                fields[key.strip()] = value.strip()
        return fields

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        return ctl.call(self.data_dir, method, path, body)

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/status")

    def stop(self, timeout: float = 20.0, *, signalled: bool = False) -> int:
        """SIGTERM (graceful leave) and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None and not signalled:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise NodeError(f"spirtd in {self.data_dir} ignored SIGTERM for {timeout}s") from None
        self._close_pipe()
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group (spirtd and any redis-server/workers it started)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalCluster:
    """N enrolled nodes under ``root``; node 0 is everyone's bootstrap."""

    def __init__(
        self,
        root: Path,
        n: int,
        *,
        args: Sequence[str] = (),
        config: str | None = None,
        cluster: str = "spirt",
    ) -> None:
        self.root = root
        self.ca = CaDir(root / "ca")
        if not self.ca.key_path.exists():
            self.ca.init(cluster)
        self.nodes: list[LocalNode] = []
        for i in range(n):
            self.add_node(args=args, config=config, start=False, index=i)

    def add_node(
        self,
        *,
        args: Sequence[str] = (),
        config: str | None = None,
        start: bool = True,
        index: int | None = None,
        enroll: bool = True,
    ) -> LocalNode:
        i = len(self.nodes) if index is None else index
        d = self.root / f"node{i}"
        if enroll:
            self.ca.enroll(DataDir(d), now=time.time(), days=30)
        boot = [self.nodes[0].address] if self.nodes and self.nodes[0].address else []
        node = LocalNode(d, bootstrap=boot, args=args, config=config)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def start(self) -> LocalCluster:
        first = self.nodes[0].start()
        # The rest start concurrently: each spends seconds importing torch and
        # starting its redis-server, and none depends on another but node 0.
        for node in self.nodes[1:]:
            node.bootstrap = [first.address]
            node.spawn()
        for node in self.nodes[1:]:
            node.wait_started(timeout=60)
        return self

    def stop(self) -> list[int]:
        """SIGTERMs every node at once (each leaves gracefully) and returns the exit codes."""
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        codes = []
        for node in self.nodes:
            try:
                codes.append(node.stop(signalled=True))
            except NodeError:
                codes.append(-9)
        return codes

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()


# A daemon that is still starting (or restarting) answers with these: keep polling.
_TRANSIENT = (ctl.Unreachable, ctl.DaemonError)


def _timed_out(timeout: float, what: str, last_exc: Exception | None) -> TimeoutError:
    return TimeoutError(
        f"timed out after {timeout}s waiting for {what}" + (f" ({last_exc})" if last_exc else "")
    )


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    """Polls ``predicate`` until true; raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
            last_exc = None
        except _TRANSIENT as e:
            last_exc = e
        time.sleep(interval)
    raise _timed_out(timeout, what, last_exc)


async def async_wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> None:
    """``wait_for`` for code running in an event loop: polls without blocking the loop
    (whose own tasks usually make ``predicate`` true), and ``predicate`` may be a
    coroutine function. A shorter default interval: in-process state is cheap to read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_exc: Exception | None = None
    while loop.time() < deadline:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                try:
                    async with asyncio.timeout_at(deadline):  # a hung predicate too
                        result = await result
                except TimeoutError:
                    raise _timed_out(timeout, what, last_exc) from None
            if result:
                return
            last_exc = None
        except _TRANSIENT as e:
            last_exc = e
        await asyncio.sleep(interval)
    raise _timed_out(timeout, what, last_exc)


def linked_peers(node: LocalNode) -> set[str]:
    """Peers this node holds an open encrypted link to."""
    return {link["node_id"] for link in node.status()["links"]}


def member_states(node: LocalNode) -> dict[str, str]:
    """node id -> membership state, as this node sees the cluster (itself included)."""
    return {m["node_id"]: m["state"] for m in node.status()["members"]}


def all_see(nodes: list[LocalNode], expected: dict[str, str]) -> bool:
    """True when every node's view includes exactly these states for these ids."""
    for n in nodes:
        view = member_states(n)
        if any(view.get(k) != v for k, v in expected.items()):
            return False
    return True
