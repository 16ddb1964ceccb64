"""Tasks: model + loss + dataset + evaluation, and the flat-vector view of parameters.

The names below are loaded on first use: ``spirtd.tasks.sharding`` (numpy only)
must not pull in torch through this package, since the daemon's config check
parses ``--shard`` before it starts its function zygote (spirtd/functions/local.py).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spirtd.tasks.base import (
        Evaluation,
        Gradient,
        Split,
        Task,
        TaskError,
        fixed_split,
    )
    from spirtd.tasks.dataset import DATASET_OPTION
    from spirtd.tasks.loader import BUILTIN, load_task, task_class
    from spirtd.tasks.sharding import Shard, ShardError, minibatch, minibatch_slice

_WHERE = {
    "DATASET_OPTION": "dataset",
    "Evaluation": "base",
    "Gradient": "base",
    "Split": "base",
    "Task": "base",
    "TaskError": "base",
    "fixed_split": "base",
    "BUILTIN": "loader",
    "load_task": "loader",
    "task_class": "loader",
    "Shard": "sharding",
    "ShardError": "sharding",
    "minibatch": "sharding",
    "minibatch_slice": "sharding",
}

__all__ = [
    "BUILTIN",
    "DATASET_OPTION",
    "Evaluation",
    "Gradient",
    "Shard",
    "ShardError",
    "Split",
    "Task",
    "TaskError",
    "fixed_split",
    "load_task",
    "minibatch",
    "minibatch_slice",
    "task_class",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
