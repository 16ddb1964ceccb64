"""The aggregation rule registry (spirtd.rules): every reader takes the rules from it,
and a rule registered through its public function is usable with no other file touched."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from spirtd import rules
from spirtd.control.ctl import build_parser
from spirtd.localcluster import LocalCluster, LocalNode, all_see, wait_for
from spirtd.redis.process import DAEMON_MODULE_COMMANDS, daemon_module_commands
from spirtd.redis.store import StoreError, TensorStore
from spirtd.rules import Rule
from spirtd.training import job as jobs
from spirtd.training import jobsize
from spirtd.training.aggregators import Aggregator, AggregatorError
from spirtd.training.job import JobError
from spirtd.training.state import StateKeys
from tests.toy_rule import TOY

BUILTIN = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed", "cclip")


@pytest.fixture
def toy() -> Iterator[Rule]:
    rules.register(TOY)
    try:
        yield TOY
    finally:
        rules.unregister(TOY.name)


def _aggregator_help(parser_help: str) -> list[str]:
    text = " ".join(parser_help.split())
    m = re.search(r"--aggregator AGGREGATOR (.*?), or nnm\+RULE", text)
    assert m, text
    return m.group(1).split(", ")


def _start_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["train", "start", "--help"])
    return out.getvalue()


def test_the_builtin_rules_are_registered_in_order() -> None:
    assert rules.names() == BUILTIN
    assert rules.module_commands() == (
        "spirt.cclip",
        "spirt.geomed",
        "spirt.krum",
        "spirt.mean",
        "spirt.median",
        "spirt.trimmean",
    )


def test_train_start_help_lists_exactly_the_registry() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "spirtd.control.ctl", "train", "start", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert _aggregator_help(r.stdout) == list(rules.names())


def test_train_start_help_lists_a_registered_rule(toy: Rule) -> None:
    assert _aggregator_help(_start_help()) == [*BUILTIN, "toy"]


def test_the_daemon_acl_allows_the_registered_commands(toy: Rule) -> None:
    # The toy runs client-side only: it adds no command.
    assert daemon_module_commands() == (*DAEMON_MODULE_COMMANDS, *rules.module_commands())
    assert set(rules.module_commands()) <= set(daemon_module_commands())
    rules.register(dataclasses.replace(TOY, name="kernel", command="SPIRT.MEDIAN"))
    try:
        assert daemon_module_commands().count("spirt.median") == 1
    finally:
        rules.unregister("kernel")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"name": "mean"}, "already registered"),
        ({"name": "Toy"}, "rule name"),
        ({"name": "nnm+toy"}, "rule name"),
        ({"name": ""}, "rule name"),
        ({"command": "FLUSHALL"}, "is not SPIRT.NAME"),
        ({"bound": ""}, "bound"),
    ],
)
def test_register_refuses_a_bad_rule(change: dict[str, Any], error: str) -> None:
    bad = dataclasses.replace(TOY, **change)
    with pytest.raises(ValueError, match=error):
        rules.register(bad)
    assert rules.names() == BUILTIN


def test_load_modules_registers_a_modules_rules_once() -> None:
    try:
        assert rules.load_modules(["tests.toy_rule"]) == ["toy"]
        assert rules.load_modules(["tests.toy_rule"]) == []
        assert rules.get("toy") is TOY
    finally:
        rules.unregister("toy")


@pytest.mark.parametrize(
    ("module", "error"),
    [
        ("tests/toy_rule", "not a dotted module name"),
        ("tests.no_such_module", "cannot import"),
        ("tests.fixtures_cluster", "defines no RULES list"),
    ],
)
def test_load_modules_refuses(module: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        rules.load_modules([module])
    assert rules.names() == BUILTIN


def test_a_job_accepts_a_rule_once_registered_and_not_after() -> None:
    with pytest.raises(JobError, match="unknown rule 'toy'"):
        jobs.from_request({"task": "digits", "aggregator": "toy"}, now_ms=1)
    rules.register(TOY)
    try:
        spec = jobs.from_request({"task": "digits", "aggregator": "toy", "f": 2}, now_ms=1)
        assert spec.aggregator == "toy" and spec.rule.min_peers() == 3
        nnm = jobs.from_request({"task": "digits", "aggregator": "nnm+toy", "f": 2}, now_ms=1)
        assert nnm.rule.nnm and nnm.rule.min_peers() == 3
        with pytest.raises(AggregatorError, match=r"needs at least 3 peers \(n >= f\+1\)"):
            spec.rule.check_membership(2)
    finally:
        rules.unregister("toy")
    with pytest.raises(JobError, match="unknown rule 'toy'"):
        spec.check()


def test_a_rule_that_keeps_its_previous_aggregate_keeps_it_in_the_state() -> None:
    rules.register(dataclasses.replace(TOY, name="kept", keeps_previous=True))
    plain = jobs.from_request({"task": "digits", "aggregator": "median"}, now_ms=1)
    try:
        spec = jobs.from_request({"task": "digits", "aggregator": "kept"}, now_ms=1)
        keys = StateKeys("j")
        assert ("agg_prev", keys.agg_prev) in keys.state_tensors(spec)
        assert ("agg_prev", keys.agg_prev) not in keys.state_tensors(plain)
        assert jobsize.copies(spec, 3) == jobsize.copies(plain, 3) + 1
    finally:
        rules.unregister("kept")


# ---- the store's dispatch, against a real redis-server ------------------------------


async def _load(s: TensorStore, x: np.ndarray) -> list[str]:
    keys = [f"g{i}" for i in range(len(x))]
    for k, row in zip(keys, x, strict=True):
        await s.put(k, row)
    return keys


def _ref_nnm(x: np.ndarray, f: int) -> np.ndarray:
    """Each row replaced by the mean of its n - f nearest rows (ties: lower index)."""
    x64 = x.astype(np.float64)
    d = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=2)
    n = len(x)
    out = []
    for i in range(n):
        nbrs = sorted(range(n), key=lambda j, i=i: (d[i][j], j))[: n - f]
        out.append(x64[nbrs].mean(axis=0))
    return np.array(out).astype(np.float32)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_store_runs_a_registered_rules_fallback(st: TensorStore, toy: Rule) -> None:
    x = np.random.default_rng(5).normal(size=(5, 33)).astype(np.float32)
    keys = await _load(st, x)
    assert await st.aggregate("toy", "o", keys) == 5
    assert np.array_equal(await st.get("o"), x.max(axis=0))
    # Through a job's aggregation, with nearest-neighbour mixing composed in front.
    await Aggregator.parse("nnm+toy", 1).run(st, "o2", keys, previous=None)
    np.testing.assert_allclose(await st.get("o2"), _ref_nnm(x, 1).max(axis=0), rtol=1e-6)
    with pytest.raises(StoreError, match="toy takes no parameter"):
        await st.aggregate("toy", "o3", keys, beta=0.1)
    with pytest.raises(StoreError, match="toy takes no START"):
        await st.aggregate("toy", "o3", keys, start="g0")
    assert not await st.exists("o3")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_fallback_of_the_wrong_type_writes_nothing(st: TensorStore) -> None:
    def wrong(
        xs: list[torch.Tensor], params: Mapping[str, Any], start: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        return torch.stack(xs).to(torch.float64).max(dim=0).values, None

    rules.register(Rule(name="wrong", min_peers=lambda f: 1, bound="1", fallback=wrong))
    try:
        keys = await _load(st, np.ones((2, 4), np.float32))
        with pytest.raises(StoreError, match="rule wrong: its fallback must return float32"):
            await st.aggregate("wrong", "o", keys)
        assert not await st.exists("o")
    finally:
        rules.unregister("wrong")


@pytest.mark.asyncio(loop_scope="module")
async def test_the_store_refuses_an_unregistered_rule(st: TensorStore) -> None:
    keys = await _load(st, np.ones((2, 4), np.float32))
    with pytest.raises(StoreError, match=r"unknown aggregation rule 'toy' \(known: mean, "):
        await st.aggregate("toy", "o", keys)


# ---- daemons that load the rule through rule_modules ---------------------------------


@pytest.mark.timeout(300)
def test_two_daemons_train_with_a_rule_from_rule_modules(make_cluster: Any) -> None:
    # localcluster puts the checkout on the daemons' PYTHONPATH: tests.toy_rule imports.
    c: LocalCluster = make_cluster(
        2, args=["--profile", "local"], config='rule_modules = ["tests.toy_rule"]\n'
    )
    c.start()
    everyone = {x.node_id: "alive" for x in c.nodes}
    wait_for(lambda: all_see(c.nodes, everyone), 60, "every node to see every other alive")
    r = subprocess.run(
        [
            *(sys.executable, "-m", "spirtd.control.ctl", "train", "start"),
            *("--task", "digits", "--aggregator", "toy", "--rounds", "2"),
            *("--data-dir", str(c.nodes[1].data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr

    def status(n: LocalNode) -> dict[str, Any]:
        return n.call("GET", "/v1/train/status")

    wait_for(
        lambda: all(status(n)["state"] in ("done", "stopped", "failed") for n in c.nodes),
        240,
        "both nodes to finish the job",
    )
    statuses = [status(n) for n in c.nodes]
    for s in statuses:
        assert s["state"] == "done", s["detail"]
        assert s["job"]["aggregator"] == "toy" and s["round"] == 2
        assert len(s["history"]) == 2
        assert all(len(h["contributors"]) == 2 for h in s["history"])
    assert len({s["model_digest"] for s in statuses}) == 1
