"""Checked task options: tasks are configured from CLI flags and function events,
so every option is type- and range-checked with an error that names it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spirtd.tasks.base import TaskError

Scalar = int | float | str | bool | None
MAX_OPTIONS = 32
MAX_OPTION_STR = 4096


def check_options(options: Mapping[str, Any], allowed: set[str], task: str) -> dict[str, Scalar]:
    if len(options) > MAX_OPTIONS:
        raise TaskError(f"task {task!r}: too many options ({len(options)} > {MAX_OPTIONS})")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TaskError(
            f"task {task!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed)) or 'none'}"
        )
    out: dict[str, Scalar] = {}
    for k, v in options.items():
        if not isinstance(v, int | float | str | bool) and v is not None:
            raise TaskError(f"task {task!r}: option {k} must be a number, string or bool")
        if isinstance(v, str) and len(v) > MAX_OPTION_STR:
            raise TaskError(f"task {task!r}: option {k} is too long")
        out[k] = v
    return out


def int_option(opts: Mapping[str, Scalar], key: str, default: int, lo: int, hi: int) -> int:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TaskError(f"option {key} must be an integer, got {v!r}")
    if not (lo <= v <= hi):
        raise TaskError(f"option {key} must be in {lo}..{hi}, got {v}")
    return v


def float_option(
    opts: Mapping[str, Scalar], key: str, default: float, lo: float, hi: float
) -> float:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TaskError(f"option {key} must be a number, got {v!r}")
    if not (lo <= float(v) <= hi):
        raise TaskError(f"option {key} must be in [{lo}, {hi}], got {v}")
    return float(v)


def choice_option(opts: Mapping[str, Scalar], key: str, default: str, choices: set[str]) -> str:
    v = opts.get(key, default)
    if v not in choices:
        raise TaskError(f"option {key} must be one of {', '.join(sorted(choices))}, got {v!r}")
    return str(v)
