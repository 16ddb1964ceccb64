"""The attack harness: the arithmetic of each attack, and the switch that refuses
to run one without the deliberate confirmation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spirtd.byzantine import harness, search
from spirtd.byzantine.attacks import ATTACKS, Attack, AttackError, alie_z, craft
from spirtd.byzantine.harness import CONFIRM_ENV
from spirtd.rules import cclip

ROOT = Path(__file__).resolve().parent.parent


def _honest(k: int = 5, d: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(1.0, 0.5, size=d).astype(np.float32) for _ in range(k)]


def test_signflip_scales_and_flips_its_own_gradient() -> None:
    own = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    (out,) = craft(Attack.make("signflip", {"scale": 3.0}), own, [], n=7, f=2, round=1)
    assert np.array_equal(out, np.array([-3.0, 6.0, -1.5], dtype=np.float32))


def test_gaussian_is_seeded_by_attack_seed_round_and_peer() -> None:
    own = np.zeros(1000, dtype=np.float32)
    a = Attack.make("gaussian", {"sigma": 10.0}, seed=7)
    (x,) = craft(a, own, [], n=7, f=2, round=3, rng_key=1)
    (y,) = craft(a, own, [], n=7, f=2, round=3, rng_key=1)
    (z,) = craft(a, own, [], n=7, f=2, round=4, rng_key=1)
    assert np.array_equal(x, y) and not np.array_equal(x, z)
    assert 9.0 < float(x.std()) < 11.0 and x.dtype == np.float32


def test_alie_z_follows_baruch_et_al() -> None:
    # n = 7, f = 2: s = floor(7/2 + 1) - 2 = 2, z = Phi^-1(5/7).
    assert alie_z(7, 2) == pytest.approx(0.5659, abs=1e-3)
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-3)  # s = 3, Phi^-1(0.7)


def test_omniscient_attacks_work_from_the_honest_gradients() -> None:
    honest = _honest()
    own = np.full(6, 100.0, dtype=np.float32)  # ignored by the omniscient ones
    stack = np.stack(honest)
    (alie,) = craft(Attack.make("alie"), own, honest, n=7, f=2, round=1)
    want = stack.mean(0) - alie_z(7, 2) * stack.std(0)
    assert np.allclose(alie, want, atol=1e-6)
    (ipm,) = craft(Attack.make("ipm", {"eps": 0.5}), own, honest, n=7, f=2, round=1)
    assert np.allclose(ipm, -0.5 * stack.mean(0), atol=1e-6)
    assert float(ipm @ stack.mean(0)) < 0  # points against the honest direction
    (mimic,) = craft(Attack.make("mimic"), own, honest, n=7, f=2, round=1)
    assert np.array_equal(mimic, honest[0])


def test_nonfinite_and_equivocation() -> None:
    own = np.array([1.0, 2.0], dtype=np.float32)
    (nan,) = craft(Attack.make("nonfinite"), own, [], n=7, f=2, round=1)
    assert np.isnan(nan).all()
    (inf,) = craft(Attack.make("nonfinite", {"value": "inf"}), own, [], n=7, f=2, round=1)
    assert np.isinf(inf).all()
    a, b = craft(Attack.make("equivocation"), own, [], n=7, f=2, round=1)
    assert np.array_equal(a, own) and np.array_equal(b, -10.0 * own)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("fmt", ["none", "fp16", "int8"])
def test_a_liars_nonfinite_vector_reaches_the_wire_in_the_jobs_format(fmt: str, bad: float) -> None:
    """What the harness publishes has the job's exact body size, and a NaN or Inf
    in the vector is one the receivers' check finds (and can prove)."""
    from types import SimpleNamespace

    from protocol import compression

    v = np.linspace(-1, 1, 5000, dtype=np.float32)
    t = SimpleNamespace(spec=SimpleNamespace(compression=fmt))
    clean = harness._body(t, v)  # type: ignore[arg-type]
    assert len(clean) == compression.encoded_size(fmt, v.size)
    compression.check(fmt, clean, v.size)
    v[4500] = bad
    body = harness._body(t, v)  # type: ignore[arg-type]
    assert len(body) == compression.encoded_size(fmt, v.size)
    with pytest.raises(compression.CompressionError, match="nonfinite"):
        compression.check(fmt, body, v.size)
    if fmt == "fp16":  # the value itself, not a NaN in its place
        assert np.frombuffer(body, "<f2")[4500] == np.float16(bad) or np.isnan(bad)


def _noisy_honest(k: int = 5, d: int = 50) -> list[np.ndarray]:
    """Gradients whose noise dwarfs their mean, as minibatch gradients' does: the
    fixed IPM point then sits inside the honest range instead of beyond it."""
    rng = np.random.default_rng(3)
    return [rng.normal(0.1, 1.0, size=d).astype(np.float32) for _ in range(k)]


def _damage(name: str, rule: str, honest: list[np.ndarray]) -> float:
    (v,) = craft(Attack.make(name), honest[0], honest, n=7, f=2, round=1, rule=rule)
    return search.damage(rule, 2, honest, v)


