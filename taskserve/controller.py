"""The controller: converges every deployment to its goal, level-triggered.

Each pass reads all goals, replicas and nodes from Redis, asks the pure
:func:`taskserve.planner.plan` what to do for each deployment, and writes the
actions back. It wakes on change notifications and resyncs on a timer, so a missed
notification costs latency, never correctness; after a crash a new controller
resumes from Redis alone. One controller leads at a time (a lease key with a TTL);
others stand by.

An autoscaled deployment (its goal has an ``autoscaling_config``) is planned for the
count the pure :func:`taskserve.autoscaler.decide` wants for its recent load, which
each pass samples (requests waiting in its queue, and those its replicas took and have
not acknowledged). The decision lives in its own key (:class:`taskserve.store.AutoscaleState`),
not in the goal: an autoscaling change writes no generation, so it neither disturbs a
``deploy()`` waiting for its rollout nor is undone by one, and a new controller goes
on from the count stored. Each change of the count is one history line by "autoscaler".
Between passes, the controller looks at the queues of autoscaled deployments (one Redis
command for all): every ``WAKE_POLL_S`` for those with no replica, so the first request
starts one at once, and, while they have load, every
:func:`~taskserve.autoscaler.sample_interval` (a quarter of the upscale delay) for those
whose delay is shorter than four resyncs. A queue that pulls the pool another way than the
last sample did starts a pass at once. An idle deployment with replicas costs no look: the
replica that takes its first request notifies the controller at once. So a backlog is
sampled within that interval of its arrival, not up to a resync later.

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
from pathlib import Path
from typing import AbstractSet, Callable, Optional

import redis

from .autoscaler_tracker import AutoscaleTracker, autoscaling_config
from .canary import VersionStats, abort_reason
from .controller_health import HealthReport, remove_report, write_report
from .errors import SignatureError
from .goals import next_goal, rolled_back, without_canary
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
from .signing import GOAL_NOT_SIGNED, ClusterSecret, check_goal, secret_from_environment, sign_goal
from .spec import check_canary_config, check_goal_options
from .state import DEFAULT_HEARTBEAT_TTL_S, DeploymentHealth, DeploymentState, Goal, Node, Replica
from .store import ClusterReader, LeaseLost, Store, wait_for_events
from .wire import interrupted_stream_end, is_streaming_message

# How often the controller drops the set entries of jobs whose records expired.
JOB_TRIM_S = 60.0
DEFAULT_JOB_TTL_S = 86_400

log = logging.getLogger("taskserve.controller")

REDIS_RETRY_S = 1.0

def may_skip_this_pass(name: str, has_canary: bool, nodes: AbstractSet[str], *, settled: AbstractSet[str],
                       changed: AbstractSet[str], autoscaled: AbstractSet[str],
                       dead_nodes: AbstractSet[str]) -> bool:
    """Whether a pass may leave the deployment ``name`` alone: planning it again would
    give what the last plan gave, because all five hold:

    - the last pass planned it HEALTHY with nothing to do and nothing to write (``settled``);
    - its goal, health and replica records did not move since (not in ``changed``, the
      deployments the reader read again);
    - it does not autoscale (its load, read every pass, may change its count);
    - it runs no canary (its stats, read every pass, may abort it: ``has_canary``);
    - none of the ``nodes`` its replicas are on counts as dead now.

    >>> may_skip_this_pass("m", False, frozenset({"node-a"}), settled={"m"}, changed=set(), autoscaled=set(),
    ...                    dead_nodes=set())
    True
    >>> may_skip_this_pass("m", False, frozenset({"node-a"}), settled={"m"}, changed=set(), autoscaled=set(),
    ...                    dead_nodes={"node-a"})
    False
    """
    return (name in settled and name not in changed and name not in autoscaled
            and not has_canary and nodes.isdisjoint(dead_nodes))


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

    Autoscaling keeps the last load samples of each autoscaled deployment in memory
    (``autoscaling``, an :class:`~taskserve.autoscaler_tracker.AutoscaleTracker`); a new
    leadership starts them over from the stored counts.

    Only a goal signed with the cluster secret (``secret``, by default
    ``$TASKSERVE_SECRET`` or ``$TASKSERVE_SECRET_FILE``) is planned: one that is not (a
    writer to Redis without the secret changed it) is ``UNHEALTHY`` with
    :data:`~taskserve.signing.GOAL_NOT_SIGNED`, its replicas left as they are. The
    goals the controller writes itself (an automatic rollback, a canary's abort) it
    signs with the same secret, having checked the goals they come from.
    """

    def __init__(self, store: Store, resync_s: float = 1.0, lease_ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, health_file: Optional[Path] = None,
                 secret: Optional[ClusterSecret] = None) -> None:
        self.store = store
        self.health_file = health_file            # where each turn of the loop says whether it leads
        self.secret = secret or secret_from_environment()
        self.resync_s = resync_s
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self.controller_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stopping = threading.Event()
        self.lease: Optional[str] = None          # the lease token while leading
        self.dead_since: dict[str, float] = {}    # node id -> when it was first seen dead (clock)
        self.errors: dict[str, str] = {}          # deployment -> the error last logged for it
        self.autoscaling = AutoscaleTracker(resync_s)   # load samples and targets; what to watch between passes
        self.reader = ClusterReader(store, clock=clock)   # goals, healths, replicas: re-read as they change
        self.settled: set[str] = set()            # deployments planned HEALTHY with nothing to do, unchanged since
        self.next_job_due: Optional[float] = None   # when the next delayed job is due (time.time())
        self.jobs_trimmed_at = float("-inf")      # when finished jobs' set entries were last trimmed (clock)
        self.accepted: dict[str, Goal] = {}       # deployment -> the goal last found signed and in bounds (that object)

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
                    self._report_health()
                    if self.leading:
                        self.reconcile_once()
                        self._wait(pubsub)
                    else:
                        wait_for_events(pubsub, self.lease_ttl_s / 3)
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
            if self.health_file is not None:
                remove_report(self.health_file, self.controller_id)
            try:
                pubsub.close()
                self.store.release_lease(self.controller_id)
            except redis.RedisError:
                pass  # the lease expires on its own

    def stop(self) -> None:
        self.stopping.set()

    def _report_health(self) -> None:
        """Write whether this controller leads to its health file (``taskserve controller --check``)."""
        if self.health_file is None:
            return
        try:
            write_report(self.health_file, HealthReport(self.controller_id, os.getpid(), self.leading, time.time()))
        except OSError as error:
            log.warning("cannot write the health file %s (%s)", self.health_file, error)

    def _wait(self, pubsub: redis.client.PubSub) -> None:
        """Until the next pass: a notification, ``resync_s``, the end of an autoscaling
        delay, or a request in the queue of an autoscaled deployment that has no replica.

        Blocking on the notifications costs nothing; looking at the queues of the
        ``watched`` deployments costs one Redis command per ``watch_s``, and only while
        there are some.
        """
        autoscaling = self.autoscaling
        start = self.clock()
        deadline = start + self.resync_s
        if autoscaling.due is not None and autoscaling.due > start:
            deadline = min(deadline, autoscaling.due)
        if self.next_job_due is not None:
            deadline = min(deadline, start + max(0.0, self.next_job_due - time.time()))
        while not self.stopping.is_set():
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            if not autoscaling.watched or autoscaling.watch_s is None:
                wait_for_events(pubsub, remaining)
                return
            if wait_for_events(pubsub, min(autoscaling.watch_s, remaining)):
                return
            if autoscaling.load_turned(self.store.waiting_requests(autoscaling.watched)):
                return

    def _lead(self, token: Optional[str]) -> None:
        """Take note of the lease token (None: another controller leads)."""
        if token == self.lease:
            return
        if token is None:
            log.info("controller %s stands by", self.controller_id)
        else:
            log.info("controller %s leads (lease %s)", self.controller_id, token.partition(":")[0])
        # What an earlier leadership saw may be stale: dead nodes get their grace anew,
        # and autoscaling goes on from the counts stored (another leader may have moved them).
        self.dead_since.clear()
        self.errors.clear()
        self.autoscaling.forget()
        self.reader.forget()
        self.settled.clear()
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
        records, changed = self.reader.read()
        read = [r.goal for r in records.values() if r.goal is not None]
        refused = {goal.name: (goal, why) for goal in read if (why := self._why_refused(goal))}
        goals = [goal for goal in read if goal.name not in refused]
        unreadable_goals = {name: r.error for name, r in records.items() if r.goal is None and r.error}
        nodes = self.store.list_nodes()
        autoscaled = [g.name for g in goals if not g.deleting and g.options.get("autoscaling_config") is not None]
        loads = self.store.deployment_loads(autoscaled)     # nothing is read when none autoscales
        clock = self.clock()
        dead_nodes = self.nodes_considered_dead(nodes, [], set().union(*(r.nodes for r in records.values())))
        capacities: Optional[list[NodeCapacity]] = None     # computed once a deployment is planned
        for name, error in unreadable_goals.items():
            self._failed(name, error)
        for goal, why in refused.values():
            self._refuse(goal, records[goal.name].health, why)
        for goal in goals:
            record = records[goal.name]
            if may_skip_this_pass(goal.name, goal.canary is not None, record.nodes, settled=self.settled,
                                  changed=changed, autoscaled=loads.keys(), dead_nodes=dead_nodes):
                continue
            self.settled.discard(goal.name)
            if record.error:
                # Planned without that record, the deployment could get one replica too many.
                self._failed(goal.name, record.error)
                continue
            try:
                if goal.canary is not None and not goal.deleting:
                    goal = self._watch_canary(goal)
                if goal.name in loads:
                    goal = self._autoscale(goal, loads[goal.name], now, clock)
                if capacities is None:
                    capacities = node_capacities(nodes, (r for d in records.values() for r in d.replicas))
                capacities, settled = self._reconcile(goal, list(record.replicas), record.health, capacities,
                                                      dead_nodes, now)
            except (redis.RedisError, LeaseLost):
                raise
            except Exception as error:
                self._failed(goal.name, _one_line(error), error)
            else:
                if settled:
                    self.settled.add(goal.name)
                if self.errors.pop(goal.name, None) is not None:
                    log.info("%s: reconciled again", goal.name)
        self.settled &= set(records)
        self.accepted = {name: goal for name, goal in self.accepted.items() if name in records}
        for name in set(self.errors) - {g.name for g in read} - set(unreadable_goals):
            del self.errors[name]     # deleted meanwhile
        self._empty_canary_queues(goals)
        self._end_autoscaling_pass(goals, set(autoscaled), set(unreadable_goals) | set(refused))
        self._move_due_jobs(goals, clock)

    # ------------------------------------------------------------------ goals it refuses

    def _why_refused(self, goal: Goal) -> str:
        """Why ``goal`` is not planned ("" when it is): not signed with the cluster secret,
        or an option or count out of its bounds (however it got into Redis, a goal of
        10**9 replicas costs only its own deployment). Checked once per goal read."""
        if self.accepted.get(goal.name) is goal:
            return ""
        if not self._checks(goal):
            return GOAL_NOT_SIGNED if self.secret is not None else (
                "the controller has no cluster secret, so it checks no goal and plans nothing; "
                "give it TASKSERVE_SECRET (or TASKSERVE_SECRET_FILE)")
        if goal.deleting:
            self.accepted[goal.name] = goal       # draining it needs no option to be right
            return ""
        try:
            check_goal_options(goal.options, goal.num_replicas)
            canary = goal.canary
            if canary is not None:
                check_goal_options(canary.options, canary.replica_count(goal.num_replicas))
                check_canary_config({"traffic_percent": canary.traffic_percent, "min_requests": canary.min_requests,
                                     "max_error_rate_increase": canary.max_error_rate_increase,
                                     "max_p95_ratio": canary.max_p95_ratio})
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else _one_line(error)
            return f"goal refused, nothing planned: {reason}"
        self.accepted[goal.name] = goal
        return ""

    def _checks(self, goal: Goal) -> bool:
        """Whether ``goal`` (one read now, or of the history) is signed with the secret."""
        if self.secret is None:
            return False
        try:
            check_goal(goal, self.secret)
        except SignatureError:
            return False
        return True

    def _refuse(self, goal: Goal, stored: DeploymentHealth, message: str) -> None:
        """Plan nothing for a refused goal: its deployment is UNHEALTHY with ``message``
        (logged once per change), that goal's outcome is "failed", and its replicas stay
        as they are until a goal the controller accepts is written."""
        if self.errors.get(goal.name) != message:
            self.errors[goal.name] = message
            log.error("%s: %s; it is not planned, the other deployments go on", goal.name, message)
        self.settled.discard(goal.name)
        concluded = replace(stored, status=DeploymentState.UNHEALTHY, message=message,
                            observed_generation=goal.generation, outcome="failed",
                            outcome_generation=goal.generation)
        if concluded != stored:
            self.store.set_health(goal.name, concluded, fence=self.lease)

    # ------------------------------------------------------------------ jobs

    def _move_due_jobs(self, goals: list[Goal], clock: float) -> None:
        """Put the delayed jobs that are due (retries after their backoff, ETAs) back on
        their queues, and note when the next one is due (the pass comes then). Every
        ``JOB_TRIM_S``, drop the set entries of jobs whose records expired."""
        moved, self.next_job_due = self.store.move_due_jobs()      # atomic: any controller may run it
        if moved:
            log.info("%d delayed job(s) due: queued again", moved)
        if clock - self.jobs_trimmed_at >= JOB_TRIM_S:
            self.jobs_trimmed_at = clock
            now = time.time()
            for goal in goals:
                ttl = float(goal.options.get("job_ttl_s") or DEFAULT_JOB_TTL_S)
                self.store.trim_finished_jobs(goal.name, now - ttl)

    # ------------------------------------------------------------------ canary releases

    def _watch_canary(self, goal: Goal) -> Goal:
        """Abort the goal's canary if :func:`taskserve.canary.abort_reason` says so, and
        return the goal to plan (the one without the canary, then)."""
        canary = goal.canary
        assert canary is not None
        stats = self.store.stats(goal.name)
        reason = abort_reason(canary, VersionStats.of(stats, canary.version),
                              VersionStats.of(stats, goal.version, canary.baseline))
        if reason is None:
            return goal
        return self._abort_canary(goal, f"canary {canary.version} aborted: {reason}") or goal

    def _abort_canary(self, goal: Goal, reason: str, error: str = "") -> Optional[Goal]:
        """Write ``goal`` without its canary (unless it changed meanwhile), recorded as
        "canary-abort" by "controller" with the reason; the goal written, or None."""
        canary = goal.canary
        assert canary is not None

        def abort(current: Optional[Goal]) -> Optional[Goal]:
            if current is None or current.deleting or current.canary is None \
                    or current.canary.version != canary.version or not self._checks(current):
                return None   # aborted, promoted or changed meanwhile: that goal wins
            aborted = without_canary(current).goal
            assert aborted is not None and self.secret is not None
            return sign_goal(replace(aborted, user_config_signature=current.user_config_signature), self.secret)

        aborted = self.store.update_goal(
            goal.name, abort, "canary-abort", by="controller", missing_ok=True,
            event_extra={"reason": reason, "canary_version": canary.version, "error": error,
                         "rollback_of": goal.generation},
            fence=self.lease)
        if aborted is not None:
            log.warning("%s: %s; version %s takes all the requests", goal.name, reason, aborted.version)
        return aborted

    def _empty_canary_queues(self, goals: list[Goal]) -> None:
        """Requests left in the canary queue of a deployment that has no canary now (sent
        before its callers saw the abort or promotion, or given back by a draining canary
        replica) go to its own queue: one round trip for every deployment."""
        moved = self.store.move_canary_queues(g.name for g in goals if g.canary is None)
        for name, count in moved.items():
            if count:
                log.info("%s: moved %d request(s) of its former canary to its queue", name, count)

    # ------------------------------------------------------------------ autoscaling

    def _autoscale(self, goal: Goal, load: tuple[int, int], now: float, clock: float) -> Goal:
        """Sample the deployment's load, ask the autoscaler for its target, record the
        decision (fenced), and return the goal to plan: ``goal`` with that target."""
        config = autoscaling_config(goal)
        if config is None:
            return goal
        # A new leadership goes on from the stored count; a new deployment starts from
        # the goal's (min_replicas).
        stored = None if self.autoscaling.tracks(goal.name) else self.store.autoscale_state(goal.name)
        step = self.autoscaling.step(goal, config, load, now, clock, stored)
        if step.write is not None:
            if step.change is not None:
                log.info("%s: autoscaling from %d to %d replicas (%s)", goal.name, step.previous,
                         step.target, step.write.reason)
            self.store.set_autoscale_state(goal.name, step.write, step.change, fence=self.lease)
        self.autoscaling.keep(step)
        return replace(goal, num_replicas=step.target)

    def _end_autoscaling_pass(self, goals: list[Goal], autoscaled: set[str], unreadable: set[str]) -> None:
        """After a pass: delete the stored states of deployments that no longer autoscale,
        then let the tracker drop what it kept of them and plan the looks between passes."""
        stopped = self.autoscaling.states_to_delete(goals, autoscaled)
        if stopped:
            self.store.delete_autoscale_states(stopped, fence=self.lease)
        self.autoscaling.end_pass(autoscaled, unreadable)

    def nodes_considered_dead(self, nodes: list[Node], replicas: list[Replica],
                              replica_nodes: AbstractSet[str] = frozenset()) -> frozenset[str]:
        """The nodes whose replicas may be forgotten and replaced (``replicas``: those
        whose nodes count, or their nodes as ``replica_nodes``).

        A node that stopped heartbeating counts as dead one more heartbeat timeout
        after this controller first saw it so. While every node looks dead at once,
        none does (and the waits start over): the heartbeats were lost, not the nodes.
        """
        clock = self.clock()
        ttls = {node.node_id: node.heartbeat_ttl_s for node in nodes}
        alive = {node.node_id for node in nodes if node.alive}
        looking_dead = (set(ttls) | set(replica_nodes)
                        | {r.node_id for r in replicas if r.node_id and not r.is_gone}) - alive
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

    def _reconcile(self, goal: Goal, replicas: list[Replica], health: DeploymentHealth,
                   capacities: list[NodeCapacity], dead_nodes: frozenset[str],
                   now: float) -> tuple[list[NodeCapacity], bool]:
        """Plan one deployment (``health``: what was concluded before) and write what it
        decided; the capacities left after it, and whether it is settled: HEALTHY with
        nothing to do and nothing to write, so planning it again gives the same until its
        records, or the nodes it runs on, change."""
        stored = health
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
        concluded = replace(
                health,
                status=result.status,
                message=result.message,
                observed_generation=goal.generation,
                failed_starts=result.failed_starts,
                last_error=result.last_error,
                last_failure_at=result.last_failure_at,
                outcome=outcome,
                outcome_generation=goal.generation,
        )
        if concluded != stored:
            self.store.set_health(goal.name, concluded, fence=self.lease)
        settled = result.status == DeploymentState.HEALTHY and not result.actions and concluded == stored
        return reserve(capacities, result.actions, goal.resources), settled

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
        if failed.canary is not None:
            # The canary failed (or the stable version while it ran): abort it; the stable
            # version serves on.
            self._abort_canary(failed, f"canary {failed.canary.version} aborted: {message}", error)
            return
        history = self.store.history(failed.name)
        if any(e.get("generation") == failed.generation and e.get("action") == "auto-rollback" for e in history):
            return
        previous = previous_goal(history, failed)
        if previous is None:
            return
        if not self._checks(previous):
            log.warning("%s: version %s failed (%s); the goal before it (version %s) is not signed with the "
                        "cluster secret, so it is not restored", failed.name, failed.version, message,
                        previous.version)
            return

        def restore(current: Goal | None) -> Goal | None:
            if current is None or current.generation != failed.generation or not self._checks(current):
                return None  # deleted or deployed meanwhile; that goal wins
            # The previous goal's own code (trusted=False: not the failed one's), with the
            # current count and autoscaling (the scale is not part of a version).
            goal = next_goal(current, rolled_back(current, previous), trusted=False).goal
            if goal is None:
                return None
            assert self.secret is not None
            return sign_goal(replace(goal, user_config_signature=previous.user_config_signature), self.secret)

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
                self.store.set_replica_config(action.replica_id, action.user_config, action.config_hash,
                                              action.user_config_signature, fence=fence)
            elif isinstance(action, ForgetReplica):
                record = records.get(action.replica_id)
                if record is not None:
                    # What it held and nobody put back (its node died with it): served next; a
                    # stream is not run again, its caller reads that it was interrupted.
                    restored, interrupted = self.store.restore_held(record.replica_id, drop=is_streaming_message)
                    if restored:
                        log.warning("put back %d request(s) replica %s held", len(restored), record.replica_id)
                    for task_id in interrupted:
                        self.store.end_stream(task_id, interrupted_stream_end())
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
