"""Settings of the local Lambda-compatible runtime, with documented defaults."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from spirtd.functions.runtime import lambda_errors

GRADIENT_FUNCTION = "spirt-gradient"
GRADIENT_HANDLER = "spirtd.functions.gradient:handler"
# Which packages a ``module:attribute`` task may come from, comma separated; unset
# means built-in tasks only (importing a module runs its code).
TASK_MODULES_ENV = "SPIRT_TASK_MODULES"


class RuntimeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class FunctionSpec:
    """One deployed function, like a Lambda function's configuration."""

    handler: str = GRADIENT_HANDLER
    # Lambda's own default is 3 s; a gradient over a real minibatch needs more.
    timeout_s: float = 60.0
    # Per worker: the worker's data segment limit (see worker.set_memory_limit).
    memory_mb: int = 1024
    # Extra environment variables for the worker, like Lambda's.
    environment: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.handler:
            raise RuntimeConfigError(f"handler must be 'module:function', got {self.handler!r}")
        if not (0.01 <= self.timeout_s <= 900):
            raise RuntimeConfigError("timeout_s must be in [0.01, 900] (Lambda's maximum)")
        if not (128 <= self.memory_mb <= 10240):
            raise RuntimeConfigError("memory_mb must be in 128..10240 (Lambda's range)")


@dataclass(frozen=True)
class RuntimeConfig:
    functions: Mapping[str, FunctionSpec] = field(
        default_factory=lambda: {GRADIENT_FUNCTION: FunctionSpec()}
    )
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port; read the real one from LocalRuntime.endpoint_url
    # Invocations running at once, over all functions; more get 429 like Lambda.
    concurrency: int = 2
    # Workers started per function by start(), so the first round has no cold start.
    prewarm: int = 0
    # torch/OpenMP threads per worker: one, so N workers use N cores without fighting.
    threads_per_worker: int = 1
    # A worker that has not imported its handler by then is killed.
    init_timeout_s: float = 120.0
    max_request_bytes: int = lambda_errors.MAX_SYNC_REQUEST
    max_event_bytes: int = lambda_errors.MAX_ASYNC_REQUEST
    max_response_bytes: int = lambda_errors.MAX_RESPONSE
    # Event (async) invocations accepted but not yet running (retries waiting
    # included); more get 429.
    event_queue: int = 256
    # A failed Event invocation is retried after each of these delays, as Lambda
    # retries twice (after about one and two minutes).
    event_retry_delays_s: tuple[float, ...] = (60.0, 120.0)
    # An Event invocation still waiting for a slot after this is dropped (Lambda's
    # default maximum event age is 6 hours).
    event_max_age_s: float = 6 * 3600.0
    # Accept only requests signed (AWS SigV4) with the runtime's access key, which
    # is random per start unless given here (see sigv4.py for why).
    require_signature: bool = True
    access_key: tuple[str, str] | None = None
    # Requests must be signed for this region (and the "lambda" service), as AWS's
    # endpoints refuse a signature scoped for another.
    region: str = "us-east-1"
    # Requests whose signature header passed but whose body is still being read and
    # checked; more get 429, so no one can make the runtime buffer many bodies.
    max_unverified: int = 8
    # Signatures remembered to refuse replays within the clock window.
    replay_cache: int = 32768
    account_id: str = "000000000000"
    # HTTPS: the server's certificate chain and key (PEM files). Required to listen
    # anywhere but loopback (a function host, host.py): the signatures would stop a
    # stranger from invoking, but not from reading events and results on the wire.
    tls_cert: str = ""
    tls_key: str = ""
    # With it, clients must also present a certificate this CA (PEM) signed.
    tls_client_ca: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def __post_init__(self) -> None:
        try:
            loopback = self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        if bool(self.tls_cert) != bool(self.tls_key):
            raise RuntimeConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise RuntimeConfigError("tls_client_ca needs tls_cert and tls_key")
        if not loopback and not (self.tls and self.require_signature):
            raise RuntimeConfigError(
                f"the runtime listens on loopback only, not {self.host}, unless it has TLS "
                "(tls_cert, tls_key) and requires signatures"
            )
        if not re.fullmatch(r"\d{12}", self.account_id):
            raise RuntimeConfigError(f"account_id must be 12 digits, not {self.account_id!r}")
        if not self.functions:
            raise RuntimeConfigError("at least one function is needed")
        for name in self.functions:
            if not (1 <= len(name) <= 64) or not all(c.isalnum() or c in "-_" for c in name):
                raise RuntimeConfigError(f"bad function name {name!r} (letters, digits, - and _)")
        if not (1 <= self.concurrency <= 1024):
            raise RuntimeConfigError("concurrency must be in 1..1024")
        if not (0 <= self.prewarm <= self.concurrency):
            raise RuntimeConfigError("prewarm must be in 0..concurrency")
        if not (1 <= self.threads_per_worker <= 256):
            raise RuntimeConfigError("threads_per_worker must be in 1..256")
        if not (1 <= self.event_queue <= 100_000):
            raise RuntimeConfigError("event_queue must be in 1..100000")
        if len(self.event_retry_delays_s) > 2 or any(
            not (0 <= d <= 3600) for d in self.event_retry_delays_s
        ):
            raise RuntimeConfigError("event_retry_delays_s: at most 2 delays of 0..3600 s")
        if not (1 <= self.max_unverified <= 1024):
            raise RuntimeConfigError("max_unverified must be in 1..1024")
        if not (64 <= self.replay_cache <= 10_000_000):
            raise RuntimeConfigError("replay_cache must be in 64..10000000")
        if not self.region or not all(c.isalnum() or c == "-" for c in self.region):
            raise RuntimeConfigError(f"bad region {self.region!r}")
        if not (0 <= self.port <= 65535):
            raise RuntimeConfigError("port must be in 0..65535")
