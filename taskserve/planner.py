"""The pure planner: from a goal and what runs, decide what to do next.

``plan()`` does no I/O. Every rule of docs/reference.md, Updates that decides which replica to
start, stop or place lives here, so it can be read in one place and tested with
plain tables:

- replicas whose ``spec_hash`` differs from the goal's ``replica_spec`` are outdated and are
  replaced in batches: at no moment are more than
  ``max(1, floor(max_unavailable * n))`` of the ``n`` target replicas unavailable;
- with ``max_surge`` new replicas start before old ones stop while nodes have room;
- when only replicas that never got a node spend that budget, one running outdated replica
  at a time is traded for new ones that fit in the room it frees (else the rollout would
  wait forever for room);
- a scale changes only the difference; a goal that matches what runs plans nothing;
- a replica whose constructor keeps failing stops the rollout after
  ``min(100, 3 * n)`` failed starts, with a growing pause between attempts;
- replicas are placed where their resources fit, spread over nodes;
- a canary (``goal.canary``) runs ``max(1, ceil(n * P / 100))`` replicas of its own beside
  the stable ones, which it never touches; without one, its replicas drain (after the
  stable rollout, when it was promoted);
- a replica is forgotten (and replaced) when it is gone, or when its node is dead;
  a node that is merely not alive right now (its heartbeat is late, Redis lost
  it) keeps its replicas: the caller says which nodes count as dead.

Example::

    >>> goal = Goal(name="echo", generation=1, version="v1", spec_hash="s1",
    ...             num_replicas=1, options={"num_cpus": 1}, code_sha="c", init_sha="i")
    >>> nodes = [NodeCapacity("node-a", Resources(num_cpus=4, memory=2**30))]
    >>> ids = iter(["echo#1"])
    >>> result = plan(goal, [], nodes, DeploymentHealth(), now=0.0, new_id=lambda: next(ids))
    >>> [type(action).__name__ for action in result.actions]
    ['StartReplica']
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Callable, Iterable, Optional, Sequence, Union

from .autoscaler import ReplicaLoad, choose_replicas_to_remove
from .state import DeploymentHealth, DeploymentState, Goal, Replica, ReplicaState, Resources

MAX_FAILED_STARTS = 100
# How a replica's start error begins when reconfigure(user_config), not the constructor, raised.
RECONFIGURE_FAILED_MARK = "reconfigure(user_config) failed:"


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartReplica:
    """Create a replica record; ``replica.node_id`` is "" when nothing fits yet."""

    replica: Replica


@dataclass(frozen=True)
class PlaceReplica:
    """Assign a pending replica to a node that now has room (and GPUs by id)."""

    replica_id: str
    node_id: str
    gpu_ids: str = ""
    resources: Optional[Resources] = None     # a canary replica's, when they are not the goal's


@dataclass(frozen=True)
class StopReplica:
    """Drain a replica: stop taking requests, finish in-flight ones, exit."""

    replica_id: str


@dataclass(frozen=True)
class SetReplicaConfig:
    """Ask a replica to run another ``user_config`` (``reconfigure`` in place)."""

    replica_id: str
    user_config: str          # JSON
    config_hash: str
    user_config_signature: str = ""     # the goal's, copied: the replica checks it


@dataclass(frozen=True)
class ForgetReplica:
    """Remove the record of a replica that is gone (stopped, failed, lost)."""

    replica_id: str
    failed_start: bool = False
    crashed: bool = False
    error: str = ""


@dataclass(frozen=True)
class ForgetDeployment:
    """A deleted deployment has no replica left: remove its keys."""


Action = Union[StartReplica, PlaceReplica, StopReplica, SetReplicaConfig, ForgetReplica, ForgetDeployment]


@dataclass(frozen=True)
class NodeCapacity:
    """A live node and the resources still free on it.

    ``gpu_free`` is the free share of each GPU by id; left empty, the node's free
    GPUs count as whole GPUs from id 0 (and a final fraction).
    """

    node_id: str
    free: Resources
    gpu_free: tuple[float, ...] = ()

    def gpus(self) -> tuple[float, ...]:
        if self.gpu_free or self.free.num_gpus <= 0:
            return self.gpu_free
        whole = int(self.free.num_gpus + 1e-9)
        rest = self.free.num_gpus - whole
        return (1.0,) * whole + ((rest,) if rest > 1e-9 else ())

    def take(self, need: Resources, gpu_ids: Sequence[int]) -> "NodeCapacity":
        """This node after a replica needing ``need`` took the GPUs ``gpu_ids``."""
        gpus = list(self.gpus())
        if need.num_gpus > 0 and not gpu_ids:
            gpu_ids = assign_gpus(need.num_gpus, gpus) or ()
        share = need.num_gpus if need.num_gpus < 1 else 1.0
        for gpu_id in gpu_ids:
            if gpu_id < len(gpus):
                gpus[gpu_id] -= share
        return NodeCapacity(self.node_id, self.free - need, tuple(gpus))


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    status: DeploymentState = DeploymentState.UPDATING
    message: str = ""
    failed: bool = False        # the rollout gave up (failure threshold reached)
    failed_starts: int = 0      # failed starts of this generation, this plan's included
    last_error: str = ""
    last_failure_at: float = 0.0


# --------------------------------------------------------------------------- rules


def unavailable_budget(max_unavailable: float, target: int) -> int:
    """How many target replicas may be unavailable at once during an update.

    A float is a fraction of the target, an int a count; at least one.

    >>> unavailable_budget(0.2, 10), unavailable_budget(0.2, 4), unavailable_budget(2, 10)
    (2, 1, 2)
    """
    if isinstance(max_unavailable, int) and not isinstance(max_unavailable, bool):
        return max(1, max_unavailable)
    return max(1, math.floor(max_unavailable * target + 1e-9))


def surge_budget(max_surge: float, target: int) -> int:
    """How many replicas may run above the target during an update (rounded up).

    >>> surge_budget(0, 10), surge_budget(0.25, 10), surge_budget(2, 10)
    (0, 3, 2)
    """
    if isinstance(max_surge, int) and not isinstance(max_surge, bool):
        return max(0, max_surge)
    return max(0, math.ceil(max_surge * target - 1e-9))


def failure_threshold(target: int) -> int:
    """Failed starts after which a rollout gives up: ``min(100, 3 * n)``, at least 3."""
    return min(MAX_FAILED_STARTS, max(3, 3 * target))


def retry_delay(failed_starts: int) -> float:
    """Seconds to wait before the next start after ``failed_starts`` failures.

    >>> [retry_delay(n) for n in (0, 1, 2, 3, 10)]
    [0.0, 0.25, 0.5, 1.0, 10.0]
    """
    if failed_starts <= 0:
        return 0.0
    return min(10.0, 0.25 * 2 ** (failed_starts - 1))


def assign_gpus(need: float, gpu_free: Sequence[float]) -> Optional[tuple[int, ...]]:
    """The GPU ids for a replica needing ``need`` GPUs, or None if they are not free.

    A fraction shares one GPU (the fullest one it fits on, so fractions pack); a
    whole number takes that many GPUs that are entirely free.

    >>> assign_gpus(0.5, [1.0, 0.5]), assign_gpus(2, [1.0, 0.5, 1.0]), assign_gpus(0.6, [0.5, 0.5])
    ((1,), (0, 2), None)
    """
    if need <= 0:
        return ()
    if need < 1:
        fits = [(free, gpu_id) for gpu_id, free in enumerate(gpu_free) if free + 1e-9 >= need]
        return (min(fits)[1],) if fits else None
    count = math.ceil(need - 1e-9)
    whole = [gpu_id for gpu_id, free in enumerate(gpu_free) if free >= 1 - 1e-9]
    return tuple(whole[:count]) if len(whole) >= count else None


def place(
    need: Resources,
    nodes: Sequence[NodeCapacity],
    spread: dict[str, int],
) -> tuple[Optional[str], str]:
    """Pick the node for a replica needing ``need``: fits, fewest of its siblings, most free CPU.

    Returns ``(node_id, "")`` or ``(None, reason)``.

    >>> place(Resources(4), [NodeCapacity("a", Resources(2)), NodeCapacity("b", Resources(1))], {})
    (None, 'needs 4 CPUs; the largest free is 2 on a')
    """
    fitting = [
        node for node in nodes
        if need.fits_in(node.free) and assign_gpus(need.num_gpus, node.gpus()) is not None
    ]
    if fitting:
        best = min(fitting, key=lambda n: (spread.get(n.node_id, 0), -n.free.num_cpus, n.node_id))
        return best.node_id, ""
    return None, _missing(need, nodes)


def _missing(need: Resources, nodes: Sequence[NodeCapacity]) -> str:
    if not nodes:
        return "no node agent is alive; start one with `taskserve agent` or `taskserve up`"
    for label, wanted, free_of, fmt in (
        ("CPUs", need.num_cpus, lambda n: n.free.num_cpus, _num),
        ("GPUs", need.num_gpus, lambda n: n.free.num_gpus, _num),
        ("bytes of memory", need.memory, lambda n: n.free.memory, str),
    ):
        largest = max(nodes, key=free_of)
        if wanted > free_of(largest) + 1e-9:
            return (f"needs {fmt(wanted)} {_unit(label, wanted)}; the largest free is {fmt(free_of(largest))} "
                    f"on {largest.node_id}")
    if any(need.fits_in(node.free) for node in nodes):
        return f"needs {_num(need.num_gpus)} {_unit('GPUs', need.num_gpus)}; the free GPU shares are split over several GPUs"
    return "no single node has all of the resources at once"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _unit(label: str, amount: float) -> str:
    """``label`` for ``amount`` of it: "CPU" for one, "CPUs" otherwise (0.5 CPUs too)."""
    return label.removesuffix("s") if label in ("CPUs", "GPUs") and amount == 1 else label


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is one.

    >>> plural(1, "replica"), plural(3, "replica"), plural(1, "time"), plural(0, "time")
    ('1 replica', '3 replicas', '1 time', '0 times')
    """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --------------------------------------------------------------------------- plan


