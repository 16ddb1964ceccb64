"""spirtd configuration: defaults < TOML file < command-line flags.

Every flag has a top-level key of the same name with '_' for '-'
(``--redis-url`` → ``redis_url``). Tunables without flags live in tables
(``[transport]``). Unknown keys are an error that names them: a typo must not
silently fall back to a default. A value of the wrong type, or outside its
range, is an error that names the key and what it accepts: ranges live on the
fields themselves (``_opt``), so the loader, the error message and
``deploy/spirtd.toml`` (checked by tests/test_config_validation.py) cannot drift.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from protocol.rounds import JobConfig, RoundConfig
from spirtd.tasks.remote import RemoteDataError, is_s3, parse_s3

# Tables of NAME = location ([datasets], [function_datasets]): their keys are
# dataset names, not settings.
DATASET_TABLES = ("datasets", "function_datasets")

# Rounds a closed round's gradient bodies outlive it ([training] body_rounds;
# spirtd/pubsub/retention.py releases them). A peer
# follows from bodies while it is at most JobConfig.lag_rounds (2) behind the
# newest round, beyond which it syncs the state instead; and peers hold
# gradients up to RoundConfig.future_window (2) rounds ahead of their own, so
# the round we close may be that far ahead of a peer still pulling an older
# one. 2 + 2 rounds, doubled for pulls that began before their round closed
# and end after (a slow link, a retry from another source): 8. With 4 peers
# that is about 40 bodies held per daemon instead of retain_s's worth.
BODY_ROUNDS = 8


class ConfigError(ValueError):
    """A fatal misconfiguration; the message names the setting."""


def _opt(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
    nonempty: bool = False,
) -> Any:
    """A setting with its allowed range: > gt, >= ge, <= le, one of choices."""
    meta = {"gt": gt, "ge": ge, "le": le, "choices": choices, "nonempty": nonempty or None}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def _allowed(f: Field[Any]) -> str:
    """What a field accepts, in words, for error messages."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    parts = []
    if "gt" in m:
        parts.append(f"> {m['gt']}")
    if "ge" in m:
        parts.append(f">= {m['ge']}")
    if "le" in m:
        parts.append(f"<= {m['le']}")
    if m.get("nonempty"):
        parts.append("a non-empty string")
    return " and ".join(parts)


def _check_ranges(obj: Any, where: str) -> None:
    for f in fields(obj):
        if not f.metadata:
            continue
        v = getattr(obj, f.name)
        if v is None:
            continue  # an optional setting left unset
        key = f"{where}{f.name}"
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, not {v!r}")
        m = f.metadata
        bad = (
            ("choices" in m and v not in m["choices"])
            or ("gt" in m and v <= m["gt"])
            or ("ge" in m and v < m["ge"])
            or ("le" in m and v > m["le"])
            or (m.get("nonempty") and not v)
        )
        if bad:
            raise ConfigError(f"{key}: must be {_allowed(f)}, not {v!r}")


@dataclass
class TransportConfig:
    handshake_timeout_s: float = _opt(5.0, gt=0)
    dial_timeout_s: float = _opt(5.0, gt=0)
    # A link that received nothing for this long is dropped; keepalives are sent
    # at a third of it so a healthy idle link never trips it.
    idle_timeout_s: float = _opt(30.0, gt=0)
    max_pending_handshakes: int = _opt(64, ge=1)
    max_links: int = _opt(1024, ge=1)
    # Frames queued per link before senders wait (backpressure) or drop (try_send).
    send_queue_frames: int = _opt(64, ge=1)
    # A chunk travels in one record, and records carry at most 1 MiB of payload.
    stream_chunk_bytes: int = _opt(256 * 1024, ge=4096, le=1 << 20)
    rekey_every_frames: int = _opt(1 << 20, ge=1, le=1 << 32)
    # Offer AES-256-GCM for records where libsodium finds hardware AES here; a
    # link uses it when both ends offer it, else ChaCha20-Poly1305 (false: always).
    aes_gcm: bool = True
    reconnect_min_s: float = _opt(0.2, gt=0)
    reconnect_max_s: float = _opt(10.0, gt=0)
    # Incoming streams open on one link at once; each holds at most one chunk in memory.
    max_streams_per_link: int = _opt(16, ge=1)
    # Before authentication (SECURITY.md): an inbound connection must send its
    # hello within hello_timeout_s; one source address holds at most
    # max_pending_per_source handshakes; a full table drops a connection that has
    # not said hello rather than refuse a newcomer; and the responder's key work
    # (X25519 + Ed25519) is budgeted per source address.
    hello_timeout_s: float = _opt(2.0, gt=0)
    max_pending_per_source: int = _opt(8, ge=1)
    handshakes_per_source_s: float = _opt(16.0, gt=0)
    handshake_burst_per_source: int = _opt(32, ge=1)
    # Messages one link may deliver; past these budgets the link stops reading
    # until the debt is repaid, and TCP pushes back on the sender.
    messages_per_s: float = _opt(500.0, gt=0)
    message_burst: int = _opt(2000, ge=1)
    message_bytes_per_s: int = _opt(2 * 1024 * 1024, ge=1)
    message_byte_burst: int = _opt(8 * 1024 * 1024, ge=1 << 20)


