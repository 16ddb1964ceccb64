"""The tensor store's client-side path: its operations in torch, for a Redis without
the SPIRT module.

They follow the module's definitions (native/optim.c; the rules' fallbacks in
spirtd/rules/ follow native/rules.c) step for step, in float64 arithmetic, so both
paths agree to float32 rounding; see native/README.md for the definitions. The store
(:mod:`spirtd.redis.store`) validates the arguments and does the reading and writing;
these functions only compute, on a worker thread.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protocol import compression
from spirtd.checks import check
from spirtd.rules.kernels import F32 as _F32
from spirtd.rules.kernels import F64 as _F64
from spirtd.rules.kernels import nnm

if TYPE_CHECKING:
    from spirtd.redis.store import _Adam, _Agg, _Sgd


class NonFiniteValue(ValueError):
    """What the store raises as NonFinite (it cannot be imported here: the store imports
    this module)."""


def first_nonfinite(a: np.ndarray | torch.Tensor) -> int | None:
    t = a if isinstance(a, torch.Tensor) else torch_view(a)
    bad = ~torch.isfinite(t.reshape(-1))
    if not bool(bad.any()):
        return None
    return int(torch.nonzero(bad)[0, 0])


def torch_view(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor over a (possibly read-only) array; callers never write into it."""
    if a.size == 0:
        return torch.zeros(a.shape, dtype=_F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(a.data, dtype=_F32).reshape(a.shape)


def norm(x: torch.Tensor) -> float:
    """L2 norm of a flat tensor, accumulated in float64."""
    return float(torch.linalg.vector_norm(x.to(_F64)))


def aggregate(agg: _Agg, xs: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], Any]:
    rows = [x for x in xs if x is not None]
    data, extra = rows[: agg.n], rows[agg.n :]
    if agg.nnm_f is not None:
        data = nnm(data, agg.nnm_f)
    out, ret = agg.rule.fallback(data, agg.params, extra[0] if extra else None)
    # The bytes are written as they are: a registered rule's fallback that returns
    # another type or length would store a tensor its shape key misdescribes.
    check(
        isinstance(out, torch.Tensor) and out.dtype == _F32 and out.numel() == data[0].numel(),
        f"rule {agg.rule.name}: its fallback must return float32 of the inputs' length",
    )
    return [out.reshape(-1)], ret


def _finite_result(t: torch.Tensor, what: str) -> torch.Tensor:
    bad = first_nonfinite(t)
    check(
        bad is None,
        f"update produced a non-finite {what} at index {bad} (learning rate too large?)",
    )
    return t


def sgd(o: _Sgd, xs: list[torch.Tensor | None]) -> list[torch.Tensor]:
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


def adam(o: _Adam, xs: list[torch.Tensor | None]) -> list[torch.Tensor]:
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


def pack(fmt: str, xs: list[torch.Tensor | None], has_base: bool) -> tuple[list[Any], int]:
    """SPIRT.PACK (native/pack.c): v = (base - src) + residual in float64, rounded once;
    the body is protocol.compression's encoding of v (the same codes as the module's),
    and the new residual is v minus the body's decoding. ``xs`` is src, then base when
    ``has_base``, then the residual (None when absent) when one is kept."""
    src = xs[0]
    assert src is not None
    s = src.numpy()
    res = xs[2 if has_base else 1] if len(xs) > (2 if has_base else 1) else None
    if has_base or res is not None:
        v64 = s.astype(np.float64)
        if has_base:
            base = xs[1]
            assert base is not None
            v64 = base.numpy().astype(np.float64) - v64
        if res is not None:
            v64 = v64 + res.numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            v = v64.astype(np.float32)
        bad = first_nonfinite(v)
        if bad is not None:
            raise NonFiniteValue(
                f"non-finite value at index {bad} of the vector to pack "
                "(base - src + residual overflows float32)"
            )
    else:
        v = s
    if fmt == "fp16":
        over = np.flatnonzero(np.abs(v) > compression.FP16_MAX)
        if over.size:
            i = int(over[0])
            raise NonFiniteValue(
                f"non-finite value in fp16 at index {i}: {float(v[i]):g} is beyond "
                f"{compression.FP16_MAX:g}"
            )
    body = compression.encode(fmt, v)
    bad = compression.first_bad(fmt, body, v.size)
    if bad is not None:  # int8 only: a range whose top code overflows float32
        raise NonFiniteValue(
            f"non-finite value in int8 block {bad // compression.HEADER}: "
            "its range overflows float32"
        )
    outputs: list[Any] = [body]
    if len(xs) > (2 if has_base else 1):
        outputs.append(torch.from_numpy(v - compression.decode(fmt, body, v.size)))
    return outputs, len(body)


def unpack_refusal(fmt: str, label: str, body: bytes, count: int) -> str | None:
    """The module's message for a body that does not decode to finite values, or None."""
    need = compression.encoded_size(fmt, count)
    if len(body) != need:
        return (
            f"size mismatch: '{label}' has {len(body)} bytes where {fmt} of {count} "
            f"values needs {need}"
        )
    at = compression.first_bad(fmt, body, count)
    if at is None:
        return None
    if fmt == "fp16":
        half = int.from_bytes(body[at : at + 2], "little")
        return f"non-finite value in '{label}' at index {at // 2} (fp16 0x{half:04x})"
    scale, offset = np.frombuffer(body, dtype="<f4", count=2, offset=at)
    return (
        f"non-finite value in '{label}': int8 block {at // compression.HEADER} has a "
        f"malformed header (scale {_c_g(scale)}, offset {_c_g(offset)})"
    )


def _c_g(x: np.floating[Any]) -> str:
    """C's %g of a float (inf, nan and -nan as glibc prints them)."""
    f = float(x)
    if math.isnan(f):
        return "-nan" if math.copysign(1.0, f) < 0 else "nan"
    return f"{f:g}"