@pytest.mark.parametrize("rule", ["mean", "median", "nnm+median"])
def test_optimal_alie_and_ipm_beat_the_fixed_points(rule: str) -> None:
    """Against the rule searched for, the optimal vector moves the aggregate strictly
    further from the honest mean than the bench's fixed ALIE and IPM do, and at least
    as far as the large and small fixed points (on the median, ALIE saturates: every
    z beyond the lowest honest value moves it equally)."""
    honest = _noisy_honest()
    for fam, fixed, extreme in (("alie", "alie", "alie_large"), ("ipm", "ipm", "ipm_small")):
        best = _damage(f"{fam}_opt", rule, honest)
        assert best > _damage(fixed, rule, honest) + 1e-6, (rule, fam)
        assert best >= _damage(extreme, rule, honest) - 1e-6, (rule, fam)
        if rule == "mean":  # unbounded: the end of the range, strictly past any fixed one
            assert best > _damage(extreme, rule, honest) + 1e-6


@pytest.mark.parametrize("rule", ["mean", "median", "krum", "nnm+median", "cclip"])
def test_optimal_factor_lies_in_the_range_and_makes_the_vector(rule: str) -> None:
    honest = _noisy_honest()
    pool = np.stack(honest)
    for fam, lo, hi in (("alie", 0.1, 100.0), ("ipm", 0.01, 100.0), ("ipm", 0.5, 2.0)):
        v, factor, dmg = search.optimal(fam, honest, rule=rule, f=2, lo=lo, hi=hi, points=25)
        assert lo <= factor <= hi
        assert np.array_equal(v, search.FAMILIES[fam](pool, factor))
        assert dmg == pytest.approx(search.damage(rule, 2, honest, v))
    # The mean's damage grows with the factor: the top of the range.
    _, factor, _ = search.optimal("ipm", honest, rule="mean", f=2, lo=0.5, hi=2.0, points=9)
    assert factor == pytest.approx(2.0)


def test_optimal_search_scores_with_the_peers_rule_code() -> None:
    """The attacker's aggregate is the store's client-side result for the job's rule."""
    honest = _noisy_honest()
    v = -3.0 * np.stack(honest).mean(0)
    got = search.rule_aggregate("nnm+median", 2, [*honest, v, v])
    stack = np.stack([*honest, v, v]).astype(np.float64)
    d = ((stack[:, None, :] - stack[None, :, :]) ** 2).sum(-1)
    mixed = np.stack([stack[np.argsort(d[i], kind="stable")[:5]].mean(0) for i in range(7)])
    assert np.allclose(got, np.median(mixed, axis=0), atol=1e-5)


def test_colluders_with_the_same_inputs_publish_the_same_vector() -> None:
    honest = _noisy_honest()
    for name in ("alie_opt", "ipm_opt"):
        a = Attack.make(name)
        (x,) = craft(a, honest[0], honest, n=7, f=2, round=4, rule="nnm+median", rng_key=1)
        copies = [h.copy() for h in honest]
        (y,) = craft(a, copies[1], copies, n=7, f=2, round=4, rule="nnm+median", rng_key=2)
        assert x.dtype == np.float32 and np.array_equal(x, y)
    with pytest.raises(AttackError, match="rule"):
        craft(Attack.make("ipm_opt"), honest[0], honest, n=7, f=2, round=1)


def test_the_named_fixed_points() -> None:
    honest = _noisy_honest()
    stack = np.stack(honest)
    (small,) = craft(Attack.make("ipm_small"), honest[0], honest, n=7, f=2, round=1)
    assert np.allclose(small, -0.1 * stack.mean(0), atol=1e-6)
    (large,) = craft(Attack.make("alie_large"), honest[0], honest, n=7, f=2, round=1)
    assert np.allclose(large, stack.mean(0) - 10.0 * stack.std(0), atol=1e-5)


def test_inf_is_inf() -> None:
    own = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    (inf,) = craft(Attack.make("inf"), own, [], n=7, f=2, round=1)
    assert inf.shape == own.shape and np.isposinf(inf).all()
    with pytest.raises(AttackError, match="takes no parameter"):
        Attack.make("inf", {"value": "nan"})


@pytest.mark.parametrize("with_previous", [False, True])
def test_cclip_boundary_lands_at_the_radius(with_previous: bool) -> None:
    rng = np.random.default_rng(5)
    own = rng.normal(0.0, 1.0, 200).astype(np.float32)
    previous = rng.normal(0.0, 0.3, 200).astype(np.float32) if with_previous else None
    start = np.zeros(200) if previous is None else previous.astype(np.float64)
    (v,) = craft(
        Attack.make("cclip_boundary"), own, [], n=7, f=2, round=3, rule="cclip", previous=previous
    )
    dev = v.astype(np.float64) - start
    tau = cclip.JOB_TAU
    assert float(np.linalg.norm(dev)) == pytest.approx(tau, rel=1e-5)
    # A sign flip: the deviation points against its own gradient.
    cos = float(dev @ own) / (np.linalg.norm(dev) * np.linalg.norm(own))
    assert cos == pytest.approx(-1.0, abs=1e-5)
    (w,) = craft(
        Attack.make("cclip_boundary", {"radius": 0.3}), own, [], n=7, f=2, round=3, rule="mean"
    )
    assert float(np.linalg.norm(w.astype(np.float64))) == pytest.approx(0.3, rel=1e-5)