@dataclass
class InvokeConfig:
    """How gradient functions are invoked ([invoke] in the config file)."""

    function_name: str = _opt("spirt-gradient", nonempty=True)
    # Functions running at once. Locally that is also the warm worker count: one
    # per core keeps them from fighting over CPUs.
    concurrency: int = _opt(2, ge=1, le=1024)
    timeout_s: float = _opt(60.0, gt=0, le=900)  # 900 s: AWS Lambda's own ceiling
    memory_mb: int = _opt(1024, ge=128, le=10240)  # AWS Lambda's range
    # Local workers started in the background as the daemon starts (at most concurrency).
    # A node that learns of a job starts all of them anyway (FunctionsService.warm). At 0
    # the function's zygote too waits for a job, unless the daemon resumes one (cli.py).
    prewarm: int = _opt(0, ge=0)
    region: str = _opt("us-east-1", nonempty=True)
    endpoint_url: str = ""  # --functions lambda: override the AWS endpoint (e.g. a VPC endpoint)
    # What a job's invocations cost (spirtd/functions/cost.py): AWS Lambda's published
    # prices for this architecture, unless a price is given here (another region, a
    # function host of one's own).
    architecture: str = _opt("x86_64", choices=("x86_64", "arm64"))
    price_gb_s: float | None = _opt(None, ge=0)  # USD per GB-second
    price_per_million_requests: float | None = _opt(None, ge=0)  # USD


@dataclass
class PubSubConfig:
    """Where received pub/sub bodies are kept ([pubsub] in the config file)."""

    memory_mb: int = _opt(512, ge=0)  # bodies held in memory at once, in total
    body_memory_max_mb: int = _opt(64, ge=0)  # a larger body goes to a 0600 file instead
    disk_mb: int = _opt(16384, ge=0)  # bodies in files under DATA_DIR/pubsub, in total
    retain_s: float = _opt(300.0, gt=0)  # a delivered body is kept this long for peers pulling it
    # Body memory faulted in at start-up. A round lands (peers - 1) x gradient
    # bytes in every node; reserving that keeps the first round off fresh pages
    # (later rounds reuse the pool's pages either way).
    reserve_mb: int = _opt(0, ge=0)


@dataclass
class TrainingConfig:
    """How this node runs training rounds ([training] in the config file)."""

    # A round closes at its deadline (with a quorum) even if some members have not
    # sent their gradient: deadline = factor x median of recent round durations,
    # clamped to [floor, ceiling]; the first round uses the initial value.
    deadline_factor: float = _opt(3.0, gt=0)
    deadline_floor_s: float = _opt(2.0, gt=0)
    deadline_ceiling_s: float = _opt(120.0, gt=0)
    initial_deadline_s: float = _opt(60.0, gt=0)
    # At a deadline with a quorum, bodies whose announcement was accepted are waited
    # for up to this fraction of the deadline more (peers then close on one set).
    body_grace: float = _opt(0.5, ge=0)
    # Gradients for this many rounds ahead are held; later ones are refused.
    future_window: int = _opt(2, ge=0)
    # A closed round's gradient bodies are kept this many rounds after it (for
    # peers a few rounds behind that still follow from them), then freed;
    # pubsub.retain_s bounds them too. More than future_window + the job's
    # lag_rounds (2): see spirtd/pubsub/retention.py.
    body_rounds: int = _opt(BODY_ROUNDS, ge=1)
    # This node's gradient counts when at least this fraction of its functions succeed.
    min_slice_fraction: float = _opt(0.5, gt=0, le=1)
    # State checkpoints in DATA_DIR/training every this many rounds (and at stop); 0: off.
    checkpoint_every: int = _opt(10, ge=0)
    # State transfers this node serves at once to peers that sync from it.
    max_state_serves: int = _opt(2, ge=1)
    # A state transfer that has not arrived by then is abandoned for another peer.
    sync_timeout_s: float = _opt(30.0, gt=0)
    # The most memory one job's model may cost this node, every copy counted
    # (parameters, optimizer state, each member's gradient, working copies: the
    # formula is in spirtd/training/jobsize.py); a larger job is refused before
    # anything is built. 1 GiB lets a 24 GiB, 2-core host run several nodes (the
    # local cluster runs up to ten) and still fits ~10M parameters at 3 members,
    # more than 2 cores can train at a useful pace.
    max_model_mb: int = _opt(1024, ge=1)


