"""Tests of the Redis store (taskserve/store/), and of the controller's passes
(taskserve/controller.py) on it: fenced writes, one broken deployment among others,
nodes that stop heartbeating. Each runs on fakeredis and on a real redis-server (the
fixtures ``server`` and ``client`` of tests/helpers.py; the real one is ``integration``).

``Store.update_replica`` runs a Lua script; fakeredis runs Lua only when the ``lupa``
package is installed, so the tests of that method are skipped without it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable, Optional

import fakeredis
import pytest
import redis

import taskserve.controller as controller_module
from taskserve.controller import Controller
from taskserve.errors import DeploymentNotFound
from taskserve.state import DeploymentHealth, DeploymentState, Goal, Node, Replica, ReplicaState, Resources
from taskserve.store import (
    AUTOSCALE_HISTORY_LIMIT,
    HISTORY_LIMIT,
    UNACKED_KEY,
    AutoscaleState,
    LeaseLost,
    NodeClaim,
    NodeTaken,
    Store,
    canary_queue_name,
    queue_name,
    wait_for_events,
)

from .helpers import redis_client, redis_under_test, signed  # noqa: F401  (the fixtures "client", "server")

NAME = "echo"


def _lua_works() -> bool:
    try:
        fakeredis.FakeRedis().eval("return 1", 0)
    except redis.ResponseError:
        return False
    return True


needs_lua = pytest.mark.skipif(
    not _lua_works(), reason="fakeredis runs Lua scripts only with the lupa package, which is not installed"
)


@pytest.fixture
def store(client) -> Store:
    return Store(client)


def next_goal(version: str = "v1", *, deleting: bool = False, num_replicas: int = 1, name: str = NAME):
    """A make_goal callback: the previous goal's generation plus one."""

    def make_goal(previous: Optional[Goal]) -> Goal:
        return signed(lambda _: Goal(
            name=name,
            generation=(previous.generation + 1) if previous else 1,
            version=version,
            spec_hash=f"spec-{version}",
            num_replicas=num_replicas,
            options={"num_cpus": 1, "max_unavailable": 0.2, "user_config": {"k": [1, 2]}},
            code_sha="code-" + version,
            init_sha="init",
            deleting=deleting,
            user_version=version,
        ))(previous)

    return make_goal


def make_replica(replica_id: str, node_id: str = "node-a", deployment: str = NAME, **changes) -> Replica:
    fields = dict(
        replica_id=replica_id,
        deployment=deployment,
        spec_hash="spec-v1",
        version="v1",
        node_id=node_id,
        state=ReplicaState.STARTING,
        pid=4242,
        message="loading",
        created_at=12.5,
        num_cpus=0.5,
        num_gpus=0.25,
        memory=1024,
        code_sha="code-v1",
        config='{"kind": "class"}',
    )
    fields.update(changes)
    return Replica(**fields)


def notifications(pubsub) -> list[str]:
    """The notifications published so far (the subscribe confirmation reads as one None)."""
    seen: list[str] = []
    misses = 0
    while misses < 2:
        message = pubsub.get_message(timeout=0.02)
        if message is None:
            misses += 1
        else:
            misses = 0
            seen.append(message["data"].decode())
    return seen


# --------------------------------------------------------------------------- goals


def test_write_goal_creates_then_increments_the_generation(store):
    assert store.get_goal(NAME) is None
    first = store.write_goal(NAME, next_goal("v1"))
    assert first.generation == 1
    assert store.get_goal(NAME) == first
    second = store.write_goal(NAME, next_goal("v2"))
    assert second.generation == 2
    assert store.get_goal(NAME) == second
    assert store.get_goal(NAME).options == {"num_cpus": 1, "max_unavailable": 0.2, "user_config": {"k": [1, 2]}}
    assert store.list_goals() == [second]
    assert store.require_goal(NAME) == second


def test_make_goal_sees_the_previous_goal(store):
    seen = []

    def make_goal(previous):
        seen.append(previous)
        return next_goal("v2")(previous)

    store.write_goal(NAME, next_goal("v1"))
    store.write_goal(NAME, make_goal)
    assert [g.version for g in seen] == ["v1"]


def test_list_goals_is_sorted_by_name(store):
    for name in ("zeta", "alpha", "mid"):
        store.write_goal(name, next_goal("v1", name=name))
    assert [g.name for g in store.list_goals()] == ["alpha", "mid", "zeta"]


def test_write_goal_stores_the_code(store, client):
    store.write_goal(NAME, next_goal("v1"), blobs=[("code-v1", b"\x80pickled"), ("unreferenced", b"x")])
    assert store.get_code("code-v1") == b"\x80pickled"
    assert client.smembers(Store.codes_key(NAME)) == {b"code-v1"}
    assert not client.exists(Store.code_key("unreferenced"))     # only what the goal refers to
    with pytest.raises(LookupError, match="code nope is missing from Redis; deploy the deployment again"):
        store.get_code("nope")


def test_make_goal_returning_none_writes_nothing(store, client):
    calls = []

    def refuse(previous):
        calls.append(previous)
        return None

    pubsub = store.subscribe()
    assert store.write_goal(NAME, refuse, blobs=[("code-v1", b"blob")], event={"action": "deploy"}) is None
    assert calls == [None]
    assert client.keys("*") == []
    assert notifications(pubsub) == []

    written = store.write_goal(NAME, next_goal("v1"), event={"action": "deploy"})
    before = {key: client.dump(key) for key in client.keys("*")}
    notifications(pubsub)
    assert store.write_goal(NAME, refuse, blobs=[("code-v2", b"blob2")], event={"action": "deploy"}) is None
    assert calls[-1] == written
    assert {key: client.dump(key) for key in client.keys("*")} == before
    assert store.get_goal(NAME) == written
    assert len(store.history(NAME)) == 1
    assert notifications(pubsub) == []


def test_write_goal_notifies(store):
    pubsub = store.subscribe()
    store.write_goal(NAME, next_goal("v1"))
    assert notifications(pubsub) == [f"goal:{NAME}"]


def test_concurrent_writer_between_watch_and_exec_retries_and_the_later_goal_wins(store, server):
    other = Store(server.connect())
    store.write_goal(NAME, next_goal("v1"), event={"action": "deploy"})
    seen: list[Goal] = []

    def make_goal(previous):
        seen.append(previous)
        if len(seen) == 1:
            # Another client writes while this one is between WATCH and EXEC.
            other.write_goal(NAME, next_goal("theirs"), event={"action": "scale"})
        return next_goal("mine")(previous)

    written = store.write_goal(NAME, make_goal, event={"action": "deploy"})
    assert [g.version for g in seen] == ["v1", "theirs"]
    assert [g.generation for g in seen] == [1, 2]
    assert written.generation == 3 == seen[0].generation + 2
    assert written.version == "mine"
    assert store.get_goal(NAME) == written
    assert [(e["generation"], e["version"], e["action"]) for e in store.history(NAME)] == [
        (1, "v1", "deploy"),
        (2, "theirs", "scale"),
        (3, "mine", "deploy"),
    ]