def plan(
    goal: Goal,
    replicas: Iterable[Replica],
    nodes: Sequence[NodeCapacity],
    health: DeploymentHealth,
    now: float,
    new_id: Callable[[], str],
    dead_nodes: Optional[AbstractSet[str]] = None,
) -> Plan:
    """Decide the next actions for one deployment.

    ``replicas`` are this deployment's records; ``nodes`` the live nodes with the
    resources free on them; ``health`` what was concluded before (failed starts
    of this generation); ``new_id`` names new replicas. ``dead_nodes`` are the
    nodes whose replicas are lost; a replica on a node that is neither live nor
    dead is kept as it is (its node may come back). None: every node that is not
    live is dead.

    The steps, in order: forget what is gone (and count failed starts), stop,
    reconfigure, place and start, then say where the deployment stands.

    >>> goal = Goal(name="echo", generation=1, version="v1", spec_hash="s1",
    ...             num_replicas=1, options={}, code_sha="c", init_sha="i")
    >>> running = Replica(replica_id="echo-1", deployment="echo", spec_hash="s1", version="v1",
    ...                   node_id="node-a", state=ReplicaState.RUNNING)
    >>> plan(goal, [running], [], DeploymentHealth(), 0.0, new_id=lambda: "echo-2", dead_nodes=set()).actions
    []
    >>> [type(a).__name__ for a in plan(goal, [running], [], DeploymentHealth(), 0.0,
    ...                                 new_id=lambda: "echo-2", dead_nodes={"node-a"}).actions]
    ['ForgetReplica', 'StartReplica']
    """
    replicas = list(replicas)
    if goal.deleting:
        return _plan_delete(*_forget_gone(goal, replicas, nodes, dead_nodes))
    canaries = [r for r in replicas if r.canary]
    result = _plan_fleet(goal, [r for r in replicas if not r.canary], nodes, health, now, new_id, dead_nodes)
    if goal.canary is None and not canaries:
        return result
    return _plan_canary(goal, canaries, result, nodes, now, new_id, dead_nodes)


