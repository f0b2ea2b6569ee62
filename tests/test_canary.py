"""Canary releases, the pure parts: the planner's tables, the abort decision, validation,
routing and the stats (SPEC §9). The cluster tests are in test_canary_integration.py; the
store's part (stats per version, the canary queue moved) is tested in test_store.py."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from taskserve.canary import VersionStats, abort_reason, baseline_of, count_request
from taskserve.gateway.routes import Route, RouteTable
from taskserve.planner import NodeCapacity, PlaceReplica, StartReplica, StopReplica, plan
from taskserve.spec import validate_options
from taskserve.state import Canary, DeploymentHealth, DeploymentState, Goal, Replica, ReplicaState, Resources
from taskserve.store import canary_queue_name, queue_name, replica_queue


def stable_goal(n: int = 10, canary: Canary | None = None, version: str = "1") -> Goal:
    return Goal(name="m", generation=2, version=version, spec_hash=f"s{version}", num_replicas=n,
                options={"num_cpus": 1}, code_sha=f"c{version}", init_sha="i", canary=canary)


def make_canary(percent: float = 10, version: str = "2", **changes) -> Canary:
    return Canary(version=version, spec_hash=f"s{version}", code_sha=f"c{version}", init_sha="i",
                  options={"num_cpus": 1}, traffic_percent=percent, **changes)


def running(replica_id: str, version: str = "1", canary: bool = False, created_at: float = 0.0) -> Replica:
    return Replica(replica_id=replica_id, deployment="m", spec_hash=f"s{version}", version=version,
                   node_id="node-a", state=ReplicaState.RUNNING, num_cpus=1, created_at=created_at, canary=canary)


NODES = [NodeCapacity("node-a", Resources(num_cpus=100, memory=2**40))]


def plan_of(goal: Goal, replicas: list[Replica], nodes=NODES):
    ids = (f"new-{i}" for i in itertools.count())
    return plan(goal, replicas, nodes, DeploymentHealth(), now=1.0, new_id=lambda: next(ids), dead_nodes=set())


def stable_fleet(n: int = 10) -> list[Replica]:
    return [running(f"r{i}", created_at=i) for i in range(n)]


# --------------------------------------------------------------------------- planner


@pytest.mark.parametrize("n, percent, expected", [(10, 10, 1), (10, 25, 3), (4, 25, 1), (4, 50, 2), (1, 1, 1),
                                                  (3, 100, 3), (0, 50, 1), (20, 5, 1), (20, 12.5, 3)])
def test_canary_replica_count_is_max_1_ceil_n_p(n: int, percent: float, expected: int) -> None:
    assert make_canary(percent).replica_count(n) == expected


def test_a_canary_starts_beside_the_stable_replicas_which_stay() -> None:
    result = plan_of(stable_goal(10, make_canary(25)), stable_fleet())
    starts = [a for a in result.actions if isinstance(a, StartReplica)]
    assert len(starts) == 3 and len(result.actions) == 3     # nothing stops
    assert all(a.replica.canary and a.replica.version == "2" and a.replica.spec_hash == "s2" for a in starts)
    assert result.status == DeploymentState.UPDATING


def test_a_running_canary_is_healthy_and_plans_nothing() -> None:
    replicas = stable_fleet() + [running("c0", "2", canary=True)]
    result = plan_of(stable_goal(10, make_canary(10)), replicas)
    assert result.actions == [] and result.status == DeploymentState.HEALTHY
    assert "canary 2 at 10%: 1 replicas running" in result.message


def test_moving_the_split_changes_no_replica_unless_the_count_changes() -> None:
    replicas = stable_fleet() + [running("c0", "2", canary=True)]
    assert plan_of(stable_goal(10, make_canary(5)), replicas).actions == []      # still 1 replica
    grown = plan_of(stable_goal(10, make_canary(20)), replicas).actions
    assert [type(a) for a in grown] == [StartReplica] and grown[0].replica.canary
    shrunk = plan_of(stable_goal(10, make_canary(10)), replicas + [running("c1", "2", canary=True, created_at=5)])
    assert shrunk.actions == [StopReplica("c1")]           # the newest canary replica goes


def test_abort_drains_the_canary_and_touches_no_stable_replica() -> None:
    replicas = stable_fleet() + [running("c0", "2", canary=True), running("c1", "2", canary=True)]
    result = plan_of(stable_goal(10), replicas)
    assert result.actions == [StopReplica("c0"), StopReplica("c1")]
    assert result.status == DeploymentState.UPDATING and "canary replicas draining: 2" in result.message
    drained = [replace(r, desired="stop", state=ReplicaState.STOPPED) if r.canary else r for r in replicas]
    done = plan_of(stable_goal(10), drained)
    assert {type(a).__name__ for a in done.actions} == {"ForgetReplica"}
    assert not any(a.failed_start for a in done.actions)


def test_promote_rolls_the_stable_replicas_within_the_bound_then_drains_the_canary() -> None:
    canary = [running("c0", "2", canary=True)]
    promoted = stable_goal(10, version="2")        # the canary's version, no canary
    first = plan_of(promoted, stable_fleet() + canary)
    stops = [a for a in first.actions if isinstance(a, StopReplica)]
    assert [a.replica_id for a in stops] == ["r0", "r1"]        # 20% of 10 at a time, oldest first
    assert "c0" not in {a.replica_id for a in stops}            # the canary serves on meanwhile
    new_stable = [running(f"n{i}", "2", created_at=20 + i) for i in range(10)]
    last = plan_of(promoted, new_stable + canary)
    assert last.actions == [StopReplica("c0")]                  # rollout done: the canary drains
    assert all(not a.replica.canary for a in first.actions if isinstance(a, StartReplica))


def test_a_canary_of_another_version_replaces_the_old_canary() -> None:
    replicas = stable_fleet() + [running("c0", "2", canary=True)]
    result = plan_of(stable_goal(10, make_canary(10, version="3")), replicas)
    kinds = sorted(type(a).__name__ for a in result.actions)
    assert kinds == ["StartReplica", "StopReplica"] or kinds == ["StartReplica"]   # rolled by the usual budget
    assert all(a.replica.version == "3" for a in result.actions if isinstance(a, StartReplica))


def test_the_canary_is_placed_in_the_room_the_stable_plan_left() -> None:
    nodes = [NodeCapacity("node-a", Resources(num_cpus=1, memory=2**30))]
    goal = stable_goal(1, make_canary(50))
    result = plan_of(goal, [], nodes)
    starts = [a.replica for a in result.actions if isinstance(a, StartReplica)]
    assert [(r.canary, r.node_id) for r in starts] == [(False, "node-a"), (True, "")]
    assert "pending: needs 1 CPU" in result.message
    # Room frees: the pending canary replica is placed with its own resources.
    pending = replace(starts[1], replica_id="c0")
    placed = plan_of(goal, [running("r0"), pending], [NodeCapacity("node-a", Resources(1, memory=2**30))])
    assert placed.actions == [PlaceReplica("c0", "node-a", "", Resources(1, 0, 0))]


def test_a_canary_whose_constructor_keeps_failing_fails_the_goal() -> None:
    failed = [replace(running(f"c{i}", "2", canary=True), state=ReplicaState.FAILED, failure="start",
                      message="ValueError: bad weights") for i in range(3)]
    result = plan_of(stable_goal(10, make_canary(10)), stable_fleet() + failed)
    assert result.failed and result.status == DeploymentState.UNHEALTHY
    assert "bad weights" in result.message


def test_replica_queues() -> None:
    assert replica_queue(running("r0")) == queue_name("m") == "taskserve.m"
    assert replica_queue(running("c0", "2", canary=True)) == canary_queue_name("m") == "taskserve.m@canary"


# --------------------------------------------------------------------------- the abort decision


def test_nothing_is_decided_before_min_requests() -> None:
    canary = make_canary(min_requests=50)
    assert abort_reason(canary, VersionStats(49, 49), VersionStats(1000, 0)) is None


@pytest.mark.parametrize("canary_errors, stable_errors, aborted", [
    (0, 0, False), (5, 0, False), (6, 0, True), (15, 10, False), (16, 10, True), (100, 100, False)])
def test_error_rate_increase_threshold(canary_errors: int, stable_errors: int, aborted: bool) -> None:
    canary = make_canary(min_requests=20, max_error_rate_increase=0.05)
    reason = abort_reason(canary, VersionStats(100, canary_errors), VersionStats(100, stable_errors))
    assert (reason is not None) == aborted
    if aborted:
        assert "error rate" in reason and "max_error_rate_increase" in reason


def test_p95_ratio_is_optional_and_needs_enough_stable_requests() -> None:
    slow = VersionStats(40, 0, (0,) * 9 + (40,) + (0,) * 6)       # all <= 1s
    fast = VersionStats(40, 0, (0,) * 5 + (40,) + (0,) * 10)      # all <= 0.05s
    assert abort_reason(make_canary(), slow, fast) is None                       # no max_p95_ratio
    assert "p95 latency" in abort_reason(make_canary(max_p95_ratio=2.0), slow, fast)
    assert abort_reason(make_canary(max_p95_ratio=2.0), slow, VersionStats(10, 0, fast.buckets)) is None
    assert abort_reason(make_canary(max_p95_ratio=2.0), fast, slow) is None


def test_stats_count_and_compare_from_the_baseline() -> None:
    counts: dict[str, int] = {}
    for seconds, ok in [(0.002, True), (0.2, False), (0.2, True), (100.0, True)]:
        count_request(counts, "2", seconds, ok)
    stats = VersionStats.of(counts, "2")
    assert (stats.requests, stats.errors, sum(stats.buckets)) == (4, 1, 4)
    assert stats.p95 == float("inf")
    before = baseline_of({**counts, "requests:1": 7}, "2")
    assert VersionStats.of(counts, "2", before) == VersionStats(0, 0, (0,) * len(stats.buckets))


# --------------------------------------------------------------------------- validation and routing


@pytest.mark.parametrize("canary, error", [
    ({"traffic_percent": 0}, "invalid canary['traffic_percent']=0"),
    ({"traffic_percent": 101}, "invalid canary['traffic_percent']=101"),
    ({"traffic_percent": True}, "invalid canary['traffic_percent']=True"),
    ({}, "a canary needs its traffic_percent"),
    ({"traffic": 10}, "unknown canary key 'traffic'; did you mean 'traffic_percent'?"),
    ({"traffic_percent": 10, "min_requests": 0}, "invalid canary['min_requests']=0"),
    ({"traffic_percent": 10, "max_error_rate_increase": 2}, "invalid canary['max_error_rate_increase']=2"),
    ({"traffic_percent": 10, "max_p95_ratio": 0.5}, "invalid canary['max_p95_ratio']=0.5"),
    ("10%", "invalid canary='10%'"),
])
def test_bad_canary_options_get_one_clear_error(canary, error: str) -> None:
    with pytest.raises((TypeError, ValueError)) as raised:
        validate_options({"version": "2", "canary": canary})
    assert str(raised.value).startswith(error) and "\n" not in str(raised.value)


def test_a_canary_needs_a_version_and_no_autoscaling() -> None:
    with pytest.raises(ValueError, match="a canary needs a version"):
        validate_options({"canary": {"traffic_percent": 10}})
    with pytest.raises(ValueError, match="autoscaled"):
        validate_options({"version": "2", "num_replicas": "auto", "canary": {"traffic_percent": 10}})
    assert validate_options({"version": "2", "canary": {"traffic_percent": 10}}).canary == {
        "traffic_percent": 10.0, "min_requests": 20, "max_error_rate_increase": 0.05, "max_p95_ratio": None}


def test_routes_split_by_percent_and_pin_by_version() -> None:
    goal = stable_goal(10, make_canary(30))
    route = RouteTable.from_goals([goal]).match("/m")
    assert (route.version, route.canary_version, route.canary_percent) == ("1", "2", 30)
    draws = [i / 10 for i in range(1000)]       # uniform over [0, 100)
    to_canary = sum(route.queue_for(None, draw)[0] == canary_queue_name("m") for draw in draws)
    assert to_canary == 300
    assert route.queue_for("1", 0.0) == (queue_name("m"), "1")
    assert route.queue_for("2", 99.0) == (canary_queue_name("m"), "2")
    with pytest.raises(ValueError, match="runs version '1' and the canary '2', not '3'"):
        route.queue_for("3", 0.0)
    assert Route("/m", "m", version="1").queue_for(None, 0.0) == (queue_name("m"), "1")
