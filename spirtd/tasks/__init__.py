"""Tasks: model + loss + dataset + evaluation, and the flat-vector view of parameters."""

from spirtd.tasks.base import Evaluation, Gradient, Split, Task, TaskError, fixed_split
from spirtd.tasks.loader import BUILTIN, load_task
from spirtd.tasks.sharding import Shard, ShardError, minibatch, minibatch_slice

__all__ = [
    "BUILTIN",
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
]
