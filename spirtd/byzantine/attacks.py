"""What a Byzantine peer sends instead of its honest gradient: pure numpy.

Each attack maps (its own honest gradient, the honest gradients of the round it
has received, the cluster's n and f) to the gradient(s) it publishes. The
omniscient ones (ALIE, IPM, mimic) need the honest gradients; a Byzantine peer
in a gossip cluster has them before it sends, because it simply waits for them.

* ``signflip``: -scale x its own gradient (SPIRT's paper used scale 10).
* ``gaussian``: N(0, sigma^2) noise in place of the gradient.
* ``alie``: "a little is enough" (Baruch et al., 2019): mean - z x std of the
  honest gradients, coordinate-wise, with z from n and f.
* ``ipm``: inner-product manipulation (Xie et al., 2020): -eps x the honest mean.
* ``labelflip``: a real gradient on its own minibatch with labels y -> C-1-y
  (computed by the harness; here it only passes through).
* ``mimic``: a copy of one honest peer's gradient (the lowest node id), which
  over-weights that peer's data without looking odd.
* ``nonfinite``: NaN (or Inf) values.
* ``equivocation``: its honest gradient to half of the peers, -scale x it to
  the other half, signed separately for the same round; with ``same_seq`` 1,
  both under one sequence number (so that a relay holding one version takes
  the other for a replay unless it looks closer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

ATTACKS = (
    "none",
    "signflip",
    "gaussian",
    "alie",
    "ipm",
    "labelflip",
    "mimic",
    "nonfinite",
    "equivocation",
)
# The ones that work from the honest gradients of the round.
OMNISCIENT = frozenset({"alie", "ipm", "mimic"})
DEFAULTS: dict[str, dict[str, Any]] = {
    "signflip": {"scale": 10.0},
    "gaussian": {"sigma": 10.0},
    "alie": {},  # z from n and f unless given
    "ipm": {"eps": 0.5},
    "nonfinite": {"value": "nan"},
    "equivocation": {"scale": 10.0, "same_seq": 0},
}


class AttackError(ValueError):
    pass


@dataclass(frozen=True)
class Attack:
    name: str = "none"
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def make(cls, name: str, params: Mapping[str, Any] | None = None, seed: int = 0) -> Attack:
        if name not in ATTACKS:
            raise AttackError(f"unknown attack {name!r} (known: {', '.join(ATTACKS)})")
        merged = {**DEFAULTS.get(name, {}), **(params or {})}
        for k, v in merged.items():
            if k == "value":
                if v not in ("nan", "inf"):
                    raise AttackError("nonfinite value must be 'nan' or 'inf'")
            elif not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise AttackError(f"attack parameter {k} must be a finite number")
        unknown = set(merged) - set(DEFAULTS.get(name, {})) - ({"z"} if name == "alie" else set())
        if unknown:
            raise AttackError(f"attack {name} takes no parameter(s) {', '.join(sorted(unknown))}")
        return cls(name, merged, seed)

    @property
    def omniscient(self) -> bool:
        return self.name in OMNISCIENT


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z: the largest deviation that still leaves the Byzantine
    values inside the range a majority of honest values would cover."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


def craft(
    attack: Attack,
    own: np.ndarray,
    honest: Sequence[np.ndarray],
    *,
    n: int,
    f: int,
    round: int,
    rng_key: int = 0,
) -> list[np.ndarray]:
    """The gradient(s) to publish: one, or two for equivocation (first to the first
    half of the peers). ``honest``: the round's honest gradients received so far,
    in node-id order (may be empty; the omniscient attacks then use ``own``)."""
    p = attack.params
    name = attack.name
    own = np.asarray(own, dtype=np.float32)
    pool = np.stack([np.asarray(h, dtype=np.float32) for h in honest]) if honest else own[None]
    if name in ("none", "labelflip"):
        out = own
    elif name == "signflip":
        out = -float(p["scale"]) * own
    elif name == "gaussian":
        rng = np.random.default_rng([attack.seed, round, rng_key])
        out = rng.normal(0.0, float(p["sigma"]), size=own.shape)
    elif name == "alie":
        z = float(p["z"]) if "z" in p else alie_z(n, f)
        out = pool.mean(axis=0) - z * pool.std(axis=0)
    elif name == "ipm":
        out = -float(p["eps"]) * pool.mean(axis=0)
    elif name == "mimic":
        out = pool[0]
    elif name == "nonfinite":
        out = np.full_like(own, np.nan if p["value"] == "nan" else np.inf)
    elif name == "equivocation":
        return [own.copy(), (-float(p["scale"]) * own).astype(np.float32)]
    else:  # pragma: no cover - make() refuses unknown names
        raise AttackError(name)
    return [np.asarray(out, dtype=np.float32)]