def test_concurrent_raw_write_of_the_key_is_not_overwritten_blindly(store, server):
    other = server.connect()
    store.write_goal(NAME, next_goal("v1"))
    calls = []

    def make_goal(previous):
        calls.append(previous.generation)
        if len(calls) == 1:
            theirs = next_goal("theirs")(next_goal("x")(next_goal("x")(None)))   # generation 3
            other.set(Store.goal_key(NAME), theirs.to_json())
        return next_goal("mine")(previous)

    written = store.write_goal(NAME, make_goal)
    assert calls == [1, 3]
    assert written.generation == 4 and store.get_goal(NAME).generation == 4


def test_history_records_each_event_newest_last(store):
    store.write_goal(NAME, next_goal("v1"), event={"action": "deploy", "by": "alice"})
    store.write_goal(NAME, next_goal("v1", num_replicas=3), event={"action": "scale"})
    store.write_goal(NAME, next_goal("v2"))   # no event: not recorded
    store.write_goal(NAME, next_goal("v3"), event={"action": "rollback"})
    history = store.history(NAME)
    assert [(e["action"], e["generation"], e["version"]) for e in history] == [
        ("deploy", 1, "v1"),
        ("scale", 2, "v1"),
        ("rollback", 4, "v3"),
    ]
    assert history[0]["by"] == "alice"
    assert Goal(**history[1]["goal"]) == next_goal("v1", num_replicas=3)(next_goal("v1")(None))
    assert all(isinstance(e["at"], float) for e in history)
    assert history[0]["at"] <= history[1]["at"] <= history[2]["at"]


def test_history_keeps_the_last_entries_only(store):
    for i in range(HISTORY_LIMIT + 5):
        store.write_goal(NAME, next_goal(f"v{i}"), event={"action": "deploy"})
    history = store.history(NAME)
    assert len(history) == HISTORY_LIMIT
    assert history[0]["generation"] == 6 and history[-1]["generation"] == HISTORY_LIMIT + 5


def test_history_of_unknown_deployment_is_empty(store):
    assert store.history("nope") == []


def test_require_goal_raises_for_missing_and_deleting(store):
    with pytest.raises(DeploymentNotFound) as info:
        store.require_goal(NAME)
    assert isinstance(info.value, KeyError) and info.value.name == NAME
    store.write_goal(NAME, next_goal("v1", deleting=True))
    with pytest.raises(DeploymentNotFound):
        store.require_goal(NAME)


# --------------------------------------------------------------------------- update_goal


def deployed(store: Store, version: str = "v1") -> Goal:
    """Write a first goal of NAME, as a deploy does."""
    return store.update_goal(NAME, lambda previous: next_goal(version)(None), "deploy", missing_ok=True)


def test_update_goal_bumps_the_generation_and_applies_the_changed_fields(store):
    first = deployed(store)
    assert first.generation == 1 and first.created_at > 0
    scaled = store.update_goal(NAME, lambda previous: {"num_replicas": 3}, "scale")
    assert scaled == replace(first, num_replicas=3, generation=2, created_at=scaled.created_at)
    assert scaled.created_at >= first.created_at
    assert store.get_goal(NAME) == scaled


def test_update_goal_takes_a_whole_goal_and_still_sets_generation_and_created_at(store):
    deployed(store)
    whole = next_goal("v2")(None)          # generation 1, created_at 0.0
    written = store.update_goal(NAME, lambda previous: whole, "rollback")
    assert (written.version, written.generation) == ("v2", 2)
    assert written.created_at > 0
    assert store.get_goal(NAME) == written


def test_update_goal_that_changes_nothing_returns_none_and_writes_nothing(store, client):
    deployed(store)
    before = {key: client.dump(key) for key in client.keys("*")}
    pubsub = store.subscribe()
    assert store.update_goal(NAME, lambda previous: None, "scale", blobs=[("code-v1", b"new bytes")]) is None
    assert {key: client.dump(key) for key in client.keys("*")} == before
    assert [e["action"] for e in store.history(NAME)] == ["deploy"]
    assert notifications(pubsub) == []


def test_update_goal_of_a_missing_deployment_raises_without_asking_the_change(store, client):
    seen = []

    def change(previous):
        seen.append(previous)
        return {"num_replicas": 2}

    with pytest.raises(DeploymentNotFound) as info:
        store.update_goal(NAME, change, "scale")
    assert info.value.name == NAME
    assert seen == []
    assert client.keys("*") == []


def test_update_goal_of_a_missing_deployment_with_missing_ok_asks_the_change(store, client):
    seen = []

    def change(previous):
        seen.append(previous)
        return None

    assert store.update_goal(NAME, change, "auto-rollback", missing_ok=True) is None
    assert seen == [None]
    assert client.keys("*") == []


def test_update_goal_of_a_deleting_deployment(store):
    deployed(store)
    deleting = store.update_goal(NAME, lambda previous: {"deleting": True}, "delete")
    assert deleting.deleting and deleting.generation == 2
    with pytest.raises(DeploymentNotFound):
        store.update_goal(NAME, lambda previous: {"num_replicas": 2}, "scale")

    # With missing_ok the change sees the deleting goal, and may create the deployment again.
    seen = []

    def redeploy(previous):
        seen.append(previous)
        return next_goal("v2")(None)

    again = store.update_goal(NAME, redeploy, "deploy", missing_ok=True)
    assert seen == [deleting]
    assert (again.generation, again.deleting, again.version) == (3, False, "v2")
    assert [e["action"] for e in store.history(NAME)] == ["deploy", "delete", "deploy"]


def test_update_goal_errors_of_the_change_write_nothing(store, client):
    deployed(store)
    before = {key: client.dump(key) for key in client.keys("*")}

    def refuse(previous):
        raise ValueError("no such version")

    with pytest.raises(ValueError, match="no such version"):
        store.update_goal(NAME, refuse, "rollback")
    assert {key: client.dump(key) for key in client.keys("*")} == before


def test_update_goal_retries_on_the_newer_goal_after_a_concurrent_change(store, server):
    other = Store(server.connect())
    deployed(store)
    seen: list[Goal] = []

    def change(previous):
        seen.append(previous)
        if len(seen) == 1:
            # Another client changes the goal between this one's read and its write.
            other.update_goal(NAME, lambda theirs: {"num_replicas": 5}, "scale", by="bob")
        return {"options": {**previous.options, "user_config": {"k": "mine"}}}

    written = store.update_goal(NAME, change, "reconfigure", by="alice")
    assert [(g.generation, g.num_replicas) for g in seen] == [(1, 1), (2, 5)]
    assert (written.generation, written.num_replicas) == (3, 5)      # their change is kept
    assert written.options["user_config"] == {"k": "mine"}
    assert store.get_goal(NAME) == written
    assert [(e["generation"], e["action"], e["by"]) for e in store.history(NAME)[1:]] == [
        (2, "scale", "bob"),
        (3, "reconfigure", "alice"),
    ]


