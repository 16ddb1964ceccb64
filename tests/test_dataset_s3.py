"""A dataset in S3 (``--dataset mnist=s3://bucket/prefix``): the copy the node and
its functions load (spirtd/tasks/remote.py), and the gradient function reading it.

The S3 API is moto's server on 127.0.0.1 (tests/fixtures_s3.py), spoken to over
HTTP by the same boto3 calls that reach S3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spirtd.functions import gradient
from spirtd.functions.credentials import bindings_env
from spirtd.functions.event import DataSlice, GradientEvent, RedisTarget
from spirtd.functions.runtime.context import local_context
from spirtd.redis import tensorfmt
from spirtd.tasks import Shard, load_task, minibatch_slice, remote
from spirtd.training.state import StateKeys
from tests.fixtures_redis import RunningRedis
from tests.fixtures_s3 import s3_endpoint, upload_dir
from tests.test_functions import reference_gradient
from tests.test_tasks_mnist import _mnist_dir

BUCKET = "spirt-data"
URI = f"s3://{BUCKET}/mnist"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An S3 endpoint holding the mnist files under ``URI``."""
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "function-cache"))
    with s3_endpoint(monkeypatch, BUCKET) as client:
        (tmp_path / "src").mkdir()
        upload_dir(client, _mnist_dir(tmp_path / "src"), BUCKET, "mnist")
        yield client


def test_a_copy_is_made_once_and_loaded_like_a_directory(s3: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    where = remote.localize(URI, cache)
    names = sorted(p.name for p in where.iterdir())
    assert names == sorted(
        [
            remote.COMPLETE,
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
        ]
    )
    assert len(load_task("mnist", Shard.parse("0/1"), path=str(where)).train) == 24
    # The same listing: the copy is used as it is (a marker shows no download).
    (where / "marker").write_text("kept")
    assert remote.localize(URI, cache) == where and (where / "marker").exists()
    assert not list(cache.glob(".partial-*"))


def test_a_new_listing_gets_a_fresh_copy_and_the_old_one_goes(s3: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = remote.localize(URI, cache)
    s3.put_object(Bucket=BUCKET, Key="mnist/README", Body=b"new object")
    second = remote.localize(URI, cache)
    assert second != first and (second / "README").read_bytes() == b"new object"
    assert not first.exists()


def test_limits_are_checked_before_anything_is_downloaded(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(remote.RemoteDataError, match="over the 1,000 allowed"):
        remote.localize(URI, cache, max_bytes=1000)
    monkeypatch.setattr(remote, "MAX_FILES", 3)
    with pytest.raises(remote.RemoteDataError, match="more than 3 objects"):
        remote.localize(URI, cache)
    monkeypatch.setattr(remote, "MAX_FILES", 64)
    s3.put_object(Bucket=BUCKET, Key="odd/..hidden", Body=b"x")
    with pytest.raises(remote.RemoteDataError, match="not a plain file name"):
        remote.localize(f"s3://{BUCKET}/odd", cache)
    with pytest.raises(remote.RemoteDataError, match="no objects under this prefix"):
        remote.localize(f"s3://{BUCKET}/nothing-here", cache)
    with pytest.raises(remote.RemoteDataError, match="cannot list"):
        remote.localize("s3://no-such-bucket/mnist", cache)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("s3://Up/x", "bucket name"),
        ("s3://ab/x", "bucket name"),
        ("s3://spirt-data/a//b", "empty"),
        ("s3://spirt-data/../etc", "'..'"),
        ("/srv/mnist", "not an s3:// location"),
    ],
)
def test_malformed_locations_are_refused(uri: str, why: str) -> None:
    with pytest.raises(remote.RemoteDataError, match=why):
        remote.parse_s3(uri)


async def test_the_gradient_function_trains_on_a_dataset_in_s3(
    s3: Any, plain_redis: RunningRedis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for k, v in bindings_env([plain_redis.server.function_binding()]).items():
        monkeypatch.setenv(k, v)
    # The same files as in S3, read from the directory they were uploaded from.
    task = load_task("mnist", Shard.parse("0/1"), path=str(tmp_path / "src"))
    params = task.initial_params(3)
    values, shape = tensorfmt.encode(params)
    await plain_redis.client.set("spirt:job1:theta", values)
    await plain_redis.client.set(tensorfmt.shape_key("spirt:job1:theta"), shape)
    ev = GradientEvent(
        job="job1",
        round=1,
        slice=0,
        task="mnist",
        redis=RedisTarget(plain_redis.url),
        params_key="spirt:job1:theta",
        data=DataSlice(shard=Shard.parse("0/1"), batch_size=8, seed=5, slices=1, uri=URI),
        output_key=StateKeys("job1").fn_output(1, 0, "nonce"),
        ttl_seconds=600,
    )
    out = await asyncio.to_thread(gradient.handler, ev.to_json(), local_context())
    rows = minibatch_slice(len(task.train), 5, 8, 0, 1)
    want, want_loss = reference_gradient("mnist", "0/1", params, rows, path=str(tmp_path / "src"))
    got = tensorfmt.decode(
        await plain_redis.client.get(ev.output_key),
        await plain_redis.client.get(tensorfmt.shape_key(ev.output_key)),
    )
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert out["loss"] == pytest.approx(want_loss, abs=1e-6)
    # The function's copy is in its own cache, complete.
    copies = list((tmp_path / "function-cache").iterdir())
    assert len(copies) == 1 and (copies[0] / remote.COMPLETE).is_file()