def _plan_fleet(
    goal: Goal,
    replicas: list[Replica],
    nodes: Sequence[NodeCapacity],
    health: DeploymentHealth,
    now: float,
    new_id: Callable[[], str],
    dead_nodes: Optional[AbstractSet[str]],
) -> Plan:
    """:func:`plan` for one set of replicas that run ``goal`` (the stable ones, or a
    canary's with its :meth:`~taskserve.state.Goal.canary_goal`)."""
    forgets, present = _forget_gone(goal, replicas, nodes, dead_nodes)
    failures = _count_failed_starts(goal, forgets, health, now)
    fleet = _partition(goal, present)
    stops = _choose_stops(goal, fleet, failures, nodes)
    configs = _reconfigure(goal, fleet, stops)
    room = _Room.of(nodes, fleet.active)
    placements, place_reason = _place_pending(stops.current, room)
    starts, start_reason = _start_missing(goal, fleet, stops, failures, room, now, new_id)
    result = Plan(
        actions=[*forgets, *_stop_actions(stops.replicas), *configs.actions, *placements, *starts],
        failed_starts=failures.count,
        last_error=failures.last_error,
        last_failure_at=failures.last_failure_at,
    )
    return _status(goal, fleet, stops, configs, failures, start_reason or place_reason, result)


# --------------------------------------------------------------------------- canary releases


def _plan_canary(
    goal: Goal,
    canaries: list[Replica],
    stable: Plan,
    nodes: Sequence[NodeCapacity],
    now: float,
    new_id: Callable[[], str],
    dead_nodes: Optional[AbstractSet[str]],
) -> Plan:
    """Add the canary's replicas to the stable version's plan (SPEC §9).

    With a canary, its ``Canary.replica_count`` replicas are planned like a deployment of
    their own (placed in the room the stable plan left, rolled when the canary changes
    version), beside the stable ones, which this never touches. Without one, its
    replicas drain: at once after an abort; after a promote, once the stable replicas
    all run the promoted version. Failed starts of both add up in one count.
    """
    canary_goal = goal.canary_goal()
    room = reserve(list(nodes), stable.actions, goal.resources)
    if canary_goal is None:
        return _drain_canary(goal, canaries, stable, room, dead_nodes)
    carried = DeploymentHealth(failed_starts=stable.failed_starts, last_error=stable.last_error,
                               last_failure_at=stable.last_failure_at)
    own = _plan_fleet(canary_goal, canaries, room, carried, now, new_id, dead_nodes)
    actions = [_as_canary(action, canary_goal) for action in own.actions]
    label = f"canary {canary_goal.version} at {_num(goal.canary.traffic_percent)}%"
    if own.status == DeploymentState.HEALTHY:
        canary_message = f"{label}: {canary_goal.num_replicas} replicas running"
    else:
        canary_message = f"{label}: {own.message}"
    return _merge(stable, own, actions, canary_message)