def test_update_goal_records_one_history_line(store):
    deployed(store)
    written = store.update_goal(NAME, lambda previous: {"num_replicas": 4}, "auto-rollback", by="controller-1",
                                event_extra={"rollback_of": 1, "reason": "boom", "error": "Traceback"})
    first, entry = store.history(NAME)
    assert entry["action"] == "auto-rollback" and entry["by"] == "controller-1"
    assert (entry["rollback_of"], entry["reason"], entry["error"]) == (1, "boom", "Traceback")
    assert (entry["generation"], entry["version"]) == (2, "v1")
    assert Goal(**entry["goal"]) == written
    assert isinstance(entry["argv"], str) and isinstance(entry["at"], float)
    assert "@" in first["by"]                  # by default, user@host of this process


def test_update_goal_stores_only_the_blobs_the_goal_refers_to(store, client):
    store.update_goal(NAME, lambda previous: next_goal("v1")(None), "deploy", missing_ok=True,
                      blobs=[("code-v1", b"one"), ("code-v2", b"two")])
    assert store.get_code("code-v1") == b"one"
    assert not client.exists(Store.code_key("code-v2"))
    package = "taskserve-pkg://pkg1.zip"
    store.update_goal(NAME, lambda previous: {"options": {**previous.options, "runtime_env": {"working_dir": package}}},
                      "deploy", blobs=[("pkg1", b"zip"), ("pkg2", b"other zip")])
    assert store.get_code("pkg1") == b"zip"
    assert not client.exists(Store.code_key("pkg2"))
    assert client.smembers(Store.codes_key(NAME)) == {b"code-v1", b"pkg1"}


def test_update_goal_notifies(store):
    deployed(store)
    pubsub = store.subscribe()
    store.update_goal(NAME, lambda previous: {"num_replicas": 2}, "scale")
    assert notifications(pubsub) == [f"goal:{NAME}"]


# --------------------------------------------------------------------------- record_outcome


def test_record_outcome_marks_the_entry_of_that_generation(store):
    deployed(store)
    store.update_goal(NAME, lambda previous: {"num_replicas": 2}, "scale")
    store.record_outcome(NAME, 1, "done", "")
    store.record_outcome(NAME, 2, "failed", "constructor failed 3 times")
    store.record_outcome(NAME, 7, "done")         # no such generation: nothing to mark
    first, second = store.history(NAME)
    assert first["outcome"] == "done"
    assert (second["outcome"], second["outcome_message"]) == ("failed", "constructor failed 3 times")
    at = second["outcome_at"]
    store.record_outcome(NAME, 2, "failed", "again")   # already recorded: kept as it was
    assert store.history(NAME)[1]["outcome_at"] == at
    assert store.history(NAME)[1]["outcome_message"] == "constructor failed 3 times"


# --------------------------------------------------------------------------- forget_deployment


def test_forget_deployment_removes_every_key_of_a_deleted_deployment(store, client):
    store.write_goal(NAME, next_goal("v1"), blobs=[("code-v1", b"one")], event={"action": "deploy"})
    store.write_goal(NAME, next_goal("v2"), blobs=[("code-v2", b"two")])
    store.write_goal("other", next_goal("v3", name="other"), blobs=[("code-v3", b"x")])
    store.write_goal("shares", next_goal("v2", name="shares"), blobs=[("code-v2", b"two")])
    store.set_health(NAME, DeploymentHealth(status=DeploymentState.HEALTHY))
    store.create_replica(make_replica("echo-1"))
    store.set_autoscale_state(NAME, AutoscaleState(target=2))
    deleting = store.write_goal(NAME, next_goal("v2", deleting=True), event={"action": "delete"})

    assert store.forget_deployment(NAME, deleting.generation) is True
    assert store.get_goal(NAME) is None
    assert store.history(NAME) == []
    assert store.get_health(NAME) == DeploymentHealth()
    assert store.autoscale_state(NAME) is None
    for key in (Store.goal_key(NAME), Store.health_key(NAME), Store.codes_key(NAME), Store.replicas_key(NAME),
                Store.history_key(NAME), Store.scale_key(NAME), Store.code_key("code-v1")):
        assert not client.exists(key), key
    assert client.smembers(Store.DEPLOYMENTS_KEY) == {b"other", b"shares"}
    assert store.get_code("code-v3") == b"x"                 # other deployments keep theirs,
    assert store.get_code("code-v2") == b"two"               # shared blobs included
    assert [g.name for g in store.list_goals()] == ["other", "shares"]


def test_forget_deployment_refuses_when_the_generation_changed(store):
    store.write_goal(NAME, next_goal("v1"))
    deleting = store.write_goal(NAME, next_goal("v1", deleting=True))
    assert deleting.generation == 2
    assert store.forget_deployment(NAME, 1) is False
    assert store.get_goal(NAME) == deleting

    # Deployed again after the delete: the newer goal survives.
    again = store.write_goal(NAME, next_goal("v2"))
    assert store.forget_deployment(NAME, deleting.generation) is False
    assert store.get_goal(NAME) == again
    assert store.require_goal(NAME) == again


def test_forget_deployment_refuses_a_goal_that_is_not_deleting(store):
    goal = store.write_goal(NAME, next_goal("v1"))
    assert store.forget_deployment(NAME, goal.generation) is False
    assert store.get_goal(NAME) == goal
    assert store.forget_deployment("missing", 1) is False


def test_forget_deployment_notifies(store):
    goal = store.write_goal(NAME, next_goal("v1", deleting=True))
    pubsub = store.subscribe()
    assert store.forget_deployment(NAME, goal.generation)
    assert notifications(pubsub) == [f"deleted:{NAME}"]


# --------------------------------------------------------------------------- health


def test_health_is_written_only_while_the_deployment_exists(store, client):
    health = DeploymentHealth(status=DeploymentState.UNHEALTHY, message="constructor failed 3 times: boom",
                              observed_generation=1, failed_starts=3, last_error="boom", last_failure_at=1.5,
                              outcome_generation=1, outcome="failed")
    store.set_health(NAME, health)
    assert not client.exists(Store.health_key(NAME))
    assert store.get_health(NAME) == DeploymentHealth()

    store.write_goal(NAME, next_goal("v1"))
    pubsub = store.subscribe()
    store.set_health(NAME, health)
    assert store.get_health(NAME) == health
    store.set_health(NAME, health)          # unchanged: no second notification
    assert notifications(pubsub) == [f"health:{NAME}"]


# --------------------------------------------------------------------------- replicas


def test_create_replica_round_trips_every_field(store, client):
    replica = make_replica("echo-1")
    store.create_replica(replica)
    assert store.get_replica("echo-1") == replica
    assert store.replicas_of(NAME) == [replica]
    assert store.replicas_on_node("node-a") == [replica]
    assert client.smembers(Store.node_replicas_key("node-a")) == {b"echo-1"}


def test_unplaced_replica_is_on_no_node_until_placed(store, client):
    store.create_replica(make_replica("echo-p", node_id="", state=ReplicaState.PENDING, pid=None,
                                      message="needs 4 CPUs"))
    assert client.keys(Store.node_replicas_key("*")) == []
    assert store.get_replica("echo-p").pid is None

    store.place_replica("echo-p", "node-b")
    placed = store.get_replica("echo-p")
    assert (placed.node_id, placed.message, placed.state) == ("node-b", "", ReplicaState.PENDING)
    assert store.replicas_on_node("node-b") == [placed]


