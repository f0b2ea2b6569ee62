"""The controller's pass at scale: its Redis round trips do not grow with the replicas,
and it re-reads only what changed (a real ``redis-server``, records only, no processes).

benchmarks/bench_control_plane.py times the same at 1,000 deployments.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from benchmarks.bench_control_plane import CountingConnection, counting_store, populate
from taskserve.controller import Controller
from taskserve.gateway.metrics import StatusReader
from taskserve.redis_server import RedisServer
from taskserve.state import ReplicaState
from taskserve.store import Store

pytestmark = pytest.mark.integration

DEPLOYMENTS = 10
NODES = 4


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    redis_server = RedisServer().start()
    try:
        yield redis_server
    finally:
        redis_server.stop()


def settled_controller(store: Store) -> Controller:
    """A leading controller that has concluded every deployment HEALTHY and read that back."""
    controller = Controller(store)
    controller._lead(store.acquire_lease(controller.controller_id, 60))
    controller.reconcile_once()
    controller.reconcile_once()
    return controller


def round_trips_of_a_pass(server: RedisServer, replicas: int) -> tuple[int, Controller, Store]:
    store = counting_store(server.port)
    store.redis.flushdb()
    populate(store, DEPLOYMENTS, replicas, NODES)
    controller = settled_controller(store)
    before = CountingConnection.sent
    controller.reconcile_once()
    return CountingConnection.sent - before, controller, store


def test_a_pass_with_nothing_changed_costs_the_same_round_trips_for_10_and_100_replicas(server):
    small, _, _ = round_trips_of_a_pass(server, 1)
    large, controller, store = round_trips_of_a_pass(server, 10)
    assert small == large
    assert large <= 6, "a pass reads in a few pipelines, not per deployment"
    assert controller.settled == {f"model-{i:04d}" for i in range(DEPLOYMENTS)}
    store.release_lease(controller.controller_id)


def test_a_changed_replica_is_seen_and_replaced_in_the_next_pass(server):
    _, controller, store = round_trips_of_a_pass(server, 2)
    [victim, survivor] = sorted(store.replicas_of("model-0003"), key=lambda r: r.replica_id)
    store.update_replica(victim.replica_id, state=ReplicaState.FAILED.value, failure="crash")
    controller.reconcile_once()
    replicas = store.replicas_of("model-0003")
    assert victim.replica_id not in {r.replica_id for r in replicas}
    assert survivor.replica_id in {r.replica_id for r in replicas}
    assert len(replicas) == 2
    assert "model-0003" not in controller.settled
    store.release_lease(controller.controller_id)


def test_a_write_that_moves_no_revision_is_seen_after_a_full_read(server):
    """A client of an older version writes without moving the revision: the periodic
    full read still finds it."""
    _, controller, store = round_trips_of_a_pass(server, 2)
    victim = sorted(store.replicas_of("model-0005"), key=lambda r: r.replica_id)[0]
    store.redis.hset(Store.replica_key(victim.replica_id), mapping={"state": "FAILED", "failure": "crash"})
    controller.reconcile_once()
    assert victim.replica_id in {r.replica_id for r in store.replicas_of("model-0005")}, "not seen yet"
    controller.reader.full_read_at = -1e9          # the full read is due
    controller.reconcile_once()
    assert victim.replica_id not in {r.replica_id for r in store.replicas_of("model-0005")}
    store.release_lease(controller.controller_id)


def round_trips_of_status_reads(server: RedisServer, deployments: int) -> tuple[list[int], dict]:
    """The round trips of a gateway's first status read, of one with nothing changed,
    and of one after a replica changed; and that last status."""
    store = counting_store(server.port)
    store.redis.flushdb()
    populate(store, deployments, 3, NODES)
    reader = StatusReader(store)
    trips = []
    for step in range(3):
        if step == 2:
            store.update_replica("model-0001-0000", state=ReplicaState.DRAINING.value)
        before = CountingConnection.sent
        status = reader.read()
        trips.append(CountingConnection.sent - before)
    return trips, status


def test_a_status_read_costs_the_same_round_trips_for_5_and_50_deployments(server):
    small, _ = round_trips_of_status_reads(server, 5)
    large, status = round_trips_of_status_reads(server, 50)
    assert small == large
    assert max(large) <= 8, "a status read reads in a few pipelines, not per deployment"
    assert len(status["deployments"]) == 50 and len(status["nodes"]) == NODES
    changed = {d["name"]: d for d in status["deployments"]}["model-0001"]
    assert {r["replica_id"]: r["state"] for r in changed["replicas"]}["model-0001-0000"] == "DRAINING"
    assert [event["action"] for event in changed["history"]] == ["deploy"]