@dataclass
class ControlConfig:
    """The control API ([control] in the config file). It always listens on
    DATA_DIR/api.sock (mode 0600: the daemon's user only); TCP is optional and
    then every request must carry the token."""

    # HOST:PORT to also serve the control API on; "" keeps it on the unix socket only.
    listen_tcp: str = ""
    # The bearer token TCP clients must send; "" means DATA_DIR/api.token, created
    # (random, mode 0600) at start when TCP is on and the file does not exist.
    token_file: str = ""


@dataclass
class RedisConfig:
    """The managed redis-server ([redis] in the config file; not with redis_url). The
    daemon always uses its unix socket; a TLS listener lets functions on other hosts
    (AWS Lambda, a function host) reach it as the functions' ACL user."""

    tls_port: int = _opt(0, ge=0, le=65535)  # 0: no TLS listener (the default)
    tls_bind: str = _opt("127.0.0.1", nonempty=True)  # an address of this host, or 0.0.0.0
    # PEM files, absolute paths; "" means the ones `spirtctl redis-tls` writes in
    # DATA_DIR/redis-tls/ (server.crt, server.key, ca.crt).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # the CA functions verify the server with; checks client certificates too
    tls_client_certs: bool = False  # true: clients must present a certificate tls_ca signed


@dataclass
class Config:
    data_dir: Path
    listen: str = "127.0.0.1:7946"
    advertise: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    redis_url: str | None = None
    functions: str = _opt("local", choices=("local", "lambda"))
    log_format: str = _opt("text", choices=("text", "json"))
    log_level: str = "info"
    cluster: str | None = None  # default: the cluster named in this node's certificate
    profile: str = _opt("lan", choices=("local", "lan", "wan"))  # membership timing profile
    transport: TransportConfig = field(default_factory=TransportConfig)
    invoke: InvokeConfig = field(default_factory=InvokeConfig)
    pubsub: PubSubConfig = field(default_factory=PubSubConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    # Where this node's datasets live, by name (--dataset NAME=DIR; the [datasets] table).
    datasets: dict[str, str] = field(default_factory=dict)
    # Where its functions find them, where that differs ([function_datasets]: a path on
    # a function host, or an s3:// location); by default, where the node has them.
    function_datasets: dict[str, str] = field(default_factory=dict)
    shard: str | None = None  # --shard I/N: train on shard I of N of a built-in dataset
    # Top-level packages a `module:attr` task may come from. Empty: built-in tasks only.
    task_modules: list[str] = field(default_factory=list)
    # Modules whose RULES list adds aggregation rules (spirtd.rules), imported at start.
    rule_modules: list[str] = field(default_factory=list)

    def validate(self) -> None:
        parse_hostport(self.listen, "listen")
        if self.advertise is not None:
            parse_hostport(self.advertise, "advertise")
        for b in self.bootstrap:
            parse_hostport(b, "bootstrap")
        _check_ranges(self, "")
        for table in (
            self.transport,
            self.invoke,
            self.pubsub,
            self.training,
            self.control,
            self.redis,
        ):
            _check_ranges(table, f"{_TABLES[type(table)]}.")
        self._validate_redis()
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(
                f"log_level: must be one of {', '.join(LOG_LEVELS).lower()}, not {self.log_level!r}"
            )
        tp = self.transport
        if tp.reconnect_max_s < tp.reconnect_min_s:
            raise ConfigError(
                f"transport.reconnect_max_s: must be >= transport.reconnect_min_s "
                f"({tp.reconnect_min_s}), not {tp.reconnect_max_s}"
            )
        ps = self.pubsub
        if ps.reserve_mb > ps.memory_mb:
            raise ConfigError(
                f"pubsub.reserve_mb: {ps.reserve_mb} exceeds pubsub.memory_mb ({ps.memory_mb})"
            )
        try:
            self.round_config().validate()
        except ValueError as e:
            raise ConfigError(f"training.{e}") from None
        tr = self.training
        follow = tr.future_window + JobConfig().lag_rounds
        if tr.body_rounds <= follow:
            raise ConfigError(
                f"training.body_rounds: must be > training.future_window + the job's "
                f"lag_rounds ({follow}): peers still follow from those rounds' bodies, "
                f"not {tr.body_rounds}"
            )
        if self.control.listen_tcp:
            parse_hostport(self.control.listen_tcp, "control.listen_tcp")
        for table in DATASET_TABLES:
            for name, path in getattr(self, table).items():
                where = f"{table}.{name}"
                if not isinstance(path, str) or not path:
                    raise ConfigError(f"{where}: must be a directory path or s3:// location")
                if is_s3(path):
                    try:
                        parse_s3(path)
                    except RemoteDataError as e:
                        raise ConfigError(f"{where}: {e}") from None
                elif not Path(path).is_absolute():
                    raise ConfigError(f"{where}: {path!r} must be an absolute path")
        if self.shard is not None:
            from spirtd.tasks.sharding import Shard, ShardError

            try:
                Shard.parse(self.shard)
            except ShardError as e:
                raise ConfigError(f"shard: {e}") from None

    def _validate_redis(self) -> None:
        rd = self.redis
        if rd.tls_port and self.redis_url:
            raise ConfigError(
                "redis.tls_port: [redis] configures the managed Redis; with redis_url, "
                "configure TLS on that server instead"
            )
        try:
            ipaddress.ip_address(rd.tls_bind)
        except ValueError:
            raise ConfigError(
                f"redis.tls_bind: must be an IP address of this host, not {rd.tls_bind!r}"
            ) from None
        for key in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(rd, key)
            if path and not Path(path).is_absolute():
                raise ConfigError(f"redis.{key}: {path!r} must be an absolute path")

    def round_config(self) -> RoundConfig:
        tr = self.training
        return RoundConfig(
            deadline_factor=tr.deadline_factor,
            deadline_floor_s=tr.deadline_floor_s,
            deadline_ceiling_s=tr.deadline_ceiling_s,
            initial_deadline_s=tr.initial_deadline_s,
            future_window=tr.future_window,
            body_grace=tr.body_grace,
        )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TABLES: dict[type, str] = {
    TransportConfig: "transport",
    InvokeConfig: "invoke",
    PubSubConfig: "pubsub",
    TrainingConfig: "training",
    ControlConfig: "control",
    RedisConfig: "redis",
}


def known_keys() -> dict[str, list[str]]:
    """Every key the loader accepts: table name ("" for the top level) -> keys."""
    out: dict[str, list[str]] = {"": []}
    for f in fields(Config):
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            out[f.name] = [g.name for g in fields(f.default_factory)]
        else:
            out[""].append(f.name)
    return out


def default_data_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY; INVOCATION_ID marks any unit.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.environ.get("INVOCATION_ID"):
        return Path("/var/lib/spirt")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "spirt"


def parse_hostport(text: str, setting: str) -> tuple[str, int]:
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"{setting}: expected HOST:PORT, got {text!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{setting}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _apply_table(target: Any, table: dict[str, Any], where: str) -> None:
    """Sets ``target``'s fields from ``table``; ``where`` prefixes keys in messages
    ("config " for the file, "--" for flags, plus the table path)."""
    known = {f.name: f for f in fields(target)}
    types = _field_types(type(target))
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}{key}: unknown setting")
        current = getattr(target, name)
        if name in DATASET_TABLES:
            setattr(target, name, _datasets(value, f"{where}{key}"))
            continue
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: must be a table ([{key}])")
            _apply_table(current, value, f"{where}{key}.")
            continue
        if name == "data_dir":
            if not isinstance(value, (str, Path)):
                raise ConfigError(f"{where}{key}: expected a directory path, got {value!r}")
            setattr(target, name, Path(value).expanduser())
            continue
        if name == "bootstrap" and isinstance(value, str):
            value = [value]
        setattr(target, name, _typed(value, types[name], f"{where}{key}"))