def test_forget_replica_removes_record_and_memberships(store, client):
    keep, drop = make_replica("echo-1"), make_replica("echo-2")
    store.create_replica(keep)
    store.create_replica(drop)
    store.forget_replica(drop)
    assert store.get_replica("echo-2") is None
    assert not client.exists(Store.replica_key("echo-2"))
    assert store.replicas_of(NAME) == [keep]
    assert store.replicas_on_node("node-a") == [keep]


def test_replicas_of_skips_ids_without_record(store, client):
    store.create_replica(make_replica("echo-1"))
    client.sadd(Store.replicas_key(NAME), "echo-ghost")
    assert [r.replica_id for r in store.replicas_of(NAME)] == ["echo-1"]


def test_all_replicas_covers_every_deployment(store):
    store.write_goal("a", next_goal("v1", name="a"))
    store.write_goal("b", next_goal("v1", name="b"))
    store.create_replica(make_replica("a-1", deployment="a"))
    store.create_replica(make_replica("b-1", deployment="b", node_id="node-b"))
    store.create_replica(make_replica("b-2", deployment="b", node_id=""))
    store.create_replica(make_replica("orphan-1", deployment="orphan"))   # no goal: not listed
    assert [r.replica_id for r in store.all_replicas()] == ["a-1", "b-1", "b-2"]


@needs_lua
def test_update_replica_sets_fields_of_an_existing_record(store):
    store.create_replica(make_replica("echo-1"))
    assert store.update_replica("echo-1", state=ReplicaState.RUNNING, pid=None, desired="stop") is True
    updated = store.get_replica("echo-1")
    assert updated.state == ReplicaState.RUNNING
    assert updated.pid is None
    assert updated.desired == "stop"
    assert updated.message == "loading"     # untouched fields stay


@needs_lua
def test_update_of_a_forgotten_replica_returns_false_and_does_not_recreate_it(store, client):
    replica = make_replica("echo-1")
    store.create_replica(replica)
    store.forget_replica(replica)
    assert store.update_replica("echo-1", state=ReplicaState.RUNNING) is False
    assert not client.exists(Store.replica_key("echo-1"))
    assert store.get_replica("echo-1") is None


# --------------------------------------------------------------------------- snapshot


def test_snapshot_reads_goal_health_and_replicas(store, client):
    goal = store.write_goal(NAME, next_goal("v1"))
    health = DeploymentHealth(status=DeploymentState.HEALTHY, observed_generation=1)
    store.set_health(NAME, health)
    replicas = [make_replica("echo-2"), make_replica("echo-1", node_id="node-b", state=ReplicaState.RUNNING)]
    for replica in replicas:
        store.create_replica(replica)
    client.sadd(Store.replicas_key(NAME), "echo-ghost")     # an id whose record is gone
    assert store.snapshot(NAME) == (goal, health, sorted(replicas, key=lambda r: r.replica_id))


def test_snapshot_of_unknown_deployment(store):
    assert store.snapshot("nope") == (None, DeploymentHealth(), [])


# --------------------------------------------------------------------------- nodes


def make_node(node_id: str, **changes) -> Node:
    fields = dict(node_id=node_id, total=Resources(8, 1, 2**33), labels={"zone": "a"}, hostname="host-" + node_id,
                  agent_pid=99)
    fields.update(changes)
    return Node(**fields)


def test_registered_node_is_alive_until_its_alive_key_goes(store, client):
    node = make_node("node-a")
    store.register_node(node, ttl_s=10)
    assert store.list_nodes() == [node]
    assert 0 < client.pttl(Store.node_alive_key("node-a")) <= 10_000

    client.delete(Store.node_alive_key("node-a"))      # the TTL ran out
    [dead] = store.list_nodes()
    assert dead.alive is False
    assert dead == Node(**{**node.__dict__, "alive": False})


def test_heartbeat_extends_a_live_node_and_reports_an_expired_one(store, client):
    store.register_node(make_node("node-a"), ttl_s=1)
    assert store.heartbeat_node("node-a", ttl_s=30) is True
    assert 1_000 < client.pttl(Store.node_alive_key("node-a")) <= 30_000

    client.delete(Store.node_alive_key("node-a"))
    assert store.heartbeat_node("node-a", ttl_s=30) is False
    assert not client.exists(Store.node_alive_key("node-a"))   # not revived by a heartbeat
    assert store.list_nodes()[0].alive is False


def test_list_nodes_mixes_alive_and_dead_sorted(store, client):
    for node_id in ("node-c", "node-a", "node-b"):
        store.register_node(make_node(node_id), ttl_s=10)
    client.delete(Store.node_alive_key("node-b"))
    assert [(n.node_id, n.alive) for n in store.list_nodes()] == [
        ("node-a", True), ("node-b", False), ("node-c", True)
    ]


def test_unregister_node(store, client):
    store.register_node(make_node("node-a"), ttl_s=10)
    store.register_node(make_node("node-b"), ttl_s=10)
    pubsub = store.subscribe()
    store.unregister_node("node-a")
    assert [n.node_id for n in store.list_nodes()] == ["node-b"]
    assert not client.exists(Store.node_alive_key("node-a"))
    assert notifications(pubsub) == ["node:node-a"]


def test_no_nodes(store):
    assert store.list_nodes() == []


@needs_lua
def test_a_node_claimed_by_a_live_agent_is_refused_to_another(store, client):
    first = NodeClaim(pid=101, host="box-1", token="t1")
    second = NodeClaim(pid=202, host="box-2", token="t2")
    store.register_node(make_node("node-a", agent_pid=101), ttl_s=10, claim=first)
    with pytest.raises(NodeTaken) as taken:
        store.register_node(make_node("node-a", agent_pid=202, hostname="box-2"), ttl_s=10, claim=second)
    assert str(taken.value) == ("node node-a already has a live agent (pid 101 on box-1); "
                                "stop it or pick another --node-id")
    assert taken.value.holder == first
    assert store.list_nodes()[0].agent_pid == 101      # the record stays the first agent's
    assert store.node_claim("node-a")[0] == first

    # The holder registers again (after an expiry) with its own claim.
    store.register_node(make_node("node-a", agent_pid=101), ttl_s=10, claim=first)


@needs_lua
def test_heartbeat_extends_only_the_claim_that_holds_the_node(store, client):
    mine, theirs = NodeClaim(pid=1, host="h", token="mine"), NodeClaim(pid=2, host="h", token="theirs")
    store.register_node(make_node("node-a"), ttl_s=1, claim=mine)
    assert store.heartbeat_node("node-a", ttl_s=30, claim=mine) is True
    assert 1_000 < client.pttl(Store.node_alive_key("node-a")) <= 30_000

    client.delete(Store.node_alive_key("node-a"))      # expired (say Redis restarted without it)
    assert store.heartbeat_node("node-a", ttl_s=30, claim=mine) is False
    assert not client.exists(Store.node_alive_key("node-a"))

    store.register_node(make_node("node-a"), ttl_s=10, claim=theirs)
    with pytest.raises(NodeTaken):
        store.heartbeat_node("node-a", ttl_s=30, claim=mine)
    assert store.node_claim("node-a")[0] == theirs


