"""The Task contract: a model, its loss, its data (fixed train/test split) and its
evaluation, plus the flat-parameter-vector view the rest of SPIRT works with.

Redis holds a model as one flat float32 vector (see spirtd/tensorfmt.py). The
order of that vector is the order of ``model.named_parameters()``, which is fixed
by the model's code, so every peer and every function agrees on it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from spirtd.tasks.sharding import ALL, Shard


class TaskError(ValueError):
    """A task was named or configured wrongly, or given data that does not fit it."""


# The job settings (spirtd/training/job.py JobSpec fields) a task class gives defaults for.
JOB_DEFAULTS = (
    "rounds",
    "batch_size",
    "functions_per_round",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "eval_every",
    "inner_steps",
    "compression",
    "outer_lr",
    "outer_momentum",
)


@dataclass(frozen=True)
class Split:
    """One part of a dataset as two tensors: inputs ``x`` and targets ``y``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise TaskError(f"{self.x.shape[0]} inputs but {self.y.shape[0]} targets")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, rows: np.ndarray | Sequence[int]) -> Split:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return Split(self.x.index_select(0, idx), self.y.index_select(0, idx))


@dataclass(frozen=True)
class Gradient:
    values: np.ndarray  # flat float32, same length and order as the parameters
    loss: float
    samples: int


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float | None
    samples: int