def test_late_sends_a_finite_sign_flip_of_the_right_size() -> None:
    own = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    (out,) = craft(Attack.make("late"), own, [], n=7, f=2, round=3)
    assert out.shape == own.shape and np.isfinite(out).all()
    assert np.array_equal(out, -10.0 * own)
    for bad in ({"every": 0}, {"every": 1.5}, {"margin_s": -1.0}):
        with pytest.raises(AttackError, match="late"):
            Attack.make("late", bad)


async def test_late_holds_until_just_before_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time
    from types import SimpleNamespace

    m = SimpleNamespace(round=3, deadline_at=time.monotonic() + 0.6)
    t = SimpleNamespace(m=m)
    attack = Attack.make("late", {"margin_s": 0.2, "every": 3, "max_wait_s": 30.0})
    monkeypatch.setattr(harness.STATE, "attack", attack)
    await asyncio.wait_for(harness._hold_until_deadline(t, 3), 30)  # type: ignore[arg-type]
    assert time.monotonic() >= m.deadline_at - 0.2
    # Not its round (every 3rd), or a bound far below the deadline: no hold to speak of.
    m.deadline_at = time.monotonic() + 3600
    await asyncio.wait_for(harness._hold_until_deadline(t, 4), 30)  # type: ignore[arg-type]
    monkeypatch.setattr(harness.STATE, "attack", Attack.make("late", {"max_wait_s": 0.05}))
    await asyncio.wait_for(harness._hold_until_deadline(t, 3), 30)  # type: ignore[arg-type]
    # A round that closed here meanwhile ends the hold too.
    monkeypatch.setattr(harness.STATE, "attack", attack)
    task = asyncio.create_task(harness._hold_until_deadline(t, 3))  # type: ignore[arg-type]
    m.round = 4
    await asyncio.wait_for(task, 30)


def test_attack_parameters_are_checked() -> None:
    assert set(ATTACKS) >= {"signflip", "gaussian", "alie", "ipm", "labelflip", "mimic"}
    with pytest.raises(AttackError, match="unknown attack"):
        Attack.make("teleport")
    with pytest.raises(AttackError, match="takes no parameter"):
        Attack.make("signflip", {"sigma": 1.0})
    with pytest.raises(AttackError, match="finite"):
        Attack.make("signflip", {"scale": float("inf")})
    with pytest.raises(AttackError, match="nan"):
        Attack.make("nonfinite", {"value": "zero"})
    with pytest.raises(AttackError, match="lo < hi"):
        Attack.make("ipm_opt", {"lo": 2.0, "hi": 1.0})
    with pytest.raises(AttackError, match="points"):
        Attack.make("alie_opt", {"points": 1})
    with pytest.raises(AttackError, match="radius"):
        Attack.make("cclip_boundary", {"radius": 0.0})


def _byzantine(args: list[str], confirm: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CONFIRM_ENV}
    env["PYTHONPATH"] = str(ROOT)
    if confirm is not None:
        env[CONFIRM_ENV] = confirm
    return subprocess.run(
        [sys.executable, "-m", "spirtd.byzantine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("confirm", [None, "no", "YES"])
def test_the_switch_refuses_without_the_confirmation(tmp_path: Path, confirm: str | None) -> None:
    r = _byzantine(
        ["--experimental-attack", "signflip", "--data-dir", str(tmp_path / "n")], confirm
    )
    assert r.returncode == 78, r.stderr
    assert "refusing to start an attack" in r.stderr and CONFIRM_ENV in r.stderr
    assert not (tmp_path / "n").exists()  # nothing started, not even a data dir


def test_the_switch_needs_an_attack_name(tmp_path: Path) -> None:
    r = _byzantine(["--data-dir", str(tmp_path / "n")], "yes")
    assert r.returncode == 2 and "--experimental-attack" in r.stderr
    r = _byzantine(["--experimental-attack", "teleport"], "yes")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_install_refuses_without_the_confirmation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIRM_ENV, raising=False)
    with pytest.raises(harness.NotConfirmed):
        harness.install(Attack.make("signflip"))


def test_no_daemon_code_reaches_the_attacks() -> None:
    """Only the experimental entry point (and the bench/tests) import the package."""
    offenders = []
    for p in sorted((ROOT / "spirtd").rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[1] == "byzantine":
            continue
        if "spirtd.byzantine" in p.read_text() or "from spirtd import byzantine" in p.read_text():
            offenders.append(str(rel))
    assert offenders == []
    # And no spirtd flag or config key mentions an attack.
    help_text = subprocess.run(
        [sys.executable, "-m", "spirtd", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    ).stdout
    assert "attack" not in help_text.lower()
