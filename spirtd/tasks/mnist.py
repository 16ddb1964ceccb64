"""``mnist``: the standard MNIST IDX files, read from a local directory.

Nothing is downloaded: point the task at a directory holding
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte`` (each may also be ``.gz``). The train files are the
train split and the t10k files the test split, as the dataset defines them.

Options (default, allowed range): ``path`` (required; set from the node's
``--dataset mnist=DIR``, never from a job), ``model`` (``mlp``; ``mlp`` or ``cnn``),
``hidden`` (128, 1..8,192: the hidden layer's width). At most 1,000,000 images are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spirtd.tasks.base import Split, Task, TaskError
from spirtd.tasks.dataset import DATASET_OPTION
from spirtd.tasks.idx import read_idx
from spirtd.tasks.options import check_options, choice_option, int_option
from spirtd.tasks.sharding import ALL, Shard

_OPTIONS = {DATASET_OPTION, "model", "hidden"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The real dataset is 60k+10k images; allow more, but not unbounded.
_MAX_IMAGES = 1_000_000


class MnistTask(Task):
    name = "mnist"
    needs_dataset = True
    rounds = 300
    optimizer = "adam"
    lr = 0.001
    momentum = 0.0
    eval_every = 25

    def __init__(self, shard: Shard = ALL, **options: Any) -> None:
        super().__init__(shard)
        opts = check_options(options, _OPTIONS, self.name)
        path = opts.get(DATASET_OPTION)
        if not isinstance(path, str) or not path:
            raise TaskError(
                f"task 'mnist' needs option {DATASET_OPTION}=DIR (the directory of IDX files)"
            )
        self.path = Path(path)
        self.arch = choice_option(opts, "model", "mlp", {"mlp", "cnn"})
        self.hidden = int_option(opts, "hidden", 128, 1, 8192)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            DATASET_OPTION: str(self.path),
            "model": self.arch,
            "hidden": self.hidden,
        }

    def build_model(self) -> nn.Module:
        if self.arch == "cnn":
            return nn.Sequential(
                nn.Unflatten(1, (1, 28, 28)),
                nn.Conv2d(1, 16, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, 10),
            )
        return nn.Sequential(nn.Linear(784, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def _find(self, stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            p = self.path / name
            if p.is_file():
                return p
        raise TaskError(f"mnist: {stem}[.gz] not found in {self.path}")

    def _read(self, which: str) -> Split:
        images_name, labels_name = _FILES[which]
        images = read_idx(self._find(images_name), max_bytes=_MAX_IMAGES * 28 * 28)
        labels = read_idx(self._find(labels_name), max_bytes=_MAX_IMAGES)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise TaskError(
                f"mnist: {images_name} must be uint8 N x 28 x 28, got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise TaskError(f"mnist: {labels_name} must be a uint8 vector")
        if labels.shape[0] != images.shape[0]:
            raise TaskError(f"mnist: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and int(labels.max()) > 9:
            raise TaskError(f"mnist: label {int(labels.max())} is not a digit")
        x = torch.from_numpy(images.reshape(images.shape[0], 784).astype(np.float32) / 255.0)
        return Split(x, torch.from_numpy(labels.astype(np.int64)))

    def load_splits(self) -> tuple[Split, Split]:
        return self._read("train"), self._read("test")
