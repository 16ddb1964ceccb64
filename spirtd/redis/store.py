"""The tensor store: SPIRT's tensors in Redis, and the work done on them.

``TensorStore`` is an async API over a ``redis.asyncio`` client (hiredis parser):

* put/get tensors in the format of :mod:`spirtd.redis.tensorfmt` (copy-free: ``put`` hands
  redis-py a memoryview of the array, ``get`` returns a read-only array over the reply
  bytes);
* aggregation rules (mean, weighted mean, median, trimmed mean, Krum/multi-Krum,
  geometric median, centered clipping, each optionally after nearest-neighbour mixing);
* optimizer updates (SGD with momentum/Nesterov/weight decay, Adam/AdamW);
* L2 norm and BLAKE2b-256 digest.

When the SPIRT module is loaded in that Redis (detected with MODULE LIST) the work runs
inside Redis (``SPIRT.*`` commands, see native/README.md). Otherwise the same operations
run here with torch, on a worker thread so the event loop keeps running, and a warning
is logged once. Both paths validate the same way and raise the same exceptions; the
client-side path reads its inputs under WATCH and writes its outputs in MULTI/EXEC, so
it too either writes everything or nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import torch
from redis.exceptions import ResponseError, WatchError

from spirtd.redis import tensorfmt

log = logging.getLogger("spirtd.store")

MODULE_NAME = "spirt"
MAX_INPUTS = 1024  # the module's SPIRT_MAX_INPUTS
MAX_ITERS = 100_000
RULES = ("mean", "median", "trimmed_mean", "krum", "geomed", "cclip")

# Coordinates per block in the client-side rank rules (bounds their temporary memory).
_RANK_BLOCK = 1 << 18
_F32 = torch.float32
_F64 = torch.float64


class StoreError(RuntimeError):
    """Bad input or a failed operation; nothing was written."""


class TensorNotFound(StoreError):
    pass


class NonFinite(StoreError):
    """An input holds NaN or an infinity; nothing was written."""


class InputChanged(StoreError):
    """An input was modified while the operation ran; nothing was written. Retry."""


async def module_loaded(client: aioredis.Redis, name: str = MODULE_NAME) -> bool:
    """True if the Redis behind ``client`` has the SPIRT module loaded."""
    try:
        mods = await client.module_list()
    except ResponseError:
        # e.g. an ACL user without MODULE permission: ask the module itself.
        try:
            await client.execute_command("SPIRT.INFO")
        except ResponseError:
            return False
        return True
    for m in mods:
        mod_name = m.get(b"name", m.get("name"))
        if isinstance(mod_name, bytes):
            mod_name = mod_name.decode("ascii", "replace")
        if mod_name == name:
            return True
    return False


# ---- validation shared by both paths -------------------------------------------------


def _label(key: str) -> str:
    text = "".join(c if " " <= c < "\x7f" and c != "'" else "?" for c in key[:76])
    return text + ("..." if len(key) > 76 else "")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise StoreError(msg)


def _num(x: Any, what: str, lo: float, hi: float = math.inf, *, hi_open: bool = False) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise StoreError(f"{what} must be a finite number, got {x!r}") from None
    _check(math.isfinite(v), f"{what} must be a finite number, got {v}")
    _check(
        lo <= v <= hi and not (hi_open and v >= hi),
        f"{what} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v:g}",
    )
    return v


def _int(x: Any, what: str, lo: int, hi: int) -> int:
    _check(
        isinstance(x, int | np.integer) and not isinstance(x, bool),
        f"{what} must be an integer, got {x!r}",
    )
    v = int(x)
    _check(lo <= v <= hi, f"{what} must be in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True)
class _Agg:
    """One validated aggregation."""

    rule: str
    keys: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    nnm_f: int | None = None
    beta: float | None = None
    trim: int | None = None
    f: int = 0
    m: int = 1
    maxiter: int = 100
    eps: float = 1e-6
    tau: float = 0.0
    iters: int = 1
    start: str | None = None
    scratch: bool = False

    @property
    def n(self) -> int:
        return len(self.keys)

    def validate(self) -> _Agg:
        """Checks every argument; returns a copy with plain Python numbers."""
        n = self.n
        _check(1 <= n <= MAX_INPUTS, f"numkeys must be in [1, {MAX_INPUTS}], got {n}")
        ch: dict[str, Any] = {}
        if self.nnm_f is not None:
            ch["nnm_f"] = _int(self.nnm_f, "NNM f", 0, n - 1)
        if self.weights is not None:
            _check(len(self.weights) == n, f"WEIGHTS needs {n} values, got {len(self.weights)}")
            ch["weights"] = tuple(_num(w, "weight", 0.0) for w in self.weights)
            _check(max(ch["weights"]) > 0, "weights must have a positive sum")
        if self.rule == "trimmed_mean":
            _check(
                (self.beta is None) != (self.trim is None),
                "TRIMMEAN needs TRIM or BETA, not both",
            )
            if self.trim is not None:
                ch["trim"] = _int(self.trim, "TRIM", 0, (n - 1) // 2)
            else:
                ch["beta"] = _num(self.beta, "BETA", 0.0, 0.5, hi_open=True)
        if self.rule == "krum":
            f = ch["f"] = _int(self.f, "F", 0, MAX_INPUTS)
            m = ch["m"] = _int(self.m, "M", 1, MAX_INPUTS)
            _check(n > 2 * f + 2, f"too few inputs for f: Krum needs n > 2f+2 (n={n}, f={f})")
            _check(m <= n - f, f"M must be at most n-f (n={n}, f={f}, M={m})")
        if self.rule == "geomed":
            ch["maxiter"] = _int(self.maxiter, "MAXITER", 1, MAX_ITERS)
            ch["eps"] = _num(self.eps, "EPS", 0.0, 1.0)
        if self.rule == "cclip":
            ch["tau"] = _num(self.tau, "TAU", 0.0)
            _check(ch["tau"] > 0, "TAU must be positive")
            ch["iters"] = _int(self.iters, "ITERS", 1, MAX_ITERS)
        return replace(self, **ch)

    def module_args(self, out: str) -> list[Any]:
        name = {"trimmed_mean": "SPIRT.TRIMMEAN"}.get(self.rule, "SPIRT." + self.rule.upper())
        args: list[Any] = [name, out, self.n, *self.keys]
        if self.weights is not None:
            args += ["WEIGHTS", *self.weights]
        if self.rule == "trimmed_mean":
            args += ["TRIM", self.trim] if self.trim is not None else ["BETA", float(self.beta)]
        elif self.rule == "krum":
            args += ["F", self.f, "M", self.m]
        elif self.rule == "geomed":
            args += ["MAXITER", self.maxiter, "EPS", float(self.eps)]
        elif self.rule == "cclip":
            args += ["TAU", float(self.tau), "ITERS", self.iters]
            if self.start is not None:
                args += ["START", self.start]
        if self.nnm_f is not None:
            args += ["NNM", self.nnm_f]
        if self.scratch:
            args.append("SCRATCH")
        return args


@dataclass(frozen=True)
class _Sgd:
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def validate(self, param: str, buf: str | None) -> _Sgd:
        o = _Sgd(
            lr=_num(self.lr, "LR", 0.0),
            momentum=_num(self.momentum, "MOMENTUM", 0.0),
            dampening=_num(self.dampening, "DAMPENING", 0.0, 1.0),
            nesterov=bool(self.nesterov),
            weight_decay=_num(self.weight_decay, "WEIGHT_DECAY", 0.0),
        )
        _check(
            not (o.momentum > 0 and buf is None), "MOMENTUM needs a BUF key for the momentum buffer"
        )
        _check(
            not (o.nesterov and (o.momentum <= 0 or o.dampening != 0)),
            "NESTEROV needs MOMENTUM > 0 and DAMPENING 0",
        )
        _check(not (o.momentum > 0 and buf == param), "BUF must differ from the parameter key")
        return o


@dataclass(frozen=True)
class _Adam:
    step: int
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def validate(self, param: str, m: str, v: str) -> _Adam:
        o = _Adam(
            step=_int(self.step, "STEP", 1, 1 << 53),
            lr=_num(self.lr, "LR", 0.0),
            beta1=_num(self.beta1, "beta1", 0.0, 1.0, hi_open=True),
            beta2=_num(self.beta2, "beta2", 0.0, 1.0, hi_open=True),
            eps=_num(self.eps, "EPS", 0.0),
            weight_decay=_num(self.weight_decay, "WEIGHT_DECAY", 0.0),
            decoupled=bool(self.decoupled),
        )
        _check(o.eps > 0, "EPS must be positive")
        _check(len({param, m, v}) == 3, "the parameter, M and V keys must all differ")
        return o


def _map_error(e: ResponseError) -> StoreError:
    msg = str(e)
    if msg.startswith("SPIRT "):
        msg = msg[len("SPIRT ") :]
    if msg.startswith("missing key"):
        return TensorNotFound(msg)
    if "during the command" in msg:
        return InputChanged(msg)
    if msg.startswith("non-finite value"):
        return NonFinite(msg)
    return StoreError(msg)


def _as_f4(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
    return np.require(array, dtype=tensorfmt.DTYPE, requirements="C")


def _first_nonfinite(a: np.ndarray | torch.Tensor) -> int | None:
    t = a if isinstance(a, torch.Tensor) else _torch_view(a)
    bad = ~torch.isfinite(t.reshape(-1))
    if not bool(bad.any()):
        return None
    return int(torch.nonzero(bad)[0, 0])


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor over a (possibly read-only) array; callers never write into it."""
    if a.size == 0:
        return torch.zeros(a.shape, dtype=_F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(a.data, dtype=_F32).reshape(a.shape)


# ---- the store -----------------------------------------------------------------------


class TensorStore:
    """Tensors and tensor operations in one Redis; see the module docstring.

    Module commands on large inputs take as long as their arithmetic (a median of
    16 x 10M floats: under a second; many Weiszfeld iterations: longer): give the client
    a ``socket_timeout`` above the longest operation you run, or none (the module's own
    JOB_TIMEOUT_MS bounds every command).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        use_module: bool | None = None,
        logger: logging.Logger | None = None,
        max_elements: int = tensorfmt.MAX_ELEMENTS,
    ) -> None:
        self.client = client
        self.log = logger or log
        self.max_elements = max_elements
        self._module = use_module

    @classmethod
    async def open(cls, client: aioredis.Redis, **kw: Any) -> TensorStore:
        """A store with module detection done."""
        store = cls(client, **kw)
        await store.detect()
        return store

    @classmethod
    async def from_url(cls, url: str, **kw: Any) -> TensorStore:
        """A store on an external Redis (``spirtd --redis-url``); detection done.

        The URL may carry credentials (``redis://user:pass@host:port/0``) or a unix
        socket (``unix:///path/redis.sock``). Without the module it warns and works
        client-side."""
        client = aioredis.Redis.from_url(url, socket_connect_timeout=5.0)
        return await cls.open(client, **kw)

    async def health(self, timeout: float = 1.0) -> dict[str, bool]:
        """``{"ok": ..., "module": ...}`` for ``spirtctl status``; answers within timeout."""
        try:
            ok = bool(await asyncio.wait_for(self.client.ping(), timeout))
        except Exception:  # any failure to answer is "not ok", never an exception here
            ok = False
        return {"ok": ok, "module": bool(self._module) if ok else False}

    async def detect(self) -> bool:
        """Decides (once) whether to use the module; logs a warning when falling back."""
        if self._module is None:
            self._module = await module_loaded(self.client)
            if not self._module:
                self.log.warning(
                    "the SPIRT Redis module is not loaded; aggregating and updating "
                    "client-side with torch (slower: every tensor crosses the socket)"
                )
        return self._module

    @property
    def uses_module(self) -> bool | None:
        """True/False once detected, None before."""
        return self._module

    # ---- tensors ----------------------------------------------------------------------

    async def put(self, key: str, array: Any, *, scratch: bool = False) -> None:
        """Stores an array (any shape) as float32. Non-finite values are refused.

        ``scratch``: the module keeps the write out of the AOF (it will not survive a
        restart of Redis); on a plain Redis it is persisted like any SET."""
        a = _as_f4(array)
        _check(a.size <= self.max_elements, f"tensor too large ({a.size} elements)")
        _check(a.ndim <= tensorfmt.MAX_DIMS, f"too many dimensions ({a.ndim})")
        shape = tensorfmt.encode_shape(a.shape)
        values = memoryview(a.reshape(-1)).cast("B")  # sent as-is, no copy
        if await self.detect():
            await self._call("SPIRT.PUT", key, shape, values, *(["SCRATCH"] if scratch else []))
            return
        bad = _first_nonfinite(a)
        if bad is not None:
            raise NonFinite(f"non-finite value at index {bad}")
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, values)
            pipe.set(tensorfmt.shape_key(key), shape)
            await pipe.execute()

    async def get(self, key: str) -> np.ndarray:
        """A read-only float32 array over the reply bytes (no copy)."""
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        """Reads several tensors in one atomic MGET."""
        raw = await self.client.mget(_names(keys))
        for i, k in enumerate(keys):
            if raw[2 * i] is None or raw[2 * i + 1] is None:
                await self._refuse_non_strings(self.client, k)  # MGET hides other types
        return [self._decode(k, raw[2 * i], raw[2 * i + 1]) for i, k in enumerate(keys)]

    async def get_torch(self, key: str) -> torch.Tensor:
        """A float32 tensor over the reply bytes (no copy; treat it as read-only)."""
        return _torch_view(await self.get(key))

    async def exists(self, key: str) -> bool:
        return bool(await self.client.exists(key))

    async def delete(self, *keys: str) -> None:
        if keys:
            await self.client.delete(*keys, *(tensorfmt.shape_key(k) for k in keys))

    def _decode(self, key: str, values: bytes | None, shape: bytes | None) -> np.ndarray:
        if values is None:
            raise TensorNotFound(f"missing key '{_label(key)}'")
        if shape is None:
            raise StoreError(f"missing shape key '{_label(key)}:shape'")
        try:
            return tensorfmt.decode(values, shape, max_elements=self.max_elements)
        except tensorfmt.TensorFormatError as e:
            raise StoreError(f"'{_label(key)}': {e}") from None
        except UnicodeDecodeError:
            raise StoreError(f"'{_label(key)}': bad shape") from None

    # ---- aggregation --------------------------------------------------------------------

    async def mean(
        self,
        out: str,
        keys: Sequence[str],
        *,
        weights: Sequence[float] | None = None,
        nnm_f: int | None = None,
        scratch: bool = False,
    ) -> None:
        w = None if weights is None else tuple(weights)
        agg = _Agg("mean", tuple(keys), weights=w, nnm_f=nnm_f, scratch=scratch)
        await self._aggregate(out, agg)

    async def median(
        self, out: str, keys: Sequence[str], *, nnm_f: int | None = None, scratch: bool = False
    ) -> None:
        await self._aggregate(out, _Agg("median", tuple(keys), nnm_f=nnm_f, scratch=scratch))

    async def trimmed_mean(
        self,
        out: str,
        keys: Sequence[str],
        beta: float | None = None,
        *,
        trim: int | None = None,
        nnm_f: int | None = None,
        scratch: bool = False,
    ) -> None:
        """Drops the ``trim`` smallest and largest values per coordinate (or
        ``floor(beta * n)``; give exactly one) and averages the rest."""
        agg = _Agg("trimmed_mean", tuple(keys), beta=beta, trim=trim, nnm_f=nnm_f, scratch=scratch)
        await self._aggregate(out, agg)

    async def krum(
        self,
        out: str,
        keys: Sequence[str],
        f: int,
        *,
        m: int = 1,
        nnm_f: int | None = None,
        scratch: bool = False,
    ) -> list[int]:
        """Multi-Krum (m = 1: Krum). Returns the chosen input positions, best first."""
        agg = _Agg("krum", tuple(keys), f=f, m=m, nnm_f=nnm_f, scratch=scratch)
        return await self._aggregate(out, agg)

    async def geomed(
        self,
        out: str,
        keys: Sequence[str],
        *,
        maxiter: int = 100,
        eps: float = 1e-6,
        nnm_f: int | None = None,
        scratch: bool = False,
    ) -> int:
        """Geometric median (Weiszfeld). Returns the number of iterations run."""
        agg = _Agg("geomed", tuple(keys), maxiter=maxiter, eps=eps, nnm_f=nnm_f, scratch=scratch)
        return await self._aggregate(out, agg)

    async def cclip(
        self,
        out: str,
        keys: Sequence[str],
        tau: float,
        *,
        iters: int = 1,
        start: str | None = None,
        nnm_f: int | None = None,
        scratch: bool = False,
    ) -> None:
        agg = _Agg(
            "cclip", tuple(keys), tau=tau, iters=iters, start=start, nnm_f=nnm_f, scratch=scratch
        )
        await self._aggregate(out, agg)

    async def aggregate(self, rule: str, out: str, keys: Sequence[str], **params: Any) -> Any:
        """Dispatch by rule name (one of RULES), e.g. from a training job's settings."""
        if rule not in RULES:
            raise StoreError(f"unknown aggregation rule {rule!r} (known: {', '.join(RULES)})")
        method: Callable[..., Any] = getattr(self, rule)
        return await method(out, keys, **params)

    async def _aggregate(self, out: str, agg: _Agg) -> Any:
        agg = agg.validate()
        if await self.detect():
            reply = await self._call(*agg.module_args(out))
            if agg.rule == "krum":
                return [int(i) for i in reply]
            return int(reply) if agg.rule == "geomed" else None
        inputs = [(k, False) for k in agg.keys]
        if agg.start is not None:
            inputs.append((agg.start, False))
        return await self._client_side(inputs, [out], lambda xs: _aggregate_torch(agg, xs))

    # ---- model updates ------------------------------------------------------------------

    async def sgd(
        self,
        param: str,
        grad: str,
        *,
        lr: float,
        momentum: float = 0.0,
        buf: str | None = None,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        scratch: bool = False,
    ) -> None:
        """A torch.optim.SGD step on ``param``; the momentum buffer lives at ``buf``
        (``scratch``: see put)."""
        o = _Sgd(lr, momentum, dampening, nesterov, weight_decay).validate(param, buf)
        use_buf = o.momentum > 0
        if await self.detect():
            args: list[Any] = ["SPIRT.SGD", param, grad, "LR", o.lr]
            if use_buf:
                args += ["MOMENTUM", o.momentum, "BUF", buf]
            if o.dampening:
                args += ["DAMPENING", o.dampening]
            if o.nesterov:
                args.append("NESTEROV")
            if o.weight_decay:
                args += ["WEIGHT_DECAY", o.weight_decay]
            if scratch:
                args.append("SCRATCH")
            await self._call(*args)
            return
        inputs = [(param, False), (grad, False)]
        outputs = [param]
        if use_buf:
            assert buf is not None
            inputs.append((buf, True))
            outputs.append(buf)
        await self._client_side(inputs, outputs, lambda xs: (_sgd_torch(o, xs), None))

    async def adam(
        self,
        param: str,
        grad: str,
        *,
        m: str,
        v: str,
        step: int,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        scratch: bool = False,
    ) -> None:
        """torch.optim.Adam (AdamW when decoupled) step number ``step`` (counting from 1;
        step 1 starts from zero moments, so ``m``/``v`` need not exist yet)."""
        o = _Adam(step, lr, betas[0], betas[1], eps, weight_decay, decoupled).validate(param, m, v)
        if await self.detect():
            args: list[Any] = [
                "SPIRT.ADAM",
                param,
                grad,
                "M",
                m,
                "V",
                v,
                "STEP",
                o.step,
                "LR",
                o.lr,
                "BETAS",
                o.beta1,
                o.beta2,
                "EPS",
                o.eps,
            ]
            if o.weight_decay:
                args += ["WEIGHT_DECAY", o.weight_decay]
            if o.decoupled:
                args.append("DECOUPLED")
            if scratch:
                args.append("SCRATCH")
            await self._call(*args)
            return
        # Step 1 starts from zero moments: m and v are only written, never read.
        inputs = [(param, False), (grad, False)]
        if o.step > 1:
            inputs += [(m, False), (v, False)]
        await self._client_side(inputs, [param, m, v], lambda xs: (_adam_torch(o, xs), None))

    # ---- reductions ---------------------------------------------------------------------

    async def norm(self, key: str) -> float:
        """L2 norm, accumulated in float64."""
        if await self.detect():
            return float(await self._call("SPIRT.NORM", key))
        x = _torch_view(await self.get(key)).reshape(-1)
        bad = _first_nonfinite(x)
        _check(bad is None, f"non-finite value in '{_label(key)}' at index {bad}")
        return float(torch.linalg.vector_norm(x.to(_F64)))

    async def digest(self, key: str) -> str:
        """BLAKE2b-256 hex of the tensor's raw bytes: equal parameters, equal digests."""
        if await self.detect():
            reply = await self._call("SPIRT.DIGEST", key)
            return reply.decode("ascii") if isinstance(reply, bytes) else str(reply)
        a = await self.get(key)
        return hashlib.blake2b(a.data.cast("B"), digest_size=32).hexdigest()

    # ---- plumbing -----------------------------------------------------------------------

    @staticmethod
    async def _refuse_non_strings(client: Any, key: str) -> None:
        if await _type(client, key) not in ("none", "string"):
            raise StoreError(f"key '{_label(key)}' holds the wrong type (not a string tensor)")
        if await _type(client, tensorfmt.shape_key(key)) not in ("none", "string"):
            raise StoreError(f"wrong type at shape key '{_label(key)}:shape'")

    async def _call(self, *args: Any) -> Any:
        try:
            return await self.client.execute_command(*args)
        except ResponseError as e:
            raise _map_error(e) from None

    async def _client_side(
        self,
        inputs: list[tuple[str, bool]],
        outputs: list[str],
        compute: Callable[[list[torch.Tensor | None]], tuple[list[torch.Tensor], Any]],
    ) -> Any:
        """Reads inputs under WATCH, computes on a thread, writes outputs in MULTI/EXEC."""
        keys = [k for k, _ in inputs]
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(*_names(keys))
            raw = await pipe.mget(_names(keys))
            xs: list[torch.Tensor | None] = []
            shape: bytes | None = None
            first = ""
            for i, (key, optional) in enumerate(inputs):
                if raw[2 * i] is None or raw[2 * i + 1] is None:
                    # MGET answers nil for other types too: tell them apart like the module.
                    await self._refuse_non_strings(pipe, key)
                if raw[2 * i] is None and optional:
                    xs.append(None)
                    continue
                a = self._decode(key, raw[2 * i], raw[2 * i + 1])
                if shape is None:
                    shape, first = tensorfmt.encode_shape(a.shape), key
                    length = a.size
                elif a.size != length:
                    raise StoreError(
                        f"length mismatch: '{_label(key)}' has {a.size} elements, "
                        f"'{_label(first)}' has {length}"
                    )
                bad = _first_nonfinite(a)
                _check(bad is None, f"non-finite value in '{_label(key)}' at index {bad}")
                xs.append(_torch_view(a).reshape(-1))
            for out in outputs:
                for name in (out, tensorfmt.shape_key(out)):
                    _check(
                        await _type(pipe, name) in ("none", "string"),
                        f"output key '{_label(name)}' holds the wrong type (not a string)",
                    )
            results, ret = await asyncio.to_thread(compute, xs)
            assert shape is not None
            pipe.multi()
            for out, r in zip(outputs, results, strict=True):
                data = r.contiguous().numpy()
                pipe.set(out, memoryview(data).cast("B"))
                pipe.set(tensorfmt.shape_key(out), shape)
            try:
                await pipe.execute()
            except WatchError:
                raise InputChanged(
                    "an input was modified during the command; nothing was written"
                ) from None
        return ret


async def _type(client: Any, key: str) -> str:
    t = await client.type(key)
    return t.decode() if isinstance(t, bytes) else str(t)


def _names(keys: Sequence[str]) -> list[str]:
    names: list[str] = []
    for k in keys:
        names += [k, tensorfmt.shape_key(k)]
    return names


# ---- client-side implementations (torch, float64 arithmetic) --------------------------
#
# They follow the module's definitions (native/rules.c, native/optim.c) step for step so
# both paths agree to float32 rounding; see native/README.md for the definitions.


def _aggregate_torch(agg: _Agg, xs: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], Any]:
    rows = [x for x in xs if x is not None]
    data, extra = rows[: agg.n], rows[agg.n :]
    if agg.nnm_f is not None:
        data = _nnm(data, agg.nnm_f)
    n = agg.n
    ret: Any = None
    if agg.rule == "mean":
        out = _mean(data, agg.weights)
    elif agg.rule == "median":
        out = _rank_mean(data, (n - 1) // 2, n // 2)
    elif agg.rule == "trimmed_mean":
        b = agg.trim if agg.trim is not None else math.floor((agg.beta or 0.0) * n)
        out = _rank_mean(data, b, n - b - 1)
    elif agg.rule == "krum":
        out, ret = _krum(data, agg.f, agg.m)
    elif agg.rule == "geomed":
        out, ret = _geomed(data, agg.maxiter, agg.eps)
    elif agg.rule == "cclip":
        out = _cclip(data, agg.tau, agg.iters, extra[0] if extra else None)
    else:  # pragma: no cover - validate() rejects unknown rules
        raise StoreError(f"unknown rule {agg.rule}")
    return [out], ret


def _mean(xs: list[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    acc = torch.zeros(xs[0].numel(), dtype=_F64)
    if weights is None:
        for x in xs:
            acc += x
        return (acc / len(xs)).to(_F32)
    # Normalised as the module does (rules.c): by the largest weight, then by the sum,
    # so denormal weights or ones whose sum overflows still give the weighted mean.
    wmax = max(weights)
    scaled = [w / wmax for w in weights]
    total = 0.0
    for w in scaled:
        total += w
    for x, w in zip(xs, scaled, strict=True):
        if w:
            acc.add_(x.to(_F64), alpha=w / total)
    out = acc.to(_F32)
    if not bool(torch.isfinite(out).all()):
        raise StoreError("non-finite result; nothing was written")
    return out


def _rank_mean(xs: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Mean of the sorted ranks lo..hi at every coordinate."""
    size = xs[0].numel()
    out = torch.empty(size, dtype=_F32)
    for a in range(0, size, _RANK_BLOCK):
        b = min(size, a + _RANK_BLOCK)
        block = torch.stack([x[a:b] for x in xs]).sort(dim=0).values
        out[a:b] = block[lo : hi + 1].to(_F64).mean(dim=0).to(_F32)
    return out


def _pairwise_sqdist(xs: list[torch.Tensor]) -> torch.Tensor:
    n, size = len(xs), xs[0].numel()
    d = torch.zeros((n, n), dtype=_F64)
    for a in range(0, size, _RANK_BLOCK):
        b = min(size, a + _RANK_BLOCK)
        block = torch.stack([x[a:b] for x in xs]).to(_F64)
        for i in range(n):
            d[i] += ((block - block[i]) ** 2).sum(dim=1)
    d.fill_diagonal_(0.0)
    return d


def _nnm(xs: list[torch.Tensor], f: int) -> list[torch.Tensor]:
    n = len(xs)
    d = _pairwise_sqdist(xs).tolist()
    keep = n - f
    mixed = []
    for i in range(n):
        nbrs = sorted(range(n), key=lambda j, i=i: (d[i][j], j))[:keep]
        mixed.append(_mean([xs[j] for j in nbrs]))
    return mixed


def _krum(xs: list[torch.Tensor], f: int, m: int) -> tuple[torch.Tensor, list[int]]:
    n = len(xs)
    d = _pairwise_sqdist(xs).tolist()
    q = n - f - 2
    scores = []
    for i in range(n):
        others = sorted(d[i][j] for j in range(n) if j != i)
        scores.append(sum(others[:q]))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return _mean([xs[i] for i in chosen]), chosen


def _geomed(xs: list[torch.Tensor], maxiter: int, eps: float) -> tuple[torch.Tensor, int]:
    x64 = [x.to(_F64) for x in xs]
    z = sum(x64[1:], x64[0].clone()) / len(xs)
    d = [float(torch.linalg.vector_norm(x - z)) for x in x64]
    iters = 0
    while iters < maxiter:
        dmax = max(d)
        if dmax == 0.0:
            break
        floor_d = dmax * 1e-12
        w = [1.0 / max(di, floor_d) for di in d]
        total = sum(w)
        znew = torch.zeros_like(z)
        for x, wi in zip(x64, w, strict=True):
            znew.add_(x, alpha=wi / total)
        diff = float(torch.linalg.vector_norm(znew - z))
        nrm = float(torch.linalg.vector_norm(znew))
        z = znew
        d = [float(torch.linalg.vector_norm(x - z)) for x in x64]
        iters += 1
        if diff <= eps * nrm:
            break
    return z.to(_F32), iters


def _cclip(
    xs: list[torch.Tensor], tau: float, iters: int, start: torch.Tensor | None
) -> torch.Tensor:
    x64 = [x.to(_F64) for x in xs]
    n = len(xs)
    v = start.to(_F64) if start is not None else torch.zeros(xs[0].numel(), dtype=_F64)
    for _ in range(iters):
        step = torch.zeros_like(v)
        for x in x64:
            diff = x - v
            dist = float(torch.linalg.vector_norm(diff))
            c = tau / dist if dist > 0.0 and tau < dist else 1.0
            step.add_(diff, alpha=c / n)
        v = v + step
    return v.to(_F32)


def _finite_result(t: torch.Tensor, what: str) -> torch.Tensor:
    bad = _first_nonfinite(t)
    _check(
        bad is None,
        f"update produced a non-finite {what} at index {bad} (learning rate too large?)",
    )
    return t


def _sgd_torch(o: _Sgd, xs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    p, g = xs[0], xs[1]
    assert p is not None and g is not None
    p64 = p.to(_F64)
    g64 = g.to(_F64) + o.weight_decay * p64
    if o.momentum == 0:
        return [_finite_result((p64 - o.lr * g64).to(_F32), "parameter")]
    buf = xs[2] if len(xs) > 2 else None
    b = g64 if buf is None else o.momentum * buf.to(_F64) + (1 - o.dampening) * g64
    step = g64 + o.momentum * b if o.nesterov else b
    new_p = _finite_result((p64 - o.lr * step).to(_F32), "parameter")
    return [new_p, _finite_result(b.to(_F32), "momentum buffer")]


def _adam_torch(o: _Adam, xs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    p, g = xs[0], xs[1]
    assert p is not None and g is not None
    w = p.to(_F64)
    gi = g.to(_F64)
    if o.decoupled:
        w = w * (1 - o.lr * o.weight_decay)
    else:
        gi = gi + o.weight_decay * w
    m_old = xs[2] if len(xs) > 3 else None
    v_old = xs[3] if len(xs) > 3 else None
    m = (1 - o.beta1) * gi
    v = (1 - o.beta2) * gi * gi
    if m_old is not None and v_old is not None:
        m = m + o.beta1 * m_old.to(_F64)
        v = v + o.beta2 * v_old.to(_F64)
    bc1 = 1 - o.beta1**o.step
    sqrt_bc2 = math.sqrt(1 - o.beta2**o.step)
    new_w = w - (o.lr / bc1) * m / (v.sqrt() / sqrt_bc2 + o.eps)
    return [
        _finite_result(new_w.to(_F32), "parameter"),
        _finite_result(m.to(_F32), "first moment"),
        _finite_result(v.to(_F32), "second moment"),
    ]


__all__ = [
    "RULES",
    "InputChanged",
    "StoreError",
    "TensorNotFound",
    "TensorStore",
    "module_loaded",
]
