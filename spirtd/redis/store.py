"""The tensor store: SPIRT's tensors in Redis, and the work done on them.

``TensorStore`` is an async API over a ``redis.asyncio`` client (hiredis parser):

* put/get tensors in the format of :mod:`spirtd.redis.tensorfmt` (copy-free: ``put`` hands
  redis-py a memoryview of the array, ``get`` returns a read-only array over the reply
  bytes);
* the aggregation rules registered in :mod:`spirtd.rules` (``aggregate``, and a method
  for each built-in one), each optionally after nearest-neighbour mixing;
* optimizer updates (SGD with momentum/Nesterov/weight decay, Adam/AdamW);
* L2 norm and BLAKE2b-256 digest;
* compression of a published vector (``pack``/``unpack``: protocol/compression.py's
  fp16 and int8 formats, with error feedback), decoded to the same bits on both paths.

When the SPIRT module is loaded in that Redis (detected with MODULE LIST) the work runs
inside Redis (``SPIRT.*`` commands, see native/README.md). Otherwise the same operations
run here with torch (:mod:`spirtd.redis.fallback`), on a worker thread so the event
loop keeps running, and a warning is logged once. Both paths validate the same way and
raise the same exceptions; the client-side path reads its inputs under WATCH and writes
its outputs in MULTI/EXEC, so it too either writes everything or nothing.

The fallback module (and with it torch, a second of CPU to import) is imported by the
methods that use it, on first use: a daemon that never trains never imports it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ResponseError, WatchError

from protocol import compression
from spirtd import rules
from spirtd.checks import StoreError, check, integer, number
from spirtd.redis import tensorfmt
from spirtd.rules.base import MAX_INPUTS, Rule

if TYPE_CHECKING:
    import torch

log = logging.getLogger("spirtd.store")

MODULE_NAME = "spirt"


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


@dataclass(frozen=True)
class _Agg:
    """One aggregation: a registered rule, its parameters and what composes with any rule
    (nearest-neighbour mixing first, a START tensor for a rule that keeps one)."""

    rule: Rule
    keys: tuple[str, ...]
    params: dict[str, Any]
    nnm_f: int | None = None
    start: str | None = None
    scratch: bool = False

    @property
    def n(self) -> int:
        return len(self.keys)

    def validate(self) -> _Agg:
        """Checks every argument; returns a copy with plain Python numbers."""
        n, name = self.n, self.rule.name
        check(1 <= n <= MAX_INPUTS, f"numkeys must be in [1, {MAX_INPUTS}], got {n}")
        ch: dict[str, Any] = {}
        if self.nnm_f is not None:
            ch["nnm_f"] = integer(self.nnm_f, "NNM f", 0, n - 1)
        unknown = sorted(set(self.params) - self.rule.accepts)
        check(not unknown, f"{name} takes no parameter(s) {', '.join(unknown)}")
        check(self.start is None or self.rule.keeps_previous, f"{name} takes no START tensor")
        ch["params"] = self.rule.check(self.params, n)
        return replace(self, **ch)

    def module_args(self, out: str) -> list[Any]:
        assert self.rule.command is not None
        args: list[Any] = [self.rule.command, out, self.n, *self.keys]
        args += self.rule.module_args(self.params)
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
            lr=number(self.lr, "LR", 0.0),
            momentum=number(self.momentum, "MOMENTUM", 0.0),
            dampening=number(self.dampening, "DAMPENING", 0.0, 1.0),
            nesterov=bool(self.nesterov),
            weight_decay=number(self.weight_decay, "WEIGHT_DECAY", 0.0),
        )
        check(
            not (o.momentum > 0 and buf is None), "MOMENTUM needs a BUF key for the momentum buffer"
        )
        check(
            not (o.nesterov and (o.momentum <= 0 or o.dampening != 0)),
            "NESTEROV needs MOMENTUM > 0 and DAMPENING 0",
        )
        check(not (o.momentum > 0 and buf == param), "BUF must differ from the parameter key")
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
            step=integer(self.step, "STEP", 1, 1 << 53),
            lr=number(self.lr, "LR", 0.0),
            beta1=number(self.beta1, "beta1", 0.0, 1.0, hi_open=True),
            beta2=number(self.beta2, "beta2", 0.0, 1.0, hi_open=True),
            eps=number(self.eps, "EPS", 0.0),
            weight_decay=number(self.weight_decay, "WEIGHT_DECAY", 0.0),
            decoupled=bool(self.decoupled),
        )
        check(o.eps > 0, "EPS must be positive")
        check(len({param, m, v}) == 3, "the parameter, M and V keys must all differ")
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
    torch = sys.modules.get("torch")  # not imported: not a tensor of it either
    if torch is not None and isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
    return np.require(array, dtype=tensorfmt.DTYPE, requirements="C")


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
        from spirtd.redis import fallback

        a = _as_f4(array)
        check(a.size <= self.max_elements, f"tensor too large ({a.size} elements)")
        check(a.ndim <= tensorfmt.MAX_DIMS, f"too many dimensions ({a.ndim})")
        shape = tensorfmt.encode_shape(a.shape)
        values = memoryview(a.reshape(-1)).cast("B")  # sent as-is, no copy
        if await self.detect():
            await self._call("SPIRT.PUT", key, shape, values, *(["SCRATCH"] if scratch else []))
            return
        bad = fallback.first_nonfinite(a)
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
        from spirtd.redis import fallback

        return fallback.torch_view(await self.get(key))

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
        await self.aggregate("mean", out, keys, weights=weights, nnm_f=nnm_f, scratch=scratch)

    async def median(
        self, out: str, keys: Sequence[str], *, nnm_f: int | None = None, scratch: bool = False
    ) -> None:
        await self.aggregate("median", out, keys, nnm_f=nnm_f, scratch=scratch)

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
        await self.aggregate(
            "trimmed_mean", out, keys, beta=beta, trim=trim, nnm_f=nnm_f, scratch=scratch
        )

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
        return await self.aggregate("krum", out, keys, f=f, m=m, nnm_f=nnm_f, scratch=scratch)

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
        return await self.aggregate(
            "geomed", out, keys, maxiter=maxiter, eps=eps, nnm_f=nnm_f, scratch=scratch
        )

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
        await self.aggregate(
            "cclip", out, keys, tau=tau, iters=iters, start=start, nnm_f=nnm_f, scratch=scratch
        )

    async def aggregate(
        self,
        rule: str,
        out: str,
        keys: Sequence[str],
        *,
        nnm_f: int | None = None,
        start: str | None = None,
        scratch: bool = False,
        **params: Any,
    ) -> Any:
        """Runs the registered rule ``rule`` (spirtd.rules) with its ``params``; a
        parameter given as None counts as absent. Returns what the rule returns."""
        try:
            spec = rules.get(rule)
        except rules.UnknownRule:
            known = ", ".join(rules.names())
            raise StoreError(f"unknown aggregation rule {rule!r} (known: {known})") from None
        given = {k: v for k, v in params.items() if v is not None}
        agg = _Agg(spec, tuple(keys), given, nnm_f=nnm_f, start=start, scratch=scratch)
        return await self._aggregate(out, agg)

    async def _aggregate(self, out: str, agg: _Agg) -> Any:
        from spirtd.redis import fallback

        agg = agg.validate()
        if agg.rule.command is not None and await self.detect():
            return agg.rule.reply(await self._call(*agg.module_args(out)))
        inputs = [(k, False) for k in agg.keys]
        if agg.start is not None:
            inputs.append((agg.start, False))
        return await self._client_side(inputs, [out], lambda xs: fallback.aggregate(agg, xs))

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
        from spirtd.redis import fallback

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
        await self._client_side(inputs, outputs, lambda xs: (fallback.sgd(o, xs), None))

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
        from spirtd.redis import fallback

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
        await self._client_side(inputs, [param, m, v], lambda xs: (fallback.adam(o, xs), None))

    # ---- reductions ---------------------------------------------------------------------

    async def norm(self, key: str) -> float:
        """L2 norm, accumulated in float64."""
        from spirtd.redis import fallback

        if await self.detect():
            return float(await self._call("SPIRT.NORM", key))
        x = fallback.torch_view(await self.get(key)).reshape(-1)
        bad = fallback.first_nonfinite(x)
        check(bad is None, f"non-finite value in '{_label(key)}' at index {bad}")
        return fallback.norm(x)

    async def digest(self, key: str) -> str:
        """BLAKE2b-256 hex of the tensor's raw bytes: equal parameters, equal digests."""
        if await self.detect():
            reply = await self._call("SPIRT.DIGEST", key)
            return reply.decode("ascii") if isinstance(reply, bytes) else str(reply)
        a = await self.get(key)
        return hashlib.blake2b(a.data.cast("B"), digest_size=32).hexdigest()

    # ---- compression (protocol.compression's formats) ------------------------------------

    async def pack(
        self,
        dst: str,
        src: str,
        *,
        fmt: str,
        base: str | None = None,
        residual: str | None = None,
        scratch: bool = False,
    ) -> int:
        """Encodes v = ``src`` (or ``base - src``, an outer round's pseudo-gradient) plus the
        tensor at ``residual`` (zeros when absent) in ``fmt`` into the plain string
        ``dst``; with ``residual``, stores there what the encoding lost (v minus the
        body's decoding), for the next pack to carry (error feedback). Returns the
        body's byte length. NonFinite: a non-finite input or v, a value beyond fp16's
        range, an int8 block whose range overflows float32; nothing is written then."""
        from spirtd.redis import fallback

        _check_pack_keys(fmt, dst, src, base, residual)
        if await self.detect():
            args: list[Any] = ["SPIRT.PACK", dst, src, "FORMAT", fmt]
            if base is not None:
                args += ["BASE", base]
            if residual is not None:
                args += ["RESIDUAL", residual]
            if scratch:
                args.append("SCRATCH")
            return int(await self._call(*args))
        inputs = [(src, False)]
        if base is not None:
            inputs.append((base, False))
        outputs = [dst]
        if residual is not None:
            inputs.append((residual, True))
            outputs.append(residual)
        try:
            return int(
                await self._client_side(
                    inputs,
                    outputs,
                    lambda xs: fallback.pack(fmt, xs, base is not None),
                    plain=frozenset({dst}),
                )
            )
        except fallback.NonFiniteValue as e:
            raise NonFinite(str(e)) from None

    async def unpack(
        self, dst: str, src: str, *, fmt: str, count: int, scratch: bool = False
    ) -> None:
        """Decodes the body at the plain string ``src`` (``count`` values in ``fmt``) into
        the 1-D float32 tensor ``dst``, bit for bit as protocol.compression.decode.
        StoreError if the body's size is not exactly ``encoded_size(fmt, count)``;
        NonFinite if it holds a non-finite half or a malformed int8 header. Nothing is
        written on refusal."""
        from spirtd.redis import fallback

        check(fmt in PACK_FORMATS, f"FORMAT must be fp16 or int8, got '{_label(str(fmt))}'")
        n = integer(count, "COUNT", 0, tensorfmt.MAX_ELEMENTS)
        if await self.detect():
            tail = ["SCRATCH"] if scratch else []
            await self._call("SPIRT.UNPACK", dst, src, "FORMAT", fmt, "COUNT", n, *tail)
            return
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(src)
            for name in (dst, tensorfmt.shape_key(dst)):
                check(
                    await _type(pipe, name) in ("none", "string"),
                    f"output key '{_label(name)}' holds the wrong type (not a string)",
                )
            kind = await _type(pipe, src)
            if kind == "none":
                raise TensorNotFound(f"missing key '{_label(src)}'")
            check(kind == "string", f"key '{_label(src)}' holds the wrong type (not a string)")
            body = await pipe.get(src)
            refusal = fallback.unpack_refusal(fmt, _label(src), body, n)
            if refusal is not None:
                raise (StoreError if refusal.startswith("size") else NonFinite)(refusal)
            out = await asyncio.to_thread(compression.decode, fmt, body, n)
            pipe.multi()
            pipe.set(dst, memoryview(out).cast("B"))
            pipe.set(tensorfmt.shape_key(dst), str(n))
            try:
                await pipe.execute()
            except WatchError:
                raise InputChanged(
                    "an input was modified during the command; nothing was written"
                ) from None

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
        compute: Callable[[list[torch.Tensor | None]], tuple[list[Any], Any]],
        plain: frozenset[str] = frozenset(),
    ) -> Any:
        """Reads inputs under WATCH, computes on a thread, writes outputs in MULTI/EXEC.
        An output in ``plain`` is a plain string (compute gives its bytes): no shape key."""
        from spirtd.redis import fallback

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
                bad = fallback.first_nonfinite(a)
                if bad is not None:
                    raise NonFinite(f"non-finite value in '{_label(key)}' at index {bad}")
                xs.append(fallback.torch_view(a).reshape(-1))
            for out in outputs:
                for name in (out,) if out in plain else (out, tensorfmt.shape_key(out)):
                    check(
                        await _type(pipe, name) in ("none", "string"),
                        f"output key '{_label(name)}' holds the wrong type (not a string)",
                    )
            results, ret = await asyncio.to_thread(compute, xs)
            assert shape is not None
            pipe.multi()
            for out, r in zip(outputs, results, strict=True):
                if out in plain:
                    pipe.set(out, r)
                    continue
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


PACK_FORMATS = ("fp16", "int8")


def _check_pack_keys(fmt: str, dst: str, src: str, base: str | None, residual: str | None) -> None:
    """SPIRT.PACK's argument checks, with its words, for both paths."""
    check(fmt in PACK_FORMATS, f"FORMAT must be fp16 or int8, got '{_label(str(fmt))}'")
    check(dst not in (src, base, residual), "dst must differ from src, BASE and RESIDUAL")
    check(residual is None or residual not in (src, base), "RESIDUAL must differ from src and BASE")


async def _type(client: Any, key: str) -> str:
    t = await client.type(key)
    return t.decode() if isinstance(t, bytes) else str(t)


def _names(keys: Sequence[str]) -> list[str]:
    names: list[str] = []
    for k in keys:
        names += [k, tensorfmt.shape_key(k)]
    return names


__all__ = [
    "InputChanged",
    "NonFinite",
    "StoreError",
    "TensorNotFound",
    "TensorStore",
    "module_loaded",
]