@needs_lua
def test_a_stale_claim_is_replaced_only_when_named(store):
    dead, new = NodeClaim(pid=1, host="h", token="dead"), NodeClaim(pid=2, host="h", token="new")
    store.register_node(make_node("node-a"), ttl_s=10, claim=dead)
    other = NodeClaim(pid=3, host="h", token="other")
    with pytest.raises(NodeTaken):
        store.register_node(make_node("node-a"), ttl_s=10, claim=new, replacing=other)
    store.register_node(make_node("node-a", agent_pid=2), ttl_s=10, claim=new, replacing=dead)
    claim, ttl_ms = store.node_claim("node-a")
    assert claim == new and 0 < ttl_ms <= 10_000
    assert store.node_claim("node-b") == (None, 0)


@needs_lua
def test_unregister_with_a_claim_leaves_another_agents_node(store):
    mine, theirs = NodeClaim(pid=1, host="h", token="mine"), NodeClaim(pid=2, host="h", token="theirs")
    store.register_node(make_node("node-a"), ttl_s=10, claim=theirs)
    store.unregister_node("node-a", mine)
    assert [n.node_id for n in store.list_nodes()] == ["node-a"]
    store.unregister_node("node-a", theirs)
    assert store.list_nodes() == []


def test_node_records_carry_their_heartbeat_timeout_and_read_unknown_fields(store, client):
    store.register_node(make_node("node-a", heartbeat_ttl_s=2.0), ttl_s=2)
    assert store.list_nodes()[0].heartbeat_ttl_s == 2.0
    record = json.loads(client.hget(Store.NODES_KEY, "node-a"))
    client.hset(Store.NODES_KEY, "node-a", json.dumps({**record, "rack": "r7", "total": {**record["total"], "tpus": 4}}))
    client.hset(Store.NODES_KEY, "node-old", json.dumps({"node_id": "node-old", "total": {"num_cpus": 2}}))
    client.hset(Store.NODES_KEY, "node-bad", "{not json")
    nodes = store.list_nodes()
    assert [n.node_id for n in nodes] == ["node-a", "node-old"]
    assert nodes[0].total == make_node("node-a").total
    assert nodes[1].heartbeat_ttl_s == 10.0            # written by an agent that did not say


# --------------------------------------------------------------------------- controller lease


class RacingGet:
    """A client (mixed in before its class) after whose next plain GET of the lease
    ``race()`` runs: another controller acts between two commands of a read-then-write."""

    race: Optional[Callable[[], None]] = None

    def get(self, name):
        value = super().get(name)
        if name == Store.LEASE_KEY and self.race is not None:
            race, self.race = self.race, None
            race()
        return value


def test_lease_has_one_holder_at_a_time(store, client, server):
    other = Store(server.connect())
    token = store.acquire_lease("controller-a", ttl_s=5)
    assert token == "1:controller-a"
    assert other.acquire_lease("controller-b", ttl_s=5) is None
    assert 0 < client.pttl(Store.LEASE_KEY) <= 5_000
    assert store.lease_holder() == "controller-a" and store.controller_alive()

    # The holder renews (and extends) its lease, keeping its token.
    assert store.acquire_lease("controller-a", ttl_s=60) == token
    assert 5_000 < client.pttl(Store.LEASE_KEY) <= 60_000
    assert other.acquire_lease("controller-b", ttl_s=5) is None

    # Only the holder can release it.
    other.release_lease("controller-b")
    assert store.lease_holder() == "controller-a"
    store.release_lease("controller-a")
    assert not client.exists(Store.LEASE_KEY) and not store.controller_alive()
    assert other.acquire_lease("controller-b", ttl_s=5) == "2:controller-b"
    assert store.acquire_lease("controller-a", ttl_s=5) is None


def test_lease_passes_on_once_it_expired(store, client):
    assert store.acquire_lease("controller-a", ttl_s=5)
    client.delete(Store.LEASE_KEY)                     # the holder stopped renewing
    assert store.acquire_lease("controller-b", ttl_s=5) == "2:controller-b"
    assert store.acquire_lease("controller-a", ttl_s=5) is None
    store.release_lease("controller-a")                # a late release does not steal it
    assert store.lease_holder() == "controller-b"


def test_each_leadership_gets_a_new_token(store, client):
    first = store.acquire_lease("controller-a", ttl_s=5)
    client.delete(Store.LEASE_KEY)                     # lost it (paused past its TTL) ...
    second = store.acquire_lease("controller-a", ttl_s=5)   # ... and took it again
    assert (first, second) == ("1:controller-a", "2:controller-a")
    assert store.renew_lease(second, ttl_s=5) is True
    assert store.renew_lease(first, ttl_s=5) is False  # the earlier leadership's token is dead


def test_renew_lease_only_while_the_token_holds_it(store, client, server):
    token = store.acquire_lease("controller-a", ttl_s=1)
    assert store.renew_lease(token, ttl_s=30) is True
    assert 1_000 < client.pttl(Store.LEASE_KEY) <= 30_000
    client.delete(Store.LEASE_KEY)
    assert store.renew_lease(token, ttl_s=30) is False
    assert not client.exists(Store.LEASE_KEY)         # a renewal never takes a free lease
    Store(server.connect()).acquire_lease("controller-b", ttl_s=5)
    assert store.renew_lease(token, ttl_s=30) is False
    assert store.lease_holder() == "controller-b"


def test_acquiring_is_atomic_when_the_lease_moves_in_between(server):
    racing = server.connect(RacingGet)
    store, other = Store(racing), Store(server.connect())
    assert store.acquire_lease("controller-a", ttl_s=5)

    def lease_moves() -> None:
        racing.delete(Store.LEASE_KEY)                 # a's lease expires ...
        assert other.acquire_lease("controller-b", ttl_s=5)   # ... and b takes it

    racing.race = lease_moves
    leads = store.acquire_lease("controller-a", ttl_s=5)   # a renews: is there a window after its read?
    if racing.race is None:
        assert not leads, "a reported leading while b held the lease"
    else:                                              # no window: b takes the lease only afterwards
        lease_moves()
    assert store.acquire_lease("controller-a", ttl_s=5) is None
    assert store.lease_holder() == "controller-b"


def test_releasing_is_atomic_when_the_lease_moves_in_between(server):
    racing = server.connect(RacingGet)
    store, other = Store(racing), Store(server.connect())
    assert store.acquire_lease("controller-a", ttl_s=5)

    def lease_moves() -> None:
        racing.delete(Store.LEASE_KEY)
        assert other.acquire_lease("controller-b", ttl_s=5)

    racing.race = lease_moves
    store.release_lease("controller-a")                # check the holder, then delete
    if racing.race is not None:
        lease_moves()
    assert store.lease_holder() == "controller-b"      # b's lease was not deleted


