"""The attack harness: the arithmetic of each attack, and the switch that refuses
to run one without the deliberate confirmation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spirtd.byzantine import harness
from spirtd.byzantine.attacks import ATTACKS, Attack, AttackError, alie_z, craft
from spirtd.byzantine.harness import CONFIRM_ENV

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


@pytest.mark.parametrize("fmt", ["none", "fp16", "int8"])
def test_a_liars_nonfinite_vector_reaches_the_wire_in_the_jobs_format(fmt: str) -> None:
    """What the harness publishes has the job's exact body size, and a NaN in the
    vector is a NaN the receivers' check finds (and can prove)."""
    from types import SimpleNamespace

    from protocol import compression

    v = np.linspace(-1, 1, 5000, dtype=np.float32)
    t = SimpleNamespace(spec=SimpleNamespace(compression=fmt))
    clean = harness._body(t, v)  # type: ignore[arg-type]
    assert len(clean) == compression.encoded_size(fmt, v.size)
    compression.check(fmt, clean, v.size)
    v[4500] = np.nan
    body = harness._body(t, v)  # type: ignore[arg-type]
    assert len(body) == compression.encoded_size(fmt, v.size)
    with pytest.raises(compression.CompressionError, match="nonfinite"):
        compression.check(fmt, body, v.size)


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
