"""The embedded function runtime's configuration, from the node's; and its zygote
started with the daemon's process.

Light on purpose (no torch, no aiohttp): ``prestart`` runs before the daemon imports
anything heavy, so the zygote's imports (torch) overlap the daemon's own start
instead of following it.
"""

from __future__ import annotations

from collections.abc import Mapping

from spirtd.config import Config
from spirtd.functions.runtime import zygote_client
from spirtd.functions.runtime.config import (
    TASK_MODULES_ENV,
    FunctionSpec,
    RuntimeConfig,
    RuntimeConfigError,
)


def runtime_config(config: Config, environment: Mapping[str, str]) -> RuntimeConfig:
    """The runtime a node with ``config`` runs, its function's variables ``environment``."""
    cfg = config.invoke
    return RuntimeConfig(
        functions={
            cfg.function_name: FunctionSpec(
                timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, environment=environment
            )
        },
        concurrency=cfg.concurrency,
        # The invoker signs for this region; the runtime accepts no other.
        region=cfg.region,
    )


def task_modules_env(config: Config) -> dict[str, str]:
    """The workers import a job's `module:attr` task themselves, so they get the
    node's allowlist; set even when empty, so an inherited variable cannot widen it."""
    return {TASK_MODULES_ENV: ",".join(config.task_modules)}


def prestart(config: Config) -> None:
    """Starts the local gradient function's zygote now (``--functions local``), for
    the runtime to take over once it starts. Its Redis binding, known only then,
    goes with each fork (zygote_client.LATE_ENV)."""
    if config.functions != "local":
        return
    try:
        rt = runtime_config(config, task_modules_env(config))
    except RuntimeConfigError:
        return  # the functions service reports it as it starts
    for name, spec in rt.functions.items():
        zygote_client.prestart(name, spec, rt)
