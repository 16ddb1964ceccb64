"""Job records, aggregator bounds and training message codecs (no processes)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import strictpack
from protocol.errors import DecodeError
from spirtd.config import ConfigError, load
from spirtd.functions.credentials import CredentialError
from spirtd.redis.service import RedisService
from spirtd.training import job as jobs
from spirtd.training.aggregators import Aggregator, AggregatorError
from spirtd.training.job import JobError, JobSpec
from spirtd.training.messages import (
    GradientMeta,
    StateMeta,
    decode_jobs_meta,
    decode_train_meta,
    encode_jobs_meta,
)


def test_request_gets_the_tasks_defaults() -> None:
    spec = jobs.from_request({"task": "digits"}, now_ms=1)
    assert (spec.optimizer, spec.lr, spec.rounds) == ("adam", 0.01, 200)
    assert spec.aggregator == "mean" and spec.f == 0
    custom = jobs.from_request({"task": "digits", "lr": 1, "rounds": 5}, now_ms=1)
    assert custom.lr == 1.0 and isinstance(custom.lr, float) and custom.rounds == 5


def test_builtin_defaults_keep_their_job_ids() -> None:
    """`train start --task NAME` alone makes the same record as before the defaults
    moved from a table in job.py onto the task classes: the ids were computed then."""
    ids = {
        name: JobSpec.job_id(jobs.from_request({"task": name, "seed": 3}, now_ms=1).to_record())
        for name in ("digits", "mnist", "synthetic")
    }
    assert ids == {
        "digits": "e1e0705d12aa5b4cded994257e9bae91",
        "mnist": "2bb77b6f7486df80dee3ac63f4d8facc",
        "synthetic": "d0f7e3452c5e4495eebe7b3b7e31d573",
    }
    user = jobs.from_request(
        {"task": "tests.test_tasks:TinyTask", "seed": 3}, now_ms=1, allowed_modules={"tests"}
    )
    assert JobSpec.job_id(user.to_record()) == "e83401faa31304f8aa205709e80d6d80"


def test_a_user_task_gives_its_own_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tuned = jobs.from_request(
        {"task": "tests.test_tasks:TunedTask"}, now_ms=1, allowed_modules={"tests"}
    )
    assert (tuned.rounds, tuned.batch_size, tuned.optimizer, tuned.lr, tuned.momentum) == (
        7,
        16,
        "adam",
        0.2,
        0.0,
    )
    assert tuned.eval_every == 10  # not overridden: the base class's
    # A flag still wins over the class.
    flagged = jobs.from_request(
        {"task": "tests.test_tasks:TunedTask", "rounds": 3}, now_ms=1, allowed_modules={"tests"}
    )
    assert flagged.rounds == 3
    made = jobs.from_request(
        {"task": "tests.test_tasks:tiny_factory"}, now_ms=1, allowed_modules={"tests"}
    )
    assert (made.rounds, made.optimizer, made.lr, made.momentum) == (100, "sgd", 0.05, 0.9)
    # A user's module is imported only from the allowed packages, none by default.
    with pytest.raises(JobError, match="not in the allowed task modules"):
        jobs.from_request({"task": "tests.test_tasks:TunedTask"}, now_ms=1)
    # A class attribute out of range is refused like the same flag would be.
    with pytest.raises(JobError, match="lr: must be a number"):
        jobs.from_request(
            {"task": "tests.test_tasks:BadDefaultsTask"}, now_ms=1, allowed_modules={"tests"}
        )
    # A module that fails at import is a refusal of one line, not a crash.
    (tmp_path / "spirt_broken_job.py").write_text('raise RuntimeError("boom\\nsecond line")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(JobError) as e:
        jobs.from_request(
            {"task": "spirt_broken_job:T"}, now_ms=1, allowed_modules={"spirt_broken_job"}
        )
    assert str(e.value) == "cannot import task module 'spirt_broken_job': boom"


def test_a_job_tolerating_byzantine_peers_defaults_to_a_robust_rule() -> None:
    assert jobs.from_request({"task": "digits", "f": 1}, now_ms=1).aggregator == "nnm+median"
    named = jobs.from_request({"task": "digits", "f": 1, "aggregator": "krum"}, now_ms=1)
    assert named.aggregator == "krum"
    # A plain mean asked for by name is the operator's choice, and kept.
    plain = jobs.from_request({"task": "digits", "f": 1, "aggregator": "mean"}, now_ms=1)
    assert plain.aggregator == "mean"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "task: required"),
        ({"task": "digits", "colour": 1}, "unknown job setting(s): colour"),
        ({"task": "digits", "rounds": 0}, "rounds"),
        ({"task": "digits", "rounds": True}, "rounds"),
        ({"task": "digits", "lr": 0}, "lr"),
        ({"task": "digits", "lr": float("nan")}, "lr"),
        ({"task": "digits", "momentum": 1.0}, "momentum"),
        ({"task": "digits", "momentum": 0.5}, "applies to sgd only"),
        ({"task": "digits", "optimizer": "lbfgs"}, "optimizer"),
        ({"task": "digits", "eval_every": 0}, "eval_every"),
        ({"task": "digits", "aggregator": "nnm+bogus"}, "unknown rule"),
        ({"task": "digits", "batch_size": 1, "functions_per_round": 2}, "cannot split"),
        ({"task": "digits", "param_count": 5}, "unknown job setting"),
        ({"task": "digits", "inner_steps": 0}, "inner_steps"),
        ({"task": "digits", "inner_steps": 1.5}, "inner_steps"),
        ({"task": "digits", "compression": "int4"}, "compression: must be one of"),
        ({"task": "digits", "inner_steps": 2, "outer_lr": 0}, "outer_lr"),
        ({"task": "digits", "inner_steps": 2, "outer_momentum": 1.0}, "outer_momentum"),
        ({"task": "digits", "outer_lr": 0.5}, "outer_lr: applies to inner_steps > 1"),
    ],
)
def test_bad_requests(body: dict, message: str) -> None:
    with pytest.raises(JobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jobs.from_request(body, now_ms=1)


def test_record_round_trip_and_id_binds_every_byte() -> None:
    spec = jobs.with_model(
        jobs.from_request({"task": "digits", "task_options": {"hidden": 32}}, now_ms=5), 2410, "ab"
    )
    record = spec.to_record()
    assert JobSpec.from_record(record) == spec
    job_id = JobSpec.job_id(record)
    assert len(job_id) == 32
    other = jobs.with_model(spec, 2410, "ac").to_record()
    assert JobSpec.job_id(other) != job_id


def test_outer_round_settings_travel_in_the_record_only_when_set() -> None:
    """A plain job's record has no outer-round fields (its id is what it was, and a
    peer that predates them runs it); a job that sets them carries them."""
    plain = jobs.with_model(jobs.from_request({"task": "digits"}, now_ms=5), 10, "x")
    assert "inner_steps" not in strictpack.unpack(plain.to_record())
    assert JobSpec.from_record(plain.to_record()) == plain
    outer = jobs.with_model(
        jobs.from_request(
            {"task": "digits", "inner_steps": 10, "compression": "int8", "outer_lr": 1.5},
            now_ms=5,
        ),
        10_000,
        "x",
    )
    obj = strictpack.unpack(outer.to_record())
    assert (obj["inner_steps"], obj["compression"], obj["outer_lr"]) == (10, "int8", 1.5)
    back = JobSpec.from_record(outer.to_record())
    assert back == outer and back.body_size == 8 * 3 + 10_000  # 3 int8 blocks' headers
    assert JobSpec.job_id(outer.to_record()) != JobSpec.job_id(plain.to_record())


def test_records_from_the_network_are_checked() -> None:
    good = jobs.with_model(jobs.from_request({"task": "digits"}, now_ms=5), 10, "x").to_record()
    obj = strictpack.unpack(good)
    for change, message in [
        ({"rounds": -1}, "rounds"),
        ({"rounds": "many"}, "wrong type"),
        ({"lr": True}, "wrong type"),
        ({"extra": 1}, "unknown field"),
        ({"v": 2}, "unknown version"),
        ({"task_options": {"k": [1, 2]}}, "scalars"),
    ]:
        with pytest.raises(JobError, match=message):
            JobSpec.from_record(strictpack.pack({**obj, **change}))
    missing = dict(obj)
    del missing["seed"]
    with pytest.raises(JobError, match="lacks seed"):
        JobSpec.from_record(strictpack.pack(missing))
    with pytest.raises(JobError, match="exceeds"):
        JobSpec.from_record(b"\x00" * (jobs.MAX_RECORD + 1))
    with pytest.raises(JobError, match="does not decode"):
        JobSpec.from_record(b"\xc1")


@pytest.mark.parametrize(
    ("name", "f", "need"),
    [
        ("mean", 0, 1),
        ("mean", 3, 1),
        ("median", 1, 3),
        ("trimmed_mean", 2, 5),
        ("geomed", 1, 3),
        ("cclip", 1, 3),
        ("krum", 1, 5),
        ("multi_krum", 2, 7),
        ("nnm+krum", 1, 5),
        ("nnm+median", 3, 7),
    ],
)
def test_aggregator_membership_bounds(name: str, f: int, need: int) -> None:
    agg = Aggregator.parse(name, f)
    assert agg.min_peers() == need
    agg.check_membership(need)
    with pytest.raises(AggregatorError, match=f"needs at least {need} peers"):
        agg.check_membership(need - 1) if need > 1 else agg.check_membership(0)


def test_meta_round_trips() -> None:
    g = GradientMeta("a" * 32, 7, b"\x01" * 32, 64, 0.25)
    assert decode_train_meta(g.encode()) == g
    s = StateMeta("b" * 32, 3, b"\x02" * 32, False)
    assert decode_train_meta(s.encode()) == s
    assert decode_jobs_meta(encode_jobs_meta("stop", "c" * 32)) == ("stop", "c" * 32)


@pytest.mark.parametrize(
    "obj",
    [
        ["g", "a" * 32, 1, b"\x00" * 31, 1, 0.0],  # short digest
        ["g", "a" * 31, 1, b"\x00" * 32, 1, 0.0],  # short job id
        ["g", "a" * 32, -1, b"\x00" * 32, 1, 0.0],
        ["g", "a" * 32, True, b"\x00" * 32, 1, 0.0],
        ["g", "a" * 32, 1, b"\x00" * 32, 1, float("inf")],
        ["g", "a" * 32, 1, b"\x00" * 32, 1],
        ["s", "a" * 32, 1, b"\x00" * 32, 1],  # participating must be a bool
        ["x"],
        {"g": 1},
    ],
)
def test_bad_meta_is_refused(obj: object) -> None:
    with pytest.raises(DecodeError):
        decode_train_meta(strictpack.pack(obj))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_meta_decoders_never_crash(data: bytes) -> None:
    for decode in (decode_train_meta, decode_jobs_meta):
        with contextlib.suppress(DecodeError):
            decode(data)


def test_dataset_and_shard_settings(tmp_path: Path) -> None:
    cfg = load(None, {"data_dir": str(tmp_path), "datasets": ["mnist=/srv/mnist"], "shard": "1/4"})
    assert cfg.datasets == {"mnist": "/srv/mnist"} and cfg.shard == "1/4"
    toml = tmp_path / "c.toml"
    toml.write_text('[datasets]\nmnist = "/data/m"\n[training]\ndeadline_factor = 2\n')
    cfg = load(toml, {"data_dir": str(tmp_path)})
    assert cfg.datasets == {"mnist": "/data/m"} and cfg.training.deadline_factor == 2.0
    for overrides, message in [
        ({"datasets": ["mnist"]}, "expected NAME=DIR"),
        ({"shard": "4/4"}, "shard"),
        ({"shard": "x"}, "shard"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(None, {"data_dir": str(tmp_path), **overrides})
    toml.write_text('[datasets]\nmnist = "relative/dir"\n')
    with pytest.raises(ConfigError, match="absolute"):
        load(toml, {"data_dir": str(tmp_path)})
    toml.write_text("[training]\ndeadline_floor_s = 0\n")
    with pytest.raises(ConfigError, match=r"training\.deadline_floor_s"):
        load(toml, {"data_dir": str(tmp_path)})
    toml.write_text("[training]\nmin_slice_fraction = 0\n")
    with pytest.raises(ConfigError, match="min_slice_fraction"):
        load(toml, {"data_dir": str(tmp_path)})


@pytest.mark.parametrize(
    ("url", "bare", "user"),
    [
        ("unix://spirt:s%40cret@/run/r.sock", "unix:///run/r.sock", "spirt"),
        (
            "unix:///run/r.sock?username=spirt&password=s%40cret&db=1",
            "unix:///run/r.sock?db=1",
            "spirt",
        ),
        ("redis://ops:s%40cret@127.0.0.1:6380/2", "redis://127.0.0.1:6380/2", "ops"),
        ("rediss://:s%40cret@cache.internal/0", "rediss://cache.internal/0", None),
    ],
)
def test_function_target_never_carries_the_password(
    tmp_path: Path, url: str, bare: str, user: str | None
) -> None:
    node = SimpleNamespace(
        config=SimpleNamespace(redis_url=url, functions="local"),
        data=SimpleNamespace(root=tmp_path),
    )
    service = RedisService(node)  # type: ignore[arg-type]
    # The event names only the URL; the password is in the functions' configuration.
    assert service.function_target().to_json() == {"url": bare}
    binding = service.function_binding()
    assert (binding.url, binding.username, binding.credentials.kind) == (bare, user, "file")
    secret = Path(binding.credentials.value)
    assert secret.read_text() == "s@cret" and secret.stat().st_mode & 0o777 == 0o600
    assert "cret" not in binding.url


def test_function_target_without_a_password(tmp_path: Path) -> None:
    node = SimpleNamespace(
        config=SimpleNamespace(redis_url="unix:///tmp/r.sock", functions="local"),
        data=SimpleNamespace(root=tmp_path),
    )
    binding = RedisService(node).function_binding()  # type: ignore[arg-type]
    assert (binding.url, binding.credentials.kind) == ("unix:///tmp/r.sock", "none")


def test_function_binding_refuses_plain_tcp_off_this_machine(tmp_path: Path) -> None:
    node = SimpleNamespace(
        config=SimpleNamespace(redis_url="redis://ops:pw@10.0.0.5:6380/2", functions="local"),
        data=SimpleNamespace(root=tmp_path),
    )
    with pytest.raises(CredentialError, match="TLS"):
        RedisService(node).function_binding()  # type: ignore[arg-type]
    assert not (tmp_path / "redis-url.secret").exists()  # the password went nowhere