def _drain_canary(goal: Goal, canaries: list[Replica], stable: Plan, room: Sequence[NodeCapacity],
                  dead_nodes: Optional[AbstractSet[str]]) -> Plan:
    """Stop the replicas of a canary the goal no longer has. Those of a promoted canary
    (they run the goal's replica_spec) serve on while the stable rollout is in progress."""
    forgets, present = _forget_gone(goal, canaries, room, dead_nodes)
    forgets = [replace(forget, failed_start=False) for forget in forgets]
    promoting = stable.status == DeploymentState.UPDATING and not stable.failed
    leaving = [r for r in present if r.desired == "run" and not (promoting and r.spec_hash == goal.replica_spec)]
    draining = [r for r in present if r.node_id and (r.desired != "run" or r in leaving)]
    result = replace(stable, actions=[*stable.actions, *forgets, *_stop_actions(leaving)])
    if not present:
        return result
    message = f"canary replicas draining: {len(draining)}" if draining else "canary replicas serve until the promotion is done"
    status = DeploymentState.UNHEALTHY if stable.status == DeploymentState.UNHEALTHY else DeploymentState.UPDATING
    return replace(result, status=status, message="; ".join(filter(None, [stable.message, message])))


def _as_canary(action: Action, canary_goal: Goal) -> Action:
    """A canary's action: its new replicas are marked canary (they consume its queue), and
    its placements carry the canary's resources."""
    if isinstance(action, StartReplica):
        return StartReplica(replace(action.replica, canary=True))
    if isinstance(action, PlaceReplica):
        return replace(action, resources=canary_goal.resources)
    return action


def _merge(stable: Plan, own: Plan, actions: list[Action], canary_message: str) -> Plan:
    """The stable plan and the canary's as one: HEALTHY when both are, UNHEALTHY (failed)
    when either is."""
    if DeploymentState.UNHEALTHY in (stable.status, own.status):
        status = DeploymentState.UNHEALTHY
    elif stable.status == own.status == DeploymentState.HEALTHY:
        status = DeploymentState.HEALTHY
    else:
        status = DeploymentState.UPDATING
    return Plan(
        actions=[*stable.actions, *actions],
        status=status,
        message="; ".join(filter(None, [stable.message, canary_message])),
        failed=stable.failed or own.failed,
        failed_starts=own.failed_starts,
        last_error=own.last_error,
        last_failure_at=own.last_failure_at,
    )


# --------------------------------------------------------------------------- what the steps share


@dataclass(frozen=True)
class _Failures:
    """Failed starts of the goal's generation, and what they allow."""

    count: int
    last_error: str
    last_failure_at: float
    gave_up: bool           # the failure threshold is reached: the rollout stops
    backing_off: bool       # the pause after the last failure is not over: no start now


@dataclass(frozen=True)
class _Fleet:
    """The present replicas of a deployment by role, and the budgets of an update."""

    present: list[Replica]
    active: list[Replica]       # told to run
    stopping: list[Replica]     # told to stop before
    current: list[Replica]      # active and of the goal's replica_spec
    outdated: list[Replica]     # active and of another replica_spec
    running: list[Replica]      # active and available
    min_available: int          # available replicas an update keeps at least
    surge: int                  # replicas an update may start above the target


@dataclass(frozen=True)
class _Stops:
    """What the stop step decided."""

    replicas: list[Replica]         # to stop, in this order
    current: list[Replica]          # current replicas that stay
    outdated_left: list[Replica]    # outdated replicas that stay for now


@dataclass(frozen=True)
class _Configs:
    """What the reconfigure step decided, and what it saw."""

    actions: list[SetReplicaConfig]
    stale: list[Replica]            # current replicas not yet told the goal's user_config
    failed: list[Replica]           # current replicas whose reconfigure rejected it
    reconfiguring: list[Replica]    # told it, not acknowledged yet


@dataclass
class _Room:
    """Free resources of the live nodes and this deployment's replicas on each,
    used up as the place/start step assigns replicas to nodes."""

    free: dict[str, NodeCapacity]
    spread: dict[str, int]

    @classmethod
    def of(cls, nodes: Sequence[NodeCapacity], active: list[Replica]) -> "_Room":
        spread: dict[str, int] = {}
        for replica in active:
            if replica.node_id:
                spread[replica.node_id] = spread.get(replica.node_id, 0) + 1
        return cls({node.node_id: node for node in nodes}, spread)

    def take(self, need: Resources) -> tuple[Optional[str], tuple[int, ...], str]:
        """Place one replica needing ``need``: ``(node_id, gpu_ids, "")``, or
        ``(None, (), reason)`` when it fits nowhere."""
        node_id, reason = place(need, list(self.free.values()), self.spread)
        if node_id is None:
            return None, (), reason
        gpu_ids = assign_gpus(need.num_gpus, self.free[node_id].gpus()) or ()
        self.free[node_id] = self.free[node_id].take(need, gpu_ids)
        self.spread[node_id] = self.spread.get(node_id, 0) + 1
        return node_id, gpu_ids, ""


