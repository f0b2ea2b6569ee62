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
from typing import Callable, Optional

import redis

from .history import previous_goal
from .planner import (
    ForgetDeployment,
    ForgetReplica,
    NodeCapacity,
    PlaceReplica,
    SetReplicaConfig,
    StartReplica,
    StopReplica,
    node_capacities,
    plan,
    reserve,
)
from .state import DEFAULT_HEARTBEAT_TTL_S, DeploymentHealth, DeploymentState, Goal, Node, Replica
from .store import LeaseLost, Store, wait_for_events

log = logging.getLogger("taskserve.controller")

REDIS_RETRY_S = 1.0


class Controller:
    """The reconcile loop around the planner and the store.

    While it leads, every write of a pass is fenced by its lease token (see
    :class:`taskserve.store.LeaseLost`): a controller paused past its lease writes
    nothing once it wakes up, and stands by.

    A node whose heartbeat stopped keeps its replicas for one more of its heartbeat
    timeouts (``dead_since``), and while every node looks dead at once (Redis
    restarted and lost the heartbeats, or this controller was cut off) no node
    counts as dead: replicas that kept running are never replaced because of
    an outage of Redis.
    """

    def __init__(self, store: Store, resync_s: float = 1.0, lease_ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.resync_s = resync_s
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self.controller_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stopping = threading.Event()
        self.lease: Optional[str] = None          # the lease token while leading
        self.dead_since: dict[str, float] = {}    # node id -> when it was first seen dead (clock)
        self.errors: dict[str, str] = {}          # deployment -> the error last logged for it

    @property
    def leading(self) -> bool:
        return self.lease is not None

    def run(self) -> None:
        """Lead (or stand by) until :meth:`stop`."""
        pubsub = self.store.subscribe()
        try:
            while not self.stopping.is_set():
                try:
                    self._lead(self.store.acquire_lease(self.controller_id, self.lease_ttl_s))
                    if self.leading:
                        self.reconcile_once()
                    wait_for_events(pubsub, self.resync_s if self.leading else self.lease_ttl_s / 3)
                except LeaseLost:
                    log.warning("controller %s lost its lease during a pass; it wrote nothing more", self.controller_id)
                    self._lead(None)
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

    def _lead(self, token: Optional[str]) -> None:
        """Take note of the lease token (None: another controller leads)."""
        if token == self.lease:
            return
        if token is None:
            log.info("controller %s stands by", self.controller_id)
        else:
            log.info("controller %s leads (lease %s)", self.controller_id, token.partition(":")[0])
        # What an earlier leadership saw may be stale: dead nodes get their grace anew.
        self.dead_since.clear()
        self.errors.clear()
        self.lease = token

    def _check_lease(self) -> None:
        """Before writing a deployment's actions: still leading? (It also renews the
        lease, so a long pass does not lose it.)"""
        if self.lease is not None and not self.store.renew_lease(self.lease, self.lease_ttl_s):
            raise LeaseLost(f"the lease {self.lease} moved on")

    def reconcile_once(self, now: float | None = None) -> None:
        """One pass over every deployment.

        A deployment that cannot be reconciled (its goal or a replica record cannot
        be read, or planning it raises) gets the error in its health message (logged
        once per change); the others go on. Redis errors and a lost lease end the pass.
        """
        now = time.time() if now is None else now
        goals, unreadable_goals = self.store.read_goals()
        unreadable_replicas: dict[str, str] = {}
        all_replicas = self.store.all_replicas(unreadable_replicas)
        nodes = self.store.list_nodes()
        dead_nodes = self.nodes_considered_dead(nodes, all_replicas)
        capacities = node_capacities(nodes, all_replicas)
        by_deployment: dict[str, list[Replica]] = {}
        for replica in all_replicas:
            by_deployment.setdefault(replica.deployment, []).append(replica)
        for name, error in unreadable_goals.items():
            self._failed(name, f"its goal cannot be read: {error}")
        for goal in goals:
            if goal.name in unreadable_replicas:
                # Planned without that record, the deployment could get one replica too many.
                self._failed(goal.name, unreadable_replicas[goal.name])
                continue
            try:
                capacities = self._reconcile(goal, by_deployment.get(goal.name, []), capacities, dead_nodes, now)
            except (redis.RedisError, LeaseLost):
                raise
            except Exception as error:
                self._failed(goal.name, _one_line(error), error)
            else:
                if self.errors.pop(goal.name, None) is not None:
                    log.info("%s: reconciled again", goal.name)
        for name in set(self.errors) - {g.name for g in goals} - set(unreadable_goals):
            del self.errors[name]     # deleted meanwhile

    def nodes_considered_dead(self, nodes: list[Node], replicas: list[Replica]) -> frozenset[str]:
        """The nodes whose replicas may be forgotten and replaced.

        A node that stopped heartbeating counts as dead one more heartbeat timeout
        after this controller first saw it so. While every node looks dead at once,
        none does (and the waits start over): the heartbeats were lost, not the nodes.
        """
        clock = self.clock()
        ttls = {node.node_id: node.heartbeat_ttl_s for node in nodes}
        alive = {node.node_id for node in nodes if node.alive}
        looking_dead = (set(ttls) | {r.node_id for r in replicas if r.node_id and not r.is_gone}) - alive
        for node_id in set(self.dead_since) - looking_dead:
            del self.dead_since[node_id]
        if not alive:
            if looking_dead and not all(node_id in self.dead_since for node_id in looking_dead):
                log.warning("every node looks dead (%s): Redis lost their heartbeats or this controller "
                            "was cut off; no replica is replaced until the agents heartbeat again",
                            ", ".join(sorted(looking_dead)))
            self.dead_since = {node_id: clock for node_id in looking_dead}
            return frozenset()
        for node_id in looking_dead:
            self.dead_since.setdefault(node_id, clock)
        return frozenset(node_id for node_id in looking_dead
                         if clock - self.dead_since[node_id] >= ttls.get(node_id, DEFAULT_HEARTBEAT_TTL_S))

    def _reconcile(self, goal: Goal, replicas: list[Replica], capacities: list[NodeCapacity],
                   dead_nodes: frozenset[str], now: float) -> list[NodeCapacity]:
        """Plan one deployment and write what it decided; the capacities left after it."""
        health = self.store.get_health(goal.name)
        if health.observed_generation != goal.generation:
            health = DeploymentHealth(observed_generation=goal.generation)
        result = plan(goal, replicas, capacities, health, now, new_id=partial(_new_replica_id, goal.name),
                      dead_nodes=dead_nodes)
        if result.actions:
            self._check_lease()
        self._apply(goal, replicas, result.actions)
        outcome = health.outcome
        if result.status == DeploymentState.HEALTHY:
            outcome = "done"
        elif result.failed:
            outcome = "failed"
        if outcome != health.outcome:
            self.store.record_outcome(goal.name, goal.generation, outcome, result.message, fence=self.lease)
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
            fence=self.lease,
        )
        return reserve(capacities, result.actions, goal.resources)

    def _failed(self, name: str, error: str, exc: Optional[BaseException] = None) -> None:
        """A deployment could not be reconciled: log it once per change, and say it in
        its health message."""
        if self.errors.get(name) != error:
            self.errors[name] = error
            log.error("%s: cannot reconcile it (%s); the other deployments go on", name, error,
                      exc_info=exc)
        message = f"the controller cannot reconcile this deployment: {error}"
        try:
            health = self.store.get_health(name)
        except (redis.RedisError, LeaseLost):
            raise
        except Exception:
            health = DeploymentHealth()
        self.store.set_health(name, replace(health, message=message), fence=self.lease)

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
            fence=self.lease,
        )
        if restored is not None:
            log.warning("%s: version %s failed (%s); rolled back to version %s",
                        failed.name, failed.version, message, restored.version)

    def _apply(self, goal: Goal, replicas: list[Replica], actions: list) -> None:
        """Write the actions, each fenced by the lease (a lost lease raises LeaseLost)."""
        records = {r.replica_id: r for r in replicas}
        fence = self.lease
        notify = False
        for action in actions:
            if isinstance(action, StartReplica):
                self.store.create_replica(action.replica, fence=fence)
                notify = True
            elif isinstance(action, PlaceReplica):
                self.store.place_replica(action.replica_id, action.node_id, action.gpu_ids, fence=fence)
                notify = True
            elif isinstance(action, StopReplica):
                self.store.update_replica(action.replica_id, fence=fence, desired="stop")
                notify = True
            elif isinstance(action, SetReplicaConfig):
                self.store.set_replica_config(action.replica_id, action.user_config, action.config_hash, fence=fence)
            elif isinstance(action, ForgetReplica):
                record = records.get(action.replica_id)
                if record is not None:
                    self.store.forget_replica(record, fence=fence)
                    if action.crashed:
                        log.warning("replica %s of %s died; replacing it", record.replica_id, goal.name)
                    elif record.node_id and not record.is_gone:
                        log.warning("replica %s of %s was on node %s, which is dead; replacing it",
                                    record.replica_id, goal.name, record.node_id)
            elif isinstance(action, ForgetDeployment):
                if self.store.forget_deployment(goal.name, goal.generation, fence=fence):
                    log.info("deployment %s deleted", goal.name)
        if notify:
            self.store.notify(f"replicas:{goal.name}")


def _new_replica_id(deployment: str) -> str:
    return f"{deployment}-{secrets.token_hex(4)}"


def _one_line(error: BaseException) -> str:
    """An error as one line, for a health message.

    >>> _one_line(KeyError("num_replicas"))
    "KeyError: 'num_replicas'"
    """
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
