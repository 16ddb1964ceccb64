"""A task that fails the way an oversized one does when it is really built, for
tests/test_job_limits.py: it sizes fine (10 parameters), then its data load
raises MemoryError (``fail=data``) or its model build raises torch's allocation
RuntimeError (``fail=model``). Loaded by a daemon only as ``tests.failing_task:Failing``
with ``task_modules = ["tests"]``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spirtd.tasks import Split, Task
from spirtd.tasks.options import check_options, choice_option
from spirtd.tasks.sharding import ALL, Shard


class Failing(Task):
    name = "tests.failing_task:Failing"

    def __init__(self, shard: Shard = ALL, **options: Any) -> None:
        super().__init__(shard)
        opts = check_options(options, {"fail"}, self.name)
        self.fail = choice_option(opts, "fail", "data", {"data", "model"})

    def count_params(self) -> int:
        return 10

    def build_model(self) -> nn.Module:
        if self.fail == "model":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: no memory")
        return nn.Linear(3, 2, bias=True)

    def load_splits(self) -> tuple[Split, Split]:
        if self.fail == "data":
            raise MemoryError
        part = Split(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))
        return part, part
