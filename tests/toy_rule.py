"""A toy aggregation rule for tests/test_rules_registry.py: the coordinate-wise maximum,
with a torch fallback only (no kernel in native/). Daemons load it with
``rule_modules = ["tests.toy_rule"]``; importing it registers nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from spirtd.rules import Rule


def coordinate_max(
    xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
) -> tuple[torch.Tensor, Any]:
    return torch.stack(xs).max(dim=0).values, len(xs)


TOY = Rule(name="toy", min_peers=lambda f: f + 1, bound="f+1", fallback=coordinate_max)
RULES = [TOY]
