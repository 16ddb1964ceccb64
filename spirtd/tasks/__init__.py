"""Tasks: model + loss + dataset + evaluation, and the flat-vector view of parameters."""

from spirtd.tasks.base import (
    DATASET_OPTION,
    Evaluation,
    Gradient,
    Split,
    Task,
    TaskError,
    fixed_split,
)
from spirtd.tasks.loader import BUILTIN, load_task, task_class
from spirtd.tasks.sharding import Shard, ShardError, minibatch, minibatch_slice

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
