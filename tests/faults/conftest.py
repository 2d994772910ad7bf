"""Fixtures of the fault suite: a private cluster per test module, because these tests stop the
broker, Redis and ClickHouse, which would break every other test sharing the session cluster.

The cluster's Redis is durable (`redis_durable`: append-only file fsynced on every write), so a
Redis stopped or killed by a test comes back with its data, as a production Redis would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.cluster import ClusterConfig, status, up
from tests.faults.support import Stack, running_cluster
from tests.helpers.models import write_version


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    """A running private cluster on free ports with every catalog topic and table."""
    yield from running_cluster(tmp_path_factory.mktemp("fault-cluster"))


@pytest.fixture
def restore_cluster(fault_cluster: ClusterConfig) -> Iterator[ClusterConfig]:
    """The private cluster, with every part running again after the test, whatever it stopped."""
    yield fault_cluster
    if not all(part.healthy for part in status(fault_cluster)):
        up(fault_cluster, auto_install=False, stop_with_caller=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with model `fraud` version 1 (`tests.helpers.models`): card features
    required, merchant features defaulted, request features."""
    root = tmp_path_factory.mktemp("fault-models")
    write_version(root, "fraud", "1", "gbdt")
    return root


@pytest.fixture
def stack(fault_cluster: ClusterConfig, models: Path, tmp_path: Path) -> Iterator[Stack]:
    """Services of one test (declare with `stack.add`, then `stack.start()`); all stopped after."""
    services = Stack(fault_cluster, tmp_path, models)
    try:
        yield services
    finally:
        services.stop()
