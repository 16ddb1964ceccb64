"""Shared fixtures. Each area keeps its fixtures in tests/fixtures_<area>.py."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures_redis",
    "tests.fixtures_cluster",
]

# Files whose tests run clusters of real daemons through long training jobs, where
# round deadlines, failure detection and state sync all run on the wall clock. The
# suite runs on two pytest-xdist workers (pyproject's addopts). These files form two
# chains, each run one file after another on one worker: the elastic scenarios (the
# longest file) and the other training files. So at most two such clusters run at
# once, one per worker, and the rest of the suite fills in around them: unit tests,
# the files that start one to three daemons for a few rounds or none (logs, CLI,
# trust, links, pub/sub), and the benches' smoke runs (they check what the benches
# print and that sign flip hurts the mean more than a robust rule, not how fast
# anything went). Every file stays whole on one worker, so module-scoped fixtures
# (a shared cluster, a shared Redis) are set up once. A new file whose daemons train
# for more than a few rounds belongs in one of the chains.
CLUSTER_CHAINS = {
    "test_training_elastic.py": "clusters-elastic",
    "test_byzantine_attacks.py": "clusters",
    "test_byzantine_bad_gradients.py": "clusters",
    "test_equivocation.py": "clusters",
    "test_training_integration.py": "clusters",
}
CLUSTER_FILES = frozenset(CLUSTER_CHAINS)


# Marked as each item is collected, before any modifyitems hook: xdist reads the
# group markers in its own pytest_collection_modifyitems.
def pytest_itemcollected(item: pytest.Item) -> None:
    name = item.path.name
    item.add_marker(pytest.mark.xdist_group(CLUSTER_CHAINS.get(name, name)))
