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

Tuned against the job's rule (issue #25):

* ``alie_opt`` and ``ipm_opt``: ALIE's z and IPM's eps chosen each round to
  maximise ||aggregate - honest mean||_2 under the job's own rule (its f, nnm+,
  the store's client-side code), searched on a log grid of ``points`` over
  [``lo``, ``hi``] (ALIE z in [0.1, 100], IPM eps in [0.01, 100], 25 points)
  plus a golden-section refinement: see :mod:`spirtd.byzantine.search`. The
  colluders agree on one vector because the search is deterministic: each
  waits for every honest member's gradient and sorts them by node id, so with
  the same set they compute the same bits. A colluder that stopped waiting
  with fewer (the wait is bounded) optimises for the set it holds and may
  publish another vector: each is still the best against its own view, but the
  f copies the search assumed are then not all alike (a weaker attack).
* ``ipm_small`` (IPM, eps 0.1, which defeats Krum in ByzFL's runs) and
  ``alie_large`` (ALIE, z 10): fixed points that break specific rules.
* ``inf``: +Inf values (``nonfinite`` with value inf, named for the matrix).
* ``cclip_boundary``: previous aggregate - radius x own / ||own||: a scaled sign
  flip whose deviation from centered clipping's start point is exactly its
  clipping radius (the job's tau, or ``radius``), so clipping leaves it whole.
* ``late``: a sign flip (x -``scale``: finite, the right size, computed on the
  round's base) held back until ``margin_s`` before this peer's deadline for
  the round, on every ``every``-th round, and at most ``max_wait_s``. Every
  round at the deadline would be a liveness attack instead: the deadline is 3x
  the median round duration, so it would climb to its ceiling (120 s); late on
  fewer than half of the rounds, the median (and so the deadline) stays the
  honest one and the gradient still lands at its last moment.
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
    "alie_opt",
    "ipm_opt",
    "ipm_small",
    "alie_large",
    "inf",
    "cclip_boundary",
    "late",
)
# The ones that work from the honest gradients of the round.
OMNISCIENT = frozenset({"alie", "ipm", "mimic", "alie_opt", "ipm_opt", "ipm_small", "alie_large"})
# The ones whose vector is not finite: published as bytes, never stored in Redis.
NONFINITE = frozenset({"nonfinite", "inf"})
# The ones searched against the job's rule (spirtd.byzantine.search).
OPTIMAL = {"alie_opt": "alie", "ipm_opt": "ipm"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "signflip": {"scale": 10.0},
    "gaussian": {"sigma": 10.0},
    "alie": {},  # z from n and f unless given
    "ipm": {"eps": 0.5},
    "nonfinite": {"value": "nan"},
    "equivocation": {"scale": 10.0, "same_seq": 0},
    "alie_opt": {"lo": 0.1, "hi": 100.0, "points": 25},
    "ipm_opt": {"lo": 0.01, "hi": 100.0, "points": 25},
    "ipm_small": {"eps": 0.1},
    "alie_large": {"z": 10.0},
    "cclip_boundary": {},  # radius: the job's cclip tau unless given
    "late": {"scale": 10.0, "margin_s": 0.25, "every": 3, "max_wait_s": 10.0},
}
# Parameters an attack takes without a default.
OPTIONAL: dict[str, frozenset[str]] = {
    "alie": frozenset({"z"}),
    "cclip_boundary": frozenset({"radius"}),
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
        unknown = set(merged) - set(DEFAULTS.get(name, {})) - OPTIONAL.get(name, frozenset())
        if unknown:
            raise AttackError(f"attack {name} takes no parameter(s) {', '.join(sorted(unknown))}")
        if name in OPTIMAL:
            lo, hi, points = merged["lo"], merged["hi"], merged["points"]
            if not (0 < lo < hi) or points != int(points) or not 2 <= points <= 1000:
                raise AttackError(f"{name}: needs 0 < lo < hi and 2 <= points <= 1000 (integer)")
        if name == "late" and (merged["margin_s"] < 0 or merged["max_wait_s"] < 0):
            raise AttackError("late: margin_s and max_wait_s must be >= 0")
        if name == "late" and (merged["every"] != int(merged["every"]) or merged["every"] < 1):
            raise AttackError("late: every must be an integer >= 1")
        if name == "cclip_boundary" and merged.get("radius", 1.0) <= 0:
            raise AttackError("cclip_boundary: radius must be positive")
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


def clip_radius(rule: str | None, f: int, n: int) -> float:
    """Centered clipping's radius in a job: the job's rule's tau if it has one, else
    what a cclip job would run with."""
    from spirtd import rules

    base = (rule or "cclip").removeprefix("nnm+")
    spec = rules.get(base) if base in rules.names() else rules.get("cclip")
    tau = spec.job_params(f, n).get("tau")
    return float(tau if tau is not None else rules.get("cclip").job_params(f, n)["tau"])


def craft(
    attack: Attack,
    own: np.ndarray,
    honest: Sequence[np.ndarray],
    *,
    n: int,
    f: int,
    round: int,
    rng_key: int = 0,
    rule: str | None = None,
    previous: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The gradient(s) to publish: one, or two for equivocation (first to the first
    half of the peers). ``honest``: the round's honest gradients received so far,
    in node-id order (may be empty; the omniscient attacks then use ``own``).
    ``rule``: the job's aggregator (its name, as in the job record), which the
    optimal attacks search against; ``previous``: the job's previous aggregate, if
    the rule keeps one (centered clipping's start point; zeros when None)."""
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
    elif name in ("alie", "alie_large"):
        z = float(p["z"]) if "z" in p else alie_z(n, f)
        out = pool.mean(axis=0) - z * pool.std(axis=0)
    elif name in ("ipm", "ipm_small"):
        out = -float(p["eps"]) * pool.mean(axis=0)
    elif name in OPTIMAL:
        from spirtd.byzantine import search

        if rule is None:
            raise AttackError(f"{name} needs the job's rule")
        out, _, _ = search.optimal(
            OPTIMAL[name],
            list(pool),
            rule=rule,
            f=f,
            lo=float(p["lo"]),
            hi=float(p["hi"]),
            points=int(p["points"]),
            previous=previous,
        )
    elif name == "cclip_boundary":
        radius = float(p["radius"]) if "radius" in p else clip_radius(rule, f, n)
        start = np.zeros_like(own) if previous is None else np.asarray(previous, np.float32)
        norm = float(np.linalg.norm(own.astype(np.float64)))
        # A zero gradient has no sign to flip: any direction at the radius will do.
        unit = own / norm if norm > 0 else np.full_like(own, 1.0 / math.sqrt(max(1, own.size)))
        out = start.astype(np.float64) - radius * unit.astype(np.float64)
    elif name == "late":
        out = -float(p["scale"]) * own
    elif name == "mimic":
        out = pool[0]
    elif name == "nonfinite":
        out = np.full_like(own, np.nan if p["value"] == "nan" else np.inf)
    elif name == "inf":
        out = np.full_like(own, np.inf)
    elif name == "equivocation":
        return [own.copy(), (-float(p["scale"]) * own).astype(np.float32)]
    else:  # pragma: no cover - make() refuses unknown names
        raise AttackError(name)
    return [np.asarray(out, dtype=np.float32)]