# --------------------------------------------------------------------------- the steps


def _forget_gone(
    goal: Goal,
    replicas: Iterable[Replica],
    nodes: Sequence[NodeCapacity],
    dead_nodes: Optional[AbstractSet[str]],
) -> tuple[list[ForgetReplica], list[Replica]]:
    """Forget the records of replicas that are gone (stopped, failed) or whose node
    died; the others are present. A failed start counts only for the goal's spec.

    Returns the forget actions and the present replicas.
    """
    live_nodes = {node.node_id for node in nodes}
    forgets: list[ForgetReplica] = []
    present: list[Replica] = []
    for replica in replicas:
        if dead_nodes is None:
            node_dead = replica.node_id not in live_nodes
        else:
            node_dead = replica.node_id in dead_nodes
        lost = bool(replica.node_id) and node_dead and not replica.is_gone
        if replica.is_gone or lost:
            forgets.append(
                ForgetReplica(
                    replica.replica_id,
                    failed_start=replica.failure == "start" and replica.spec_hash == goal.replica_spec,
                    crashed=replica.failure == "crash",
                    error=replica.message,
                )
            )
        else:
            present.append(replica)
    return forgets, present


def _plan_delete(forgets: list[ForgetReplica], present: list[Replica]) -> Plan:
    """A deleting goal drains every replica; once none is placed, the deployment is forgotten."""
    result = Plan(actions=list(forgets))
    for replica in present:
        if replica.desired == "run":
            if replica.node_id:
                result.actions.append(StopReplica(replica.replica_id))
            else:
                result.actions.append(ForgetReplica(replica.replica_id))
    if all(not r.node_id for r in present):
        result.actions.append(ForgetDeployment())
    result.message = f"deleting: {plural(sum(1 for r in present if r.node_id), 'replica')} draining"
    return result


def _count_failed_starts(goal: Goal, forgets: list[ForgetReplica], health: DeploymentHealth, now: float) -> _Failures:
    """Add this pass's failed starts to the generation's: after ``failure_threshold``
    of them the rollout gives up, and after each one starts pause for ``retry_delay``."""
    failed = [forget for forget in forgets if forget.failed_start]
    count = health.failed_starts + len(failed)
    last_failure_at = now if failed else health.last_failure_at
    return _Failures(
        count=count,
        last_error=failed[-1].error if failed else health.last_error,
        last_failure_at=last_failure_at,
        gave_up=count >= failure_threshold(goal.num_replicas),
        backing_off=count > 0 and now < last_failure_at + retry_delay(count),
    )


def _partition(goal: Goal, present: list[Replica]) -> _Fleet:
    """Sort the present replicas by role and work out the update budgets."""
    target = goal.num_replicas
    active = [r for r in present if r.desired == "run"]
    return _Fleet(
        present=present,
        active=active,
        stopping=[r for r in present if r.desired != "run"],
        current=[r for r in active if r.spec_hash == goal.replica_spec],
        outdated=[r for r in active if r.spec_hash != goal.replica_spec],
        running=[r for r in active if r.is_available],
        min_available=max(0, target - unavailable_budget(goal.options.get("max_unavailable", 0.2), target)),
        surge=surge_budget(goal.options.get("max_surge", 0), target),
    )


def _choose_stops(goal: Goal, fleet: _Fleet, failures: _Failures, nodes: Sequence[NodeCapacity]) -> _Stops:
    """Stop, in this order: current replicas whose health check keeps failing (they are
    replaced), the surplus of a scale-down, then outdated replicas as the budgets allow."""
    unhealthy = [r for r in fleet.current if r.unhealthy]
    current = [r for r in fleet.current if not r.unhealthy]
    surplus = _surplus(current, goal.num_replicas)
    current = [r for r in current if r not in surplus]
    outdated = _outdated_to_stop(goal, fleet, current, unhealthy + surplus, failures, nodes)
    replicas = unhealthy + surplus + outdated
    stopped = {r.replica_id for r in replicas}
    return _Stops(replicas, current, [r for r in fleet.outdated if r.replica_id not in stopped])


def _surplus(current: list[Replica], target: int) -> list[Replica]:
    """Current replicas above the target (a scale-down): the least useful first (not
    placed, then starting, then idle running ones, then busy ones by the requests they
    last reported holding), per :func:`taskserve.autoscaler.choose_replicas_to_remove`."""
    if len(current) <= target:
        return []
    by_id = {r.replica_id: r for r in current}
    chosen = choose_replicas_to_remove([ReplicaLoad.of(r, r.in_flight) for r in current], len(current) - target)
    return [by_id[replica_id] for replica_id in chosen]


