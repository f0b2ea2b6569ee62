"""Fixtures: a real redis-server on a free port, a real controller and node agent.

Integration tests share one cluster per test run (``cluster``) and give each of
their deployments a unique name (``unique_name``); tests that break the cluster
on purpose start their own with :func:`tests.helpers.start_cluster`. Every test
that uses a cluster is marked ``integration`` automatically, so
``pytest -m "not integration"`` runs the fast part alone.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Iterator

import pytest

import taskserve

from .helpers import Cluster, start_cluster

CLUSTER_FIXTURES = {"cluster", "connected", "three_nodes"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"))
    os.environ["TASKSERVE_ADDRESS"] = started.url
    try:
        yield started
    finally:
        started.shutdown()
        os.environ.pop("TASKSERVE_ADDRESS", None)


@pytest.fixture
def connected(cluster: Cluster) -> Cluster:
    """The shared cluster, with this process connected to it."""
    taskserve.connect(cluster.url)
    return cluster


_counter = itertools.count()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A deployment name no other test uses."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"{base}-{next(_counter)}"
