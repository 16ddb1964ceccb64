"""bench.byzantine --quick on real peers, with fewer rounds: the JSON it prints,
resuming, and that sign flip hurts the mean more than the robust rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import byzantine

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {
    "setting",
    "n",
    "f",
    "rule",
    "attack",
    "rounds",
    "seed",
    "attack_seed",
    "accuracy_min",
    "accuracy_mean",
    "clean_accuracy_min",
    "clean_accuracy_mean",
    "drop",
    "equal_digests",
    "excluded",
    "duration_s",
    "error",
}


# 2 settings x 13 rules (7 + nnm+ the 6 robust ones) x (clean + 15 attacks).
FULL_CELLS = 416


def test_quick_mode_pits_optimal_ipm_against_the_mean_and_the_default() -> None:
    """The issue's acceptance: --quick has optimal IPM against the default rule for
    f > 0 and against the mean, at 7 peers; the full matrix has every new attack."""
    from spirtd.training.job import ROBUST_DEFAULT

    assert "ipm_opt" in byzantine.QUICK_ATTACKS
    assert {"mean", ROBUST_DEFAULT} <= set(byzantine.QUICK_RULES)
    new = {"alie_opt", "ipm_opt", "ipm_small", "alie_large", "inf", "cclip_boundary", "late"}
    assert new <= set(byzantine.ATTACK_NAMES)


# Most of the run is the 7 daemons' start and their first job; at 6 rounds the mean
# under sign flip dropped 0.57 and the robust rule 0.17, 8 leave the margin wider.
ROUNDS = 8


def _run(*args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "bench.byzantine", *args],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1800)
def test_quick_mode(tmp_path: Path) -> None:
    # The CI run of the bench (the "the quick mode runs in CI"): 8 cells.
    resume = tmp_path / "cells.jsonl"
    plot = tmp_path / "matrix.png"
    out = _run(
        "--quick", "--rounds", str(ROUNDS), "--json", "--resume", str(resume), "--plot", str(plot)
    )
    inputs = out["inputs"]
    assert (
        inputs["job_seed"] == byzantine.JOB_SEED and inputs["attack_seed"] == byzantine.ATTACK_SEED
    )
    assert inputs["settings"] == {"7p_f2": {"peers": 7, "f": 2}} and inputs["rounds"] == ROUNDS
    rows = out["rows"]
    want = {(r, a) for r in byzantine.QUICK_RULES for a in ["none", *byzantine.QUICK_ATTACKS]}
    assert {(x["rule"], x["attack"]) for x in rows} == want
    for x in rows:
        assert set(x) >= ROW_KEYS, ROW_KEYS - set(x)
        assert x["error"] is None, x
        assert 0.0 <= x["accuracy_min"] <= x["accuracy_mean"] + 1e-9 <= 1.0 + 1e-9
        assert x["drop"] == pytest.approx(x["clean_accuracy_mean"] - x["accuracy_mean"], abs=1e-3)
    by = {(x["rule"], x["attack"]): x for x in rows}
    robust = byzantine.QUICK_RULES[1]
    assert by[("mean", "signflip")]["drop"] > by[(robust, "signflip")]["drop"] + 0.2
    assert out["cell_s_mean"] > 0 and out["full_matrix_cells"] == FULL_CELLS
    assert plot.stat().st_size > 10_000
    # Every cell is on file: a resumed run has nothing left to do.
    assert len(resume.read_text().splitlines()) == len(rows)
    again = _run("--quick", "--rounds", str(ROUNDS), "--json", "--resume", str(resume))
    assert again["rows"] == rows and again["cluster_start_s"] == {}


def test_cells_and_drops_without_peers() -> None:
    cells = byzantine.cells(["7p_f2"], ["mean", "krum"], ["signflip"])
    assert cells == [
        ("7p_f2", "mean", "none"),
        ("7p_f2", "mean", "signflip"),
        ("7p_f2", "krum", "none"),
        ("7p_f2", "krum", "signflip"),
    ]
    assert (
        len(byzantine.cells(list(byzantine.SETTINGS), byzantine.RULES, byzantine.ATTACK_NAMES))
        == FULL_CELLS
    )
    base = {"setting": "7p_f2", "rounds": 5, "seed": 1}
    rows = byzantine.with_clean(
        [
            {**base, "rule": "mean", "attack": "none", "accuracy_min": 0.9, "accuracy_mean": 0.92},
            {
                **base,
                "rule": "mean",
                "attack": "signflip",
                "accuracy_min": 0.1,
                "accuracy_mean": 0.12,
            },
        ]
    )
    assert rows[1]["clean_accuracy_mean"] == 0.92 and rows[1]["drop"] == pytest.approx(0.8)
    assert rows[0]["drop"] == 0.0


def test_markdown_table_marks_stalls_and_keeps_them_out_of_the_worst_drop() -> None:
    base = {"setting": "7p_f2", "rounds": 5, "seed": 1, "error": None}
    rows = byzantine.with_clean(
        [
            {**base, "rule": "krum", "attack": "none", "accuracy_min": 0.95, "accuracy_mean": 0.95},
            {**base, "rule": "krum", "attack": "alie", "accuracy_min": 0.9, "accuracy_mean": 0.91},
            {
                **base,
                "rule": "krum",
                "attack": "nonfinite",
                "accuracy_min": 0.5,
                "accuracy_mean": 0.5,
                "error": "timed out",
            },
        ]
    )
    text = byzantine.markdown(rows, ["7p_f2"])
    assert "| rule | clean | alie | nonfinite | worst drop (points) |" in text
    assert "| krum | 0.950 | 0.900 | stalled | 4.0 + stalls |" in text