def _outdated_to_stop(
    goal: Goal,
    fleet: _Fleet,
    current: list[Replica],
    already: list[Replica],
    failures: _Failures,
    nodes: Sequence[NodeCapacity],
) -> list[Replica]:
    """Outdated replicas to stop. Those not available cost nothing to stop. Running ones,
    oldest first, go only while availability stays within the budget (and, with surge,
    only once replacements run, unless the surge cannot be placed), or one at a time as a
    :func:`_trade`. After the rollout gave up, only unplaced ones go, so the previous
    version keeps serving.

    ``already`` are the replicas the stop step chose before.
    """
    if failures.gave_up:
        return [r for r in fleet.outdated if not r.is_available and r.node_id == ""]
    target = goal.num_replicas
    not_serving = [r for r in fleet.outdated if not r.is_available]
    outdated_running = sorted((r for r in fleet.outdated if r.is_available), key=lambda r: r.created_at)
    running_after = len(fleet.running) - sum(1 for r in already if r.is_available)
    if target == 0:
        allowed = len(outdated_running)
    elif fleet.surge > 0 and not _surge_blocked(current, goal, nodes):
        allowed = max(0, running_after - target)
    else:
        allowed = max(0, running_after - fleet.min_available)
    if allowed == 0 and not failures.backing_off:
        return not_serving + _trade(goal, fleet, already, outdated_running, nodes)
    return not_serving + outdated_running[:allowed]


def _trade(
    goal: Goal,
    fleet: _Fleet,
    already: list[Replica],
    outdated_running: list[Replica],
    nodes: Sequence[NodeCapacity],
) -> list[Replica]:
    """One running outdated replica to stop although the budget is spent, or none.

    When every unavailable replica of the target is one that never got a node (they are
    unavailable whether they run the old spec or the new), the budget stops nothing, and
    new replicas wait for room only a stopped old one frees: the rollout would wait
    forever. So one old replica is traded for the new ones that fit in the room it frees:
    only while nothing else is in flight (no replica starting or draining, so the last
    trade's replacements run first), no new replica fits anywhere as it is, and the
    room freed fits one; the oldest such replica goes. Each trade removes one outdated
    replica and places at least one new one, so a target that fits the nodes is reached,
    with availability at most one below what ran before.

    >>> goal = Goal(name="m", generation=1, version="2", spec_hash="new", num_replicas=2,
    ...             options={"num_cpus": 1}, code_sha="c", init_sha="i")
    >>> old = Replica(replica_id="m-1", deployment="m", spec_hash="old", version="1",
    ...               node_id="a", state=ReplicaState.RUNNING, num_cpus=2)
    >>> unplaced = replace(old, replica_id="m-2", node_id="", state=ReplicaState.PENDING)
    >>> fleet = _partition(goal, [old, unplaced])
    >>> [r.replica_id for r in _trade(goal, fleet, [], [old], [NodeCapacity("a", Resources(0.5))])]
    ['m-1']
    """
    if not outdated_running or goal.num_replicas == 0:
        return []
    in_flight = any(r.node_id and not r.is_available for r in fleet.present) or any(r.node_id for r in already)
    waiting = len(fleet.current) < goal.num_replicas or any(not r.node_id for r in fleet.current)
    if in_flight or not waiting or place(goal.resources, nodes, {})[0] is not None:
        return []
    by_id = {node.node_id: node for node in nodes}
    for replica in outdated_running:
        node = by_id.get(replica.node_id)
        if node is not None and place(goal.resources, [_give_back(node, replica)], {})[0] is not None:
            return [replica]
    return []


def _give_back(node: NodeCapacity, replica: Replica) -> NodeCapacity:
    """``node`` once ``replica`` has exited and freed what it held (its GPUs by id).

    >>> _give_back(NodeCapacity("a", Resources(1)), Replica(replica_id="r", deployment="m",
    ...            spec_hash="s", version="1", num_cpus=2)).free.num_cpus
    3
    """
    gpus = list(node.gpus())
    share = replica.num_gpus if replica.num_gpus < 1 else 1.0
    for gpu_id in replica.gpu_id_list:
        if gpu_id < len(gpus):
            gpus[gpu_id] += share
    return NodeCapacity(node.node_id, node.free + replica.resources, tuple(gpus))


def _stop_actions(replicas: list[Replica]) -> list[Action]:
    """A placed replica is drained; one that never got a node is just forgotten."""
    return [StopReplica(r.replica_id) if r.node_id else ForgetReplica(r.replica_id) for r in replicas]


