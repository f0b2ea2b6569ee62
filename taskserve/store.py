"""Every Redis key taskserve uses, and every atomic change to them.

No other module knows a key name. The layout (``{p}`` is the prefix, ``taskserve``):

=====================================  ========  ==========================================
key                                    type      what
=====================================  ========  ==========================================
``{p}:deployments``                    set       names of all deployments
``{p}:goal:{name}``                    string    the deployment's goal (JSON, see Goal)
``{p}:health:{name}``                  string    the controller's conclusion (JSON)
``{p}:history:{name}``                 list      every goal change, newest last (JSON)
``{p}:code:{sha256}``                  string    pickled class/function and init args, or a
                                                 zipped working_dir
``{p}:codes:{name}``                   set       code shas a deployment refers to
``{p}:replicas:{name}``                set       replica ids of a deployment
``{p}:replica:{replica_id}``           hash      one replica (see Replica)
``{p}:control:{replica_id}``           list      wake-ups for a replica to re-read its record
``{p}:node-replicas:{node_id}``        set       replica ids assigned to a node
``{p}:nodes``                          hash      node id -> node record (JSON)
``{p}:node-alive:{node_id}``           string    exists while the node agent heartbeats
``{p}:controller-lease``               string    the leading controller's id, with a TTL
``{p}:events``                         channel   change notifications (wake-ups only)
``{p}:deliveries:{task_id}``           string    times a request was put back after its replica
                                                 died (expires after a day)
``taskserve.{name}``                   list      Celery's queue of a deployment (kombu's)
``celery-task-meta-{task_id}``         string    Celery's result of a request, also published
                                                 on the channel of the same name
=====================================  ========  ==========================================

Example::

    >>> import fakeredis
    >>> store = Store(fakeredis.FakeRedis())
    >>> store.list_goals()
    []
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Union

import redis

from .errors import DeploymentNotFound
from .state import DeploymentHealth, Goal, Node, Replica

PREFIX = "taskserve"
EVENTS_CHANNEL = f"{PREFIX}:events"
QUEUE_PREFIX = f"{PREFIX}."
RESULT_KEY_PREFIX = "celery-task-meta-"   # Celery's, see celery.backends.base.KeyValueStoreBackend

HISTORY_LIMIT = 50

# A change for Store.update_goal: from the current goal, the fields to change, a whole
# new goal, or None for nothing to do. It sees None (no deployment) only with missing_ok.
GoalChange = Callable[[Optional[Goal]], Union[Goal, dict[str, Any], None]]

# Writes fields to a replica hash only if the replica still exists, so a late state
# report cannot resurrect a record the controller already forgot.
_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
"""


def queue_name(deployment: str) -> str:
    """The Celery queue a deployment's replicas consume.

    >>> queue_name("echo")
    'taskserve.echo'
    """
    return QUEUE_PREFIX + deployment


def result_key(task_id: str) -> str:
    """Where Celery's Redis backend stores a request's result, and the channel it
    publishes it on when it does.

    >>> result_key("d9b1")
    'celery-task-meta-d9b1'
    """
    return RESULT_KEY_PREFIX + task_id


def _text(value: Optional[bytes]) -> Optional[str]:
    return value.decode() if isinstance(value, bytes) else value


