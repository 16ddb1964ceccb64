"""The gradient function's event: its schema, strict validation, and a builder.

The event carries neither a secret nor a reference to one. Which Redis the
function may use, and with which credentials, is the function's own configuration
(credentials.py); the event at most picks one of those Redis by its URL.

Schema (version 1)::

    {"v": 1, "job": str, "round": int, "slice": int,
     "task": str, "task_options": {str: scalar},
     "redis": {"url": "unix://...|redis://...|rediss://..."} | {},
     "params_key": str,
     "data": {"uri": str|null, "shard": "i/n", "batch_size": int,
              "indices": [int, ...]|null, "seed": int|null, "slices": int},
     "output_key": str, "ttl_seconds": int, "warm": true (optional)}

``data`` picks the slice either by explicit ``indices`` (rows of the peer's
shard; ``batch_size`` must equal their count) or by ``seed``: the round's
minibatch of ``batch_size`` rows is drawn from the seed, split into ``slices``
parts, and this function takes part ``slice`` (tasks.sharding.minibatch_slice).

``"warm": true`` asks only for a warm container: the function loads the task and
its data and connects to the Redis, and returns without reading the parameters or
writing the output. A node that joins or restarts sends it while it syncs, when no
parameters are in its Redis yet, so that its first real round finds the function
warm. Absent, the event is a gradient request as above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spirtd.redis.binding import RedisTarget
from spirtd.tasks.sharding import Shard, ShardError

VERSION = 1
MAX_INDICES = 1_000_000
MAX_BATCH = 10_000_000
MAX_SLICES = 100_000
MAX_ROUND = 2**53
MAX_TTL_S = 7 * 24 * 3600
MAX_TASK_OPTIONS = 32

_JOB_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# Keys: printable ASCII without spaces, e.g. "spirt:job:theta" and, for the output, a key
# of the invocation's own "spirt:job:fn:3:1:<nonce>" (training/state.py StateKeys).
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")
_URL_SCHEMES = ("unix://", "redis://", "rediss://")


class EventError(ValueError):
    """The event is malformed; the message names the field."""


@dataclass(frozen=True)
class DataSlice:
    shard: Shard
    batch_size: int
    indices: tuple[int, ...] | None = None
    seed: int | None = None
    slices: int = 1
    uri: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "shard": str(self.shard),
            "batch_size": self.batch_size,
            "indices": list(self.indices) if self.indices is not None else None,
            "seed": self.seed,
            "slices": self.slices,
        }


@dataclass(frozen=True)
class GradientEvent:
    job: str
    round: int
    slice: int
    task: str
    redis: RedisTarget
    params_key: str
    data: DataSlice
    output_key: str
    ttl_seconds: int = 3600
    task_options: Mapping[str, Any] = field(default_factory=dict)
    warm: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {
            "v": VERSION,
            "job": self.job,
            "round": self.round,
            "slice": self.slice,
            "task": self.task,
            "task_options": dict(self.task_options),
            "redis": self.redis.to_json(),
            "params_key": self.params_key,
            "data": self.data.to_json(),
            "output_key": self.output_key,
            "ttl_seconds": self.ttl_seconds,
        }
        if self.warm:
            out["warm"] = True
        return out

    @classmethod
    def from_json(cls, obj: Any) -> GradientEvent:
        ev = _obj(
            obj,
            "event",
            {
                "v",
                "job",
                "round",
                "slice",
                "task",
                "task_options",
                "redis",
                "params_key",
                "data",
                "output_key",
                "ttl_seconds",
                "warm",
            },
        )
        if ev.get("v") != VERSION:
            raise EventError(f"event.v must be {VERSION}, got {ev.get('v')!r}")
        job = _str(ev, "job", _JOB_RE, "event")
        rnd = _int(ev, "round", 0, MAX_ROUND, "event")
        slc = _int(ev, "slice", 0, MAX_SLICES - 1, "event")
        task = ev.get("task")
        if not isinstance(task, str) or not (1 <= len(task) <= 256):
            raise EventError("event.task must be a task name of 1..256 characters")
        opts = _task_options(ev.get("task_options", {}))
        redis = _redis(ev.get("redis", {}))
        data = _data(ev.get("data"), slc)
        warm = ev.get("warm", False)
        if not isinstance(warm, bool):
            raise EventError("event.warm must be true or false")
        return cls(
            job=job,
            round=rnd,
            slice=slc,
            task=task,
            redis=redis,
            params_key=_str(ev, "params_key", _KEY_RE, "event"),
            data=data,
            output_key=_str(ev, "output_key", _KEY_RE, "event"),
            ttl_seconds=_int(ev, "ttl_seconds", 1, MAX_TTL_S, "event"),
            task_options=opts,
            warm=warm,
        )


def _obj(v: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise EventError(f"{where} must be a JSON object")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise EventError(f"{where} has unknown field(s): {', '.join(map(str, unknown))[:200]}")
    return v


def _str(d: Mapping[str, Any], key: str, pattern: re.Pattern[str], where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not pattern.match(v):
        raise EventError(f"{where}.{key} is missing or malformed")
    return v


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not (lo <= v <= hi):
        raise EventError(f"{where}.{key} must be an integer in {lo}..{hi}, got {v!r}"[:200])
    return v


def _task_options(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_TASK_OPTIONS:
        raise EventError(f"event.task_options must be an object of at most {MAX_TASK_OPTIONS}")
    for k, x in v.items():
        if not isinstance(x, int | float | str | bool) and x is not None:
            raise EventError(f"event.task_options.{k} must be a scalar"[:200])
        if isinstance(x, str) and len(x) > 4096:
            raise EventError(f"event.task_options.{k} is too long"[:200])
    return dict(v)


def _redis(v: Any) -> RedisTarget:
    if isinstance(v, dict) and {"username", "credentials"} & set(v):
        raise EventError(
            "event.redis may name only the url: the function's own configuration "
            "(SPIRT_REDIS_TARGETS) says which credentials go with it"
        )
    r = _obj(v, "event.redis", {"url"})
    url = r.get("url")
    if url is None:
        return RedisTarget()
    if not isinstance(url, str) or len(url) > 1024 or not url.startswith(_URL_SCHEMES):
        raise EventError("event.redis.url must be a unix://, redis:// or rediss:// URL")
    return RedisTarget(url)


def _data(v: Any, slice_index: int) -> DataSlice:
    d = _obj(v, "event.data", {"uri", "shard", "batch_size", "indices", "seed", "slices"})
    uri = d.get("uri")
    if uri is not None and (not isinstance(uri, str) or not (1 <= len(uri) <= 1024)):
        raise EventError("event.data.uri must be null or a string of at most 1024 characters")
    shard_text = d.get("shard", "0/1")
    try:
        shard = Shard.parse(shard_text)
    except ShardError as e:
        raise EventError(f"event.data.shard: {e}") from e
    batch = _int(d, "batch_size", 1, MAX_BATCH, "event.data")
    indices = d.get("indices")
    seed = d.get("seed")
    if (indices is None) == (seed is None):
        raise EventError("event.data needs exactly one of indices or seed")
    if indices is not None:
        if not isinstance(indices, list) or not (1 <= len(indices) <= MAX_INDICES):
            raise EventError(f"event.data.indices must be a list of 1..{MAX_INDICES} rows")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < 2**40):
                raise EventError("event.data.indices must hold non-negative integers")
        if len(indices) != batch:
            raise EventError("event.data.batch_size must equal the number of indices")
        return DataSlice(shard=shard, batch_size=batch, indices=tuple(indices), uri=uri)
    seed_v = _int(d, "seed", 0, 2**63 - 1, "event.data")
    slices = _int(d, "slices", 1, min(MAX_SLICES, batch), "event.data")
    if slice_index >= slices:
        raise EventError(f"event.slice {slice_index} is not below event.data.slices {slices}")
    return DataSlice(shard=shard, batch_size=batch, seed=seed_v, slices=slices, uri=uri)
