"""The caller's side without a cluster: a handle's checks, the gateway's push and deletes,
on fakeredis. Redis-backed paths end to end are in tests/test_client_faults.py.
"""

from __future__ import annotations

import asyncio

import fakeredis
import fakeredis.aioredis
import pytest
import redis

import taskserve
from taskserve.gateway.messaging import ResultJanitor, TaskSender
from taskserve.gateway.routes import Route, RouteTable
from taskserve.handle import DeploymentHandle
from taskserve.signing import sign_goal
from taskserve.state import DeploymentHealth, DeploymentState, Goal, Replica, ReplicaState
from taskserve.store import Store, queue_name, result_key

from .helpers import SECRET


def goal(name: str = "m", generation: int = 1, **options) -> Goal:
    return Goal(name=name, generation=generation, version="1", spec_hash="s", num_replicas=1,
                options=options, code_sha="c", init_sha="i")


def write(store: Store, goal: Goal, health: DeploymentHealth | None = None) -> None:
    """Write ``goal`` as a client with the cluster secret does: signed."""
    store.redis.set(store.goal_key(goal.name), sign_goal(goal, SECRET).to_json())
    if health is not None:
        store.redis.set(store.health_key(goal.name), health.to_json())


FAILED = DeploymentHealth(DeploymentState.UNHEALTHY, "constructor failed 3 times: ValueError: no weights",
                          observed_generation=1)


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis())


def test_a_handle_refuses_a_deployment_whose_rollout_failed_with_nothing_serving(store):
    write(store, goal(), FAILED)
    handle = DeploymentHandle("m")
    with pytest.raises(taskserve.DeploymentUnavailable) as caught:
        handle._check(store)
    assert str(caught.value) == (
        "deployment 'm' has no replica that can serve: constructor failed 3 times: ValueError: no weights; "
        "`taskserve status m` shows its replicas, and a deploy of a fixed version serves again")
    with pytest.raises(taskserve.DeploymentUnavailable):     # the verdict holds until the next read
        handle.pid._check(store)


def test_a_handle_refuses_a_goal_not_signed_with_the_cluster_secret(store):
    store.redis.set(store.goal_key("m"), goal().to_json())     # as anyone with the Redis password could
    with pytest.raises(taskserve.errors.SignatureError) as caught:
        DeploymentHandle("m")._check(store)
    assert str(caught.value) == ("deployment 'm': goal not signed with the cluster secret; redeploy it with the "
                                 "right TASKSERVE_SECRET; refused to call it")
    write(store, goal())
    DeploymentHandle("m")._check(store)


def test_a_handle_lets_calls_queue_while_something_serves_or_may_serve(store):
    write(store, goal(), FAILED)
    store.create_replica(Replica("m-old", "m", "s0", "0", node_id="a", state=ReplicaState.RUNNING))
    DeploymentHandle("m")._check(store)                      # the previous version serves on
    write(store, goal(generation=2), FAILED)                 # a newer goal the controller has not seen
    store.forget_replica(Replica("m-old", "m", "s0", "0", node_id="a"))
    DeploymentHandle("m")._check(store)
    write(store, goal(), DeploymentHealth(DeploymentState.UPDATING, "starting", observed_generation=1))
    DeploymentHandle("m")._check(store)


def test_a_handle_reads_its_deployment_at_most_once_an_interval(store, monkeypatch):
    write(store, goal(max_queued_requests=2))
    reads = []
    mget = store.redis.mget
    monkeypatch.setattr(store.redis, "mget", lambda keys: reads.append(keys) or mget(keys))
    handle = DeploymentHandle("m")
    for _ in range(5):
        handle._check(store)
        handle.echo._check(store)
    assert len(reads) == 1 and handle._checked.max_queued == 2

    store.redis.delete(store.goal_key("m"))
    monkeypatch.setattr("taskserve.handle.EXISTENCE_CHECK_INTERVAL_S", 0.0)
    with pytest.raises(taskserve.DeploymentNotFound):
        handle._check(store)


def test_a_handle_refuses_calls_beyond_max_queued_requests(store):
    handle = DeploymentHandle("m")
    store.redis.lpush(queue_name("m"), "a", "b")
    handle._check_queue(store, 3)
    store.redis.lpush(queue_name("m"), "c")
    with pytest.raises(taskserve.BackPressureError, match="has 3 requests waiting, its max_queued_requests of 3"):
        handle._check_queue(store, 3)


def test_redis_unavailable_names_the_address_without_its_password():
    error = taskserve.RedisUnavailable("redis://admin:hunter2@10.1.2.3:6379/0", "Connection refused")
    assert str(error) == "cannot reach Redis at redis://admin@10.1.2.3:6379/0 (Connection refused); is the cluster up (`taskserve up`, or check --address)?"
    assert "hunter2" not in repr(error) and "hunter2" not in str(error.args)
    assert isinstance(error, ConnectionError) and isinstance(error, taskserve.TaskserveError)


def test_the_route_table_carries_the_limit_and_what_cannot_serve():
    table = RouteTable.from_goals([goal("a", max_queued_requests=5), goal("b")], unavailable={"b": "broken"})
    assert {route.deployment: (route.max_queued, route.unavailable) for route in table.routes} == \
        {"a": (5, ""), "b": (None, "broken")}


def test_the_gateway_pushes_only_while_the_queue_has_room():
    async def run() -> None:
        client = fakeredis.aioredis.FakeRedis()
        sender = TaskSender("redis://127.0.0.1:6379/0", client)
        route = Route("/m", "m", max_queued=2)
        payload = {"method": "GET", "path": "/m"}
        await sender.send(route, "t1", payload)
        await sender.send(route, "t2", payload)
        with pytest.raises(taskserve.BackPressureError) as caught:
            await sender.send(route, "t3", payload)
        assert (caught.value.queued, caught.value.limit) == (2, 2)
        assert await client.llen(queue_name("m")) == 2
        await sender.send(Route("/m", "m"), "t4", payload)      # no limit: a plain LPUSH
        assert await client.llen(queue_name("m")) == 3

    asyncio.run(run())


class FlakyRedis:
    """Deletes through fakeredis, except while ``down``."""

    def __init__(self) -> None:
        self.real = fakeredis.aioredis.FakeRedis()
        self.down = False
        self.calls = 0

    async def delete(self, *keys: str) -> int:
        self.calls += 1
        if self.down:
            raise redis.ConnectionError("Connection refused")
        return await self.real.delete(*keys)


def test_the_janitor_deletes_in_batches_and_keeps_what_failed():
    async def run() -> None:
        client = FlakyRedis()
        for task_id in ("a", "b", "c"):
            await client.real.set(result_key(task_id), "{}")
        janitor = ResultJanitor(client)         # type: ignore[arg-type]
        client.down = True
        for task_id in ("a", "b", "c"):
            janitor.forget(task_id)
        assert await janitor.flush() is False and len(janitor.pending) == 3
        client.down = False
        assert await janitor.flush() is True and janitor.pending == []
        assert client.calls == 2                 # one DEL for the three keys once Redis answered
        assert await client.real.exists(*(result_key(t) for t in "abc")) == 0

    asyncio.run(run())
