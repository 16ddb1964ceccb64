"""The strict IDX reader and the mnist task, on tiny IDX files written here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spirtd.tasks import TaskError, load_task
from spirtd.tasks.idx import IdxError, read_idx, write_idx


def _mnist_dir(root: Path, n_train: int = 24, n_test: int = 10, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte{sfx}",
            rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        )
        write_idx(
            root / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, size=n, dtype=np.uint8)
        )
    return root


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, dtype: str, suffix: str) -> None:
    a = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    p = tmp_path / f"a.idx{suffix}"
    write_idx(p, a)
    b = read_idx(p)
    assert b.shape == (2, 3, 4) and np.array_equal(a, b)


def _raw(tmp_path: Path, data: bytes, name: str = "x.idx") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        (b"\x00\x00\x08\x00", "dimension count"),
        (b"\x00\x00\x08\x05" + struct.pack(">5I", 1, 1, 1, 1, 1) + b"\x00", "dimension count"),
        (b"\x00\x00\x08\x01\x00\x00", "truncated dimensions"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00\x01\x02", "header says"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01\x02", "header says"),
        (b"\x00\x00", "truncated magic"),
    ],
)
def test_idx_rejects_malformed(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(IdxError, match=match):
        read_idx(_raw(tmp_path, data))


def test_idx_refuses_huge_dims_before_allocating(tmp_path: Path) -> None:
    # 4 x 2^32-1 float64 claims ~2^38 bytes: refused from the header alone.
    data = b"\x00\x00\x0e\x02" + struct.pack(">2I", 0xFFFFFFFF, 0xFFFFFFFF)
    with pytest.raises(IdxError, match="too large"):
        read_idx(_raw(tmp_path, data))
    small = b"\x00\x00\x08\x01" + struct.pack(">I", 100) + bytes(100)
    with pytest.raises(IdxError, match="too large"):
        read_idx(_raw(tmp_path, small), max_bytes=99)


def test_idx_gz_truncated_and_trailing(tmp_path: Path) -> None:
    good = b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x01\x02\x03\x04"
    p = tmp_path / "t.idx.gz"
    p.write_bytes(gzip.compress(good[:-1]))
    with pytest.raises(IdxError, match="truncated"):
        read_idx(p)
    p.write_bytes(gzip.compress(good + b"\x05"))
    with pytest.raises(IdxError, match="trailing"):
        read_idx(p)
    p.write_bytes(b"not gzip at all")
    with pytest.raises(IdxError):
        read_idx(p)


def test_idx_refuses_non_regular_file(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match="regular file"):
        read_idx(tmp_path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_idx_fuzz_only_idx_errors(data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".idx") as f:
        f.write(data)
        f.flush()
        try:
            a = read_idx(f.name)
        except IdxError:
            return
        assert a.nbytes == len(data) - 4 - 4 * a.ndim


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_task_on_tiny_files(tmp_path: Path, gz: bool) -> None:
    root = _mnist_dir(tmp_path, gz=gz)
    task = load_task("mnist", "1/2", path=str(root))
    assert len(task.train) == 12 and len(task.test) == 10
    assert float(task.train.x.max()) <= 1.0 and task.train.x.shape[1] == 784
    params = task.initial_params(0)
    assert params.size == 784 * 128 + 128 + 128 * 10 + 10
    g = task.gradient(params, [0, 3])
    assert g.values.shape == params.shape and np.isfinite(g.values).all()
    ev = task.evaluate(params)
    assert ev.samples == 10 and 0.0 <= (ev.accuracy or 0.0) <= 1.0
    cnn = load_task("mnist", path=str(root), model="cnn", hidden=16)
    assert cnn.gradient(cnn.initial_params(0), [1]).samples == 1


def test_mnist_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="path"):
        load_task("mnist")
    with pytest.raises(TaskError, match="not found"):
        _ = load_task("mnist", path=str(tmp_path)).train
    root = _mnist_dir(tmp_path)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(23, dtype=np.uint8))
    with pytest.raises(TaskError, match="24 images but 23 labels"):
        _ = load_task("mnist", path=str(root)).train
    write_idx(root / "train-labels-idx1-ubyte", np.full(24, 12, dtype=np.uint8))
    with pytest.raises(TaskError, match="not a digit"):
        _ = load_task("mnist", path=str(root)).train
    write_idx(root / "train-images-idx3-ubyte", np.zeros((24, 20, 20), dtype=np.uint8))
    with pytest.raises(TaskError, match="28 x 28"):
        _ = load_task("mnist", path=str(root)).train
