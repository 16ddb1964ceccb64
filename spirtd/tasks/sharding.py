"""Which part of a dataset a peer trains on: shard ``i/n`` and minibatch slices.

Sharding is strided (row ``k`` belongs to shard ``k % n``) so shards stay the same
size within one row and keep the class mix of a pre-shuffled split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# A shard count past this is a typo, not a cluster.
MAX_SHARDS = 1_000_000

_SHARD_RE = re.compile(r"^(\d{1,7})/(\d{1,7})$")


class ShardError(ValueError):
    pass


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not (1 <= self.count <= MAX_SHARDS):
            raise ShardError(f"shard count must be in 1..{MAX_SHARDS}, got {self.count}")
        if not (0 <= self.index < self.count):
            raise ShardError(f"shard index must be in 0..{self.count - 1}, got {self.index}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parses ``"i/n"`` (0-based ``i``)."""
        m = _SHARD_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ShardError(f"shard must look like 'i/n' (e.g. '0/3'), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def rows(self, total: int) -> np.ndarray:
        """Row numbers of this shard in a dataset of ``total`` rows."""
        return np.arange(self.index, total, self.count, dtype=np.int64)


ALL = Shard(0, 1)


def minibatch(shard_size: int, seed: int, batch_size: int) -> np.ndarray:
    """The minibatch (indices into the shard) a round draws from ``seed``.

    Without replacement while the shard is big enough, so one sample is never
    counted twice in a round.
    """
    if shard_size <= 0:
        raise ShardError("the shard is empty")
    if batch_size <= 0:
        raise ShardError(f"batch size must be positive, got {batch_size}")
    rng = np.random.default_rng(seed)
    if batch_size <= shard_size:
        return rng.choice(shard_size, size=batch_size, replace=False).astype(np.int64)
    return rng.integers(0, shard_size, size=batch_size, dtype=np.int64)


def minibatch_slice(
    shard_size: int, seed: int, batch_size: int, slice_index: int, slice_count: int
) -> np.ndarray:
    """Slice ``slice_index`` of ``slice_count`` of the round's minibatch.

    The daemon and every function compute the same split, so a function needs
    only the seed and its slice number, not a list of indices.
    """
    if not (1 <= slice_count <= batch_size):
        raise ShardError(f"slice count must be in 1..{batch_size}, got {slice_count}")
    if not (0 <= slice_index < slice_count):
        raise ShardError(f"slice index must be in 0..{slice_count - 1}, got {slice_index}")
    batch = minibatch(shard_size, seed, batch_size)
    return np.array_split(batch, slice_count)[slice_index]
