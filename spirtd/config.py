"""spirtd configuration: defaults < TOML file < command-line flags.

Every flag has a top-level key of the same name with '_' for '-'
(``--redis-url`` → ``redis_url``). Tunables without flags live in tables
(``[transport]``). Unknown keys are an error that names them: a typo must not
silently fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from protocol.rounds import RoundConfig


class ConfigError(ValueError):
    """A fatal misconfiguration; the message names the setting."""


@dataclass
class TransportConfig:
    handshake_timeout_s: float = 5.0
    dial_timeout_s: float = 5.0
    # A link that received nothing for this long is dropped; keepalives are sent
    # at a third of it so a healthy idle link never trips it.
    idle_timeout_s: float = 30.0
    max_pending_handshakes: int = 64
    max_links: int = 1024
    # Frames queued per link before senders wait (backpressure) or drop (try_send).
    send_queue_frames: int = 64
    stream_chunk_bytes: int = 256 * 1024
    rekey_every_frames: int = 1 << 20
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    # Incoming streams open on one link at once; each holds at most one chunk in memory.
    max_streams_per_link: int = 16


@dataclass
class InvokeConfig:
    """How gradient functions are invoked ([invoke] in the config file)."""

    function_name: str = "spirt-gradient"
    # Functions running at once. Locally that is also the warm worker count: one
    # per core keeps them from fighting over CPUs.
    concurrency: int = 2
    timeout_s: float = 60.0
    memory_mb: int = 1024
    prewarm: int = 0  # local workers started with the daemon (no cold start in round 1)
    region: str = "us-east-1"
    endpoint_url: str = ""  # --functions lambda: override the AWS endpoint (e.g. a VPC endpoint)


@dataclass
class PubSubConfig:
    """Where received pub/sub bodies are kept ([pubsub] in the config file)."""

    memory_mb: int = 512  # bodies held in memory at once, in total
    body_memory_max_mb: int = 64  # a larger body goes to a 0600 file instead
    disk_mb: int = 16384  # bodies in files under DATA_DIR/pubsub, in total
    retain_s: float = 300.0  # a delivered body is kept this long for peers still pulling it
    # Body memory faulted in at start-up. A round lands (peers - 1) x gradient
    # bytes in every node; reserving that keeps the first round off fresh pages
    # (later rounds reuse the pool's pages either way).
    reserve_mb: int = 0


@dataclass
class TrainingConfig:
    """How this node runs training rounds ([training] in the config file)."""

    # A round closes at its deadline (with a quorum) even if some members have not
    # sent their gradient: deadline = factor x median of recent round durations,
    # clamped to [floor, ceiling]; the first round uses the initial value.
    deadline_factor: float = 3.0
    deadline_floor_s: float = 2.0
    deadline_ceiling_s: float = 120.0
    initial_deadline_s: float = 60.0
    # Gradients for this many rounds ahead are held; later ones are refused.
    future_window: int = 2
    # This node's gradient counts when at least this fraction of its functions succeed.
    min_slice_fraction: float = 0.5
    # State checkpoints in DATA_DIR/training every this many rounds (and at stop); 0: off.
    checkpoint_every: int = 10
    # State transfers this node serves at once to peers that sync from it.
    max_state_serves: int = 2
    # A state transfer that has not arrived by then is abandoned for another peer.
    sync_timeout_s: float = 30.0


@dataclass
class Config:
    data_dir: Path
    listen: str = "127.0.0.1:7946"
    advertise: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    redis_url: str | None = None
    functions: str = "local"
    log_format: str = "text"
    log_level: str = "info"
    cluster: str | None = None  # default: the cluster named in this node's certificate
    profile: str = "lan"  # membership profile: local | lan | wan
    transport: TransportConfig = field(default_factory=TransportConfig)
    invoke: InvokeConfig = field(default_factory=InvokeConfig)
    pubsub: PubSubConfig = field(default_factory=PubSubConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # Where this node's datasets live, by name (--dataset NAME=DIR; the [datasets] table).
    datasets: dict[str, str] = field(default_factory=dict)
    shard: str | None = None  # --shard I/N: train on shard I of N of a built-in dataset
    # Top-level packages a `module:attr` task may come from. Empty: built-in tasks only.
    task_modules: list[str] = field(default_factory=list)

    def validate(self) -> None:
        parse_hostport(self.listen, "listen")
        if self.advertise is not None:
            parse_hostport(self.advertise, "advertise")
        for b in self.bootstrap:
            parse_hostport(b, "bootstrap")
        if self.functions not in ("local", "lambda"):
            raise ConfigError(f"functions: must be 'local' or 'lambda', not {self.functions!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be 'text' or 'json', not {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")
        if self.profile not in ("local", "lan", "wan"):
            raise ConfigError(f"profile: must be local, lan or wan, not {self.profile!r}")
        ps = self.pubsub
        for name in ("memory_mb", "body_memory_max_mb", "disk_mb", "reserve_mb"):
            if getattr(ps, name) < 0:
                raise ConfigError(f"pubsub.{name}: must not be negative")
        if ps.reserve_mb > ps.memory_mb:
            raise ConfigError(
                f"pubsub.reserve_mb: {ps.reserve_mb} exceeds pubsub.memory_mb ({ps.memory_mb})"
            )
        if ps.retain_s <= 0:
            raise ConfigError("pubsub.retain_s: must be positive")
        tr = self.training
        try:
            self.round_config().validate()
        except ValueError as e:
            raise ConfigError(f"training.{e}") from None
        if not 0.0 < tr.min_slice_fraction <= 1.0:
            raise ConfigError("training.min_slice_fraction: must be in (0, 1]")
        if tr.checkpoint_every < 0:
            raise ConfigError("training.checkpoint_every: must be >= 0 (0 turns it off)")
        if tr.max_state_serves < 1:
            raise ConfigError("training.max_state_serves: must be >= 1")
        if tr.sync_timeout_s <= 0:
            raise ConfigError("training.sync_timeout_s: must be positive")
        for name, path in self.datasets.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(f"datasets.{name}: must be a directory path")
            if not Path(path).is_absolute():
                raise ConfigError(f"datasets.{name}: {path!r} must be an absolute path")
        if self.shard is not None:
            from spirtd.tasks.sharding import Shard, ShardError

            try:
                Shard.parse(self.shard)
            except ShardError as e:
                raise ConfigError(f"shard: {e}") from None

    def round_config(self) -> RoundConfig:
        tr = self.training
        return RoundConfig(
            deadline_factor=tr.deadline_factor,
            deadline_floor_s=tr.deadline_floor_s,
            deadline_ceiling_s=tr.deadline_ceiling_s,
            initial_deadline_s=tr.initial_deadline_s,
            future_window=tr.future_window,
        )


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
    known = {f.name: f for f in fields(target)}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}{key}: unknown setting")
        current = getattr(target, name)
        if name == "datasets":
            value = _datasets(value, f"{where}{key}")
        if isinstance(current, (TransportConfig, InvokeConfig, PubSubConfig, TrainingConfig)):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: must be a table")
            _apply_table(current, value, f"{where}{key}.")
            continue
        if name == "data_dir":
            value = Path(value).expanduser()
        elif name == "bootstrap" and isinstance(value, str):
            value = [value]
        expected = type(current) if current is not None else None
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is not None and expected is not Path and not isinstance(value, expected):
            raise ConfigError(f"{where}{key}: expected {expected.__name__}, got {value!r}")
        setattr(target, name, value)


def _datasets(value: Any, where: str) -> dict[str, str]:
    """``[datasets]`` as a table, or ``--dataset NAME=DIR`` flags as a list."""
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"{where}: expected NAME=DIR, got {item!r}")
            out[name] = str(Path(path).expanduser().resolve())
        return out
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f'{where}: must be a table of NAME = "DIR"')
    return {k: str(Path(v).expanduser()) for k, v in value.items()}


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