def _reconfigure(goal: Goal, fleet: _Fleet, stops: _Stops) -> _Configs:
    """Give current replicas the goal's user_config in place. A replica reconfiguring is
    unavailable, so serving ones switch in the same batches as a rollout (within the
    unavailability budget, oldest first); the others switch at once. Once a replica
    rejected the config, no other is told (the update has failed)."""
    goal_config = goal.user_config_hash
    current = stops.current
    failed = [r for r in current if r.config_hash == goal_config and r.config_error]
    stale = [r for r in current if r.config_hash != goal_config]
    reconfiguring = [r for r in current if r.config_hash == goal_config and r.applied_config_hash != goal_config
                     and r.state == ReplicaState.RUNNING and not r.config_error]
    actions: list[SetReplicaConfig] = []
    if not failed:
        stopped = {r.replica_id for r in stops.replicas}
        stale_serving = sorted((r for r in stale if r.is_available), key=lambda r: r.created_at)
        available_after = sum(1 for r in fleet.active if r.is_available and r.replica_id not in stopped)
        allowed = len(stale_serving) if goal.num_replicas == 0 else max(0, available_after - fleet.min_available)
        config_json = _config_json(goal)
        actions = [SetReplicaConfig(r.replica_id, config_json, goal_config, goal.user_config_signature)
                   for r in [r for r in stale if not r.is_available] + stale_serving[:allowed]]
    return _Configs(actions, stale, failed, reconfiguring)


def _place_pending(current: list[Replica], room: _Room) -> tuple[list[PlaceReplica], str]:
    """Place current replicas that wait for a node, oldest first, where they now fit.

    Returns the placements and why the last one that still fits nowhere waits ("" if none).
    """
    placements: list[PlaceReplica] = []
    reason = ""
    for replica in sorted(current, key=lambda r: r.created_at):
        if replica.node_id:
            continue
        node_id, gpu_ids, why = room.take(replica.resources)
        if node_id is None:
            reason = why
        else:
            placements.append(PlaceReplica(replica.replica_id, node_id, _ids(gpu_ids)))
    return placements, reason


def _start_missing(
    goal: Goal,
    fleet: _Fleet,
    stops: _Stops,
    failures: _Failures,
    room: _Room,
    now: float,
    new_id: Callable[[], str],
) -> tuple[list[StartReplica], str]:
    """Start the current replicas the target misses, as far as the surge allows next to
    the outdated ones left; none once the rollout gave up or while it backs off after a
    failed start. A replica that fits on no node yet starts unplaced, with the reason.

    Returns the starts and why the last unplaced one waits ("" if none).
    """
    target = goal.num_replicas
    missing = target - len(stops.current)
    room_left = target + fleet.surge - (len(stops.current) + len(stops.outdated_left))
    count = 0 if failures.gave_up or failures.backing_off else max(0, min(missing, room_left))
    need = goal.resources
    starts: list[StartReplica] = []
    reason = ""
    for _ in range(count):
        node_id, gpu_ids, why = room.take(need)
        reason = why or reason
        starts.append(
            StartReplica(
                Replica(
                    replica_id=new_id(),
                    deployment=goal.name,
                    spec_hash=goal.replica_spec,
                    version=goal.version,
                    node_id=node_id or "",
                    state=ReplicaState.PENDING,
                    message=why,
                    created_at=now,
                    num_cpus=need.num_cpus,
                    num_gpus=need.num_gpus,
                    memory=need.memory,
                    code_sha=goal.code_sha,
                    config=replica_config(goal),
                    user_config=_config_json(goal),
                    config_hash=goal.user_config_hash,
                    user_config_signature=goal.user_config_signature,
                    gpu_ids=_ids(gpu_ids),
                )
            )
        )
    return starts, reason


def _status(
    goal: Goal,
    fleet: _Fleet,
    stops: _Stops,
    configs: _Configs,
    failures: _Failures,
    pending_reason: str,
    result: Plan,
) -> Plan:
    """Where the deployment stands: HEALTHY once the target runs the goal and nothing is
    left to do; UNHEALTHY (and failed) when a replica rejected the user_config or the
    constructor failed too often; UPDATING otherwise, with a progress message."""
    current_running = [r for r in stops.current if r.is_available]
    done = (
        len(current_running) == goal.num_replicas
        and not configs.stale
        and not stops.outdated_left
        and not fleet.stopping
        and not stops.replicas
        and not result.actions
    )
    if done:
        return replace(result, status=DeploymentState.HEALTHY, message="")
    if configs.failed:
        rejected = configs.failed[0]
        return replace(
            result,
            status=DeploymentState.UNHEALTHY,
            failed=True,
            last_error=rejected.config_error,
            message=f"reconfigure failed on {rejected.replica_id}: {_last_line(rejected.config_error)}",
        )
    if failures.gave_up:
        message = f"{_what_failed(failures.last_error)} failed {plural(failures.count, 'time')}: {_last_line(failures.last_error)}"
        if stops.outdated_left:
            left = len(stops.outdated_left)
            message += f"; {plural(left, 'replica')} of the previous version {'keeps' if left == 1 else 'keep'} serving"
        return replace(result, status=DeploymentState.UNHEALTHY, failed=True, message=message)
    return replace(result, message=_progress(goal, fleet, stops, configs, failures, pending_reason))


