"""Shared pytest fixtures.

`cluster` starts a private dev cluster (Apache Kafka, Redis, ClickHouse on free ports) the first
time a test asks for it, and stops and deletes it when the session ends. Tests that do not request
it start nothing. Its servers also stop if the test process is killed before it can clean up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.local.cluster import ClusterConfig, down, up


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    """A running dev cluster with the catalog's topics and the ClickHouse tables, on free ports."""
    config = ClusterConfig.with_free_ports(tmp_path_factory.mktemp("cluster"))
    try:
        up(config, auto_install=False, stop_with_caller=True)
        yield config
    finally:
        down(config, wipe=True)


@pytest.fixture(scope="session")
def cluster_env(cluster: ClusterConfig) -> dict[str, str]:
    """The `SLUICE_*` variables that point a service at the `cluster` fixture."""
    return cluster.env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault suite (`tests/faults/`) runs last: what its outages leave behind for a while
    (a restarted broker's CPU, ClickHouse and Redis recovering) must not slow the timing-aware
    tests that would otherwise run right after it, such as the 45 s demo."""
    items.sort(key=lambda item: "faults" in item.path.parts)
