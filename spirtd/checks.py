"""The tensor store's error and the argument checks that raise it.

Neutral ground between :mod:`spirtd.redis` (the store raises it) and
:mod:`spirtd.rules` (the rules check their parameters with the same words as the
store, and the store dispatches to the rules): in either package it would make the
two import each other. Import-light, since the rule registry must load without torch
(``spirtctl`` lists the rules in its help).
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any


class StoreError(RuntimeError):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise StoreError(msg)


def number(x: Any, what: str, lo: float, hi: float = math.inf, *, hi_open: bool = False) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise StoreError(f"{what} must be a finite number, got {x!r}") from None
    check(math.isfinite(v), f"{what} must be a finite number, got {v}")
    check(
        lo <= v <= hi and not (hi_open and v >= hi),
        f"{what} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v:g}",
    )
    return v


def integer(x: Any, what: str, lo: int, hi: int) -> int:
    # numbers.Integral takes numpy's integers too (they register with it).
    check(
        isinstance(x, Integral) and not isinstance(x, bool),
        f"{what} must be an integer, got {x!r}",
    )
    v = int(x)
    check(lo <= v <= hi, f"{what} must be in [{lo}, {hi}], got {v}")
    return v