def _field_types(cls: type) -> dict[str, str]:
    # ``from __future__ import annotations`` leaves annotations as strings.
    return {f.name: str(f.type) for f in fields(cls)}


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _typed(value: Any, annotation: str, key: str) -> Any:
    """``value`` checked (and an int widened to float) against a field's annotation."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    if base.startswith("list["):
        inner = base[5:-1]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {inner}s, got {value!r}")
        return [_typed(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = {
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }.get(base)
    if ok is None:
        return value
    if not ok(value):
        raise ConfigError(f"{key}: expected {_TYPE_WORDS[base]}, got {value!r}")
    return float(value) if base == "float" else value


def _datasets(value: Any, where: str) -> dict[str, str]:
    """``[datasets]`` as a table, or ``--dataset NAME=DIR`` flags as a list."""
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise ConfigError(
                    f"{where}: expected NAME=DIR or NAME=s3://BUCKET/PREFIX, got {item!r}"
                )
            out[name] = path if is_s3(path) else str(Path(path).expanduser().resolve())
        return out
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f'{where}: must be a table of NAME = "DIR" or "s3://BUCKET/PREFIX"')
    return {k: v if is_s3(v) else str(Path(v).expanduser()) for k, v in value.items()}


def load(file: Path | None, overrides: dict[str, Any]) -> Config:
    cfg = Config(data_dir=default_data_dir())
    if file is not None:
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config: cannot read {file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {file} is not valid TOML: {e}") from None
        _apply_table(cfg, table, "config ")
    _apply_table(cfg, {k: v for k, v in overrides.items() if v is not None}, "--")
    cfg.validate()
    return cfg
