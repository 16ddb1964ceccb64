"""The coordinate-wise median (the mean of the two middle values when n is even)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spirtd.rules.base import Rule

if TYPE_CHECKING:
    import torch


def _fallback(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    from spirtd.rules import kernels

    n = len(xs)
    return kernels.rank_mean(xs, (n - 1) // 2, n // 2), None


RULE = Rule(
    name="median",
    # An honest majority.
    min_peers=lambda f: 2 * f + 1,
    bound="2f+1",
    fallback=_fallback,
    command="SPIRT.MEDIAN",
)
