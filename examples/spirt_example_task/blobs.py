# spirt_example_task/blobs.py  (examples/ in the SPIRT repository)
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spirtd.tasks import Shard, Split, Task, TaskError, fixed_split

CLASSES = 3
MAX_BYTES = 64 << 20


class Blobs(Task):
    """Points in the plane, three classes, a one-hidden-layer MLP."""

    name = "spirt_example_task.blobs:Blobs"
    # A node runs it only with --dataset spirt_example_task.blobs:Blobs=DIR.
    needs_dataset = True
    # Job defaults of its own; the rest are Task's (batch 64, SGD at 0.05, ...).
    rounds = 40
    eval_every = 5

    def __init__(
        self, shard: Shard, path: str | None = None, hidden: Any = 32, **unknown: Any
    ) -> None:
        super().__init__(shard)  # spirtd shards the training split for you
        if unknown:
            raise TaskError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))}")
        if path is None:
            raise TaskError(f"{self.name} needs --dataset {self.name}=DIR on this node")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= 4096:
            raise TaskError(f"{self.name}: hidden must be an integer in 1..4096, got {hidden!r}")
        self.path = Path(path)
        self.hidden = hidden

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hidden": self.hidden}

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, self.hidden), nn.ReLU(), nn.Linear(self.hidden, CLASSES))

    def load_splits(self) -> tuple[Split, Split]:
        file = self.path / "blobs.npz"
        if file.stat().st_size > MAX_BYTES:  # checked before anything is read
            raise TaskError(f"{self.name}: {file} is over {MAX_BYTES >> 20} MiB")
        with np.load(file) as f:  # arrays only: np.load refuses pickles
            x, y = f["x"], f["y"]
        if x.ndim != 2 or x.shape[1] != 2 or y.shape != (len(x),) or len(x) < 2:
            raise TaskError(f"{self.name}: blobs.npz needs x of N x 2 and y of N (N >= 2)")
        if y.min() < 0 or y.max() >= CLASSES:
            raise TaskError(f"{self.name}: labels must be in 0..{CLASSES - 1}")
        full = Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))
        train_rows, test_rows = fixed_split(len(full), 0.2, seed=0)
        return full.take(train_rows), full.take(test_rows)
