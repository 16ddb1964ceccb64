"""Locates the SPIRT Redis module that `pip install` compiled from native/."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class ModuleNotBuilt(RuntimeError):
    pass


def module_path() -> Path:
    # find_spec only locates the file; it never imports it (it is not a Python
    # extension, it exports RedisModule_OnLoad).
    spec = importlib.util.find_spec("spirtd._native.spirt_redis")
    if spec is None or spec.origin is None:
        raise ModuleNotBuilt(
            "redis: the SPIRT Redis module is not built in this environment; install SPIRT "
            "with deploy/install-venv.sh (deploy/setup-debian.sh runs it), or give --redis-url "
            "for a Redis you run yourself"
        )
    return Path(spec.origin)
