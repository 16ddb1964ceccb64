"""The redis-server that spirtd starts and supervises for its data dir.

Layout, all inside ``DATA_DIR/redis/`` (mode 0700):

* ``redis.sock``     the unix socket (mode 0700); no TCP port unless one is configured,
                     and then TLS only off loopback (``RedisTls``: functions on
                     other hosts log in there as ``spirt-fn``);
* ``password``       the generated password of the daemon's ACL user ``spirt`` (mode 0600);
* ``function-password``  the password of the functions' ACL user ``spirt-fn`` (0600);
* ``admin-password`` only with ``admin=True`` (tests, benchmarks): a user with every right;
* ``redis.conf``     written on every start (mode 0600); it holds only the passwords'
                     SHA-256, and disables the ``default`` user;
* ``appendonlydir/`` AOF persistence;
* ``redis.log``      redis-server's own log; ``redis.out`` its stdout/stderr.

Each user gets only what it needs (``DAEMON_ACL``, ``FUNCTION_ACL``): the daemon reads
and writes ``spirt:*`` keys with data, transaction and SPIRT commands; a function reads
only the model parameters (``spirt:*:theta`` and its shape) and writes only function
outputs (``spirt:*:fn:*``, never a gradient key ``spirt:*:g:*``) with GET, SET, STRLEN,
MULTI/EXEC and PING (and SPIRT.PUT where the module is loaded). Neither can run ACL,
FLUSHALL, SHUTDOWN, CONFIG, MODULE or SPIRT.CONFIG. A password file readable by group
or others is refused, not repaired: someone may already have read it.

The supervisor restarts a dead server with exponential backoff and logs why it died
(exit status plus the tail of its log). ``stop()`` shuts it down with SIGTERM, which
makes redis-server flush the AOF before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from spirtd import rules
from spirtd.keyfiles import write_secret
from spirtd.redis.binding import CredentialRef, RedisBinding
from spirtd.redis.module import module_path

USERNAME = "spirt"
FUNCTION_USERNAME = "spirt-fn"
ADMIN_USERNAME = "spirt-admin"
# Every key spirtd writes is under "spirt:" (training/state.py's StateKeys).
DAEMON_ACL = (
    "resetkeys",
    "~spirt:*",
    "resetchannels",
    "-@all",
    "+@read",
    "+@write",
    "+@keyspace",
    "+@string",
    "+@transaction",
    "+@connection",
    # After the grants: takes back FLUSHALL, KEYS, CONFIG, ACL, SHUTDOWN, MODULE, ...
    "-@dangerous",
)
# The module's commands spirtd runs besides the aggregation rules' (which the rule
# registry names: daemon_module_commands); SPIRT.CONFIG (admin) is not among them.
DAEMON_MODULE_COMMANDS = (
    "spirt.put",
    "spirt.get",
    "spirt.sgd",
    "spirt.adam",
    "spirt.norm",
    "spirt.digest",
    "spirt.info",
    # A published vector's compression (protocol.compression), done in the database.
    "spirt.pack",
    "spirt.unpack",
)
# A gradient function reads the parameters and writes its slice's gradient
# (spirtd/functions/gradient.py); the same rule deploy/aws/README.md gives for AWS.
FUNCTION_ACL = (
    "resetkeys",
    # Only the model (StateKeys.theta): other peers' gradients are none of its business.
    "%R~spirt:*:theta",
    "%R~spirt:*:theta:shape",
    # Its writes go only to a namespace of their own (StateKeys.fn_output), which the
    # node then averages into the local gradient: with the gradient keys writable, a
    # function could overwrite peers' verified gradients or ours before it is signed.
    # Read and write in one pattern: a module command's keys are read-write, and Redis
    # wants one pattern to grant both.
    "~spirt:*:fn:*",
    "resetchannels",
    "-@all",
    "+get",
    "+set",
    "+strlen",
    "+multi",
    "+exec",
    "+ping",
)
# With the module, a function writes its gradient as scratch (kept out of the AOF).
FUNCTION_MODULE_COMMANDS = ("spirt.put",)
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH = 107
_LOG_TAIL_LINES = 8
_PR_SET_PDEATHSIG = 1


def daemon_module_commands() -> tuple[str, ...]:
    """Every SPIRT.* command the daemon's ACL user may run, the rules' read when called."""
    return (*DAEMON_MODULE_COMMANDS, *rules.module_commands())


class RedisStartError(RuntimeError):
    """redis-server is missing, misconfigured, or did not come up. The message is one line."""


# Where `spirtctl redis-tls` writes the listener's material, under the data dir.
TLS_DIR = "redis-tls"


def default_tls_files(data_dir: Path) -> tuple[Path, Path, Path]:
    """(certificate, key, CA) as `spirtctl redis-tls` writes them for ``data_dir``."""
    d = Path(data_dir) / TLS_DIR
    return d / "server.crt", d / "server.key", d / "ca.crt"


@dataclass(frozen=True)
class RedisTls:
    """A TLS listener beside the unix socket, for functions on other hosts (Lambda,
    a function host): they log in there as the functions' ACL user. Only TLS is
    served on ``bind``: the plain port stays off (or on loopback, for tests)."""

    port: int
    cert: Path
    key: Path
    ca: Path  # clients verify the server with it; with client_certs, Redis checks clients'
    bind: str = "127.0.0.1"
    client_certs: bool = False

    def check(self) -> None:
        if not (1 <= self.port <= 65535):
            raise RedisStartError(f"TLS port {self.port} is out of range 1..65535")
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not path.is_file():
                raise RedisStartError(f"TLS {what} {path} is not a readable file")
        if stat.S_IMODE(self.key.stat().st_mode) & 0o077:
            raise RedisStartError(
                f"TLS key {self.key} is readable by others; chmod 600 it (and replace it "
                "if someone else could have read it)"
            )
        if not self.bind or any(c in self.bind for c in ' "\n'):
            raise RedisStartError(f"bad TLS bind address {self.bind!r}")

    def config_lines(self) -> list[str]:
        return [
            f"tls-port {int(self.port)}",
            f"tls-cert-file {_quote(str(self.cert))}",
            f"tls-key-file {_quote(str(self.key))}",
            f"tls-ca-cert-file {_quote(str(self.ca))}",
            f"tls-auth-clients {'yes' if self.client_certs else 'no'}",
            'tls-protocols "TLSv1.2 TLSv1.3"',
            "tls-prefer-server-ciphers yes",
        ]


@dataclass(frozen=True)
class RedisConnectionInfo:
    """What another process (e.g. a serverless function) needs to reach this Redis."""

    url: str
    username: str
    password_file: str

    def to_dict(self) -> dict[str, str]:
        return {"url": self.url, "username": self.username, "password_file": self.password_file}


def _quote(value: str) -> str:
    # redis.conf accepts double-quoted strings with backslash escapes.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {name}"
    return f"exited with status {code}"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if spirtd is killed hard, its
    # redis-server must not linger holding the data dir.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ManagedRedis:
    """Starts, supervises and stops one redis-server for a data dir.

    Usable on its own::

        r = ManagedRedis(Path("/var/lib/spirt"))
        await r.start()
        client = await r.client()
        ...
        await r.stop()
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        load_module: bool = True,
        port: int | None = None,
        module_args: Sequence[str] = (),
        redis_server: str = "redis-server",
        logger: logging.Logger | None = None,
        start_timeout: float = 15.0,
        stop_timeout: float = 30.0,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        extra_config: Sequence[str] = (),
        admin: bool = False,
        tls: RedisTls | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.dir = self.data_dir / "redis"
        self.socket_path = self.dir / "redis.sock"
        self.password_file = self.dir / "password"
        self.function_password_file = self.dir / "function-password"
        self.admin_password_file = self.dir / "admin-password"
        self.admin = admin
        self.config_file = self.dir / "redis.conf"
        self.log_file = self.dir / "redis.log"
        self.out_file = self.dir / "redis.out"
        # Who client() logs in as: the daemon's user, or with admin=True (tests and
        # benchmarks that flush or reconfigure the server) the admin user.
        self.username = ADMIN_USERNAME if admin else USERNAME
        self.load_module = load_module
        self.port = port
        self.module_args = list(module_args)
        self.redis_server = redis_server
        self.log = logger or logging.getLogger("spirtd.redis")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.extra_config = list(extra_config)
        self.tls = tls
        self.restarts = 0
        self.last_exit: str | None = None
        self._passwords: dict[Path, str] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready = asyncio.Event()

    # ---- public surface -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The unix socket URL (always served)."""
        return f"unix://{self.socket_path}"

    @property
    def tcp_url(self) -> str | None:
        """``redis://127.0.0.1:PORT/0`` when a TCP port is configured, else None."""
        return None if self.port is None else f"redis://127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str | None:
        """``rediss://BIND:PORT/0`` when the TLS listener is on, else None. Remote
        functions use the address their host reaches the node at instead of BIND."""
        if self.tls is None:
            return None
        host = "127.0.0.1" if self.tls.bind in ("0.0.0.0", "::") else self.tls.bind
        host = f"[{host}]" if ":" in host else host
        return f"rediss://{host}:{self.tls.port}/0"

    @property
    def password(self) -> str:
        """The password client() logs in with (the daemon's, or the admin's)."""
        return self._password_of(self.admin_password_file if self.admin else self.password_file)

    @property
    def daemon_password(self) -> str:
        return self._password_of(self.password_file)

    @property
    def client_password_file(self) -> Path:
        return self.admin_password_file if self.admin else self.password_file

    def _password_of(self, path: Path) -> str:
        if path not in self._passwords:
            self._passwords[path] = self._load_or_create_password(path)
        return self._passwords[path]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None and self._ready.is_set()

    def connection_info(self, *, tcp: bool = False) -> RedisConnectionInfo:
        """URL, user and password file of the functions' user (what a gradient function
        needs); ``tcp=True`` gives the TCP address (a port must be configured)."""
        url = self.tcp_url if tcp else self.url
        if url is None:
            raise RuntimeError("no TCP port configured for this Redis")
        self._password_of(self.function_password_file)
        return RedisConnectionInfo(url, FUNCTION_USERNAME, str(self.function_password_file))

    def function_binding(self, *, tcp: bool = False) -> RedisBinding:
        """The binding a gradient function's configuration needs for this Redis."""
        info = self.connection_info(tcp=tcp)
        return RedisBinding(info.url, info.username, CredentialRef("file", info.password_file))

    def connection_kwargs(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": self.password,
            "unix_socket_path": str(self.socket_path),
        }

    async def client(self, **overrides: Any) -> aioredis.Redis:
        """A new redis.asyncio client for this server; the caller closes it (``aclose()``)."""
        kw = self.connection_kwargs()
        kw.setdefault("socket_connect_timeout", 5.0)
        kw.update(overrides)
        return aioredis.Redis(**kw)

    async def start(self) -> None:
        """Starts redis-server and its supervisor; returns once it answers PING."""
        if self._supervisor is not None:
            raise RuntimeError("ManagedRedis already started")
        self._stopping = False
        self._prepare()
        await self._refuse_if_already_serving()
        await self._spawn_and_wait()
        self._supervisor = asyncio.create_task(self._supervise(), name="redis-supervisor")

    async def wait_ready(self, timeout: float) -> None:
        """Waits until the (possibly restarting) server answers again."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """Clean shutdown: SIGTERM (redis flushes the AOF), SIGKILL after stop_timeout."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()
        self._ready.clear()

    async def __aenter__(self) -> ManagedRedis:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- setup ----------------------------------------------------------------------

    def _prepare(self) -> None:
        if shutil.which(self.redis_server) is None:
            raise RedisStartError(
                f"redis-server not found (looked for {self.redis_server!r} on PATH); "
                "install it (Debian: apt-get install redis-server)"
            )
        if len(str(self.socket_path)) > MAX_UNIX_PATH:
            raise RedisStartError(
                f"data dir path too long for a unix socket ({self.socket_path} is "
                f"{len(str(self.socket_path))} bytes, limit {MAX_UNIX_PATH}); "
                "use a shorter data dir"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

        def sha(path: Path) -> str:
            return hashlib.sha256(self._password_of(path).encode()).hexdigest()

        daemon_rules, function_rules = list(DAEMON_ACL), list(FUNCTION_ACL)
        if self.load_module:
            # Naming a command that is not loaded would stop redis-server from starting.
            daemon_rules += [f"+{c}" for c in daemon_module_commands()]
            function_rules += [f"+{c}" for c in FUNCTION_MODULE_COMMANDS]
        lines = [
            "daemonize no",
            f"dir {_quote(str(self.dir))}",
            f"logfile {_quote(str(self.log_file))}",
            "loglevel notice",
            'pidfile ""',
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            'appenddirname "appendonlydir"',
            "appendfsync everysec",
            # AOF is the persistence; periodic RDB snapshots of multi-MB tensors only cost I/O.
            'save ""',
            # Tensors are tens of MB: the default 64 MB threshold would fork for an AOF
            # rewrite every few commands (a fork of a multi-GB server stalls it briefly).
            "auto-aof-rewrite-min-size 1gb",
            # The default user cannot log in ("off"), but keeps full rights: Redis 7.0 replays
            # MULTI/EXEC blocks of the AOF as the default user, and without rights they fail.
            "user default off ~* &* +@all",
            f"user {USERNAME} on #{sha(self.password_file)} {' '.join(daemon_rules)}",
            f"user {FUNCTION_USERNAME} on #{sha(self.function_password_file)} "
            + " ".join(function_rules),
        ]
        if self.admin:
            lines.append(f"user {ADMIN_USERNAME} on #{sha(self.admin_password_file)} ~* &* +@all")
        lines += [f"unixsocket {_quote(str(self.socket_path))}", "unixsocketperm 700"]
        # Redis binds every listener to every bind address, so the plain port and a
        # TLS listener off loopback cannot be on together.
        binds = []
        if self.port is None:
            lines.append("port 0")
        else:
            lines.append(f"port {int(self.port)}")
            binds.append("127.0.0.1")
        if self.tls is not None:
            self.tls.check()
            if self.port is not None and self.tls.bind not in ("127.0.0.1", "::1", "localhost"):
                raise RedisStartError(
                    "a plain TCP port and a TLS listener off loopback cannot be on together"
                )
            if self.tls.bind not in binds:
                binds.append(self.tls.bind)
            # No idle "timeout": it would also cut the daemon's pooled connections. A
            # function container that vanished is found by Redis's TCP keepalive (300 s).
            lines += self.tls.config_lines()
        if binds:
            lines.append("bind " + " ".join(binds))
        if self.load_module:
            so = module_path()
            args = " ".join(_quote(a) for a in self.module_args)
            lines.append(f"loadmodule {_quote(str(so))} {args}".rstrip())
        lines += self.extra_config
        text = "\n".join(lines) + "\n"
        # It holds the ACL password hashes: 0600 from creation, through an unpredictable
        # temporary name, so a link planted in the data dir cannot redirect the write.
        write_secret(self.config_file, text.encode())

    def _load_or_create_password(self, path: Path) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            password = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            return password
        except OSError as e:
            raise RedisStartError(f"cannot open redis password file {path}: {e.strerror}") from e
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RedisStartError(f"redis password file {path} is not a regular file")
            if stat.S_IMODE(st.st_mode) & 0o077:
                # Refused rather than chmod'ed: whoever could read it may already have
                # the password, so tightening the mode would hide a leak, not undo it.
                raise RedisStartError(
                    f"redis password file {path} is readable by others (mode "
                    f"{stat.S_IMODE(st.st_mode):o}); delete it so a new password is made "
                    "(or chmod 600 it if no one else could have read it)"
                )
            password = f.read(4096).strip()
        if len(password) < 16:
            raise RedisStartError(f"redis password file {path} is empty or too short")
        return password

    async def _refuse_if_already_serving(self) -> None:
        # Two servers on one data dir would corrupt the AOF; a live socket means one is up.
        if not self.socket_path.exists():
            return
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path)), 1.0
            )
        except (OSError, TimeoutError):
            return  # stale socket file from a crash; redis-server replaces it
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise RedisStartError(f"another redis-server is already serving {self.socket_path}")

    # ---- process life cycle ---------------------------------------------------------

    async def _spawn_and_wait(self) -> None:
        self._ready.clear()
        out = self.out_file.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.redis_server,
                str(self.config_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # a Ctrl-C to spirtd must not kill redis mid-write
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            raise RedisStartError(f"cannot run {self.redis_server}: {e}") from e
        finally:
            out.close()
        try:
            await self._wait_answering()
        except RedisStartError:
            await self._terminate()
            raise
        self._ready.set()
        self.log.info("redis-server pid %d ready at %s", self._proc.pid, self.url)

    async def _wait_answering(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        last_err = "no answer"
        delay = 0.01
        while True:
            if self._proc.returncode is not None:
                raise RedisStartError(
                    f"redis-server {_describe_exit(self._proc.returncode)} during startup: "
                    f"{self._why()}"
                )
            client = await self.client(
                socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
            )
            try:
                await client.ping()
                return
            except AuthenticationError as e:
                raise RedisStartError(f"redis-server rejected the {USERNAME} password: {e}") from e
            except (RedisError, OSError) as e:
                last_err = str(e)
                if "username-password" in last_err:  # redis-py may wrap auth errors
                    raise RedisStartError(
                        f"redis-server rejected the {USERNAME} password: {e}"
                    ) from e
            finally:
                await client.aclose()
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server did not answer within {self.start_timeout:.0f} s "
                    f"({last_err}): {self._why()}"
                )
            # Wake early if the process dies instead of sleeping the whole delay.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), delay)
            delay = min(delay * 2, 0.2)

    def _why(self) -> str:
        tail = _read_tail(self.log_file) or _read_tail(self.out_file)
        return tail or "no log output"

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        # Redis refuses a shutdown it cannot do cleanly at that moment ("Writing
        # initial AOF, can't exit", right after a full sync) and then waits for the
        # next signal: ask again every second rather than sit out stop_timeout.
        deadline = time.monotonic() + self.stop_timeout
        try:
            while True:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                try:
                    await asyncio.wait_for(proc.wait(), min(1.0, left))
                    break
                except TimeoutError:
                    continue
        except TimeoutError:
            self.log.warning(
                "redis-server did not stop within %.0f s; killing it", self.stop_timeout
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _supervise(self) -> None:
        backoff = self.min_backoff
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            self._ready.clear()
            if self._stopping:
                return
            self.last_exit = _describe_exit(code)
            if time.monotonic() - started > 30.0:
                backoff = self.min_backoff  # it ran fine for a while: not a crash loop
            while not self._stopping:
                self.log.warning(
                    "redis-server %s (%s); restarting in %.1f s",
                    self.last_exit,
                    self._why(),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                try:
                    self._prepare()
                    await self._spawn_and_wait()
                except RedisStartError as e:
                    self.last_exit = str(e)
                    continue
                self.restarts += 1
                break