def _user_at_host() -> str:
    """Who changes a goal from this process, for the history."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Store:
    """Typed access to the cluster state in one Redis database."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._update_replica = client.register_script(_UPDATE_IF_EXISTS)

    # ------------------------------------------------------------------ keys

    @staticmethod
    def goal_key(name: str) -> str:
        return f"{PREFIX}:goal:{name}"

    @staticmethod
    def health_key(name: str) -> str:
        return f"{PREFIX}:health:{name}"

    @staticmethod
    def history_key(name: str) -> str:
        return f"{PREFIX}:history:{name}"

    @staticmethod
    def code_key(sha: str) -> str:
        return f"{PREFIX}:code:{sha}"

    @staticmethod
    def codes_key(name: str) -> str:
        return f"{PREFIX}:codes:{name}"

    @staticmethod
    def replicas_key(name: str) -> str:
        return f"{PREFIX}:replicas:{name}"

    @staticmethod
    def replica_key(replica_id: str) -> str:
        return f"{PREFIX}:replica:{replica_id}"

    @staticmethod
    def control_key(replica_id: str) -> str:
        return f"{PREFIX}:control:{replica_id}"

    @staticmethod
    def node_replicas_key(node_id: str) -> str:
        return f"{PREFIX}:node-replicas:{node_id}"

    @staticmethod
    def node_alive_key(node_id: str) -> str:
        return f"{PREFIX}:node-alive:{node_id}"

    DEPLOYMENTS_KEY = f"{PREFIX}:deployments"
    NODES_KEY = f"{PREFIX}:nodes"
    LEASE_KEY = f"{PREFIX}:controller-lease"

    # ------------------------------------------------------------------ notifications

    def notify(self, what: str) -> None:
        """Wake the controller and agents; they resync on a timer anyway."""
        self.redis.publish(EVENTS_CHANNEL, what)

    def subscribe(self) -> redis.client.PubSub:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(EVENTS_CHANNEL)
        return pubsub

    # ------------------------------------------------------------------ goals

    def get_goal(self, name: str) -> Optional[Goal]:
        text = self.redis.get(self.goal_key(name))
        return Goal.from_json(text) if text else None

    def require_goal(self, name: str) -> Goal:
        goal = self.get_goal(name)
        if goal is None or goal.deleting:
            raise DeploymentNotFound(name)
        return goal

    def list_goals(self) -> list[Goal]:
        names = sorted(_text(n) for n in self.redis.smembers(self.DEPLOYMENTS_KEY))
        if not names:
            return []
        texts = self.redis.mget([self.goal_key(n) for n in names])
        return [Goal.from_json(t) for t in texts if t]

    def deployment_exists(self, name: str) -> bool:
        text = self.redis.get(self.goal_key(name))
        return bool(text) and not Goal.from_json(text).deleting

    def write_goal(
        self,
        name: str,
        make_goal: Callable[[Optional[Goal]], Optional[Goal]],
        blobs: Iterable[tuple[str, bytes]] = (),
        event: Optional[dict] = None,
    ) -> Optional[Goal]:
        """Replace a deployment's goal atomically and return the goal written.

        The primitive under :meth:`update_goal`, which changes of a deployment use.
        ``make_goal(previous)`` builds the new goal from the one in Redis (None if
        there is none); it is called again if another client wrote in between, so
        the later writer wins cleanly. It returns None to write nothing. ``blobs``
        are ``(sha, bytes)`` uploads (code, working_dir packages); those the new goal
        refers to are stored with it. ``event`` is recorded in the history.
        """
        blobs = list(blobs)
        key = self.goal_key(name)

        def write(pipe: redis.client.Pipeline) -> Optional[Goal]:
            text = pipe.get(key)
            goal = make_goal(Goal.from_json(text) if text else None)
            if goal is None:
                pipe.unwatch()
                return None
            pipe.multi()
            for sha, blob in blobs:
                if sha in goal.blob_shas():
                    pipe.set(self.code_key(sha), blob)
                    pipe.sadd(self.codes_key(name), sha)
            pipe.set(key, goal.to_json())
            pipe.sadd(self.DEPLOYMENTS_KEY, name)
            if event is not None:
                record = {**event, "generation": goal.generation, "version": goal.version,
                          "goal": json.loads(goal.to_json()), "at": time.time()}
                pipe.rpush(self.history_key(name), json.dumps(record))
                pipe.ltrim(self.history_key(name), -HISTORY_LIMIT, -1)
            return goal

        goal = self.redis.transaction(write, key, value_from_callable=True)
        if goal is not None:
            self.notify(f"goal:{name}")
        return goal

    def update_goal(
        self,
        name: str,
        change: GoalChange,
        action: str,
        *,
        by: Optional[str] = None,
        blobs: Iterable[tuple[str, bytes]] = (),
        event_extra: Optional[dict] = None,
        missing_ok: bool = False,
    ) -> Optional[Goal]:
        """Change a deployment's goal to its next generation and record why; return it.

        ``change(previous)`` returns the fields to change (a dict), a whole new goal,
        or None when there is nothing to do (then nothing is written or recorded).
        It is called again on the newer goal if another client wrote in between. The
        goal written gets the next generation and ``created_at`` now, and the history
        an entry with ``action``, ``by`` (default: this user@host), this command line
        (``argv``) and ``event_extra``. ``blobs`` are stored as in :meth:`write_goal`.

        A missing or deleting deployment raises :class:`DeploymentNotFound`; with
        ``missing_ok``, ``change`` sees it instead (None, or the deleting goal) and
        returns a whole goal to create the deployment again, or None.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> first = Goal(name="echo", generation=0, version="v1", spec_hash="s1", num_replicas=1,
        ...              options={}, code_sha="c1", init_sha="i1")
        >>> store.update_goal("echo", lambda previous: first, "deploy", missing_ok=True).generation
        1
        >>> store.update_goal("echo", lambda previous: {"num_replicas": 3}, "scale").generation
        2
        >>> store.update_goal("echo", lambda previous: None, "scale") is None
        True
        >>> [(e["action"], e["generation"]) for e in store.history("echo")]
        [('deploy', 1), ('scale', 2)]
        """
        event = {"action": action, "by": by or _user_at_host(), "argv": " ".join(sys.argv[:3]), **(event_extra or {})}

        def make_goal(previous: Optional[Goal]) -> Optional[Goal]:
            if (previous is None or previous.deleting) and not missing_ok:
                raise DeploymentNotFound(name)
            changed = change(previous)
            if changed is None:
                return None
            goal = replace(previous, **changed) if isinstance(changed, dict) else changed
            generation = (previous.generation if previous else 0) + 1
            return replace(goal, generation=generation, created_at=time.time())

        return self.write_goal(name, make_goal, blobs=blobs, event=event)

    def forget_deployment(self, name: str, generation: int) -> bool:
        """Remove a deleted deployment's keys, unless a newer goal was written since."""
        key = self.goal_key(name)

        def forget(pipe: redis.client.Pipeline) -> bool:
            text = pipe.get(key)
            goal = Goal.from_json(text) if text else None
            if goal is None or not goal.deleting or goal.generation != generation:
                pipe.unwatch()
                return False
            others = [self.codes_key(_text(n)) for n in pipe.smembers(self.DEPLOYMENTS_KEY) if _text(n) != name]
            shared = {_text(s) for s in pipe.sunion(others)} if others else set()
            shas = [_text(s) for s in pipe.smembers(self.codes_key(name)) if _text(s) not in shared]
            pipe.multi()
            pipe.delete(key, self.health_key(name), self.codes_key(name),
                        self.replicas_key(name), self.history_key(name))
            for sha in shas:
                pipe.delete(self.code_key(sha))
            pipe.srem(self.DEPLOYMENTS_KEY, name)
            return True

        forgotten = self.redis.transaction(forget, key, value_from_callable=True)
        if forgotten:
            self.notify(f"deleted:{name}")
        return forgotten

    def get_code(self, sha: str) -> bytes:
        blob = self.redis.get(self.code_key(sha))
        if blob is None:
            raise LookupError(f"code {sha} is missing from Redis; deploy the deployment again")
        return blob

    def history(self, name: str) -> list[dict]:
        """Every goal change of ``name``, oldest first."""
        return [json.loads(item) for item in self.redis.lrange(self.history_key(name), 0, -1)]

    def record_outcome(self, name: str, generation: int, outcome: str, message: str = "") -> None:
        """Note how the goal change of ``generation`` ended ("done" or "failed")."""
        key = self.history_key(name)

        def record(pipe: redis.client.Pipeline) -> None:
            items = pipe.lrange(key, 0, -1)
            for index in range(len(items) - 1, -1, -1):
                entry = json.loads(items[index])
                if entry.get("generation") == generation:
                    break
            else:
                return
            if entry.get("outcome") == outcome:
                return
            entry.update(outcome=outcome, outcome_message=message, outcome_at=time.time())
            pipe.multi()
            pipe.lset(key, index, json.dumps(entry))

        self.redis.transaction(record, key)

    def queue_depths(self, names: Iterable[str]) -> dict[str, int]:
        """How many requests wait in each deployment's queue (not yet taken by a replica)."""
        names = list(names)
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(queue_name(name))
            return dict(zip(names, pipe.execute(), strict=True))

    # ------------------------------------------------------------------ redeliveries

    @staticmethod
    def deliveries_key(task_id: str) -> str:
        return f"{PREFIX}:deliveries:{task_id}"

    def count_redeliveries(self, task_ids: Iterable[str], ttl_s: int = 86_400) -> None:
        """Note that the requests ``task_ids`` are delivered again (their replica died)."""
        task_ids = list(task_ids)
        if not task_ids:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.incr(self.deliveries_key(task_id))
                pipe.expire(self.deliveries_key(task_id), ttl_s)
            pipe.execute()

    def redeliveries(self, task_id: str) -> int:
        """How often the request ``task_id`` was put back after its replica died."""
        return int(self.redis.get(self.deliveries_key(task_id)) or 0)

    # ------------------------------------------------------------------ health

    def get_health(self, name: str) -> DeploymentHealth:
        text = self.redis.get(self.health_key(name))
        return DeploymentHealth.from_json(text) if text else DeploymentHealth()

    def set_health(self, name: str, health: DeploymentHealth) -> None:
        """Record the controller's conclusion (only while the deployment exists)."""
        with self.redis.pipeline() as pipe:
            pipe.exists(self.goal_key(name))
            pipe.get(self.health_key(name))
            exists, before = pipe.execute()
        text = health.to_json()
        if exists and _text(before) != text:
            self.redis.set(self.health_key(name), text)
            self.notify(f"health:{name}")

    # ------------------------------------------------------------------ replicas

    def create_replica(self, replica: Replica) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.replica_key(replica.replica_id), mapping=replica.to_fields())
            pipe.sadd(self.replicas_key(replica.deployment), replica.replica_id)
            if replica.node_id:
                pipe.sadd(self.node_replicas_key(replica.node_id), replica.replica_id)
            pipe.execute()

    def place_replica(self, replica_id: str, node_id: str, gpu_ids: str = "") -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.replica_key(replica_id), mapping={"node_id": node_id, "gpu_ids": gpu_ids, "message": ""})
            pipe.sadd(self.node_replicas_key(node_id), replica_id)
            pipe.execute()

    def update_replica(self, replica_id: str, **fields: object) -> bool:
        """Set some fields of a replica record if it still exists; True if it did."""
        args: list[str] = []
        for field, value in fields.items():
            if isinstance(value, bool):
                value = "1" if value else ""
            args += [field, "" if value is None else str(getattr(value, "value", value))]
        return bool(self._update_replica(keys=[self.replica_key(replica_id)], args=args))

    def set_replica_config(self, replica_id: str, user_config: str, config_hash: str) -> bool:
        """Give a replica a new user_config and wake it; it acknowledges by writing
        ``applied_config_hash`` (or ``config_error``) to its record."""
        if not self.update_replica(replica_id, user_config=user_config, config_hash=config_hash, config_error=""):
            return False
        with self.redis.pipeline() as pipe:
            pipe.rpush(self.control_key(replica_id), "config")
            pipe.expire(self.control_key(replica_id), 600)
            pipe.execute()
        return True

    def wait_for_control(self, replica_id: str, timeout_s: float) -> bool:
        """Block until the replica is woken or ``timeout_s`` passes; True if woken."""
        woken = self.redis.blpop([self.control_key(replica_id)], timeout=timeout_s)
        if woken:
            self.redis.delete(self.control_key(replica_id))   # one re-read covers every wake-up
        return bool(woken)

    def forget_replica(self, replica: Replica) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.replica_key(replica.replica_id), self.control_key(replica.replica_id))
            pipe.srem(self.replicas_key(replica.deployment), replica.replica_id)
            if replica.node_id:
                pipe.srem(self.node_replicas_key(replica.node_id), replica.replica_id)
            pipe.execute()

    def get_replica(self, replica_id: str) -> Optional[Replica]:
        fields = self.redis.hgetall(self.replica_key(replica_id))
        return Replica.from_fields(_decode_hash(fields)) if fields else None

    def _replicas_by_ids(self, ids: Iterable[str]) -> list[Replica]:
        ids = sorted(ids)
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for replica_id in ids:
                pipe.hgetall(self.replica_key(replica_id))
            rows = pipe.execute()
        return [Replica.from_fields(_decode_hash(row)) for row in rows if row]

    def replicas_of(self, name: str) -> list[Replica]:
        return self._replicas_by_ids(_text(i) for i in self.redis.smembers(self.replicas_key(name)))

    def replicas_on_node(self, node_id: str) -> list[Replica]:
        return self._replicas_by_ids(_text(i) for i in self.redis.smembers(self.node_replicas_key(node_id)))

    def snapshot(self, name: str) -> tuple[Optional[Goal], DeploymentHealth, list[Replica]]:
        """Goal, health and replicas of one deployment, read in one transaction."""
        for _ in range(10):
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self.goal_key(name))
                pipe.get(self.health_key(name))
                pipe.smembers(self.replicas_key(name))
                goal_text, health_text, ids = pipe.execute()
            ids = sorted(_text(i) for i in ids)
            # The records are read in a second transaction; re-read if the set moved.
            with self.redis.pipeline(transaction=True) as pipe:
                for replica_id in ids:
                    pipe.hgetall(self.replica_key(replica_id))
                pipe.smembers(self.replicas_key(name))
                *rows, ids_after = pipe.execute()
            if sorted(_text(i) for i in ids_after) == ids:
                break
        goal = Goal.from_json(goal_text) if goal_text else None
        health = DeploymentHealth.from_json(health_text) if health_text else DeploymentHealth()
        replicas = [Replica.from_fields(_decode_hash(row)) for row in rows if row]
        return goal, health, replicas

    # ------------------------------------------------------------------ nodes

    def register_node(self, node: Node, ttl_s: float) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.NODES_KEY, node.node_id, node.to_json())
            pipe.set(self.node_alive_key(node.node_id), str(node.agent_pid or ""), px=int(ttl_s * 1000))
            pipe.execute()
        self.notify(f"node:{node.node_id}")

    def heartbeat_node(self, node_id: str, ttl_s: float) -> bool:
        """Extend the node's liveness; False if it had already expired."""
        return bool(self.redis.pexpire(self.node_alive_key(node_id), int(ttl_s * 1000)))

    def unregister_node(self, node_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.node_alive_key(node_id))
            pipe.hdel(self.NODES_KEY, node_id)
            pipe.execute()
        self.notify(f"node:{node_id}")

    def list_nodes(self) -> list[Node]:
        records = self.redis.hgetall(self.NODES_KEY)
        if not records:
            return []
        ids = sorted(_text(k) for k in records)
        alive = self.redis.mget([self.node_alive_key(i) for i in ids])
        return [
            Node.from_json(records[i.encode()], alive=flag is not None)
            for i, flag in zip(ids, alive, strict=True)
        ]

    def forget_dead_nodes(self, keep: Iterable[str] = ()) -> list[str]:
        """Drop records of nodes that are no longer alive and hold no replica."""
        gone = []
        keep = set(keep)
        for node in self.list_nodes():
            if not node.alive and node.node_id not in keep and not self.redis.scard(self.node_replicas_key(node.node_id)):
                self.redis.hdel(self.NODES_KEY, node.node_id)
                gone.append(node.node_id)
        return gone

    # ------------------------------------------------------------------ controller lease

    def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Become or stay the leading controller for ``ttl_s`` seconds."""
        ttl_ms = int(ttl_s * 1000)
        if self.redis.set(self.LEASE_KEY, holder, nx=True, px=ttl_ms):
            return True
        current = _text(self.redis.get(self.LEASE_KEY))
        if current == holder:
            self.redis.pexpire(self.LEASE_KEY, ttl_ms)
            return True
        return False

    def controller_alive(self) -> bool:
        """True while some controller holds the lease."""
        return bool(self.redis.exists(self.LEASE_KEY))

    def release_lease(self, holder: str) -> None:
        if _text(self.redis.get(self.LEASE_KEY)) == holder:
            self.redis.delete(self.LEASE_KEY)

    def all_replicas(self) -> list[Replica]:
        ids: set[str] = set()
        for name in self.redis.smembers(self.DEPLOYMENTS_KEY):
            ids.update(_text(i) for i in self.redis.smembers(self.replicas_key(_text(name))))
        return self._replicas_by_ids(ids)


def wait_for_events(pubsub: redis.client.PubSub, timeout_s: float) -> bool:
    """Wait until a notification arrives (then swallow the backlog) or the timeout.

    Returns True if something was notified.
    """
    message = pubsub.get_message(timeout=timeout_s)
    seen = message is not None
    while message is not None:
        message = pubsub.get_message(timeout=0)
    return seen


def _decode_hash(fields: dict) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}
