"""The gradient function: an AWS Lambda handler, ``handler(event, context)``.

For one slice of one round it:

1. reads the model parameters (one flat float32 vector, spirtd/tensorfmt.py)
   from the peer's Redis;
2. loads its slice of the peer's training shard;
3. computes the mean-loss gradient with torch;
4. writes it to ``output_key``, a key the node made for this invocation alone (under
   ``spirt:<job>:fn:``, with a fresh nonce: the functions' Redis user may write no
   other key, least of all a gradient), values and shape in one command, both with a
   TTL, so a retried invocation overwrites its own output and never adds a second one:
   ``SPIRT.PUT ... SCRATCH EX ttl`` where the module is loaded (kept out of the AOF),
   else SET and SET in one MULTI;
5. returns ``{"loss", "samples", "duration_ms", ...}``.

The event is validated strictly (event.py). The Redis it writes to, and the
credentials for it, come from the function's own configuration (credentials.py);
the event can only pick one of the configured Redis by URL. A warm container keeps
its tasks (datasets) and Redis connections between invocations.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import redis
import torch

from spirtd.functions import credentials
from spirtd.functions.credentials import RedisBinding
from spirtd.functions.event import GradientEvent
from spirtd.functions.runtime.config import TASK_MODULES_ENV
from spirtd.redis import tensorfmt
from spirtd.tasks import DATASET_OPTION, Task, load_task, minibatch_slice, remote
from spirtd.tasks.base import TaskError

# For rediss:// (TLS), the CA that signed the peer's Redis certificate, as a PEM
# file path or as PEM text.
CA_FILE_ENV = "SPIRT_REDIS_CA_FILE"
CA_PEM_ENV = "SPIRT_REDIS_CA_PEM"
REDIS_TIMEOUT_S = 30.0
_MAX_CACHED = 4


class ParamsError(RuntimeError):
    """The parameters in Redis are missing or do not fit the task."""


class GradientError(RuntimeError):
    """The gradient is not finite (diverged parameters); nothing is written."""


def _init() -> None:
    """Lambda's init phase: torch sets autograd up on its first backward pass, which
    is paid here, as the worker starts (a local worker starts when its node learns of
    a job, before the job needs it), not in the first invocation."""
    layer = torch.nn.Linear(2, 1)
    layer(torch.zeros(1, 2)).sum().backward()


_init()

_lock = threading.Lock()
_tasks: OrderedDict[tuple[Any, ...], Task] = OrderedDict()
_clients: OrderedDict[RedisBinding, redis.Redis] = OrderedDict()


def _task_for(ev: GradientEvent) -> Task:
    options = dict(ev.task_options)
    uri = ev.data.uri
    if uri is not None and not remote.is_s3(uri):
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            raise TaskError("event.data.uri must be an absolute path, file:// or s3:// URI")
        options[DATASET_OPTION] = path
    key = (ev.task, str(ev.data.shard), uri, tuple(sorted(options.items())))
    with _lock:
        task = _tasks.get(key)
        if task is not None:
            _tasks.move_to_end(key)
            return task
    if uri is not None and remote.is_s3(uri):
        # Copied once per container (and per listing): a warm container reuses the task.
        try:
            options[DATASET_OPTION] = str(remote.localize(uri, remote.default_cache()))
        except remote.RemoteDataError as e:
            raise TaskError(str(e)) from None
    allowed_env = os.environ.get(TASK_MODULES_ENV, "")
    allowed = {m.strip() for m in allowed_env.split(",") if m.strip()}
    task = load_task(ev.task, ev.data.shard, allowed_modules=allowed, **options)
    with _lock:
        _tasks[key] = task
        while len(_tasks) > _MAX_CACHED:
            _tasks.popitem(last=False)
    return task


def _client_for(binding: RedisBinding) -> redis.Redis:
    with _lock:
        client = _clients.get(binding)
        if client is not None:
            _clients.move_to_end(binding)
            return client
    creds = credentials.resolve(binding)
    kw: dict[str, Any] = {
        "username": creds.username,
        "password": creds.password,
        "socket_timeout": REDIS_TIMEOUT_S,
        "socket_connect_timeout": 10.0,
    }
    if binding.url.startswith("rediss://"):
        kw["ssl_cert_reqs"] = "required"
        if os.environ.get(CA_FILE_ENV):
            kw["ssl_ca_certs"] = os.environ[CA_FILE_ENV]
        elif os.environ.get(CA_PEM_ENV):
            kw["ssl_ca_data"] = os.environ[CA_PEM_ENV]
    client = redis.Redis.from_url(binding.url, **kw)
    with _lock:
        _clients[binding] = client
        while len(_clients) > _MAX_CACHED:
            _clients.popitem(last=False)[1].close()
    return client


def _forget_client(binding: RedisBinding) -> None:
    with _lock:
        client = _clients.pop(binding, None)
    if client is not None:
        _no_module_put.discard(client)
        client.close()
    credentials.forget(binding)


def read_params(client: redis.Redis, key: str, expected: int) -> np.ndarray:
    """The flat parameter vector at ``key``; its size is checked before it is fetched."""
    pipe = client.pipeline(transaction=False)
    pipe.strlen(key)
    pipe.get(tensorfmt.shape_key(key))
    size, shape = pipe.execute()
    if size == 0:
        raise ParamsError(f"no parameters at {key!r}")
    if size != expected * tensorfmt.DTYPE.itemsize:
        raise ParamsError(
            f"parameters at {key!r} have {size} bytes; the task needs "
            f"{expected} float32 ({expected * tensorfmt.DTYPE.itemsize} bytes)"
        )
    dims = tensorfmt.parse_shape(shape, max_elements=expected)
    if dims != (expected,):
        raise ParamsError(f"parameters at {key!r} have shape {dims}; expected ({expected},)")
    values = client.get(key)
    # Decoding checks the length again: the key may have changed between the calls.
    return tensorfmt.decode(values, shape, max_elements=expected)


# Clients whose Redis refused SPIRT.PUT (no module, or an ACL without it): they
# write with SET from then on.
_no_module_put: weakref.WeakSet[redis.Redis] = weakref.WeakSet()


def write_gradient(client: redis.Redis, key: str, values: np.ndarray, ttl_s: int) -> None:
    data, shape = tensorfmt.encode(values)
    if client not in _no_module_put:
        # One command writes values and shape, so a retry replaces the previous
        # attempt's output. SCRATCH keeps this one-round value out of the AOF.
        try:
            client.execute_command("SPIRT.PUT", key, shape, data, "SCRATCH", "EX", ttl_s)
            return
        except redis.ResponseError as e:
            if not _module_absent(e):
                raise
            _no_module_put.add(client)
    # One MULTI: readers never see new values with an old shape, and a retry
    # replaces the previous attempt's output instead of adding to it.
    pipe = client.pipeline(transaction=True)
    pipe.set(key, data, ex=ttl_s)
    pipe.set(tensorfmt.shape_key(key), shape, ex=ttl_s)
    pipe.execute()


def _module_absent(e: redis.ResponseError) -> bool:
    """No SPIRT.PUT here: no module, or an ACL without the command. (A key the user may
    not write is refused with another message, and SET would be refused too.)"""
    msg = str(e).lower()
    return "unknown command" in msg or ("no permissions" in msg and "spirt.put" in msg)


def rows_for(ev: GradientEvent, task: Task) -> np.ndarray:
    d = ev.data
    if d.indices is not None:
        return np.asarray(d.indices, dtype=np.int64)
    assert d.seed is not None
    return minibatch_slice(len(task.train), d.seed, d.batch_size, ev.slice, d.slices)


def compute(ev: GradientEvent) -> dict[str, Any]:
    t0 = time.perf_counter()
    task = _task_for(ev)
    binding = credentials.binding_for(ev.redis.url)
    client = _client_for(binding)
    if ev.warm:
        return _warm(ev, task, client, t0)
    try:
        params = read_params(client, ev.params_key, task.param_count)
        grad = task.gradient(params, rows_for(ev, task))
        if not (math.isfinite(grad.loss) and np.isfinite(grad.values).all()):
            raise GradientError(
                f"non-finite loss or gradient for slice {ev.slice} of round "
                f"{ev.round}; the output key was not written"
            )
        write_gradient(client, ev.output_key, grad.values, ev.ttl_seconds)
    except (redis.AuthenticationError, redis.ConnectionError):
        # A rotated password or a restarted Redis: start clean next time.
        _forget_client(binding)
        raise
    return {
        "job": ev.job,
        "round": ev.round,
        "slice": ev.slice,
        "output_key": ev.output_key,
        "loss": grad.loss,
        "samples": grad.samples,
        "param_count": int(grad.values.size),
        "duration_ms": (time.perf_counter() - t0) * 1000.0,
    }


def _warm(ev: GradientEvent, task: Task, client: redis.Redis, t0: float) -> dict[str, Any]:
    """What a first call pays besides the work itself: the data, the model, torch's
    first backward pass (on the task's initial parameters and one row of the
    slice) and the Redis connection. Nothing is read from Redis or written."""
    rows = rows_for(ev, task)[:1]
    task.gradient(task.initial_params(0), rows)
    client.ping()
    return {
        "job": ev.job,
        "round": ev.round,
        "slice": ev.slice,
        "warm": True,
        "duration_ms": (time.perf_counter() - t0) * 1000.0,
    }


def handler(event: Any, context: Any) -> dict[str, Any]:
    return compute(GradientEvent.from_json(event))
