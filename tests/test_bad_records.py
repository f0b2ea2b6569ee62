"""One bad record costs only itself: a goal beyond the bounds of its options (however it
got into Redis) is refused by the controller in its deployment's error boundary, while a
killed replica of a healthy deployment is replaced in the same pass; a goal with an
unknown or mistyped option, or a replica record with ``pid="abc"``, is left out of
``taskserve status``, ``Deployment.status()``, ``list_deployments()`` and the gateway's
``/-/api/status`` and named there, and every other deployment is shown.
"""

from __future__ import annotations

import json

import fakeredis
import pytest

import taskserve
from taskserve.controller import Controller
from taskserve.gateway.metrics import StatusReader
from taskserve.signing import sign_goal
from taskserve.state import DeploymentState, Goal, Node, Replica, ReplicaState, Resources
from taskserve.store import Store

from .helpers import SECRET, running_gateway, wait_until
from .test_cli import run_cli


def goal(name: str, num_replicas: int = 1, **options) -> Goal:
    """A goal as a client with the secret writes it, with ``options`` unchecked: signed,
    as a goal written straight into Redis by someone with the secret (or an older client)
    would be, so that only the bounds stand in the way."""
    return sign_goal(Goal(name=name, generation=0, version="1", spec_hash="spec-1", num_replicas=num_replicas,
                          options={"num_cpus": 0.1, **options}, code_sha="code", init_sha="init", user_version="1"),
                     SECRET)


def write(store: Store, written: Goal) -> None:
    store.update_goal(written.name, lambda previous: written, "deploy", missing_ok=True)


def running(store: Store, name: str) -> None:
    for replica in store.replicas_of(name):
        store.update_replica(replica.replica_id, state=ReplicaState.RUNNING, applied_config_hash=replica.config_hash)


# ------------------------------------------------------------------ the controller's bounds


@pytest.mark.parametrize("bad, words", [
    (goal("bad", num_replicas=10_001), "invalid num_replicas=10001: Input should be less than or equal to 10000"),
    (goal("bad", autoscaling_config={"max_replicas": 10**9}), "autoscaling_config['max_replicas']=1000000000"),
    (goal("bad", max_concurrent_queries=10**6), "max_concurrent_queries=1000000"),
    (goal("bad", num_cpu=1), "unknown deployment option 'num_cpu'; did you mean 'num_cpus'?"),
    (goal("bad", request_timeout_s="soon"), "request_timeout_s='soon'"),
])
def test_a_goal_beyond_its_bounds_costs_only_its_deployment(bad, words):
    store = Store(fakeredis.FakeRedis())
    store.register_node(Node("node-a", Resources(num_cpus=64)), ttl_s=600)
    write(store, goal("good", num_replicas=2))
    controller = Controller(store, secret=SECRET)
    controller._lead(store.acquire_lease(controller.controller_id, 600))
    controller.reconcile_once()
    running(store, "good")
    controller.reconcile_once()
    assert store.get_health("good").status == DeploymentState.HEALTHY

    write(store, bad)
    killed = store.replicas_of("good")[0]
    store.update_replica(killed.replica_id, state=ReplicaState.FAILED, failure="crash")
    controller.reconcile_once()

    assert store.replicas_of("bad") == [], "nothing is planned for the goal beyond its bounds"
    health = store.get_health("bad")
    assert health.status == DeploymentState.UNHEALTHY and health.outcome == "failed"
    assert health.message.startswith("goal refused, nothing planned: ") and words in health.message
    assert "\n" not in health.message
    replicas = store.replicas_of("good")
    assert killed.replica_id not in {r.replica_id for r in replicas} and len(replicas) == 2, (
        "the killed replica of the healthy deployment is replaced in the same pass")

    write(store, goal("bad", num_replicas=3))            # fixed: planned at once
    controller.reconcile_once()
    assert len(store.replicas_of("bad")) == 3 and "bad" not in controller.errors


# ------------------------------------------------------------------ status, unit


