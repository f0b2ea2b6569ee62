"""The controller: converges every deployment to its goal, level-triggered.

Each pass reads all goals, replicas and nodes from Redis, asks the pure
:func:`taskserve.planner.plan` what to do for each deployment, and writes the
actions back. It wakes on change notifications and resyncs on a timer, so a missed
notification costs latency, never correctness; after a crash a new controller
resumes from Redis alone. One controller leads at a time (a lease key with a TTL);
others stand by.

Example::

    taskserve controller --address redis://10.0.0.5:6379/0
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import replace
from functools import partial

import redis

from .history import previous_goal
from .planner import (
    ForgetDeployment,
    ForgetReplica,
    PlaceReplica,
    SetReplicaConfig,
    StartReplica,
    StopReplica,
    node_capacities,
    plan,
    reserve,
)
from .state import DeploymentHealth, DeploymentState, Goal, Replica
from .store import Store, wait_for_events

log = logging.getLogger("taskserve.controller")

REDIS_RETRY_S = 1.0


class Controller:
    """The reconcile loop around the planner and the store."""

    def __init__(self, store: Store, resync_s: float = 1.0, lease_ttl_s: float = 5.0) -> None:
        self.store = store
        self.resync_s = resync_s
        self.lease_ttl_s = lease_ttl_s
        self.controller_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stopping = threading.Event()
        self.leading = False

    def run(self) -> None:
        """Lead (or stand by) until :meth:`stop`."""
        pubsub = self.store.subscribe()
        try:
            while not self.stopping.is_set():
                try:
                    leading = self.store.acquire_lease(self.controller_id, self.lease_ttl_s)
                    if leading != self.leading:
                        log.info("controller %s %s", self.controller_id, "leads" if leading else "stands by")
                        self.leading = leading
                    if leading:
                        self.reconcile_once()
                    wait_for_events(pubsub, self.resync_s if leading else self.lease_ttl_s / 3)
                except redis.RedisError as error:
                    log.warning("Redis is unreachable (%s); retrying in %.0fs", error, REDIS_RETRY_S)
                    self.stopping.wait(REDIS_RETRY_S)
                except Exception:
                    log.exception("reconcile pass failed; retrying")
                    self.stopping.wait(self.resync_s)
        finally:
            try:
                pubsub.close()
                self.store.release_lease(self.controller_id)
            except redis.RedisError:
                pass  # the lease expires on its own

    def stop(self) -> None:
        self.stopping.set()

    def reconcile_once(self, now: float | None = None) -> None:
        """One pass over every deployment."""
        now = time.time() if now is None else now
        goals = self.store.list_goals()
        all_replicas = self.store.all_replicas()
        capacities = node_capacities(self.store.list_nodes(), all_replicas)
        by_deployment: dict[str, list[Replica]] = {}
        for replica in all_replicas:
            by_deployment.setdefault(replica.deployment, []).append(replica)
        for goal in goals:
            replicas = by_deployment.get(goal.name, [])
            health = self.store.get_health(goal.name)
            if health.observed_generation != goal.generation:
                health = DeploymentHealth(observed_generation=goal.generation)
            result = plan(goal, replicas, capacities, health, now, new_id=partial(_new_replica_id, goal.name))
            self._apply(goal, replicas, result.actions)
            capacities = reserve(capacities, result.actions, goal.resources)
            outcome = health.outcome
            if result.status == DeploymentState.HEALTHY:
                outcome = "done"
            elif result.failed:
                outcome = "failed"
            if outcome != health.outcome:
                self.store.record_outcome(goal.name, goal.generation, outcome, result.message)
                if outcome == "failed":
                    self._roll_back(goal, result.message, result.last_error)
            self.store.set_health(
                goal.name,
                replace(
                    health,
                    status=result.status,
                    message=result.message,
                    observed_generation=goal.generation,
                    failed_starts=result.failed_starts,
                    last_error=result.last_error,
                    last_failure_at=result.last_failure_at,
                    outcome=outcome,
                    outcome_generation=goal.generation,
                ),
            )

    def _roll_back(self, failed: Goal, message: str, error: str) -> None:
        """Restore the goal before a failed rollout, so the previous version serves on.

        A first deploy has nothing to go back to and stays UNHEALTHY; neither does
        an automatic rollback that failed itself (no rollback loops).
        """
        history = self.store.history(failed.name)
        if any(e.get("generation") == failed.generation and e.get("action") == "auto-rollback" for e in history):
            return
        previous = previous_goal(history, failed)
        if previous is None:
            return

        def restore(current: Goal | None) -> Goal | None:
            if current is None or current.generation != failed.generation:
                return None  # deleted or deployed meanwhile; that goal wins
            return replace(previous, num_replicas=current.num_replicas,
                           options={**previous.options, "num_replicas": current.num_replicas}, deleting=False)

        restored = self.store.update_goal(
            failed.name, restore, "auto-rollback", by=self.controller_id, missing_ok=True,
            event_extra={"rollback_of": failed.generation, "reason": message, "error": error},
        )
        if restored is not None:
            log.warning("%s: version %s failed (%s); rolled back to version %s",
                        failed.name, failed.version, message, restored.version)

    def _apply(self, goal: Goal, replicas: list[Replica], actions: list) -> None:
        records = {r.replica_id: r for r in replicas}
        notify = False
        for action in actions:
            if isinstance(action, StartReplica):
                self.store.create_replica(action.replica)
                notify = True
            elif isinstance(action, PlaceReplica):
                self.store.place_replica(action.replica_id, action.node_id, action.gpu_ids)
                notify = True
            elif isinstance(action, StopReplica):
                self.store.update_replica(action.replica_id, desired="stop")
                notify = True
            elif isinstance(action, SetReplicaConfig):
                self.store.set_replica_config(action.replica_id, action.user_config, action.config_hash)
            elif isinstance(action, ForgetReplica):
                record = records.get(action.replica_id)
                if record is not None:
                    self.store.forget_replica(record)
                    if action.crashed:
                        log.warning("replica %s of %s died; replacing it", record.replica_id, goal.name)
            elif isinstance(action, ForgetDeployment):
                if self.store.forget_deployment(goal.name, goal.generation):
                    log.info("deployment %s deleted", goal.name)
        if notify:
            self.store.notify(f"replicas:{goal.name}")


def _new_replica_id(deployment: str) -> str:
    return f"{deployment}-{secrets.token_hex(4)}"
