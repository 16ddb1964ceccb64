"""Shared fixtures. Each area keeps its fixtures in tests/fixtures_<area>.py."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures_redis",
    "tests.fixtures_cluster",
]

# Files whose tests run clusters of real daemons through long training jobs, where
# round deadlines, failure detection and state sync all run on the wall clock. The
# suite runs on two pytest-xdist workers (pyproject's addopts); these files all go
# to one worker, one after another, so two such clusters never compete for the
# machine's two cores, while the other worker runs everything else: unit tests and
# the files that start one to three daemons for a few rounds or none (logs, CLI,
# trust, links, pub/sub) and the benches' smoke runs (they check what the benches
# print and that sign flip hurts the mean more than a robust rule, not how fast
# anything went), which a loaded core slows but does not break. Every file
# stays whole on one worker, so module-scoped fixtures (a shared cluster, a shared
# Redis) are set up once. A new file whose daemons train for more than a few rounds
# belongs here.
CLUSTER_FILES = frozenset(
    {
        "test_byzantine_attacks.py",
        "test_byzantine_bad_gradients.py",
        "test_equivocation.py",
        "test_training_elastic.py",
        "test_training_bodies.py",
        "test_training_integration.py",
        "test_training_outer.py",
    }
)


# Marked as each item is collected, before any modifyitems hook: xdist reads the
# group markers in its own pytest_collection_modifyitems.
def pytest_itemcollected(item: pytest.Item) -> None:
    name = item.path.name
    item.add_marker(pytest.mark.xdist_group("clusters" if name in CLUSTER_FILES else name))