@needs_lua
def test_fenced_writes_are_refused_once_the_lease_moved(store, client, server):
    """A controller paused past its lease wakes up and writes with its old token: nothing lands."""
    store.update_goal(NAME, lambda previous: next_goal("v1", num_replicas=2)(previous), "deploy", missing_ok=True)
    store.create_replica(make_replica("echo-1"))
    store.create_replica(make_replica("echo-2", node_id=""))
    old = store.acquire_lease("controller-a", ttl_s=5)
    client.delete(Store.LEASE_KEY)                     # a was paused: its lease ran out ...
    new = Store(server.connect()).acquire_lease("controller-b", ttl_s=5)   # ... b leads
    before = {key: client.dump(key) for key in client.keys("*")}

    refused = [
        lambda: store.create_replica(make_replica("echo-3"), fence=old),
        lambda: store.place_replica("echo-2", "node-a", fence=old),
        lambda: store.update_replica("echo-1", fence=old, desired="stop"),
        lambda: store.set_replica_config("echo-1", '{"k": 2}', "h2", fence=old),
        lambda: store.forget_replica(make_replica("echo-1"), fence=old),
        lambda: store.set_health(NAME, DeploymentHealth(status=DeploymentState.HEALTHY), fence=old),
        lambda: store.record_outcome(NAME, 1, "failed", fence=old),
        lambda: store.update_goal(NAME, lambda previous: {"num_replicas": 5}, "auto-rollback", fence=old),
        lambda: store.write_goal(NAME, next_goal("v9"), fence=old),
        lambda: store.forget_deployment(NAME, 1, fence=old),
        lambda: store.set_autoscale_state(NAME, AutoscaleState(target=3), {"from": 2, "to": 3}, fence=old),
        lambda: store.delete_autoscale_states([NAME], fence=old),
    ]
    for write in refused:
        with pytest.raises(LeaseLost):
            write()
    after = {key: client.dump(key) for key in client.keys("*")}
    assert after == before, "a refused write changed nothing"

    # The new leader's token writes.
    store.update_replica("echo-1", fence=new, desired="stop")
    store.create_replica(make_replica("echo-3"), fence=new)
    assert store.get_replica("echo-1").desired == "stop"
    assert {r.replica_id for r in store.replicas_of(NAME)} == {"echo-1", "echo-2", "echo-3"}


@needs_lua
def test_fenced_writes_are_refused_while_no_one_holds_the_lease(store, client):
    token = store.acquire_lease("controller-a", ttl_s=5)
    store.update_goal(NAME, lambda previous: next_goal("v1")(previous), "deploy", missing_ok=True)
    store.create_replica(make_replica("echo-1"), fence=token)
    client.delete(Store.LEASE_KEY)
    with pytest.raises(LeaseLost):
        store.create_replica(make_replica("echo-2"), fence=token)
    with pytest.raises(LeaseLost):
        store.set_health(NAME, DeploymentHealth(message="late"), fence=token)
    assert [r.replica_id for r in store.replicas_of(NAME)] == ["echo-1"]
    assert store.get_health(NAME).message == ""


@needs_lua
def test_a_fenced_transaction_is_refused_when_the_lease_moves_before_it_commits(store, client, server):
    token = store.acquire_lease("controller-a", ttl_s=5)
    store.update_goal(NAME, lambda previous: next_goal("v1")(previous), "deploy", missing_ok=True)
    other = Store(server.connect())

    def change(previous: Optional[Goal]) -> dict:
        if store.lease_holder() == "controller-a":     # the lease moves between WATCH and EXEC
            other.redis.delete(Store.LEASE_KEY)
            other.acquire_lease("controller-b", ttl_s=5)
        return {"num_replicas": 7}

    with pytest.raises(LeaseLost):
        store.update_goal(NAME, change, "auto-rollback", fence=token)
    assert store.get_goal(NAME).num_replicas == 1


@needs_lua
def test_placing_a_forgotten_replica_writes_no_half_record(store, client):
    assert store.place_replica("echo-gone", "node-a") is False
    assert not client.exists(Store.replica_key("echo-gone"))
    assert not client.smembers(Store.node_replicas_key("node-a"))


# --------------------------------------------------------------------------- notifications, names


def test_wait_for_events(store):
    pubsub = store.subscribe()
    assert wait_for_events(pubsub, 0.05) is False
    store.notify("a")
    store.notify("b")
    assert wait_for_events(pubsub, 1.0) is True
    assert wait_for_events(pubsub, 0.05) is False     # the backlog was swallowed


def test_queue_name():
    assert queue_name("echo") == "taskserve.echo"


# --------------------------------------------------------------------------- canary releases


def test_store_adds_and_resets_stats_per_version(store):
    store.add_stats("m", {"requests:1": 3, "requests:2": 2, "errors:2": 1})
    store.add_stats("m", {"requests:2": 1})
    assert store.stats("m") == {"requests:1": 3, "requests:2": 3, "errors:2": 1}
    store.reset_stats("m", "2")
    assert store.stats("m") == {"requests:1": 3}


@needs_lua
def test_moving_the_canary_queue_keeps_order_and_rewrites_the_routing_key(store):
    def message(n: int) -> str:
        return '{"n": %d, "properties": {"delivery_info": {"exchange": "", "routing_key": "taskserve.m@canary"}}}' % n
    store.redis.lpush(queue_name("m"), '{"n": 0}')
    for n in (1, 2, 3):                       # LPUSH: the oldest (1) is served first (BRPOP, the right end)
        store.redis.lpush(canary_queue_name("m"), message(n))
    assert store.move_canary_queues(["m", "other"]) == {"m": 3, "other": 0}
    items = [item.decode() for item in store.redis.lrange(queue_name("m"), 0, -1)]
    assert [item[:7] for item in items] == ['{"n": 0', '{"n": 3', '{"n": 2', '{"n": 1']
    assert all("taskserve.m@canary" not in item for item in items)
    assert store.redis.llen(canary_queue_name("m")) == 0


# --------------------------------------------------------------------------- autoscaling


def unacked_entry(queue: str, tag: str = "t") -> str:
    """kombu's entry of an unacknowledged message: ``[message, exchange, routing_key]``."""
    return json.dumps([{"body": "W1tdLCB7fV0=", "headers": {"id": tag, "argsrepr": '"]'},
                        "properties": {"delivery_tag": tag, "delivery_info": {"routing_key": queue}}},
                       "", queue])


def test_loads_count_waiting_and_unacknowledged_requests_per_deployment(store, client):
    client.lpush(queue_name("a"), "m1", "m2", "m3")
    client.lpush(queue_name("b"), "m4")
    client.hset(UNACKED_KEY, mapping={
        "t1": unacked_entry(queue_name("a"), "t1"),
        "t2": unacked_entry(queue_name("a"), "t2"),
        "t3": unacked_entry(queue_name("b"), "t3"),
        "t4": unacked_entry("celery", "t4"),                 # another app's queue on the same Redis
        "t5": unacked_entry(queue_name("ab"), "t5"),         # a name that starts like another
        "t6": "not json",
        "t7": json.dumps({"routing_key": queue_name("a")}),
        "t8": json.dumps([{}, "", 'taskserve.a"']),
        "t9": b"\xff\xfe[",
    })
    assert store.deployment_loads(["a", "b", "c"]) == {"a": (3, 2), "b": (1, 1), "c": (0, 0)}
    assert store.deployment_loads(["a", "ab"]) == {"a": (3, 2), "ab": (0, 1)}
    assert store.deployment_loads([]) == {}