def test_the_gateway_status_names_what_it_cannot_read_and_shows_the_rest():
    store = Store(fakeredis.FakeRedis())
    for name in ("good", "mistyped", "unknown", "broken-replica"):
        store.update_goal(name, lambda previous, n=name: goal(n), "deploy", missing_ok=True)
    store.redis.set(store.goal_key("mistyped"),
                    json.dumps({**json.loads(store.redis.get(store.goal_key("mistyped"))),
                                "options": {"autoscaling_config": "many"}}))
    store.redis.set(store.goal_key("unknown"),
                    json.dumps({**json.loads(store.redis.get(store.goal_key("unknown"))),
                                "options": {"num_cpu": 1}}))
    store.redis.set(store.goal_key("json"), "{not json")
    store.redis.sadd(store.DEPLOYMENTS_KEY, "json")
    store.create_replica(Replica("broken-replica-1", "broken-replica", "spec-1", "1", node_id="node-a",
                                 state=ReplicaState.RUNNING, pid=41))
    store.create_replica(Replica("broken-replica-2", "broken-replica", "spec-1", "1", node_id="node-a"))
    store.redis.hset(store.replica_key("broken-replica-2"), "pid", "abc")

    status = StatusReader(store).read()
    shown = {d["name"]: d for d in status["deployments"]}
    assert set(shown) == {"good", "broken-replica"}
    assert [r["replica_id"] for r in shown["broken-replica"]["replicas"]] == ["broken-replica-1"]
    assert shown["broken-replica"]["skipped"] == ["replica broken-replica-2: pid is not a number: 'abc'"]
    skipped = status["skipped"]
    assert "replica broken-replica-2: pid is not a number: 'abc'" in skipped
    assert "deployment unknown: its goal cannot be read: unknown deployment option 'num_cpu'; " \
           "did you mean 'num_cpus'?" in skipped
    assert any(line.startswith("deployment mistyped: its goal cannot be read: invalid autoscaling_config='many'")
               for line in skipped)
    assert any(line.startswith("deployment json: its goal cannot be read: JSONDecodeError") for line in skipped)
    assert len(skipped) == 4


# ------------------------------------------------------------------ status, on a cluster


class Greeter:
    def __call__(self, name):
        return f"hi {name}"


def test_status_list_and_the_gateway_skip_and_name_bad_records(connected, unique_name):
    good = taskserve.deployment(name=f"{unique_name}-good", version="1")(Greeter)
    bad_replica = taskserve.deployment(name=f"{unique_name}-pid", version="1")(Greeter)
    bad_goal = taskserve.deployment(name=f"{unique_name}-goal", version="1")(Greeter)
    for model in (good, bad_replica, bad_goal):
        model.deploy()
    store = taskserve.connect(connected.url)
    [replica] = store.replicas_of(bad_replica.name)
    store.redis.hset(store.replica_key(replica.replica_id), "pid", "abc")       # as anyone with the password could
    key = store.goal_key(bad_goal.name)
    store.redis.set(key, json.dumps({**json.loads(store.redis.get(key)),
                                     "options": {**json.loads(store.redis.get(key))["options"], "num_cpu": 1}}))
    replica_line = f"replica {replica.replica_id}: pid is not a number: 'abc'"
    goal_line = (f"deployment {bad_goal.name}: its goal cannot be read: unknown deployment option 'num_cpu'; "
                 "did you mean 'num_cpus'?")

    status = bad_replica.status()                                      # Deployment.status()
    assert status.replicas == [] and status.skipped == [replica_line]
    assert good.status().status == "HEALTHY"
    assert bad_goal.name not in taskserve.list_deployments() and good.name in taskserve.list_deployments()
    with pytest.raises(taskserve.DeploymentError, match="its goal cannot be read: unknown deployment option"):
        bad_goal.status()

    printed = run_cli(connected, "status")
    assert good.name in printed.stdout and bad_replica.name in printed.stdout
    assert f"skipped {replica_line}" in printed.stderr and f"skipped {goal_line}" in printed.stderr
    one = run_cli(connected, "status", bad_replica.name)
    assert f"skipped {replica_line}" in one.stderr
    as_json = json.loads(run_cli(connected, "status", "--json").stdout)
    assert replica_line in as_json["skipped"] and goal_line in as_json["skipped"]

    with running_gateway(connected) as http:
        api_status = wait_until(lambda: (lambda s: s if goal_line in s["skipped"] else None)(
            http.get("/-/api/status").json()), timeout=30, message="the gateway's status to name the bad goal")
    assert replica_line in api_status["skipped"]
    assert {good.name, bad_replica.name} <= {d["name"] for d in api_status["deployments"]}

    store.redis.hset(store.replica_key(replica.replica_id), "pid", str(replica.pid))
    for model in (good, bad_replica, bad_goal):          # a goal that cannot be read is deleted all the same
        model.delete(timeout=60)
