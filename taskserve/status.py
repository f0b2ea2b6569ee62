"""A deployment's status as ``Deployment.status()``, ``taskserve status`` and the gateway's
``/-/api/status`` report it, assembled from what was read of it. Reads nothing itself.

The client (:func:`taskserve.api.deployment_status`) reads one deployment and the gateway
(:class:`taskserve.gateway.metrics.StatusReader`) every deployment in a few pipelines;
both build each status with :func:`status_of`.

Example::

    >>> from taskserve.state import DeploymentHealth, DeploymentState, Goal, Replica, ReplicaState
    >>> goal = Goal(name="echo", generation=2, version="v1", spec_hash="s", num_replicas=1, options={},
    ...             code_sha="c", init_sha="i")
    >>> health = DeploymentHealth(DeploymentState.HEALTHY, observed_generation=2)
    >>> replica = Replica("echo-1", "echo", "s", "v1", node_id="node-a", state=ReplicaState.RUNNING, pid=41)
    >>> status = status_of(goal, health, [replica], None, {})
    >>> status.status, [(r.replica_id, r.state, r.pid) for r in status.replicas]
    ('HEALTHY', [('echo-1', 'RUNNING', 41)])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .canary import VersionStats
from .spec import check_goal_options
from .state import DeploymentHealth, DeploymentState, Goal, Replica
from .store import AutoscaleState


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica as ``status()`` reports it."""

    replica_id: str
    version: str
    state: str
    node_id: str
    pid: Optional[int]
    message: str = ""
    config_hash: str = ""       # the user_config this replica runs ("" when there is none)
    canary: bool = False        # one of the canary's replicas


@dataclass(frozen=True)
class DeploymentStatus:
    """A consistent snapshot of a deployment: its state, why, and its replicas."""

    name: str
    status: str
    message: str
    version: str
    num_replicas: int
    generation: int
    replicas: list[ReplicaInfo] = field(default_factory=list)
    # For an autoscaled deployment: the controller's decision and the load behind it
    # (target, waiting, serving, load, reason, min_replicas, max_replicas); else None.
    autoscaling: Optional[dict[str, Any]] = None
    # While a canary runs (SPEC §9): its version, percent, replicas running, requests,
    # errors, error_rate and p95 (seconds), its thresholds, and the same counts of the
    # stable version since the canary started (under "stable"); else None.
    canary: Optional[dict[str, Any]] = None
    # Records of this deployment that cannot be read, left out of the rest: one line each,
    # naming the record and why ("replica echo-1: pid is not a number: 'abc'").
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "version": self.version,
            "num_replicas": self.num_replicas,
            "generation": self.generation,
            "replicas": [info.__dict__ for info in self.replicas],
            "autoscaling": self.autoscaling,
            "canary": self.canary,
            "skipped": list(self.skipped),
        }


def status_of(goal: Goal, health: DeploymentHealth, replicas: list[Replica], scale: Optional[AutoscaleState],
              stats: dict[str, int], unreadable: Iterable[tuple[str, str]] = ()) -> DeploymentStatus:
    """A deployment's status from what was read of it: its goal, health and replicas,
    its autoscaling state (used only with an ``autoscaling_config``), its stats (used
    only while a canary runs), and the ``(replica id, why)`` of each replica record that
    could not be read (named in ``skipped``). Reads nothing: the gateway's status page
    builds every deployment's status from one pipelined read this way.

    A goal whose options cannot be read as options (written by hand: an unknown option, a
    value of the wrong type) raises ``TypeError`` or ``ValueError`` naming it."""
    check_goal_options(goal.options, goal.num_replicas)
    name = goal.name
    current = health.observed_generation == goal.generation
    status = health.status.value if current else DeploymentState.UPDATING.value
    message = health.message if current else "waiting for the controller"
    num_replicas, autoscaling = goal.num_replicas, None
    config = goal.options.get("autoscaling_config")
    if config:
        num_replicas = scale.target if scale is not None else goal.num_replicas
        autoscaling = {
            "target": num_replicas,
            "waiting": scale.waiting if scale else 0,
            "serving": scale.serving if scale else 0,
            "load": scale.load if scale else 0,
            "reason": scale.reason if scale else "no load measured yet",
            "min_replicas": config.get("min_replicas"),
            "max_replicas": config.get("max_replicas"),
            "target_ongoing_requests": config.get("target_ongoing_requests"),
        }
    return DeploymentStatus(
        name=name,
        status=status,
        message=message,
        version=goal.version,
        num_replicas=num_replicas,
        generation=goal.generation,
        autoscaling=autoscaling,
        canary=canary_status(goal, replicas, stats),
        replicas=[
            ReplicaInfo(r.replica_id, r.version, r.state.value, r.node_id, r.pid, r.message, r.applied_config_hash,
                        r.canary)
            for r in sorted(replicas, key=lambda r: (r.created_at, r.replica_id))
        ],
        skipped=[f"replica {replica_id}: {why}" for replica_id, why in sorted(unreadable)],
    )


def canary_status(goal: Goal, replicas: list[Replica], stats: dict[str, int]) -> Optional[dict[str, Any]]:
    """``status().canary``: the canary and how it does against the stable version (None without one)."""
    canary = goal.canary
    if canary is None:
        return None
    mine = VersionStats.of(stats, canary.version)
    stable = VersionStats.of(stats, goal.version, canary.baseline)
    running = sum(1 for r in replicas if r.canary and r.spec_hash == canary.spec_hash and r.is_available)
    return {
        "version": canary.version,
        "percent": canary.traffic_percent,
        "replicas": running,
        "target_replicas": canary.replica_count(goal.num_replicas),
        "requests": mine.requests,
        "errors": mine.errors,
        "error_rate": mine.error_rate,
        "p95": finite(mine.p95),
        "min_requests": canary.min_requests,
        "max_error_rate_increase": canary.max_error_rate_increase,
        "max_p95_ratio": canary.max_p95_ratio,
        "stable": {"version": goal.version, "requests": stable.requests, "errors": stable.errors,
                   "error_rate": stable.error_rate, "p95": finite(stable.p95)},
    }


def finite(seconds: Optional[float]) -> Optional[float]:
    """A p95 for JSON: beyond the last latency bound (infinite) it is reported as None.

    >>> finite(0.25), finite(float("inf")), finite(None)
    (0.25, None, None)
    """
    return None if seconds is None or math.isinf(seconds) else seconds