class Task(ABC):
    """Subclasses give ``build_model`` and ``load_splits``; the rest is shared.

    ``load_splits`` must return the same (train, test) split every time on every
    machine: the split is part of the task's definition, not of a run.
    """

    name: ClassVar[str] = ""
    # Classification tasks get an accuracy in ``evaluate``.
    classification: ClassVar[bool] = True
    # A node refuses a job for this task unless it has ``--dataset NAME=DIR`` for it,
    # and builds the task with that directory as option ``DATASET_OPTION``.
    needs_dataset: ClassVar[bool] = False

    # What a job of this task runs with when `spirtctl train start` names only the
    # task (the README's "Bring your own model" lists them). A subclass overrides
    # any of them as class attributes; ``job_defaults`` reads them.
    rounds: ClassVar[int] = 100
    batch_size: ClassVar[int] = 64
    functions_per_round: ClassVar[int] = 2
    optimizer: ClassVar[str] = "sgd"
    lr: ClassVar[float] = 0.05
    momentum: ClassVar[float] = 0.9
    weight_decay: ClassVar[float] = 0.0
    eval_every: ClassVar[int] = 10
    # Outer rounds: 1 inner step is the plain synchronous round.
    inner_steps: ClassVar[int] = 1
    compression: ClassVar[str] = "none"
    outer_lr: ClassVar[float] = 0.7
    outer_momentum: ClassVar[float] = 0.9

    @classmethod
    def job_defaults(cls) -> dict[str, Any]:
        """The job settings this task class gives when a request leaves them out."""
        return {k: getattr(cls, k) for k in JOB_DEFAULTS}

    def __init__(self, shard: Shard = ALL) -> None:
        self.shard = shard
        self._lock = threading.Lock()
        self._splits: tuple[Split, Split] | None = None
        self._model: nn.Module | None = None

    # --- what a task defines -------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def load_splits(self) -> tuple[Split, Split]:
        """The whole dataset's fixed (train, test) split, before sharding."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (mean, so slice gradients average by sample count)."""
        return nn.functional.cross_entropy(output, target)

    def describe(self) -> dict[str, Any]:
        """The options that define this task instance (reported, and used as a cache key)."""
        return {"name": self.name, "shard": str(self.shard)}

    # --- data ------------------------------------------------------------------
    def _load(self) -> tuple[Split, Split]:
        with self._lock:
            if self._splits is None:
                train, test = self.load_splits()
                self._splits = (train.take(self.shard.rows(len(train))), test)
            return self._splits

    @property
    def train(self) -> Split:
        """This peer's shard of the training split."""
        return self._load()[0]

    @property
    def test(self) -> Split:
        """The whole test split (every peer evaluates on the same data)."""
        return self._load()[1]

    # --- parameters as one flat vector ----------------------------------------
    @property
    def model(self) -> nn.Module:
        """A scratch model instance reused for gradient and evaluation work."""
        with self._lock:
            if self._model is None:
                self._model = self.build_model()
            return self._model

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def count_params(self) -> int:
        """The model's parameter count without allocating it: the model is built on
        torch's meta device (shapes only), so a job can be sized, and refused, before
        a model of any size exists. A task whose ``build_model`` cannot run there
        overrides this with its own arithmetic."""
        try:
            with torch.device("meta"):
                model = self.build_model()
        except Exception as e:  # user code: any failure there means "cannot size"
            raise TaskError(
                f"task {self.name!r}: its model cannot be sized before it is built "
                f"({type(e).__name__}: {e}); give the task a count_params() method"
            ) from None
        return sum(p.numel() for p in model.parameters())

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(p.shape)) for n, p in self.model.named_parameters()]

    @staticmethod
    def flatten(model: nn.Module) -> np.ndarray:
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return flat.to(torch.float32).numpy().copy()

    def load_params(self, params: np.ndarray) -> nn.Module:
        """Copies a flat vector into the scratch model and returns it."""
        model = self.model
        vec = np.asarray(params)
        if vec.ndim != 1 or vec.shape[0] != self.param_count:
            raise TaskError(
                f"task {self.name!r} needs a flat vector of {self.param_count} parameters, "
                f"got shape {tuple(vec.shape)}"
            )
        if not np.all(np.isfinite(vec)):
            raise TaskError("parameters contain NaN or infinity")
        src = torch.from_numpy(np.array(vec, dtype=np.float32, copy=True))
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                n = p.numel()
                p.copy_(src[offset : offset + n].view_as(p))
                offset += n
        return model

    def initial_params(self, seed: int) -> np.ndarray:
        """Deterministic initial parameters: the same seed gives the same vector."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.flatten(self.build_model())

    # --- training and evaluation -------------------------------------------------
    def gradient(self, params: np.ndarray, rows: np.ndarray | Sequence[int]) -> Gradient:
        """Mean-loss gradient over ``rows`` of this peer's training shard."""
        train = self.train
        idx = np.asarray(rows, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise TaskError("a gradient needs a non-empty list of rows")
        if idx.min() < 0 or idx.max() >= len(train):
            raise TaskError(f"row out of range for a shard of {len(train)} samples")
        batch = train.take(idx)
        model = self.load_params(params)
        model.train()
        model.zero_grad(set_to_none=True)
        loss = self.loss(model(batch.x), batch.y)
        loss.backward()
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
        flat = torch.cat(grads).to(torch.float32).numpy().copy()
        return Gradient(values=flat, loss=float(loss.detach()), samples=int(idx.size))

    def evaluate(self, params: np.ndarray, batch_size: int = 1024) -> Evaluation:
        """Loss and accuracy of ``params`` on the test split."""
        test = self.test
        model = self.load_params(params)
        model.eval()
        total_loss = 0.0
        correct = 0
        with torch.no_grad():
            for start in range(0, len(test), batch_size):
                x = test.x[start : start + batch_size]
                y = test.y[start : start + batch_size]
                out = model(x)
                total_loss += float(self.loss(out, y)) * int(y.shape[0])
                if self.classification:
                    correct += int((out.argmax(dim=1) == y).sum())
        n = len(test)
        accuracy = correct / n if self.classification and n else None
        return Evaluation(loss=total_loss / n if n else float("nan"), accuracy=accuracy, samples=n)


def fixed_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of a shuffled train/test split that never changes for a given seed."""
    if not (0.0 < test_fraction < 1.0):
        raise TaskError(f"test fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]
