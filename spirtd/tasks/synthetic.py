"""``synthetic``: Gaussian blobs and an MLP, generated from a seed.

Tiny by default so tests run in milliseconds; its size options make the gradient
work as heavy as a benchmark needs without any data on disk.

Options (default, allowed range): ``samples`` (512, 8..10,000,000), ``features``
(16, 1..65,536), ``classes`` (4, 2..10,000), ``hidden`` (32, 1..65,536), ``depth``
(1 hidden layer, 0..16), ``data_seed`` (0, 0..2^63-1), ``noise`` (1.0, 0..100).
Each is bounded alone, and the data they make together is bounded at 1 GiB
(``data_peak_bytes``); the model they make together is bounded by the node's
``[training] max_model_mb`` when a job is checked (spirtd/training/jobsize.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from spirtd.tasks.base import Split, Task, TaskError, fixed_split
from spirtd.tasks.options import check_options, float_option, int_option
from spirtd.tasks.sharding import ALL, Shard

_OPTIONS = {"samples", "features", "classes", "hidden", "depth", "data_seed", "noise"}
MAX_DATA_BYTES = 1 << 30


def data_peak_bytes(samples: int, features: int, classes: int) -> int:
    """The most memory ``load_splits`` holds at once (measured with tracemalloc):
    per sample x feature the float64 noise, its float32 copy and the gathered class
    centres (16 bytes); per class x feature the centres in float64 and float32 (12);
    per sample the labels and the split's row numbers (about 40; 64 counted)."""
    return 16 * samples * features + 12 * classes * features + 64 * samples


class SyntheticTask(Task):
    name = "synthetic"
    rounds = 30
    lr = 0.1

    def __init__(self, shard: Shard = ALL, **options: Any) -> None:
        super().__init__(shard)
        opts = check_options(options, _OPTIONS, self.name)
        self.samples = int_option(opts, "samples", 512, 8, 10_000_000)
        self.features = int_option(opts, "features", 16, 1, 65_536)
        self.classes = int_option(opts, "classes", 4, 2, 10_000)
        self.hidden = int_option(opts, "hidden", 32, 1, 65_536)
        self.depth = int_option(opts, "depth", 1, 0, 16)
        self.data_seed = int_option(opts, "data_seed", 0, 0, 2**63 - 1)
        self.noise = float_option(opts, "noise", 1.0, 0.0, 100.0)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "samples": self.samples,
            "features": self.features,
            "classes": self.classes,
            "hidden": self.hidden,
            "depth": self.depth,
            "data_seed": self.data_seed,
            "noise": self.noise,
        }

    def build_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = self.features
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, self.classes))
        return nn.Sequential(*layers)

    def load_splits(self) -> tuple[Split, Split]:
        # Checked here, not in __init__, so that a job is sized by its model first
        # (the larger cost); either way before any of the data is allocated.
        need = data_peak_bytes(self.samples, self.features, self.classes)
        if need > MAX_DATA_BYTES:
            raise TaskError(
                f"synthetic: samples={self.samples} features={self.features} "
                f"classes={self.classes} would take {need / 2**20:.0f} MiB to generate, "
                f"over the task's {MAX_DATA_BYTES >> 20} MiB"
            )
        rng = np.random.default_rng(self.data_seed)
        centers = rng.normal(0.0, 2.0, size=(self.classes, self.features)).astype(np.float32)
        y = rng.integers(0, self.classes, size=self.samples)
        x = centers[y] + rng.normal(0.0, self.noise, size=(self.samples, self.features)).astype(
            np.float32
        )
        tx = torch.from_numpy(x.astype(np.float32))
        ty = torch.from_numpy(y.astype(np.int64))
        train_rows, test_rows = fixed_split(self.samples, 0.2, seed=self.data_seed + 1)
        full = Split(tx, ty)
        return full.take(train_rows), full.take(test_rows)
