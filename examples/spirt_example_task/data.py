"""Writes the example task's dataset: ``python -m spirt_example_task.data DIR``.

Three Gaussian blobs in the plane, one per class, as ``DIR/blobs.npz`` (arrays
``x``, float32 N x 2, and ``y``, int64 labels): plain arrays that ``np.load``
reads without unpickling anything. The same seed gives the same file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CENTRES = np.array([[0.0, 4.0], [-4.0, -3.0], [4.0, -3.0]])


def write(directory: Path, samples: int = 1500, seed: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CENTRES), size=samples)
    x = CENTRES[y] + rng.normal(0.0, 1.0, size=(samples, 2))
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "blobs.npz"
    np.savez(out, x=x.astype(np.float32), y=y.astype(np.int64))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spirt_example_task.data", description=__doc__)
    p.add_argument("directory", type=Path, help="where blobs.npz goes (created if absent)")
    p.add_argument("--samples", type=int, default=1500, help="how many points (8..1,000,000)")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    if not 8 <= a.samples <= 1_000_000:
        p.error(f"--samples must be in 8..1,000,000, got {a.samples}")
    print(write(a.directory, a.samples, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
