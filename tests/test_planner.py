"""Unit tests of the pure planner (taskserve/planner.py).

Plain tables for the rules, hypothesis properties for the invariants of docs/reference.md, Updates:
availability never below ``n - unavailable_budget``, a matching goal plans nothing,
scale-only keeps current replicas, rollouts converge (whenever the new version fits the
nodes, even when replicas that never got a node spend the budget), failures stop the rollout,
placement fits and spreads, deletion drains before forgetting.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Callable, Iterable, Optional

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from taskserve.planner import (
    ForgetDeployment,
    ForgetReplica,
    NodeCapacity,
    PlaceReplica,
    Plan,
    StartReplica,
    StopReplica,
    failure_threshold,
    node_capacities,
    place,
    plan,
    plural,
    reserve,
    retry_delay,
    surge_budget,
    unavailable_budget,
)
from taskserve.state import (
    DeploymentHealth,
    DeploymentState,
    Goal,
    Node,
    Replica,
    ReplicaState,
    Resources,
)

from .helpers import examples

NEW = "spec-new"
OLD = "spec-old"
NAME = "model"

PROPERTY = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIM = settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def make_goal(
    n: int,
    *,
    spec_hash: str = NEW,
    version: str = "v2",
    max_unavailable: float = 0.2,
    max_surge: float = 0,
    num_cpus: float = 1,
    num_gpus: float = 0,
    memory: Optional[int] = None,
    deleting: bool = False,
    generation: int = 1,
) -> Goal:
    return Goal(
        name=NAME,
        generation=generation,
        version=version,
        spec_hash=spec_hash,
        num_replicas=n,
        options={
            "num_replicas": n,
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "memory": memory,
            "max_unavailable": max_unavailable,
            "max_surge": max_surge,
            "user_config": None,
        },
        code_sha="code",
        init_sha="init",
        deleting=deleting,
    )


def rep(
    replica_id: str,
    *,
    spec_hash: str = NEW,
    node_id: str = "node-a",
    state: ReplicaState = ReplicaState.RUNNING,
    desired: str = "run",
    failure: str = "",
    message: str = "",
    created_at: float = 0.0,
    num_cpus: float = 1,
    num_gpus: float = 0,
    memory: int = 0,
    gpu_ids: str = "",
) -> Replica:
    return Replica(
        replica_id=replica_id,
        deployment=NAME,
        spec_hash=spec_hash,
        version="v2" if spec_hash == NEW else "v1",
        node_id=node_id,
        state=state,
        desired=desired,
        failure=failure,
        message=message,
        created_at=created_at,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory,
        gpu_ids=gpu_ids,
    )


def cap(node_id: str, cpus: float = 1000, gpus: float = 0, memory: int = 2**40) -> NodeCapacity:
    return NodeCapacity(node_id, Resources(cpus, gpus, memory))


AMPLE = [cap("node-a"), cap("node-b"), cap("node-c"), cap("node-d")]


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{NAME}-new{next(counter)}"


def run_plan(
    goal: Goal,
    replicas: Iterable[Replica],
    nodes=AMPLE,
    health: Optional[DeploymentHealth] = None,
    now: float = 1000.0,
    dead_nodes: Optional[set[str]] = None,
) -> Plan:
    return plan(goal, list(replicas), nodes, health or DeploymentHealth(), now=now, new_id=ids(),
                dead_nodes=dead_nodes)


def of_type(result: Plan, kind) -> list:
    return [a for a in result.actions if isinstance(a, kind)]


def stopped_ids(result: Plan) -> set[str]:
    return {a.replica_id for a in result.actions if isinstance(a, (StopReplica, ForgetReplica))}


def available_after(replicas: Iterable[Replica], result: Plan) -> int:
    gone = stopped_ids(result)
    return sum(1 for r in replicas if r.is_available and r.replica_id not in gone)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "max_unavailable, target, expected",
    [
        (0.2, 10, 2),
        (0.2, 4, 1),      # floor(0.8) -> at least one
        (0.2, 0, 1),
        (0.2, 15, 3),
        (0.3, 10, 3),     # 0.3 * 10 is 2.9999999999999996 in floating point
        (0.5, 7, 3),
        (1.0, 5, 5),      # a float is a fraction: 100 %
        (1, 5, 1),        # an int is a count
        (2, 10, 2),
        (0, 10, 1),       # at least one, or nothing could ever be replaced
        (0.0, 10, 1),
        (25, 10, 25),
    ],
)
def test_unavailable_budget(max_unavailable, target, expected):
    assert unavailable_budget(max_unavailable, target) == expected


@pytest.mark.parametrize(
    "max_surge, target, expected",
    [
        (0, 10, 0),
        (0.0, 10, 0),
        (0.25, 10, 3),    # rounded up
        (0.25, 4, 1),
        (0.25, 1, 1),
        (0.25, 0, 0),
        (0.3, 10, 3),     # 0.3 * 10 rounds up to 3, not 4
        (1, 10, 1),
        (2, 10, 2),
        (1.0, 3, 3),
    ],
)
def test_surge_budget(max_surge, target, expected):
    assert surge_budget(max_surge, target) == expected


@pytest.mark.parametrize("target, expected", [(0, 3), (1, 3), (2, 6), (10, 30), (33, 99), (34, 100), (500, 100)])
def test_failure_threshold(target, expected):
    assert failure_threshold(target) == expected


@pytest.mark.parametrize(
    "failed, expected",
    [(-1, 0.0), (0, 0.0), (1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (6, 8.0), (7, 10.0), (50, 10.0)],
)
def test_retry_delay(failed, expected):
    assert retry_delay(failed) == expected


@given(st.integers(min_value=0, max_value=200))
@settings(max_examples=examples(60), deadline=None)
def test_retry_delay_grows_and_is_capped(failed):
    assert 0 <= retry_delay(failed) <= retry_delay(failed + 1) <= 10.0


@given(st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=1000))
@settings(max_examples=examples(100), deadline=None)
def test_budgets_are_bounded(fraction, target):
    budget = unavailable_budget(fraction, target)
    assert 1 <= budget <= max(1, target)
    surge = surge_budget(fraction, target)
    assert 0 <= surge <= target


# --------------------------------------------------------------------------- node_capacities, reserve


def test_node_capacities_subtract_reservations_and_skip_dead_nodes():
    nodes = [
        Node("node-a", Resources(8, 2, 1000)),
        Node("node-b", Resources(4, 0, 1000)),
        Node("node-dead", Resources(64, 8, 10**6), alive=False),
    ]
    replicas = [
        rep("r1", node_id="node-a", num_cpus=2, num_gpus=0.5, memory=100),
        rep("r2", node_id="node-a", state=ReplicaState.DRAINING, desired="stop", num_cpus=1, memory=50),
        rep("r3", node_id="node-a", state=ReplicaState.STOPPED, num_cpus=4),   # exited: holds nothing
        rep("r4", node_id="node-a", state=ReplicaState.FAILED, num_cpus=4),    # exited: holds nothing
        rep("r5", node_id="", state=ReplicaState.PENDING, num_cpus=3),          # not placed
        rep("r6", node_id="node-b", state=ReplicaState.STARTING, num_cpus=1.5),
        rep("r7", node_id="node-dead", num_cpus=1),
    ]
    result = node_capacities(nodes, replicas)
    assert [(c.node_id, c.free) for c in result] == [
        ("node-a", Resources(5, 1.5, 850)),
        ("node-b", Resources(2.5, 0, 1000)),
    ]
    assert result[0].gpu_free == (0.5, 1.0)     # r1's half GPU is on GPU 0


def test_gpu_ids_pack_fractions_and_take_whole_gpus():
    goal = replace(make_goal(3), options={**make_goal(3).options, "num_cpus": 0, "num_gpus": 0.5})
    result = run_plan(goal, [], nodes=[cap("node-a", 8, 2)])
    ids = sorted(start.replica.gpu_ids for start in of_type(result, StartReplica))
    assert ids == ["0", "0", "1"]           # two halves share GPU 0, the third goes to GPU 1
    whole = replace(make_goal(1), options={**make_goal(1).options, "num_cpus": 0, "num_gpus": 2})
    [start] = of_type(run_plan(whole, [], nodes=[cap("node-a", 8, 3)]), StartReplica)
    assert start.replica.gpu_ids == "0,1"
    taken = node_capacities([Node("node-a", Resources(8, 2, 100))],
                            [rep("r1", node_id="node-a", num_gpus=0.6, gpu_ids="0"),
                             rep("r2", node_id="node-a", num_gpus=0.6, gpu_ids="1")])
    assert place(Resources(0, 0.6), taken, {}) == (
        None, "needs 0.6 GPUs; the free GPU shares are split over several GPUs")


def test_reserve_takes_need_for_each_placed_start_and_placement():
    capacities = [cap("node-a", 4, 1, 100), cap("node-b", 4, 0, 100), cap("node-c", 4, 0, 100)]
    need = Resources(1, 0.5, 10)
    actions = [
        StartReplica(rep("x1", node_id="node-a")),
        StartReplica(rep("x2", node_id="node-a")),
        StartReplica(rep("x3", node_id="")),            # pending: takes nothing
        PlaceReplica("x4", "node-b"),
        StopReplica("x5"),
        ForgetReplica("x6"),
    ]
    result = reserve(capacities, actions, need)
    assert [(c.node_id, c.free) for c in result] == [
        ("node-a", Resources(2, 0, 80)), ("node-b", Resources(3, -0.5, 90)), ("node-c", Resources(4, 0, 100))]
    assert result[0].gpu_free == (0.0,)       # both halves on GPU 0
    # The input is not modified.
    assert capacities[0] == cap("node-a", 4, 1, 100)


# --------------------------------------------------------------------------- place()


def test_place_reports_the_largest_free_cpu():
    nodes = [cap("node-a", 1), cap("node-b", 2), cap("node-c", 0.5)]
    assert place(Resources(4), nodes, {}) == (None, "needs 4 CPUs; the largest free is 2 on node-b")


@pytest.mark.parametrize(
    "need, nodes, reason",
    [
        (Resources(1), [], "no node agent is alive; start one with `taskserve agent` or `taskserve up`"),
        (Resources(1.5), [cap("a", 0.5), cap("b", 1.25)], "needs 1.5 CPUs; the largest free is 1.25 on b"),
        (Resources(0, 1), [cap("a", 4, 0.5), cap("b", 4, 0)], "needs 1 GPU; the largest free is 0.5 on a"),
        (Resources(0, 0, 100), [cap("a", 4, 0, 50)], "needs 100 bytes of memory; the largest free is 50 on a"),
        (Resources(2, 1), [cap("a", 2, 0), cap("b", 1, 1)], "no single node has all of the resources at once"),
    ],
)
def test_place_reasons(need, nodes, reason):
    assert place(need, nodes, {}) == (None, reason)


def test_place_prefers_fewest_siblings_then_most_free_cpu_then_name():
    nodes = [cap("a", 4), cap("b", 8), cap("c", 8)]
    assert place(Resources(1), nodes, {}) == ("b", "")               # most free CPU, then name
    assert place(Resources(1), nodes, {"b": 1}) == ("c", "")
    assert place(Resources(1), nodes, {"b": 1, "c": 1}) == ("a", "")  # spread beats free CPU
    assert place(Resources(6), nodes, {"b": 1, "c": 2}) == ("b", "")  # only where it fits


def test_place_fractional_gpus_with_float_rounding():
    # Ten 0.1-GPU replicas share one GPU although 1 - 10 * 0.1 is not exactly 0.
    free = Resources(100, 1.0, 0)
    for _ in range(10):
        node_id, reason = place(Resources(0, 0.1), [NodeCapacity("gpu", free)], {})
        assert (node_id, reason) == ("gpu", "")
        free = free - Resources(0, 0.1)
    node_id, reason = place(Resources(0, 0.1), [NodeCapacity("gpu", free)], {})
    assert node_id is None and reason.startswith("needs 0.1 GPUs; the largest free is")


# --------------------------------------------------------------------------- plan(): tables


def test_first_deploy_starts_n_replicas_spread_over_nodes():
    nodes = [cap("node-a", 4), cap("node-b", 4), cap("node-c", 4)]
    result = run_plan(make_goal(3), [], nodes=nodes)
    starts = of_type(result, StartReplica)
    assert len(starts) == 3 and len(result.actions) == 3
    assert sorted(s.replica.node_id for s in starts) == ["node-a", "node-b", "node-c"]
    for start in starts:
        assert start.replica.spec_hash == NEW
        assert start.replica.state == ReplicaState.PENDING
        assert start.replica.desired == "run"
        assert start.replica.created_at == 1000.0
        assert start.replica.resources == Resources(1, 0, 0)
        assert start.replica.message == ""
    assert len({s.replica.replica_id for s in starts}) == 3
    assert result.status == DeploymentState.UPDATING
    assert result.message == "starting 3 replicas: 0/3 running"


def test_spread_counts_replicas_already_placed():
    nodes = [cap("node-a", 8), cap("node-b", 4), cap("node-c", 4)]
    existing = [rep("r1", node_id="node-a"), rep("r2", node_id="node-a"), rep("r3", node_id="node-b")]
    result = run_plan(make_goal(5), existing, nodes=nodes)
    # node-a has the most free CPU but already two siblings: c then b.
    assert [s.replica.node_id for s in of_type(result, StartReplica)] == ["node-c", "node-b"]


def test_spread_falls_back_to_sharing_a_node_when_others_are_full():
    nodes = [cap("node-a", 4), cap("node-b", 0)]
    result = run_plan(make_goal(3), [], nodes=nodes)
    assert [s.replica.node_id for s in of_type(result, StartReplica)] == ["node-a"] * 3


def test_replica_too_big_for_any_node_stays_pending_with_reason():
    nodes = [cap("node-a", 1), cap("node-b", 2)]
    result = run_plan(make_goal(1, num_cpus=4), [], nodes=nodes)
    [start] = of_type(result, StartReplica)
    assert start.replica.node_id == ""
    assert start.replica.message == "needs 4 CPUs; the largest free is 2 on node-b"
    assert result.status == DeploymentState.UPDATING
    assert result.message.endswith("; pending: needs 4 CPUs; the largest free is 2 on node-b")


def test_only_what_fits_is_placed_the_rest_waits():
    nodes = [cap("node-a", 2), cap("node-b", 1)]
    result = run_plan(make_goal(5), [], nodes=nodes)
    starts = of_type(result, StartReplica)
    assert len(starts) == 5
    assert sorted(s.replica.node_id for s in starts) == ["", "", "node-a", "node-a", "node-b"]
    assert all(s.replica.message == "needs 1 CPU; the largest free is 0 on node-a"
               for s in starts if not s.replica.node_id)


def test_fractional_gpus_share_a_node():
    nodes = [cap("gpu-node", 8, 1), cap("cpu-node", 8, 0)]
    result = run_plan(make_goal(2, num_gpus=0.5), [], nodes=nodes)
    assert [s.replica.node_id for s in of_type(result, StartReplica)] == ["gpu-node", "gpu-node"]
    assert all(s.replica.num_gpus == 0.5 for s in of_type(result, StartReplica))

    result = run_plan(make_goal(3, num_gpus=0.5), [], nodes=nodes)
    assert [s.replica.node_id for s in of_type(result, StartReplica)] == ["gpu-node", "gpu-node", ""]
    assert "pending: needs 0.5 GPUs; the largest free is 0 on " in result.message


def test_pending_replica_is_placed_once_room_appears():
    pending = rep("p1", node_id="", state=ReplicaState.PENDING, message="needs 1 CPU; ...")
    result = run_plan(make_goal(1), [pending], nodes=[cap("node-a", 0), cap("node-b", 2)])
    assert result.actions == [PlaceReplica("p1", "node-b")]

    # Still no room: no action, the reason is in the status message.
    result = run_plan(make_goal(1), [pending], nodes=[cap("node-a", 0.5)])
    assert result.actions == []
    assert result.message.endswith("pending: needs 1 CPU; the largest free is 0.5 on node-a")


def test_replicas_on_a_dead_node_are_forgotten_and_replaced():
    replicas = [
        rep("r1", node_id="node-a"),
        rep("r2", node_id="node-dead"),
        rep("r3", node_id="node-dead", state=ReplicaState.STARTING),
    ]
    result = run_plan(make_goal(3), replicas, nodes=[cap("node-a"), cap("node-b")])
    forgotten = of_type(result, ForgetReplica)
    assert {f.replica_id for f in forgotten} == {"r2", "r3"}
    assert not any(f.failed_start for f in forgotten)
    assert not of_type(result, StopReplica)          # nobody is left to drain them
    starts = of_type(result, StartReplica)
    assert len(starts) == 2
    assert all(s.replica.node_id in ("node-a", "node-b") for s in starts)
    assert [s.replica.node_id for s in starts].count("node-b") >= 1   # spread away from node-a
    assert result.failed_starts == 0


def test_goal_that_matches_what_runs_plans_nothing():
    replicas = [rep(f"r{i}", node_id=("node-a", "node-b")[i % 2]) for i in range(4)]
    result = run_plan(make_goal(4), replicas)
    assert result.actions == []
    assert result.status == DeploymentState.HEALTHY
    assert result.message == ""
    assert result.failed is False


def test_zero_replicas_and_no_records_is_healthy():
    result = run_plan(make_goal(0), [])
    assert result.actions == [] and result.status == DeploymentState.HEALTHY


def test_draining_replica_keeps_the_deployment_updating():
    replicas = [rep("r1"), rep("r2", state=ReplicaState.DRAINING, desired="stop")]
    result = run_plan(make_goal(1), replicas)
    assert result.actions == []
    assert result.status == DeploymentState.UPDATING
    assert result.message == "scaling to 1: 1 draining"


def test_gone_replicas_are_forgotten():
    replicas = [
        rep("r1"),
        rep("r2", state=ReplicaState.STOPPED, desired="stop"),
        rep("r3", spec_hash=OLD, state=ReplicaState.FAILED, failure="crash", message="killed"),
    ]
    result = run_plan(make_goal(1), replicas)
    assert result.actions == [ForgetReplica("r2"), ForgetReplica("r3", crashed=True, error="killed")]
    assert result.failed_starts == 0


def test_crashed_current_replica_is_replaced_at_once_without_counting_as_failed_start():
    replicas = [rep("r1"), rep("r2", state=ReplicaState.FAILED, failure="crash", message="SIGKILL")]
    result = run_plan(make_goal(2), replicas)
    assert of_type(result, ForgetReplica) == [ForgetReplica("r2", crashed=True, error="SIGKILL")]
    assert len(of_type(result, StartReplica)) == 1
    assert result.failed_starts == 0 and not result.failed


def test_scale_down_drains_the_least_useful_first():
    replicas = [
        rep("unplaced", node_id="", state=ReplicaState.PENDING, created_at=5),
        rep("starting", state=ReplicaState.STARTING, created_at=4),
        rep("old-running", created_at=1),
        rep("new-running", created_at=3),
        rep("mid-running", created_at=2),
    ]
    result = run_plan(make_goal(2), replicas)
    assert result.actions == [ForgetReplica("unplaced"), StopReplica("starting"), StopReplica("new-running")]
    assert result.message == "scaling to 2: 3 draining"


def test_scale_to_zero_stops_everything():
    replicas = [rep("a"), rep("b", spec_hash=OLD), rep("c", node_id="", state=ReplicaState.PENDING)]
    result = run_plan(make_goal(0), replicas)
    assert set(result.actions) == {StopReplica("a"), StopReplica("b"), ForgetReplica("c")}
    assert not of_type(result, StartReplica)


def test_rolling_update_first_step_stop_first():
    # 10 old replicas, 20 %: two go, two new ones start.
    replicas = [rep(f"old{i}", spec_hash=OLD, created_at=i) for i in range(10)]
    result = run_plan(make_goal(10), replicas)
    assert of_type(result, StopReplica) == [StopReplica("old0"), StopReplica("old1")]   # oldest first
    assert len(of_type(result, StartReplica)) == 2
    assert result.message == "rolling to v2: 0/10 replicas updated"


def test_rolling_update_first_step_with_surge():
    replicas = [rep(f"old{i}", spec_hash=OLD, created_at=i) for i in range(8)]
    result = run_plan(make_goal(8, max_surge=0.25), replicas)
    assert not of_type(result, StopReplica)          # nothing stops before replacements run
    assert len(of_type(result, StartReplica)) == 2


def test_surge_without_room_falls_back_to_stop_first():
    replicas = [rep(f"old{i}", spec_hash=OLD, created_at=i) for i in range(4)]
    full = [cap("node-a", 0), cap("node-b", 0.5)]
    result = run_plan(make_goal(4, max_surge=1), replicas, nodes=full)
    assert of_type(result, StopReplica) == [StopReplica("old0")]
    # Room for the surge plus the stopped one; none fits until the old ones exit.
    starts = of_type(result, StartReplica)
    assert len(starts) == 2 and all(s.replica.node_id == "" for s in starts)


def test_outdated_replicas_not_serving_are_stopped_regardless_of_budget():
    replicas = [rep(f"old{i}", spec_hash=OLD) for i in range(4)] + [
        rep("old-starting", spec_hash=OLD, state=ReplicaState.STARTING),
        rep("old-pending", spec_hash=OLD, node_id="", state=ReplicaState.PENDING),
    ]
    result = run_plan(make_goal(4), replicas)
    assert set(of_type(result, StopReplica)) >= {StopReplica("old-starting")}
    assert ForgetReplica("old-pending") in result.actions
    # Of the running ones, only the budget (1 of 4) goes.
    running_stopped = [a for a in of_type(result, StopReplica) if a.replica_id != "old-starting"]
    assert running_stopped == [StopReplica("old0")]


def issue_fleet() -> list[Replica]:
    """4 replicas needing 7.5 CPUs on a 16-CPU node: two run, two never found room."""
    return [
        rep("old0", spec_hash=OLD, num_cpus=7.5, created_at=0),
        rep("old1", spec_hash=OLD, num_cpus=7.5, created_at=1),
        rep("old2", spec_hash=OLD, num_cpus=7.5, node_id="", state=ReplicaState.PENDING, created_at=2),
        rep("old3", spec_hash=OLD, num_cpus=7.5, node_id="", state=ReplicaState.PENDING, created_at=3),
    ]


def test_budget_spent_by_never_placed_replicas_trades_one_running_replica():
    # The new version (1.5 CPUs) fits 4 times, but not in the 1 CPU left. The two replicas that
    # never got a node spend the budget of 1, so the plain rule stops no running one and the
    # rollout waits forever; instead one running replica is traded for new ones.
    result = run_plan(make_goal(4, num_cpus=1.5), issue_fleet(), nodes=[cap("node-a", 1)])
    assert {ForgetReplica("old2"), ForgetReplica("old3")} <= set(result.actions)
    assert of_type(result, StopReplica) == [StopReplica("old0")]       # one at a time, oldest first
    # Its replacement and those of the two never placed wait for the room it frees.
    assert [s.replica.node_id for s in of_type(result, StartReplica)] == ["", "", ""]


def test_no_trade_while_anything_is_in_flight_or_where_the_freed_room_does_not_fit():
    goal = make_goal(4, num_cpus=1.5)
    one_free = [cap("node-a", 1)]
    draining = [*issue_fleet()[1:], rep("old0", spec_hash=OLD, num_cpus=7.5, desired="stop")]
    starting = [*issue_fleet()[:2], rep("new0", num_cpus=1.5, state=ReplicaState.STARTING)]
    for replicas in (draining, starting):
        assert not of_type(run_plan(goal, replicas, nodes=one_free), StopReplica), replicas
    # Room for a new replica somewhere already: it goes there, nothing is traded.
    assert not of_type(run_plan(goal, issue_fleet(), nodes=[cap("node-a", 1), cap("node-b", 2)]), StopReplica)
    # Even the freed room would not hold a new replica: trading would only lose one.
    assert not of_type(run_plan(make_goal(4, num_cpus=9), issue_fleet(), nodes=one_free), StopReplica)


def test_simulated_rollout_out_of_never_placed_replicas_reaches_the_new_version():
    world = World([Node("node-a", Resources(16, 0, 2**40))], issue_fleet())
    goal = make_goal(4, num_cpus=1.5)
    result, availability = converge(world, goal, max_steps=20)
    assert_converged(world, goal, result)
    assert min(availability) >= 1, availability      # one below the two that ran, once


def test_replica_config_carries_the_options_a_replica_needs():
    goal = replace(make_goal(1), options={**make_goal(1).options, "user_config": {"a": 1}, "serializer": "pickle"})
    [start] = of_type(run_plan(goal, []), StartReplica)
    config = json.loads(start.replica.config)
    assert json.loads(start.replica.user_config) == {"a": 1}
    assert start.replica.config_hash == goal.user_config_hash != ""
    assert config["serializer"] == "pickle"
    assert config["kind"] == "class"
    assert start.replica.code_sha == "code"


# --------------------------------------------------------------------------- failures


def failed_start(replica_id: str, spec_hash: str = NEW) -> Replica:
    return rep(replica_id, spec_hash=spec_hash, state=ReplicaState.FAILED, failure="start",
               message="Traceback (most recent call last):\n  ...\nValueError: boom\n")


def test_failed_start_is_counted_and_pauses_starts():
    result = run_plan(make_goal(2), [failed_start("f1")], now=500.0)
    assert of_type(result, ForgetReplica) == [
        ForgetReplica("f1", failed_start=True, error=failed_start("f1").message)
    ]
    assert result.failed_starts == 1
    assert result.last_failure_at == 500.0
    assert "ValueError: boom" in result.last_error
    assert not of_type(result, StartReplica)       # backing off right after a failure
    assert not result.failed and result.status == DeploymentState.UPDATING
    assert result.message.startswith("waiting: constructor failed 1 time: ValueError: boom; ")


def test_failed_start_of_an_outdated_spec_does_not_count():
    result = run_plan(make_goal(1), [failed_start("f1", spec_hash=OLD)])
    assert of_type(result, ForgetReplica) == [ForgetReplica("f1", failed_start=False, error=failed_start("f1").message)]
    assert result.failed_starts == 0
    assert len(of_type(result, StartReplica)) == 1


@pytest.mark.parametrize("failed, delay", [(1, 0.25), (2, 0.5), (4, 2.0), (5, 4.0)])
def test_backoff_window(failed, delay):
    health = DeploymentHealth(failed_starts=failed, last_failure_at=100.0, last_error="ValueError: boom")
    goal = make_goal(20)   # threshold 60: far away
    during = run_plan(goal, [], health=health, now=100.0 + delay - 0.01)
    assert not of_type(during, StartReplica)
    assert during.failed_starts == failed and during.last_failure_at == 100.0
    after = run_plan(goal, [], health=health, now=100.0 + delay)
    assert len(of_type(after, StartReplica)) == 20


@pytest.mark.parametrize("n", [1, 2, 5])
def test_failure_threshold_gives_up(n):
    threshold = failure_threshold(n)
    health = DeploymentHealth(failed_starts=threshold - 1, last_failure_at=0.0, last_error="old")
    old = [rep(f"old{i}", spec_hash=OLD) for i in range(n)]
    result = run_plan(make_goal(n), old + [failed_start("f")], health=health, now=10_000.0)
    assert result.failed is True
    assert result.failed_starts == threshold
    assert result.status == DeploymentState.UNHEALTHY
    assert result.message == (
        f"constructor failed {plural(threshold, 'time')}: ValueError: boom; "
        f"{plural(n, 'replica')} of the previous version {'keeps' if n == 1 else 'keep'} serving"
    )
    assert not of_type(result, StartReplica)
    assert not of_type(result, StopReplica)        # the previous version keeps serving

    # Later passes (no new failure, long after) still start nothing.
    health = DeploymentHealth(failed_starts=threshold, last_failure_at=10_000.0, last_error=result.last_error)
    later = run_plan(make_goal(n), old, health=health, now=10**6)
    assert later.failed and not of_type(later, StartReplica) and not of_type(later, StopReplica)


def test_below_threshold_does_not_give_up():
    n = 2
    health = DeploymentHealth(failed_starts=failure_threshold(n) - 2, last_failure_at=0.0)
    result = run_plan(make_goal(n), [failed_start("f")], health=health, now=10_000.0)
    assert result.failed is False
    assert result.status == DeploymentState.UPDATING


def test_gave_up_still_drops_unplaced_outdated_replicas():
    health = DeploymentHealth(failed_starts=failure_threshold(1), last_failure_at=0.0)
    replicas = [rep("old", spec_hash=OLD), rep("old-pending", spec_hash=OLD, node_id="", state=ReplicaState.PENDING)]
    result = run_plan(make_goal(1), replicas, health=health)
    assert result.actions == [ForgetReplica("old-pending")]
    assert result.failed


@given(n=st.integers(min_value=1, max_value=12), fails=st.integers(min_value=1, max_value=40))
@settings(max_examples=examples(60), deadline=None)
def test_failures_in_one_pass_add_up(n, fails):
    health = DeploymentHealth(failed_starts=0)
    result = run_plan(make_goal(n), [failed_start(f"f{i}") for i in range(fails)], health=health, now=50.0)
    assert result.failed_starts == fails
    assert result.failed == (fails >= failure_threshold(n))
    assert not of_type(result, StartReplica)
    assert (result.status == DeploymentState.UNHEALTHY) == result.failed


# --------------------------------------------------------------------------- delete


def test_delete_stops_everything_before_forgetting_the_deployment():
    replicas = [
        rep("a"),
        rep("b", spec_hash=OLD, state=ReplicaState.STARTING),
        rep("c", node_id="", state=ReplicaState.PENDING),
        rep("d", state=ReplicaState.DRAINING, desired="stop"),
        rep("e", state=ReplicaState.STOPPED, desired="stop"),
    ]
    result = run_plan(make_goal(3, deleting=True), replicas)
    assert set(result.actions) == {StopReplica("a"), StopReplica("b"), ForgetReplica("c"), ForgetReplica("e")}
    assert not of_type(result, ForgetDeployment)
    assert not of_type(result, StartReplica)
    assert result.message == "deleting: 3 replicas draining"


def test_delete_waits_for_draining_replicas():
    result = run_plan(make_goal(1, deleting=True), [rep("d", state=ReplicaState.DRAINING, desired="stop")])
    assert result.actions == []


def test_delete_forgets_the_deployment_once_nothing_placed_is_left():
    replicas = [
        rep("e", state=ReplicaState.STOPPED, desired="stop"),
        rep("f", state=ReplicaState.FAILED, failure="crash"),
        rep("p", node_id="", state=ReplicaState.PENDING),
    ]
    result = run_plan(make_goal(2, deleting=True), replicas)
    assert result.actions[-1] == ForgetDeployment()
    assert set(result.actions[:-1]) == {ForgetReplica("e"), ForgetReplica("f", crashed=True), ForgetReplica("p")}
    assert run_plan(make_goal(2, deleting=True), []).actions == [ForgetDeployment()]


def test_replicas_of_a_node_not_live_but_not_yet_dead_are_kept_and_not_replaced():
    """Its heartbeat is late (or Redis lost it): the caller does not count it as dead yet."""
    replicas = [rep("r1", node_id="node-a"), rep("r2", node_id="node-late"), rep("r3", node_id="node-late")]
    result = run_plan(make_goal(3), replicas, nodes=[cap("node-a"), cap("node-b")], dead_nodes=set())
    assert result.actions == []
    assert result.status == DeploymentState.HEALTHY

    result = run_plan(make_goal(3), replicas, nodes=[cap("node-a"), cap("node-b")], dead_nodes={"node-late"})
    assert {f.replica_id for f in of_type(result, ForgetReplica)} == {"r2", "r3"}
    assert len(of_type(result, StartReplica)) == 2


def test_when_no_node_is_live_and_none_is_dead_nothing_is_forgotten_or_started():
    replicas = [rep("r1", node_id="node-a"), rep("r2", node_id="node-b", state=ReplicaState.STARTING)]
    assert run_plan(make_goal(2), replicas, nodes=[], dead_nodes=set()).actions == []
    # A scale-up waits for a node instead (an unplaced start names why).
    grown = run_plan(make_goal(4), replicas, nodes=[], dead_nodes=set())
    assert not of_type(grown, ForgetReplica)
    assert [s.replica.node_id for s in of_type(grown, StartReplica)] == ["", ""]


def test_a_deleting_deployment_drains_replicas_of_a_node_not_yet_dead():
    result = run_plan(make_goal(1, deleting=True), [rep("x", node_id="node-late")], nodes=[], dead_nodes=set())
    assert result.actions == [StopReplica("x")]


def test_delete_forgets_replicas_of_dead_nodes():
    result = run_plan(make_goal(1, deleting=True), [rep("x", node_id="node-dead")])
    assert result.actions == [ForgetReplica("x"), ForgetDeployment()]


# --------------------------------------------------------------------------- properties

STATES = [
    ReplicaState.PENDING,
    ReplicaState.STARTING,
    ReplicaState.RUNNING,
    ReplicaState.DRAINING,
    ReplicaState.STOPPED,
    ReplicaState.FAILED,
]
NODE_IDS = [c.node_id for c in AMPLE]


@st.composite
def replica_sets(draw, max_size: int = 40) -> list[Replica]:
    count = draw(st.integers(min_value=0, max_value=max_size))
    replicas = []
    for i in range(count):
        state = draw(st.sampled_from(STATES))
        if state == ReplicaState.PENDING:
            node_id = draw(st.sampled_from([""] + NODE_IDS))
        else:
            node_id = draw(st.sampled_from(NODE_IDS))
        replicas.append(
            rep(
                f"r{i}",
                spec_hash=draw(st.sampled_from([NEW, OLD, "spec-older"])),
                node_id=node_id,
                state=state,
                desired=draw(st.sampled_from(["run", "run", "stop"])),
                failure=draw(st.sampled_from(["", "start", "crash"])) if state == ReplicaState.FAILED else "",
                created_at=draw(st.integers(min_value=0, max_value=100)),
            )
        )
    return replicas


MAX_UNAVAILABLE = st.sampled_from([0.2, 0.5, 1])
MAX_SURGE = st.sampled_from([0, 0.25, 1])


def check_actions_are_well_formed(replicas: list[Replica], result: Plan) -> None:
    by_id = {r.replica_id: r for r in replicas}
    touched = [a.replica_id for a in result.actions if isinstance(a, (StopReplica, ForgetReplica))]
    assert len(touched) == len(set(touched)), f"a replica is stopped or forgotten twice: {result.actions}"
    for action in result.actions:
        if isinstance(action, StopReplica):
            target = by_id[action.replica_id]
            assert target.desired == "run" and target.node_id and not target.is_gone
        elif isinstance(action, ForgetReplica):
            assert action.replica_id in by_id
        elif isinstance(action, PlaceReplica):
            assert by_id[action.replica_id].node_id == ""


@given(
    n=st.integers(min_value=0, max_value=30),
    replicas=replica_sets(),
    max_unavailable=MAX_UNAVAILABLE,
    max_surge=MAX_SURGE,
)
@PROPERTY
def test_property_availability_never_below_budget(n, replicas, max_unavailable, max_surge):
    goal = make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge)
    result = run_plan(goal, replicas)
    check_actions_are_well_formed(replicas, result)
    before = sum(1 for r in replicas if r.is_available)
    after = available_after(replicas, result)
    bound = min(before, n - unavailable_budget(max_unavailable, n))
    assert after >= bound, (before, after, bound, result.actions)
    if n > 0 and before < n - unavailable_budget(max_unavailable, n):
        assert after == before, "already below the bound: no available replica may stop"
    # Starts never take the current spec above the target.
    current_left = [
        r for r in replicas
        if r.spec_hash == NEW and r.desired == "run" and not r.is_gone and r.replica_id not in stopped_ids(result)
    ]
    assert len(current_left) + len(of_type(result, StartReplica)) <= max(n, len(current_left))
    if len(current_left) > n:
        assert not of_type(result, StartReplica)


@given(replicas=replica_sets(), max_unavailable=MAX_UNAVAILABLE)
@PROPERTY
def test_property_scale_to_zero_stops_every_replica(replicas, max_unavailable):
    result = run_plan(make_goal(0, max_unavailable=max_unavailable), replicas)
    if result.failed:
        return
    left = [r for r in replicas if r.desired == "run" and not r.is_gone and r.replica_id not in stopped_ids(result)]
    assert left == []
    assert not of_type(result, StartReplica)


@given(
    n=st.integers(min_value=0, max_value=30),
    nodes=st.integers(min_value=1, max_value=5),
    max_unavailable=MAX_UNAVAILABLE,
    max_surge=MAX_SURGE,
    tight=st.booleans(),
)
@PROPERTY
def test_property_matching_goal_plans_nothing(n, nodes, max_unavailable, max_surge, tight):
    node_ids = [f"node-{i}" for i in range(nodes)]
    replicas = [rep(f"r{i}", node_id=node_ids[i % nodes], created_at=i) for i in range(n)]
    capacity = 0 if tight else 1000   # full nodes must not matter either
    result = run_plan(
        make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge),
        replicas,
        nodes=[cap(node_id, capacity) for node_id in node_ids],
    )
    assert result.actions == []
    assert result.status == DeploymentState.HEALTHY
    assert result.message == "" and not result.failed


@st.composite
def current_replica_sets(draw) -> list[Replica]:
    count = draw(st.integers(min_value=0, max_value=35))
    replicas = []
    for i in range(count):
        state = draw(st.sampled_from([ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.RUNNING]))
        node_id = draw(st.sampled_from([""] + NODE_IDS)) if state == ReplicaState.PENDING else draw(st.sampled_from(NODE_IDS))
        replicas.append(rep(f"r{i}", node_id=node_id, state=state, created_at=draw(st.integers(0, 50))))
    return replicas


@given(
    n=st.integers(min_value=0, max_value=30),
    replicas=current_replica_sets(),
    max_unavailable=MAX_UNAVAILABLE,
    max_surge=MAX_SURGE,
)
@PROPERTY
def test_property_scale_only(n, replicas, max_unavailable, max_surge):
    result = run_plan(make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge), replicas)
    check_actions_are_well_formed(replicas, result)
    removed = stopped_ids(result)
    starts = of_type(result, StartReplica)
    if len(replicas) <= n:
        assert removed == set()
        assert len(starts) == n - len(replicas)
        # Every waiting replica gets a node (capacity is ample).
        assert {a.replica_id for a in of_type(result, PlaceReplica)} == {r.replica_id for r in replicas if not r.node_id}
    else:
        assert len(removed) == len(replicas) - n
        assert not starts
        # The available ones are the last to go.
        available = sum(1 for r in replicas if r.is_available)
        assert available_after(replicas, result) == min(available, n)
        # Unplaced ones are forgotten, placed ones drained.
        for action in result.actions:
            if isinstance(action, ForgetReplica):
                assert next(r for r in replicas if r.replica_id == action.replica_id).node_id == ""
    assert all(s.replica.spec_hash == NEW for s in starts)
    if len(replicas) == n and all(r.is_available for r in replicas):
        assert result.actions == [] and result.status == DeploymentState.HEALTHY


# --------------------------------------------------------------------------- rollout simulation


class World:
    """An in-memory cluster: a start runs on the next step, a stop is gone the step after."""

    def __init__(self, nodes: list[Node], replicas: list[Replica], fail_spec: Optional[str] = None) -> None:
        self.nodes = nodes
        self.replicas = {r.replica_id: r for r in replicas}
        self.fail_spec = fail_spec
        self.now = 0.0
        self.health = DeploymentHealth()
        self.counter = itertools.count(1)

    def available(self) -> int:
        return sum(1 for r in self.replicas.values() if r.is_available)

    def step(self, goal: Goal) -> Plan:
        capacities = node_capacities(self.nodes, self.replicas.values())
        result = plan(goal, list(self.replicas.values()), capacities, self.health, self.now,
                      new_id=lambda: f"{NAME}-{next(self.counter)}")
        for action in result.actions:
            if isinstance(action, StartReplica):
                assert action.replica.replica_id not in self.replicas
                self.replicas[action.replica.replica_id] = action.replica
            elif isinstance(action, PlaceReplica):
                self.replicas[action.replica_id] = replace(self.replicas[action.replica_id], node_id=action.node_id)
            elif isinstance(action, StopReplica):
                self.replicas[action.replica_id] = replace(self.replicas[action.replica_id], desired="stop")
            elif isinstance(action, ForgetReplica):
                del self.replicas[action.replica_id]
            elif isinstance(action, ForgetDeployment):
                pass
        self.health = replace(
            self.health,
            status=result.status,
            failed_starts=result.failed_starts,
            last_error=result.last_error,
            last_failure_at=result.last_failure_at,
        )
        return result

    def advance(self, seconds: float = 1.0) -> None:
        """Time passes: stopped replicas exit, placed new ones finish starting (or fail)."""
        self.now += seconds
        for replica_id, replica in list(self.replicas.items()):
            if replica.desired == "stop":
                self.replicas[replica_id] = replace(replica, state=ReplicaState.STOPPED)
            elif replica.state in (ReplicaState.PENDING, ReplicaState.STARTING) and replica.node_id:
                if replica.spec_hash == self.fail_spec:
                    self.replicas[replica_id] = replace(
                        replica, state=ReplicaState.FAILED, failure="start",
                        message="Traceback (most recent call last):\nRuntimeError: cannot load weights",
                    )
                else:
                    self.replicas[replica_id] = replace(replica, state=ReplicaState.RUNNING)


def old_world(n: int, nodes: list[Node], fail_spec: Optional[str] = None) -> World:
    replicas = [
        rep(f"old{i}", spec_hash=OLD, node_id=nodes[i % len(nodes)].node_id, created_at=-1.0 - i)
        for i in range(n)
    ]
    return World(nodes, replicas, fail_spec)


def converge(world: World, goal: Goal, max_steps: int, seconds: float = 1.0) -> tuple[Plan, list[int]]:
    availability = []
    for _ in range(max_steps):
        result = world.step(goal)
        availability.append(world.available())
        if result.status == DeploymentState.HEALTHY or result.failed:
            return result, availability
        world.advance(seconds)
    raise AssertionError(f"no convergence in {max_steps} steps; replicas: {list(world.replicas.values())}")


def assert_converged(world: World, goal: Goal, result: Plan) -> None:
    assert result.status == DeploymentState.HEALTHY and result.actions == []
    assert len(world.replicas) == goal.num_replicas
    assert all(r.spec_hash == NEW and r.state == ReplicaState.RUNNING and r.desired == "run"
               for r in world.replicas.values())


AMPLE_NODES = [Node(f"node-{i}", Resources(1000, 0, 2**40)) for i in range(3)]


@given(n=st.integers(min_value=1, max_value=25), max_unavailable=MAX_UNAVAILABLE)
@SIM
def test_simulated_rollout_stop_first(n, max_unavailable):
    world = old_world(n, AMPLE_NODES)
    goal = make_goal(n, max_unavailable=max_unavailable, max_surge=0)
    result, availability = converge(world, goal, max_steps=4 * n + 10)
    assert_converged(world, goal, result)
    assert min(availability) >= n - unavailable_budget(max_unavailable, n), availability


@given(n=st.integers(min_value=1, max_value=25), max_surge=st.sampled_from([0.25, 1, 0.5, 2]),
       max_unavailable=MAX_UNAVAILABLE)
@SIM
def test_simulated_rollout_with_surge_keeps_full_capacity(n, max_surge, max_unavailable):
    world = old_world(n, AMPLE_NODES)
    goal = make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge)
    result, availability = converge(world, goal, max_steps=4 * n + 10)
    assert_converged(world, goal, result)
    assert min(availability) >= n, availability


@given(n=st.integers(min_value=1, max_value=15), max_surge=st.sampled_from([0.25, 1]),
       max_unavailable=MAX_UNAVAILABLE)
@SIM
def test_simulated_rollout_surge_never_exceeds_target_plus_surge(n, max_surge, max_unavailable):
    world = old_world(n, AMPLE_NODES)
    goal = make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge)
    for _ in range(4 * n + 10):
        result = world.step(goal)
        wanted = [r for r in world.replicas.values() if r.desired == "run"]
        assert len(wanted) <= n + surge_budget(max_surge, n)
        if result.status == DeploymentState.HEALTHY:
            break
        world.advance()
    assert_converged(world, goal, result)


@given(n=st.integers(min_value=1, max_value=12), max_surge=st.sampled_from([0, 0.25, 1]),
       max_unavailable=MAX_UNAVAILABLE)
@SIM
def test_simulated_rollout_on_full_nodes_converges(n, max_surge, max_unavailable):
    # Exactly room for n replicas: surge cannot be placed and falls back to stop-first.
    nodes = [Node("node-a", Resources((n + 1) // 2, 0, 2**40)), Node("node-b", Resources(n // 2, 0, 2**40))]
    world = old_world(n, nodes)
    goal = make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge)
    result, availability = converge(world, goal, max_steps=6 * n + 10)
    assert_converged(world, goal, result)
    assert min(availability) >= n - unavailable_budget(max_unavailable, n), availability


@st.composite
def fleets_the_new_spec_fits(draw) -> tuple[list[Node], list[Replica], int, float]:
    """Nodes, a fleet of the old spec placed first-fit (what fits nowhere waits unplaced), and
    a target ``n`` with a new CPU need such that ``n`` new replicas fit the nodes at once."""
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 16]), min_size=1, max_size=3))
    nodes = [Node(f"node-{i}", Resources(size, 0, 2**40)) for i, size in enumerate(sizes)]
    new_cpus = draw(st.sampled_from([0.25, 0.5, 1, 1.5, 2, 3, 4]))
    fits = sum(int(size // new_cpus) for size in sizes)
    assume(fits >= 1)
    n = draw(st.integers(min_value=1, max_value=min(fits, 12)))
    old_cpus = draw(st.sampled_from([0.25, 0.5, 1, 1.5, 2, 3, 4, 7.5, 12]))
    old_count = draw(st.integers(min_value=0, max_value=12))
    free = {node.node_id: node.total.num_cpus for node in nodes}
    replicas = []
    for i in range(old_count):
        home = next((node_id for node_id, left in free.items() if left + 1e-9 >= old_cpus), "")
        if home:
            free[home] -= old_cpus
        state = ReplicaState.RUNNING if home else ReplicaState.PENDING
        replicas.append(rep(f"old{i}", spec_hash=OLD, num_cpus=old_cpus, node_id=home, state=state,
                            created_at=-1.0 - i))
    return nodes, replicas, n, new_cpus


@given(fleet=fleets_the_new_spec_fits(), max_unavailable=MAX_UNAVAILABLE, max_surge=MAX_SURGE)
@SIM
def test_simulated_rollout_reaches_the_new_version_whenever_it_fits(fleet, max_unavailable, max_surge):
    # Whatever the old version needed, and however much of it never found room: when the new
    # version's replicas fit the nodes, planning pass after pass reaches it (issue: a rollout
    # deadlocked when the budget was spent by replicas that were never placed).
    nodes, replicas, n, new_cpus = fleet
    world = World(nodes, replicas)
    goal = make_goal(n, num_cpus=new_cpus, max_unavailable=max_unavailable, max_surge=max_surge)
    result, availability = converge(world, goal, max_steps=6 * max(n, len(replicas)) + 10)
    assert_converged(world, goal, result)
    # Availability falls below the bound only by a trade: one below what ran before, at worst.
    running_before = sum(1 for r in replicas if r.is_available)
    assert min(availability) >= min(n - unavailable_budget(max_unavailable, n), running_before - 1), availability


@given(n=st.integers(min_value=1, max_value=10), max_unavailable=MAX_UNAVAILABLE)
@SIM
def test_simulated_failing_rollout_gives_up_and_keeps_the_old_version(n, max_unavailable):
    world = old_world(n, AMPLE_NODES, fail_spec=NEW)
    goal = make_goal(n, max_unavailable=max_unavailable)
    # 31 s per step: every backoff (at most 30 s) is over by the next step.
    result, availability = converge(world, goal, max_steps=failure_threshold(n) * 3 + 20, seconds=31.0)
    assert result.failed and result.status == DeploymentState.UNHEALTHY
    assert result.failed_starts >= failure_threshold(n)
    assert "RuntimeError: cannot load weights" in result.message
    assert min(availability) >= n - unavailable_budget(max_unavailable, n)
    old_left = [r for r in world.replicas.values() if r.spec_hash == OLD and r.is_available]
    assert len(old_left) >= n - unavailable_budget(max_unavailable, n)
    # It stays given up: nothing starts, nothing more stops.
    for _ in range(3):
        world.advance(100.0)
        later = world.step(goal)
        assert later.failed
        assert not of_type(later, StartReplica) and not of_type(later, StopReplica)


def test_simulated_first_deploy_with_failing_constructor_ends_unhealthy():
    world = World(AMPLE_NODES, [], fail_spec=NEW)
    goal = make_goal(2)
    result, _ = converge(world, goal, max_steps=100, seconds=31.0)
    assert result.failed and result.status == DeploymentState.UNHEALTHY
    assert result.failed_starts == failure_threshold(2) == 6
    assert result.message == "constructor failed 6 times: RuntimeError: cannot load weights"


@given(n=st.integers(min_value=1, max_value=20), new_n=st.integers(min_value=0, max_value=20),
       max_unavailable=MAX_UNAVAILABLE, max_surge=MAX_SURGE)
@SIM
def test_simulated_rollout_with_scale_change_converges(n, new_n, max_unavailable, max_surge):
    world = old_world(n, AMPLE_NODES)
    goal = make_goal(new_n, max_unavailable=max_unavailable, max_surge=max_surge)
    result, availability = converge(world, goal, max_steps=4 * max(n, new_n) + 10)
    assert_converged(world, goal, result)
    if new_n:
        assert min(availability) >= min(n, new_n - unavailable_budget(max_unavailable, new_n))


def _settled(replica: Replica) -> Replica:
    """Records the agent could write: a draining replica was asked to stop; no start failures."""
    if replica.state == ReplicaState.DRAINING:
        replica = replace(replica, desired="stop")
    if replica.failure == "start":
        replica = replace(replica, failure="crash")
    return replica


@given(n=st.integers(min_value=0, max_value=30), replicas=replica_sets(), max_unavailable=MAX_UNAVAILABLE,
       max_surge=MAX_SURGE)
@SIM
def test_simulated_convergence_from_any_state(n, replicas, max_unavailable, max_surge):
    nodes = [Node(node_id, Resources(1000, 0, 2**40)) for node_id in NODE_IDS]
    world = World(nodes, [_settled(r) for r in replicas])
    goal = make_goal(n, max_unavailable=max_unavailable, max_surge=max_surge)
    result, availability = converge(world, goal, max_steps=4 * max(n, len(replicas)) + 10)
    assert_converged(world, goal, result)
    # Once availability reached the bound, it never falls below it again.
    bound = n - unavailable_budget(max_unavailable, n)
    reached = False
    for available in availability:
        assert not reached or available >= bound, availability
        reached = reached or available >= bound