@needs_lua
def test_autoscale_state_round_trips_and_is_written_only_while_the_deployment_exists(store, client):
    state = AutoscaleState(target=3, reason="3 replicas for 5 waiting/serving, target 2 each", waiting=4,
                           serving=1, at=1700000000.5, changed_at=1699999999.0)
    assert store.set_autoscale_state(NAME, state) is False
    assert store.autoscale_state(NAME) is None
    deployed(store)
    assert store.set_autoscale_state(NAME, state) is True
    assert store.autoscale_state(NAME) == state
    assert store.autoscale_states([NAME, "other"]) == {NAME: state, "other": None}
    assert [e["action"] for e in store.history(NAME)] == ["deploy"], "no change, no history line"
    assert store.get_goal(NAME).generation == 1


@needs_lua
def test_an_autoscaling_change_is_one_history_line_without_a_goal(store):
    deployed(store)
    store.set_autoscale_state(NAME, AutoscaleState(target=4), {"from": 1, "to": 4, "reason": "r", "generation": 1})
    deploy_entry, line = store.history(NAME)
    assert (line["action"], line["by"], line["from"], line["to"], line["reason"]) == ("autoscale", "autoscaler", 1, 4, "r")
    assert "goal" not in line and line["at"] >= deploy_entry["at"]

    store.record_outcome(NAME, 1, "done")             # the goal change's entry, not the autoscaling line
    deploy_entry, line = store.history(NAME)
    assert deploy_entry["outcome"] == "done" and "outcome" not in line


@needs_lua
def test_autoscaling_lines_never_push_the_goal_changes_out_of_the_history(store):
    for i in range(HISTORY_LIMIT - 10):
        store.write_goal(NAME, next_goal(f"v{i}"), event={"action": "deploy"})
    for count in range(3 * AUTOSCALE_HISTORY_LIMIT):
        store.set_autoscale_state(NAME, AutoscaleState(target=count), {"from": count, "to": count + 1})
    history = store.history(NAME)
    lines = [e for e in history if e["action"] == "autoscale"]
    assert len(lines) == AUTOSCALE_HISTORY_LIMIT
    assert [e["to"] for e in lines] == list(range(2 * AUTOSCALE_HISTORY_LIMIT + 1, 3 * AUTOSCALE_HISTORY_LIMIT + 1))
    assert len(history) == HISTORY_LIMIT
    deploys = [e for e in history if e["action"] == "deploy"]
    assert len(deploys) == HISTORY_LIMIT - AUTOSCALE_HISTORY_LIMIT
    assert deploys[-1]["version"] == f"v{HISTORY_LIMIT - 11}"

    for i in range(5):                                # goal changes still push out the oldest entries
        store.write_goal(NAME, next_goal(f"w{i}"), event={"action": "deploy"})
    assert len(store.history(NAME)) == HISTORY_LIMIT and store.history(NAME)[-1]["version"] == "w4"


@needs_lua
def test_delete_autoscale_states(store, client):
    deployed(store)
    store.set_autoscale_state(NAME, AutoscaleState(target=2))
    assert store.delete_autoscale_states([NAME, "other"]) == 1
    assert store.autoscale_state(NAME) is None
    assert store.delete_autoscale_states([]) == 0


def test_an_unreadable_autoscale_state_reads_as_none_and_is_logged_once(store, client, caplog):
    client.set(Store.scale_key(NAME), '{"target": "four"}')
    with caplog.at_level("ERROR", logger="taskserve.store"):
        assert store.autoscale_state(NAME) is None
        assert store.autoscale_state(NAME) is None
    assert len(caplog.records) == 1


def test_a_goal_with_fields_this_version_does_not_know_reads_fine(store, client):
    store.write_goal(NAME, next_goal("v1"))
    data = json.loads(client.get(Store.goal_key(NAME)))
    client.set(Store.goal_key(NAME), json.dumps({**data, "priority": 3, "placement": {"zone": "a"}}))
    assert store.get_goal(NAME).version == "v1"
    assert [g.name for g in store.list_goals()] == [NAME]
    assert store.require_goal(NAME).version == "v1"
    assert store.update_goal(NAME, lambda previous: {"num_replicas": 2}, "scale").num_replicas == 2


def test_a_corrupt_goal_leaves_the_others_readable_and_is_logged_once(store, client, caplog):
    for name in ("a-first", "b-broken", "c-last"):
        store.write_goal(name, next_goal("v1", name=name))
    client.set(Store.goal_key("b-broken"), "{not json")
    with caplog.at_level("ERROR", logger="taskserve.store"):
        assert [g.name for g in store.list_goals()] == ["a-first", "c-last"]
        assert [g.name for g in store.list_goals()] == ["a-first", "c-last"]
    assert [r.getMessage() for r in caplog.records] == [
        "the goal of deployment b-broken cannot be read (JSONDecodeError: Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1)); skipping it"
    ]
    goals, unreadable = store.read_goals()
    assert [g.name for g in goals] == ["a-first", "c-last"] and list(unreadable) == ["b-broken"]
    client.set(Store.goal_key("b-broken"), json.dumps({"name": "b-broken"}))   # JSON, but not a goal
    assert list(store.read_goals()[1]) == ["b-broken"]
    assert store.snapshot("c-last")[0].name == "c-last"


def test_an_unreadable_replica_record_is_noted_by_deployment(store, client):
    store.create_replica(make_replica("echo-1"))
    store.create_replica(make_replica("other-1", deployment="other"))
    client.sadd(Store.DEPLOYMENTS_KEY, NAME, "other")
    client.hset(Store.replica_key("other-1"), "state", "HIBERNATING")
    with pytest.raises(ValueError):
        store.all_replicas()
    unreadable: dict[str, str] = {}
    assert [r.replica_id for r in store.all_replicas(unreadable)] == ["echo-1"]
    assert unreadable == {"other": "the record of replica other-1 cannot be read: "
                                   "state is not a replica state: 'HIBERNATING'"}


def test_health_with_fields_this_version_does_not_know_reads_fine(store, client):
    store.write_goal(NAME, next_goal("v1"))
    client.set(Store.health_key(NAME), json.dumps({"status": "HEALTHY", "message": "", "observed_generation": 1,
                                                    "slo": "p99<50ms"}))
    assert store.get_health(NAME).status == DeploymentState.HEALTHY


def test_goal_record_is_json(store, client):
    goal = store.write_goal(NAME, next_goal("v1"))
    data = json.loads(client.get(Store.goal_key(NAME)))
    assert data["generation"] == 1 and data["name"] == NAME
    assert Goal.from_json(client.get(Store.goal_key(NAME))) == goal


# --------------------------------------------------------------------------- the controller on this store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def leading_controller(store: Store, clock: Optional[Clock] = None) -> Controller:
    controller = Controller(store, clock=clock or Clock())
    controller._lead(store.acquire_lease(controller.controller_id, controller.lease_ttl_s))
    assert controller.leading
    return controller


def deploy(store: Store, name: str, num_replicas: int = 1) -> Goal:
    goal = store.update_goal(name, lambda previous: next_goal("v1", name=name, num_replicas=num_replicas)(previous),
                             "deploy", missing_ok=True)
    assert goal is not None
    return goal


def with_nodes(store: Store, *node_ids: str, ttl_s: float = 2.0) -> None:
    for node_id in node_ids:
        store.register_node(make_node(node_id, heartbeat_ttl_s=ttl_s), ttl_s=ttl_s)


