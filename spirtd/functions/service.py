"""The node's serverless backend: the embedded Lambda-compatible runtime
(`--functions local`) or AWS Lambda (`--functions lambda`), behind one invoker.

The trainer only ever talks to ``self.invoker``; which endpoint answers is a
deployment choice, not a code path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from spirtd.config import ConfigError
from spirtd.functions.cost import LAMBDA_PRICES, Prices, prices_for
from spirtd.functions.credentials import CredentialError, bindings_env
from spirtd.functions.invoker import Invoker
from spirtd.functions.local import runtime_config, task_modules_env
from spirtd.functions.runtime import zygote_client
from spirtd.functions.runtime.server import LocalRuntime

if TYPE_CHECKING:
    from spirtd.nodeapi import NodeApi
    from spirtd.redis.service import RedisService

log = logging.getLogger("spirtd.functions")


class FunctionsService:
    name = "functions"

    def __init__(self, node: NodeApi, redis: RedisService | None = None) -> None:
        self.node = node
        # Which Redis the local functions may use, and how they log in there, is
        # their configuration (environment), never something an event says.
        self.redis = redis
        self.runtime: LocalRuntime | None = None
        self.invoker: Invoker | None = None
        # The price table a job's cost is reckoned at ([invoke] architecture, prices).
        self.prices: Prices = LAMBDA_PRICES["x86_64"]

    async def start(self) -> None:
        cfg = self.node.config.invoke
        backend = self.node.config.functions
        if backend == "local":
            environment: dict[str, str] = {}
            if self.redis is not None:
                try:
                    environment = bindings_env([self.redis.function_binding()])
                except CredentialError as e:
                    raise ConfigError(f"functions: {e}") from None
            environment.update(task_modules_env(self.node.config))
            self.runtime = LocalRuntime(runtime_config(self.node.config, environment))
            endpoint: str | None = await self.runtime.start()
            if cfg.prewarm or zygote_client.prestarted():
                # In the background: the node is up and joins meanwhile. A zygote
                # started with the process (local.prestart) is taken over here.
                # Otherwise its imports (torch: seconds of CPU, hundreds of MB) wait
                # until a job is known (warm()).
                self.runtime.warm(cfg.prewarm)
            # The runtime accepts only requests signed with its per-start key.
            credentials: tuple[str, str] | None = self.runtime.credentials
            log.info("local function runtime at %s (%d workers)", endpoint, cfg.concurrency)
        else:
            endpoint = cfg.endpoint_url or None  # None: the AWS Lambda endpoint
            credentials = None  # boto3's own chain: env, instance role, ...
            log.info("functions on AWS Lambda: %s in %s", cfg.function_name, cfg.region)
        self.invoker = Invoker(
            endpoint,
            cfg.function_name,
            concurrency=cfg.concurrency,
            region=cfg.region,
            credentials=credentials,
            attempt_timeout_s=cfg.timeout_s + 30.0,
            memory_mb=cfg.memory_mb,
        )
        self.prices = prices_for(cfg.architecture, cfg.price_gb_s, cfg.price_per_million_requests)

    def warm(self) -> None:
        """A job is coming (started here, received, or resumed after a restart): starts
        the local workers now, in the background, while the job is prepared and its
        state synced. A cold worker spends seconds importing torch; a node that joins
        or restarts into a running job would otherwise wait for that after its sync."""
        if self.runtime is not None:
            self.runtime.warm(self.node.config.invoke.concurrency)

    async def stop(self) -> None:
        if self.invoker is not None:
            await self.invoker.close()
        if self.runtime is not None:
            await self.runtime.stop()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.node.config.functions,
            "in_flight": self.invoker.in_flight if self.invoker is not None else 0,
            "function": self.node.config.invoke.function_name,
        }
        if self.runtime is not None:
            stats = self.runtime.stats()
            out["endpoint"] = stats["endpoint"]
            out["cold_starts"] = stats["cold_starts"]
            out["throttles"] = stats["throttles"]
            # What the embedded runtime billed (REPORT lines summed), every job and
            # warm-up call since the daemon started: bench.cost reads it.
            out["billed"] = self.runtime.billing().get(self.node.config.invoke.function_name)
        return {"functions": out}
