"""Shared fixtures. Each area keeps its fixtures in tests/fixtures_<area>.py."""

pytest_plugins = [
    "tests.fixtures_redis",
    "tests.fixtures_cluster",
]