def running(store: Store, name: str) -> None:
    """Every replica of ``name`` runs (what its agent and process would write)."""
    for replica in store.replicas_of(name):
        store.update_replica(replica.replica_id, state=ReplicaState.RUNNING,
                             applied_config_hash=replica.config_hash)


@needs_lua
def test_a_deployment_whose_planning_raises_does_not_stop_the_others(store, monkeypatch, caplog):
    with_nodes(store, "node-a")
    for name in ("alpha", "broken", "gamma"):
        deploy(store, name, num_replicas=2)
    real_plan = controller_module.plan

    def plan(goal, *args, **kwargs):
        if goal.name == "broken":
            raise KeyError("num_replicas")
        return real_plan(goal, *args, **kwargs)

    monkeypatch.setattr(controller_module, "plan", plan)
    controller = leading_controller(store)
    with caplog.at_level("ERROR", logger="taskserve.controller"):
        for _ in range(3):
            controller.reconcile_once()
            running(store, "alpha")
            running(store, "gamma")
    assert len(store.replicas_of("alpha")) == len(store.replicas_of("gamma")) == 2
    assert store.get_health("alpha").status == store.get_health("gamma").status == DeploymentState.HEALTHY
    assert store.replicas_of("broken") == []
    assert store.get_health("broken").message == \
        "the controller cannot reconcile this deployment: KeyError: 'num_replicas'"
    assert [r.getMessage() for r in caplog.records] == [
        "broken: cannot reconcile it (KeyError: 'num_replicas'); the other deployments go on"
    ]

    monkeypatch.setattr(controller_module, "plan", real_plan)   # fixed: it converges too
    controller.reconcile_once()
    assert len(store.replicas_of("broken")) == 2 and "broken" not in controller.errors


@needs_lua
def test_a_corrupt_goal_does_not_stop_the_others(store, client):
    with_nodes(store, "node-a")
    deploy(store, "alpha")
    deploy(store, "broken")
    client.set(Store.goal_key("broken"), "{not json")
    controller = leading_controller(store)
    controller.reconcile_once()
    assert len(store.replicas_of("alpha")) == 1
    assert store.get_health("broken").message.startswith(
        "the controller cannot reconcile this deployment: its goal cannot be read: JSONDecodeError")


@needs_lua
def test_a_leader_that_loses_its_lease_before_applying_writes_nothing(store, server, monkeypatch):
    """Paused after planning, past its lease: another controller leads when it wakes up."""
    with_nodes(store, "node-a")
    deploy(store, NAME, num_replicas=3)
    paused = leading_controller(store)
    standby = Controller(Store(server.connect()))
    real_plan = controller_module.plan

    def plan_then_pause(*args, **kwargs):
        result = real_plan(*args, **kwargs)
        store.redis.delete(Store.LEASE_KEY)            # the lease ran out while it was stopped
        standby._lead(standby.store.acquire_lease(standby.controller_id, 5))
        return result

    monkeypatch.setattr(controller_module, "plan", plan_then_pause)
    with pytest.raises(LeaseLost):
        paused.reconcile_once()
    assert store.replicas_of(NAME) == []
    assert store.get_health(NAME) == DeploymentHealth()

    monkeypatch.setattr(controller_module, "plan", real_plan)
    standby.reconcile_once()
    assert len(store.replicas_of(NAME)) == 3
    assert store.acquire_lease(paused.controller_id, 5) is None   # it stands by from now on


@needs_lua
def test_a_lease_lost_between_the_check_and_a_write_refuses_the_write(store, server, monkeypatch):
    with_nodes(store, "node-a")
    deploy(store, NAME, num_replicas=3)
    paused = leading_controller(store)
    real_create = store.create_replica

    def create_after_a_pause(replica, fence=None):
        if store.lease_holder() == paused.controller_id:
            store.redis.delete(Store.LEASE_KEY)
            Store(server.connect()).acquire_lease("controller-b", 5)
        return real_create(replica, fence=fence)

    monkeypatch.setattr(store, "create_replica", create_after_a_pause)
    with pytest.raises(LeaseLost):
        paused.reconcile_once()
    assert store.replicas_of(NAME) == []


@needs_lua
def test_replicas_of_a_node_that_stopped_heartbeating_wait_one_more_ttl(store, client):
    with_nodes(store, "node-a", "node-b", ttl_s=2.0)
    deploy(store, NAME, num_replicas=2)
    clock = Clock()
    controller = leading_controller(store, clock)
    controller.reconcile_once()
    running(store, NAME)
    on_b = {r.replica_id for r in store.replicas_of(NAME) if r.node_id == "node-b"}
    assert len(on_b) == 1

    client.delete(Store.node_alive_key("node-b"))      # its heartbeat is late
    controller.reconcile_once()
    clock.now += 1.9
    controller.reconcile_once()
    assert on_b <= {r.replica_id for r in store.replicas_of(NAME)}, "kept within the grace"
    assert len(store.replicas_of(NAME)) == 2

    clock.now += 0.1                                   # one TTL after it was first seen dead
    controller.reconcile_once()
    replicas = store.replicas_of(NAME)
    assert not on_b & {r.replica_id for r in replicas}
    assert sorted(r.node_id for r in replicas) == ["node-a", "node-a"]


@needs_lua
def test_a_node_that_heartbeats_again_within_the_grace_keeps_its_replicas(store, client):
    with_nodes(store, "node-a", "node-b", ttl_s=2.0)
    deploy(store, NAME, num_replicas=2)
    clock = Clock()
    controller = leading_controller(store, clock)
    controller.reconcile_once()
    before = {r.replica_id for r in store.replicas_of(NAME)}
    client.delete(Store.node_alive_key("node-b"))
    controller.reconcile_once()
    clock.now += 1.5
    with_nodes(store, "node-b", ttl_s=2.0)             # it registers again
    controller.reconcile_once()
    clock.now += 10
    controller.reconcile_once()
    assert {r.replica_id for r in store.replicas_of(NAME)} == before
    assert controller.dead_since == {}


@needs_lua
def test_when_every_node_looks_dead_no_replica_is_forgotten(store, client):
    """Redis restarted and lost every heartbeat (or this controller was cut off)."""
    with_nodes(store, "node-a", "node-b", ttl_s=2.0)
    deploy(store, NAME, num_replicas=2)
    clock = Clock()
    controller = leading_controller(store, clock)
    controller.reconcile_once()
    running(store, NAME)
    before = {r.replica_id for r in store.replicas_of(NAME)}

    client.delete(Store.node_alive_key("node-a"), Store.node_alive_key("node-b"))
    for _ in range(5):
        clock.now += 10
        controller.reconcile_once()
        assert {r.replica_id for r in store.replicas_of(NAME)} == before

    # node-a heartbeats again first: node-b gets a full TTL from then.
    with_nodes(store, "node-a", ttl_s=2.0)
    clock.now += 1
    controller.reconcile_once()
    with_nodes(store, "node-b", ttl_s=2.0)
    clock.now += 10
    controller.reconcile_once()
    assert {r.replica_id for r in store.replicas_of(NAME)} == before
