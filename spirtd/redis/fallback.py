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

from spirtd.checks import check
from spirtd.rules.kernels import F32 as _F32
from spirtd.rules.kernels import F64 as _F64
from spirtd.rules.kernels import nnm

if TYPE_CHECKING:
    from spirtd.redis.store import _Adam, _Agg, _Sgd


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