def _progress(
    goal: Goal, fleet: _Fleet, stops: _Stops, configs: _Configs, failures: _Failures, pending_reason: str
) -> str:
    """The message of an update in progress: what it does, then what holds it up."""
    target = goal.num_replicas
    current = stops.current
    updated = sum(1 for r in current if r.is_available)
    if any(r.spec_hash != goal.replica_spec for r in fleet.present):
        text = f"rolling to {goal.version}: {updated}/{target} replicas updated"
    elif configs.stale or configs.reconfiguring:
        synced = sum(1 for r in current if r.applied_config_hash == goal.user_config_hash)
        text = f"reconfiguring: {synced}/{len(current)} replicas run the new user_config"
    elif len(fleet.active) > target or fleet.stopping:
        text = f"scaling to {target}: {len(fleet.stopping) + len(stops.replicas)} draining"
    else:
        text = f"starting {plural(target, 'replica')}: {updated}/{target} running"
    if failures.count:
        text = (f"waiting: {_what_failed(failures.last_error)} failed {plural(failures.count, 'time')}: "
                f"{_last_line(failures.last_error)}; ") + text
    replaced = len(fleet.stopping) + len(stops.replicas) + len(stops.outdated_left)
    if pending_reason and replaced:
        # The routine wait of a rollout on a full node: the old replicas free the room.
        need = pending_reason.split(";")[0]
        text += f"; new replicas start as the {plural(replaced, 'replica')} being replaced free room ({need})"
    elif pending_reason:
        text += f"; pending: {pending_reason}"
    waiting = sorted({r.message for r in current if r.node_id and r.state == ReplicaState.PENDING and r.message})
    if waiting:
        text += "; " + "; ".join(waiting)
    return text


# --------------------------------------------------------------------------- helpers


def replica_config(goal: Goal) -> str:
    """The goal options a replica process needs, as the JSON its record carries."""
    keys = ("serializer", "max_concurrent_queries", "graceful_shutdown_timeout_s",
            "health_check_period_s", "health_check_timeout_s", "result_ttl_s", "job_ttl_s", "max_deliveries",
            "runtime_env")
    config = {key: goal.options.get(key) for key in keys}
    config["kind"] = goal.kind
    return json.dumps(config, sort_keys=True)


def _config_json(goal: Goal) -> str:
    """The goal's user_config as the JSON a replica record carries."""
    return json.dumps(goal.options.get("user_config"), sort_keys=True)


def _surge_blocked(current: list[Replica], goal: Goal, nodes: Sequence[NodeCapacity]) -> bool:
    """True when new replicas cannot be placed, so surge falls back to stop-first."""
    if any(not r.node_id for r in current):
        return True
    return not any(goal.resources.fits_in(node.free) for node in nodes)


def _ids(gpu_ids: Sequence[int]) -> str:
    return ",".join(str(gpu_id) for gpu_id in gpu_ids)


def _what_failed(error: str) -> str:
    """"reconfigure" when a replica's start failed in ``reconfigure(user_config)``, else
    "constructor" (the replica writes the marker first in its start error).

    >>> _what_failed("reconfigure(user_config) failed: ..."), _what_failed("Traceback ...")
    ('reconfigure', 'constructor')
    """
    return "reconfigure" if error.startswith(RECONFIGURE_FAILED_MARK) else "constructor"


def _last_line(error: str) -> str:
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


def node_capacities(nodes: Iterable, replicas: Iterable[Replica]) -> list[NodeCapacity]:
    """Free resources of each live node: its total less what its replicas reserve.

    ``nodes`` are :class:`taskserve.state.Node`; a replica holds its resources
    (and its GPUs, by id) until it has exited.
    """
    on_node: dict[str, list[Replica]] = {}
    for replica in replicas:
        if replica.node_id and not replica.is_gone:
            on_node.setdefault(replica.node_id, []).append(replica)
    capacities = []
    for node in nodes:
        if not node.alive:
            continue
        capacity = NodeCapacity(node.node_id, node.total)
        capacity = NodeCapacity(node.node_id, node.total, capacity.gpus())
        for replica in on_node.get(node.node_id, ()):
            capacity = capacity.take(replica.resources, replica.gpu_id_list)
        capacities.append(capacity)
    return capacities


def reserve(capacities: list[NodeCapacity], actions: Iterable[Action], need: Resources) -> list[NodeCapacity]:
    """Capacities after the starts and placements in ``actions`` took ``need`` each (a
    canary's, what its replicas need)."""
    by_node = {capacity.node_id: capacity for capacity in capacities}
    for action in actions:
        if isinstance(action, StartReplica):
            node_id, gpu_ids = action.replica.node_id, action.replica.gpu_id_list
            took = action.replica.resources if action.replica.canary else need
        elif isinstance(action, PlaceReplica):
            node_id, gpu_ids = action.node_id, [int(i) for i in action.gpu_ids.split(",") if i]
            took = action.resources or need
        else:
            continue
        if node_id in by_node:
            by_node[node_id] = by_node[node_id].take(took, gpu_ids)
    return [by_node[capacity.node_id] for capacity in capacities]
