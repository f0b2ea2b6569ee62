"""Every Redis key taskserve uses, and every atomic change to them.

No other module knows a key name. The layout (``{p}`` is the prefix, ``taskserve``):

=====================================  ========  ==========================================
key                                    type      what
=====================================  ========  ==========================================
``{p}:deployments``                    set       names of all deployments
``{p}:revisions``                      hash      deployment name -> its revision: a new value
                                                 of ``{p}:revision`` with every write to its
                                                 goal, health, replica set or replica records
``{p}:revision``                       string    the counter the revisions are drawn from
``{p}:goal:{name}``                    string    the deployment's goal (JSON, see Goal)
``{p}:health:{name}``                  string    the controller's conclusion (JSON)
``{p}:history:{name}``                 list      every goal change, and every change of an
                                                 autoscaled replica count, newest last (JSON)
``{p}:scale:{name}``                   string    an autoscaled deployment's target replica
                                                 count, the load it was decided for and why
                                                 (JSON, see AutoscaleState); the controller's
``{p}:code:{sha256}``                  string    pickled class/function and init args, or a
                                                 zipped working_dir
``{p}:codes:{name}``                   set       code shas a deployment refers to
``{p}:replicas:{name}``                set       replica ids of a deployment
``{p}:replica:{replica_id}``           hash      one replica (see Replica)
``{p}:control:{replica_id}``           list      wake-ups for a replica to re-read its record
``{p}:node-replicas:{node_id}``        set       replica ids assigned to a node
``{p}:nodes``                          hash      node id -> node record (JSON)
``{p}:node-alive:{node_id}``           string    the claim of the node's agent (JSON: pid, host,
                                                 token); exists while the agent heartbeats
``{p}:controller-lease``               string    ``<epoch>:<controller id>`` of the leading
                                                 controller, with a TTL; the controller's
                                                 writes are fenced by it
``{p}:controller-epoch``               string    counts leaderships (the lease's epoch)
``{p}:events``                         channel   change notifications (wake-ups only)
``{p}:deliveries:{task_id}``           string    times a request was put back after its replica
                                                 died (expires after a day)
``{p}:stats:{name}``                   hash      requests, errors and latency buckets the replicas
                                                 served, per version: ``requests:{version}``,
                                                 ``errors:{version}``, ``le{i}:{version}`` (see
                                                 taskserve.canary); flushed by each replica about
                                                 once a second
``taskserve.{name}``                   list      Celery's queue of a deployment (kombu's)
``taskserve.{name}@canary``            list      the queue of its canary's replicas (SPEC §9)
``celery-task-meta-{task_id}``         string    Celery's result of a request, also published
                                                 on the channel of the same name
``unacked``                            hash      kombu's messages taken but not acknowledged:
                                                 delivery tag -> JSON ``[message, exchange,
                                                 routing_key]``, the routing key being the
                                                 queue's name (read for the autoscaler's load)
``unacked_index``                      zset      kombu's: delivery tag -> when it was taken
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
import logging
import select
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import redis

from .errors import DeploymentNotFound
from .state import DeploymentHealth, Goal, Node, Replica

log = logging.getLogger("taskserve.store")

PREFIX = "taskserve"
EVENTS_CHANNEL = f"{PREFIX}:events"
QUEUE_PREFIX = f"{PREFIX}."
RESULT_KEY_PREFIX = "celery-task-meta-"   # Celery's, see celery.backends.base.KeyValueStoreBackend

HISTORY_LIMIT = 50
# At most this many of the history's entries are autoscaling changes: a busy autoscaler
# drops its own oldest line, so the goals a rollback goes back to stay.
AUTOSCALE_HISTORY_LIMIT = 20
AUTOSCALE_ACTION = "autoscale"

# kombu's Redis transport (kombu.transport.redis.Channel.unacked_key, unacked_index_key).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"

# A change for Store.update_goal: from the current goal, the fields to change, a whole
# new goal, or None for nothing to do. It sees None (no deployment) only with missing_ok.
GoalChange = Callable[[Optional[Goal]], Union[Goal, dict[str, Any], None]]

# The controller's writes are fenced by its lease: each script below starts with this
# check. With a fence (ARGV[1], the lease token the controller got) the write happens
# only while the lease (KEYS[1]) still holds that token, so a controller that was
# paused past its lease writes nothing once it wakes up; -1 says the lease is lost.
# Without a fence (ARGV[1] == '': agents, replicas, clients) the check passes.
_FENCE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
"""

# Every write to a deployment's goal, health, replica set or replica records gives the
# deployment a new revision: the next value of a counter shared by all deployments, so a
# deployment deleted and made again never repeats one. A reader that remembers the
# revisions re-reads only the deployments whose revision moved (see ClusterReader).
# ``bump(revisions, counter, name)`` does it inside a script; a false name does nothing.
_BUMP = """
local function bump(revisions, counter, name)
  if name then
    redis.call('HSET', revisions, name, redis.call('INCR', counter))
  end
end
"""

# Writes fields to a replica hash only if the replica still exists, so a late state
# report cannot resurrect a record the controller already forgot.
# KEYS: lease, replica, revisions, revision counter; ARGV: fence, field, value, ...
_UPDATE_IF_EXISTS = _BUMP + _FENCE + """
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
  bump(KEYS[3], KEYS[4], redis.call('HGET', KEYS[2], 'deployment'))
  return 1
end
return 0
"""

# KEYS: lease, replica, replicas of the deployment, revisions, revision counter[, replicas
# of the node]; ARGV: fence, replica id, deployment, field, value, ...
_CREATE_REPLICA = _BUMP + _FENCE + """
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('SADD', KEYS[3], ARGV[2])
if KEYS[6] then
  redis.call('SADD', KEYS[6], ARGV[2])
end
bump(KEYS[4], KEYS[5], ARGV[3])
return 1
"""

# KEYS: lease, replica, replicas of the node, revisions, revision counter; ARGV: fence,
# replica id, node id, gpu ids. A replica forgotten meanwhile is not placed (no half
# record is written).
_PLACE_REPLICA = _BUMP + _FENCE + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], 'node_id', ARGV[3], 'gpu_ids', ARGV[4], 'message', '')
redis.call('SADD', KEYS[3], ARGV[2])
bump(KEYS[4], KEYS[5], redis.call('HGET', KEYS[2], 'deployment'))
return 1
"""

# KEYS: lease, replica, its control list, replicas of the deployment, revisions, revision
# counter[, replicas of the node]; ARGV: fence, replica id, deployment.
_FORGET_REPLICA = _BUMP + _FENCE + """
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[2])
if KEYS[7] then
  redis.call('SREM', KEYS[7], ARGV[2])
end
bump(KEYS[5], KEYS[6], ARGV[3])
return 1
"""

# KEYS: lease, goal, health, revisions, revision counter; ARGV: fence, health JSON,
# deployment. Written only while the deployment exists, and only when it changed (1 if
# written).
_SET_HEALTH = _BUMP + _FENCE + """
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('GET', KEYS[3]) == ARGV[2] then
  return 0
end
redis.call('SET', KEYS[3], ARGV[2])
bump(KEYS[4], KEYS[5], ARGV[3])
return 1
"""

# KEYS: lease, goal, scale, history; ARGV: fence, state JSON, history entry JSON ('' for
# none), history limit, limit of autoscaling entries, the prefix of their JSON. Written
# only while the deployment exists. An entry beyond the autoscaling limit replaces the
# oldest autoscaling entry, not a goal change.
_SET_SCALE = _FENCE + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('SET', KEYS[3], ARGV[2])
if ARGV[3] ~= '' then
  local prefix = ARGV[6]
  local oldest = nil
  local count = 0
  for _, item in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do
    if string.sub(item, 1, string.len(prefix)) == prefix then
      count = count + 1
      if oldest == nil then
        oldest = item
      end
    end
  end
  if oldest ~= nil and count >= tonumber(ARGV[5]) then
    redis.call('LREM', KEYS[4], 1, oldest)
  end
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[4]), -1)
end
return 1
"""

# KEYS: lease, keys to delete; ARGV: fence. The number deleted.
_DELETE_FENCED = _FENCE + """
if #KEYS < 2 then
  return 0
end
return redis.call('DEL', unpack(KEYS, 2))
"""

# The lease's value is "<epoch>:<holder>"; the epoch (KEYS[2]) grows with every new
# leadership, so the value is a token that no earlier leadership shares. The holder
# (ARGV[1]) renews its own lease; anyone takes a lease nobody holds.
_ACQUIRE_LEASE = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, ':', 1, true)
  if sep and string.sub(current, sep + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return current
  end
  return false
end
local token = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""

_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: queues; the length of each, in one command (cheaper to send and parse than a
# pipeline of LLENs, for the controller's frequent looks between passes).
_QUEUE_LENGTHS = """
local lengths = {}
for i, key in ipairs(KEYS) do
  lengths[i] = redis.call('LLEN', key)
end
return lengths
"""

_RELEASE_LEASE = """
local current = redis.call('GET', KEYS[1])
if not current then
  return 0
end
local sep = string.find(current, ':', 1, true)
if current == ARGV[1] or (sep and string.sub(current, sep + 1) == ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# A node's alive key (KEYS[1]) holds its agent's claim. An agent takes it only if
# nobody holds it, if it holds it already, or if it holds ARGV[4] (a stale claim the
# agent proved dead), and then writes the node record (KEYS[2], field ARGV[3],
# value ARGV[5]). Returns ARGV[1] (the claim) when taken, else the holder's claim.
_CLAIM_NODE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and current ~= ARGV[4] then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
return ARGV[1]
"""

# Extends the node's liveness only while this agent's claim (ARGV[1]) holds it:
# 1 extended, 0 expired, else the claim of the agent that holds it now.
_HEARTBEAT_NODE = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  return 0
end
return current
"""

# Leaves the cluster: drops the alive key and the node record, unless another agent's
# claim (not ARGV[1], when given) holds the node now.
_UNREGISTER_NODE = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and current and current ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""


class LeaseLost(RuntimeError):
    """A fenced write was refused: the controller no longer holds the lease it wrote under."""


@dataclass(frozen=True)
class NodeClaim:
    """Which agent process runs a node: the value of the node's alive key.

    >>> claim = NodeClaim(pid=41, host="box", token="ab12")
    >>> NodeClaim.parse(claim.text) == claim
    True
    >>> NodeClaim.parse("41")        # an agent of an earlier version wrote its pid only
    NodeClaim(pid=41, host='', token='')
    """

    pid: Optional[int]
    host: str
    token: str = ""
    raw: str = field(default="", compare=False, repr=False)

    @property
    def text(self) -> str:
        """The value of the alive key (as read, for a claim that was read)."""
        if self.raw:
            return self.raw
        return json.dumps({"pid": self.pid, "host": self.host, "token": self.token}, sort_keys=True)

    @classmethod
    def parse(cls, text: Union[str, bytes]) -> "NodeClaim":
        text = _text(text) or ""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            pid = data.get("pid")
            return cls(pid if isinstance(pid, int) else None, str(data.get("host") or ""),
                       str(data.get("token") or ""), raw=text)
        return cls(int(text) if text.isdigit() else None, "", "", raw=text)

    def describe(self) -> str:
        """``pid N on HOST``, as much of it as is known.

        >>> NodeClaim(pid=41, host="box").describe(), NodeClaim(pid=None, host="").describe()
        ('pid 41 on box', 'pid unknown')
        """
        where = f" on {self.host}" if self.host else ""
        return f"pid {self.pid if self.pid is not None else 'unknown'}{where}"


class NodeTaken(RuntimeError):
    """Another live agent holds the node id this agent wants."""

    def __init__(self, node_id: str, holder: NodeClaim) -> None:
        super().__init__(f"node {node_id} already has a live agent ({holder.describe()}); "
                         "stop it or pick another --node-id")
        self.node_id = node_id
        self.holder = holder


@dataclass(frozen=True)
class AutoscaleState:
    """What the controller decided for an autoscaled deployment, as ``{p}:scale:{name}`` holds it.

    ``target`` is the replica count the controller plans for (the goal's ``num_replicas``
    is only where autoscaling starts); ``waiting`` and ``serving`` are the load it was
    decided for: requests in the deployment's queue, and those its replicas took and have
    not acknowledged. ``at`` (seconds since the epoch) is when this load, target and reason
    were first seen together, ``changed_at`` when the target last changed.

    >>> state = AutoscaleState(target=3, reason="3 replicas for 14 waiting/serving, target 5 each",
    ...                        waiting=10, serving=4, at=1700000000.0, changed_at=1699999990.0)
    >>> state.load
    14
    >>> AutoscaleState.from_json(state.to_json()) == state
    True
    >>> AutoscaleState.from_json('{"target": 2, "zone": "a"}')      # unknown fields are left out
    AutoscaleState(target=2, reason='', waiting=0, serving=0, at=0.0, changed_at=0.0)
    """

    target: int
    reason: str = ""
    waiting: int = 0
    serving: int = 0
    at: float = 0.0
    changed_at: float = 0.0

    @property
    def load(self) -> int:
        """Requests waiting or being served."""
        return self.waiting + self.serving

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "reason": self.reason, "waiting": self.waiting,
                           "serving": self.serving, "at": self.at, "changed_at": self.changed_at})

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "AutoscaleState":
        """Read a state; raises ``ValueError`` (or ``TypeError``) for one that is not a state."""
        data = json.loads(text)
        if not isinstance(data, dict) or isinstance(data.get("target"), bool) or \
                not isinstance(data.get("target"), int) or data["target"] < 0:
            raise ValueError(f"not an autoscaling state: {_short(text)}")
        return cls(
            target=data["target"],
            reason=str(data.get("reason") or ""),
            waiting=int(data.get("waiting") or 0),
            serving=int(data.get("serving") or 0),
            at=float(data.get("at") or 0.0),
            changed_at=float(data.get("changed_at") or 0.0),
        )


def queue_name(deployment: str) -> str:
    """The Celery queue a deployment's replicas consume.

    >>> queue_name("echo")
    'taskserve.echo'
    """
    return QUEUE_PREFIX + deployment


CANARY_QUEUE_SUFFIX = "@canary"


def canary_queue_name(deployment: str) -> str:
    """The queue a deployment's canary replicas consume: requests sent to the canary
    version wait there, apart from the stable version's.

    >>> canary_queue_name("echo")
    'taskserve.echo@canary'
    """
    return queue_name(deployment) + CANARY_QUEUE_SUFFIX


def replica_queue(replica: Replica) -> str:
    """The queue ``replica`` consumes: its deployment's, or its canary queue.

    >>> replica_queue(Replica("echo-1", "echo", "s2", "2", canary=True))
    'taskserve.echo@canary'
    """
    return canary_queue_name(replica.deployment) if replica.canary else queue_name(replica.deployment)


# Moves every request of the canary queue (KEYS[1]) to the deployment's queue (KEYS[2]),
# oldest first to the end served next, with the routing key their message carries
# (ARGV[1], the canary queue's name) changed to the deployment's queue (ARGV[2]), so a
# replica that dies holding one gives it back there. Returns how many were moved.
# With many pairs (KEYS and ARGV: canary queue, queue, canary queue, ...), each pair in
# turn, in one call; returns the counts in that order.
_MOVE_CANARY_QUEUE = """
local counts = {}
for pair = 1, #KEYS, 2 do
  local from_key = '"routing_key": "' .. ARGV[pair] .. '"'
  local to_key = '"routing_key": "' .. ARGV[pair + 1] .. '"'
  local moved = 0
  while true do
    local item = redis.call('LPOP', KEYS[pair])
    if not item then
      break
    end
    local at = string.find(item, from_key, 1, true)
    if at then
      item = string.sub(item, 1, at - 1) .. to_key .. string.sub(item, at + string.len(from_key))
    end
    redis.call('RPUSH', KEYS[pair + 1], item)
    moved = moved + 1
  end
  counts[#counts + 1] = moved
end
return counts
"""


def result_key(task_id: str) -> str:
    """Where Celery's Redis backend stores a request's result, and the channel it
    publishes it on when it does.

    >>> result_key("d9b1")
    'celery-task-meta-d9b1'
    """
    return RESULT_KEY_PREFIX + task_id


def _text(value: Optional[bytes]) -> Optional[str]:
    return value.decode() if isinstance(value, bytes) else value


def _short(value: Union[str, bytes], limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def unacked_routing_key(entry: Union[str, bytes]) -> Optional[str]:
    """The routing key (the queue's name) of kombu's unacked entry ``[message, exchange,
    routing_key]``; None for anything else.

    The entry holds the whole message; its routing key is read off the end without
    parsing the rest when the entry ends like a JSON list of strings does.

    >>> unacked_routing_key(json.dumps([{"body": "e30=", "headers": {"id": "d9b1"}}, "", "taskserve.echo"]))
    'taskserve.echo'
    >>> unacked_routing_key(json.dumps([{}, "", 'a "quoted" key']).encode())
    'a "quoted" key'
    >>> unacked_routing_key("not json"), unacked_routing_key("[1]"), unacked_routing_key('["x"]')
    (None, None, None)
    """
    raw = entry if isinstance(entry, bytes) else entry.encode("utf-8", "surrogatepass")
    if raw.endswith(b'"]'):
        start = raw.rfind(b'"', 0, len(raw) - 2)
        key = raw[start + 1:-2]
        # The key is whole only if nothing in it was escaped and a separator precedes it.
        if start > 1 and raw[start - 1:start] in (b" ", b",") and b"\\" not in key:
            try:
                return key.decode()
            except UnicodeDecodeError:
                return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, list) and len(data) == 3 and isinstance(data[2], str):
        return data[2]
    return None


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
        self._create_replica = client.register_script(_CREATE_REPLICA)
        self._place_replica = client.register_script(_PLACE_REPLICA)
        self._forget_replica = client.register_script(_FORGET_REPLICA)
        self._set_health = client.register_script(_SET_HEALTH)
        self._acquire_lease = client.register_script(_ACQUIRE_LEASE)
        self._renew_lease = client.register_script(_RENEW_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)
        self._claim_node = client.register_script(_CLAIM_NODE)
        self._heartbeat_node = client.register_script(_HEARTBEAT_NODE)
        self._unregister_node = client.register_script(_UNREGISTER_NODE)
        self._set_scale = client.register_script(_SET_SCALE)
        self._delete_fenced = client.register_script(_DELETE_FENCED)
        self._move_canary_queue = client.register_script(_MOVE_CANARY_QUEUE)
        self._queue_lengths = client.register_script(_QUEUE_LENGTHS)
        self._reported: dict[str, str] = {}   # what was logged as unreadable, so once per change

    def _fenced(self, script: Any, keys: list[str], args: list[Any], fence: Optional[str]) -> Any:
        """Run one of the fenced scripts; raise :class:`LeaseLost` if the fence refused it."""
        result = script(keys=[self.LEASE_KEY, *keys], args=[fence or "", *args])
        if result == -1:
            raise LeaseLost(f"the controller lease {fence!r} is no longer held; nothing was written")
        return result

    def _check_fence(self, pipe: redis.client.Pipeline, fence: Optional[str]) -> None:
        """In a transaction that WATCHes the lease: refuse to go on without it."""
        if fence is not None and _text(pipe.get(self.LEASE_KEY)) != fence:
            pipe.unwatch()
            raise LeaseLost(f"the controller lease {fence!r} is no longer held; nothing was written")

    def _fence_keys(self, fence: Optional[str]) -> list[str]:
        return [self.LEASE_KEY] if fence is not None else []

    def report_unreadable(self, what: str, error: str) -> None:
        """Log that ``what`` cannot be read, once until its error changes."""
        if self._reported.get(what) != error:
            self._reported[what] = error
            log.error("%s cannot be read (%s); skipping it", what, error)

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

    @staticmethod
    def scale_key(name: str) -> str:
        return f"{PREFIX}:scale:{name}"

    @staticmethod
    def stats_key(name: str) -> str:
        return f"{PREFIX}:stats:{name}"

    DEPLOYMENTS_KEY = f"{PREFIX}:deployments"
    REVISIONS_KEY = f"{PREFIX}:revisions"
    REVISION_KEY = f"{PREFIX}:revision"
    NODES_KEY = f"{PREFIX}:nodes"
    LEASE_KEY = f"{PREFIX}:controller-lease"
    EPOCH_KEY = f"{PREFIX}:controller-epoch"

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
        """Every deployment's goal, sorted by name; a goal that cannot be read is
        left out (and logged once)."""
        goals, unreadable = self.read_goals()
        for name, error in unreadable.items():
            self.report_unreadable(f"the goal of deployment {name}", error)
        return goals

    def read_goals(self) -> tuple[list[Goal], dict[str, str]]:
        """Every deployment's goal sorted by name, and the error of each one that
        cannot be read (not JSON, missing fields), by deployment name."""
        names = sorted(_text(n) for n in self.redis.smembers(self.DEPLOYMENTS_KEY))
        if not names:
            return [], {}
        texts = self.redis.mget([self.goal_key(n) for n in names])
        goals: list[Goal] = []
        unreadable: dict[str, str] = {}
        for name, text in zip(names, texts, strict=True):
            if not text:
                continue
            try:
                goals.append(Goal.from_json(text))
            except Exception as error:
                unreadable[name] = _describe(error)
        return goals, unreadable

    def deployment_exists(self, name: str) -> bool:
        text = self.redis.get(self.goal_key(name))
        return bool(text) and not Goal.from_json(text).deleting

    def write_goal(
        self,
        name: str,
        make_goal: Callable[[Optional[Goal]], Optional[Goal]],
        blobs: Iterable[tuple[str, bytes]] = (),
        event: Optional[dict] = None,
        fence: Optional[str] = None,
    ) -> Optional[Goal]:
        """Replace a deployment's goal atomically and return the goal written.

        The primitive under :meth:`update_goal`, which changes of a deployment use.
        ``make_goal(previous)`` builds the new goal from the one in Redis (None if
        there is none); it is called again if another client wrote in between, so
        the later writer wins cleanly. It returns None to write nothing. ``blobs``
        are ``(sha, bytes)`` uploads (code, working_dir packages); those the new goal
        refers to are stored with it. ``event`` is recorded in the history. With
        ``fence`` (the controller's lease token) nothing is written unless the lease
        still holds it (:class:`LeaseLost`).
        """
        blobs = list(blobs)
        key = self.goal_key(name)

        def write(pipe: redis.client.Pipeline) -> Optional[Goal]:
            self._check_fence(pipe, fence)
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
            pipe.eval(_BUMP + "bump(KEYS[1], KEYS[2], ARGV[1])", 2, self.REVISIONS_KEY, self.REVISION_KEY, name)
            if event is not None:
                record = {**event, "generation": goal.generation, "version": goal.version,
                          "goal": json.loads(goal.to_json()), "at": time.time()}
                pipe.rpush(self.history_key(name), json.dumps(record))
                pipe.ltrim(self.history_key(name), -HISTORY_LIMIT, -1)
            return goal

        goal = self.redis.transaction(write, key, *self._fence_keys(fence), value_from_callable=True)
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
        fence: Optional[str] = None,
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
        returns a whole goal to create the deployment again, or None. ``fence`` is
        as in :meth:`write_goal`.

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

        return self.write_goal(name, make_goal, blobs=blobs, event=event, fence=fence)

    def forget_deployment(self, name: str, generation: int, fence: Optional[str] = None) -> bool:
        """Remove a deleted deployment's keys, unless a newer goal was written since."""
        key = self.goal_key(name)

        def forget(pipe: redis.client.Pipeline) -> bool:
            self._check_fence(pipe, fence)
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
                        self.replicas_key(name), self.history_key(name), self.scale_key(name),
                        self.stats_key(name))
            for sha in shas:
                pipe.delete(self.code_key(sha))
            pipe.srem(self.DEPLOYMENTS_KEY, name)
            pipe.hdel(self.REVISIONS_KEY, name)
            return True

        forgotten = self.redis.transaction(forget, key, *self._fence_keys(fence), value_from_callable=True)
        if forgotten:
            self.notify(f"deleted:{name}")
        return forgotten

    def get_code(self, sha: str) -> bytes:
        blob = self.redis.get(self.code_key(sha))
        if blob is None:
            raise LookupError(f"code {sha} is missing from Redis; deploy the deployment again")
        return blob

    def history(self, name: str) -> list[dict]:
        """Every goal change of ``name`` and every change of an autoscaled replica count,
        oldest first.

        A goal change holds its ``goal``; an autoscaling change (``action`` "autoscale",
        ``by`` "autoscaler") holds none, but ``from`` and ``to`` (the replica counts), the
        ``reason`` and the generation and version of the goal it scaled.
        """
        return [json.loads(item) for item in self.redis.lrange(self.history_key(name), 0, -1)]

    def record_outcome(self, name: str, generation: int, outcome: str, message: str = "",
                       fence: Optional[str] = None) -> None:
        """Note how the goal change of ``generation`` ended ("done" or "failed")."""
        key = self.history_key(name)

        def record(pipe: redis.client.Pipeline) -> None:
            self._check_fence(pipe, fence)
            items = pipe.lrange(key, 0, -1)
            for index in range(len(items) - 1, -1, -1):
                entry = json.loads(items[index])
                # Autoscaling lines carry the generation they scaled, but no goal of their own.
                if entry.get("generation") == generation and "goal" in entry:
                    break
            else:
                return
            if entry.get("outcome") == outcome:
                return
            entry.update(outcome=outcome, outcome_message=message, outcome_at=time.time())
            pipe.multi()
            pipe.lset(key, index, json.dumps(entry))

        self.redis.transaction(record, key, *self._fence_keys(fence))

    def queue_depths(self, names: Iterable[str]) -> dict[str, int]:
        """How many requests wait in each deployment's queue (not yet taken by a replica)."""
        names = list(names)
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(queue_name(name))
            return dict(zip(names, pipe.execute(), strict=True))

    def waiting_requests(self, names: Iterable[str]) -> dict[str, int]:
        """:meth:`queue_depths` in one command: what the controller reads between passes,
        several times a second, while deployments autoscale. Reads nothing without ``names``.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.redis.lpush(queue_name("echo"), "request-1", "request-2")
        2
        >>> store.waiting_requests(["echo", "other"])
        {'echo': 2, 'other': 0}
        """
        names = list(names)
        if not names:
            return {}
        lengths = self._queue_lengths(keys=[queue_name(name) for name in names])
        return {name: int(length) for name, length in zip(names, lengths, strict=True)}

    def serving_requests(self, names: Iterable[str]) -> dict[str, int]:
        """How many requests the replicas of each deployment took and have not
        acknowledged yet (served now, or prefetched): one ``HGETALL`` of kombu's
        ``unacked`` hash.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.redis.hset(UNACKED_KEY, "tag-1", json.dumps([{"body": ""}, "", "taskserve.echo"]))
        1
        >>> store.serving_requests(["echo", "other"])
        {'echo': 1, 'other': 0}
        """
        return _count_serving(list(names), self.redis.hgetall(UNACKED_KEY))

    def deployment_loads(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Each deployment's load as ``(waiting, serving)``: :meth:`queue_depths` and
        :meth:`serving_requests` in one round trip. Reads nothing without ``names``.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.redis.lpush(queue_name("echo"), "request-1", "request-2")
        2
        >>> store.deployment_loads(["echo"])
        {'echo': (2, 0)}
        """
        names = list(names)
        if not names:
            return {}
        # One transaction: a message moving from a queue to the unacked hash meanwhile
        # is not counted twice.
        with self.redis.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.llen(queue_name(name))
            pipe.hgetall(UNACKED_KEY)
            *depths, unacked = pipe.execute()
        serving = _count_serving(names, unacked)
        return {name: (int(depth), serving[name]) for name, depth in zip(names, depths, strict=True)}

    # ------------------------------------------------------------------ autoscaling

    def autoscale_state(self, name: str) -> Optional[AutoscaleState]:
        """What the controller decided for the autoscaled deployment ``name`` (None before
        its first decision, or when the record cannot be read, which is logged once).

        Callers show it only while the goal has an ``autoscaling_config``.
        """
        return self.autoscale_states([name])[name]

    def autoscale_states(self, names: Iterable[str]) -> dict[str, Optional[AutoscaleState]]:
        """:meth:`autoscale_state` of each of ``names``, in one ``MGET``.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.autoscale_states(["echo"])
        {'echo': None}
        """
        names = list(names)
        if not names:
            return {}
        states: dict[str, Optional[AutoscaleState]] = {}
        for name, text in zip(names, self.redis.mget([self.scale_key(n) for n in names]), strict=True):
            states[name] = None
            if text is not None:
                try:
                    states[name] = AutoscaleState.from_json(text)
                except (ValueError, TypeError) as error:
                    self.report_unreadable(f"the autoscaling state of deployment {name}", _describe(error))
        return states

    def set_autoscale_state(self, name: str, state: AutoscaleState, change: Optional[dict] = None,
                            fence: Optional[str] = None) -> bool:
        """Record the controller's autoscaling decision for ``name`` (only while the
        deployment exists); True if written.

        ``change``, when the target changed, is the history entry that says so: it is
        recorded as an ``action`` "autoscale" by "autoscaler" entry with the time, in the
        same atomic write. The history keeps at most ``AUTOSCALE_HISTORY_LIMIT`` of them.
        No goal changes and no generation is used up: a ``deploy()`` waiting for its
        rollout is not disturbed. ``fence`` is the controller's lease token.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.set_autoscale_state("echo", AutoscaleState(target=2))     # no such deployment
        False
        """
        entry = ""
        if change is not None:
            entry = json.dumps({"action": AUTOSCALE_ACTION, "by": "autoscaler", **change, "at": time.time()})
        keys = [self.goal_key(name), self.scale_key(name), self.history_key(name)]
        args = [state.to_json(), entry, HISTORY_LIMIT, AUTOSCALE_HISTORY_LIMIT, _AUTOSCALE_ENTRY_PREFIX]
        return bool(self._fenced(self._set_scale, keys, args, fence))

    def delete_autoscale_states(self, names: Iterable[str], fence: Optional[str] = None) -> int:
        """Forget the autoscaling states of ``names`` (their deployments no longer
        autoscale); how many there were."""
        keys = [self.scale_key(name) for name in names]
        if not keys:
            return 0
        return int(self._fenced(self._delete_fenced, keys, [], fence))

    # ------------------------------------------------------------------ canary releases

    def move_canary_queues(self, names: Iterable[str]) -> dict[str, int]:
        """Move what waits in the canary queue of each of ``names`` (deployments that run
        no canary now) to its own queue, in one round trip; how many moved, by name.

        Requests sent to a canary that was aborted or promoted meanwhile, and those a
        draining canary replica gave back, are served by the stable version this way.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.redis.lpush(canary_queue_name("echo"), '{"delivery_info": {"routing_key": "taskserve.echo@canary"}}')
        1
        >>> store.move_canary_queues(["echo"]), store.redis.lrange(queue_name("echo"), 0, -1)
        ({'echo': 1}, [b'{"delivery_info": {"routing_key": "taskserve.echo"}}'])
        """
        names = list(names)
        if not names:
            return {}
        pairs = [key for name in names for key in (canary_queue_name(name), queue_name(name))]
        moved = self._move_canary_queue(keys=pairs, args=pairs)
        return {name: int(count) for name, count in zip(names, moved, strict=True)}

    def add_stats(self, name: str, counts: dict[str, int]) -> None:
        """Add a replica's counters (``{"requests:2": 5, ...}``) to the deployment's
        stats, in one round trip."""
        if not counts:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for field_name, count in counts.items():
                pipe.hincrby(self.stats_key(name), field_name, count)
            pipe.execute()

    def stats(self, name: str) -> dict[str, int]:
        """Every counter of the deployment's stats (see :mod:`taskserve.canary`)."""
        return {_text(k): int(v) for k, v in self.redis.hgetall(self.stats_key(name)).items()}

    def reset_stats(self, name: str, version: str) -> None:
        """Forget what ``version``'s replicas counted (a canary of it starts afresh)."""
        fields = [k for k in self.redis.hkeys(self.stats_key(name)) if _text(k).partition(":")[2] == version]
        if fields:
            self.redis.hdel(self.stats_key(name), *fields)

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

    def set_health(self, name: str, health: DeploymentHealth, fence: Optional[str] = None) -> None:
        """Record the controller's conclusion (only while the deployment exists)."""
        keys = [self.goal_key(name), self.health_key(name), self.REVISIONS_KEY, self.REVISION_KEY]
        if self._fenced(self._set_health, keys, [health.to_json(), name], fence):
            self.notify(f"health:{name}")

    # ------------------------------------------------------------------ replicas

    def create_replica(self, replica: Replica, fence: Optional[str] = None) -> None:
        keys = [self.replica_key(replica.replica_id), self.replicas_key(replica.deployment),
                self.REVISIONS_KEY, self.REVISION_KEY]
        if replica.node_id:
            keys.append(self.node_replicas_key(replica.node_id))
        args = [replica.replica_id, replica.deployment]
        for name, value in replica.to_fields().items():
            args += [name, value]
        self._fenced(self._create_replica, keys, args, fence)

    def place_replica(self, replica_id: str, node_id: str, gpu_ids: str = "", fence: Optional[str] = None) -> bool:
        """Assign a replica to a node (if its record still exists); True if it did."""
        keys = [self.replica_key(replica_id), self.node_replicas_key(node_id), self.REVISIONS_KEY, self.REVISION_KEY]
        return bool(self._fenced(self._place_replica, keys, [replica_id, node_id, gpu_ids], fence))

    def update_replica(self, replica_id: str, fence: Optional[str] = None, **fields: object) -> bool:
        """Set some fields of a replica record if it still exists; True if it did."""
        args: list[str] = []
        for name, value in fields.items():
            if isinstance(value, bool):
                value = "1" if value else ""
            args += [name, "" if value is None else str(getattr(value, "value", value))]
        keys = [self.replica_key(replica_id), self.REVISIONS_KEY, self.REVISION_KEY]
        return bool(self._fenced(self._update_replica, keys, args, fence))

    def set_replica_config(self, replica_id: str, user_config: str, config_hash: str, signature: str = "",
                           fence: Optional[str] = None) -> bool:
        """Give a replica a new user_config (with its client's ``signature``) and wake it;
        it acknowledges by writing ``applied_config_hash`` (or ``config_error``) to its record."""
        if not self.update_replica(replica_id, fence=fence, user_config=user_config, config_hash=config_hash,
                                   user_config_signature=signature, config_error=""):
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

    def forget_replica(self, replica: Replica, fence: Optional[str] = None) -> None:
        keys = [self.replica_key(replica.replica_id), self.control_key(replica.replica_id),
                self.replicas_key(replica.deployment), self.REVISIONS_KEY, self.REVISION_KEY]
        if replica.node_id:
            keys.append(self.node_replicas_key(replica.node_id))
        self._fenced(self._forget_replica, keys, [replica.replica_id, replica.deployment], fence)

    def get_replica(self, replica_id: str) -> Optional[Replica]:
        fields = self.redis.hgetall(self.replica_key(replica_id))
        return Replica.from_fields(_decode_hash(fields)) if fields else None

    def _replicas_by_ids(self, ids: Iterable[str], unreadable: Optional[dict[str, str]] = None) -> list[Replica]:
        """The records of ``ids`` that exist. A record that cannot be read raises,
        or with ``unreadable`` is left out and its error noted there by replica id."""
        ids = sorted(ids)
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for replica_id in ids:
                pipe.hgetall(self.replica_key(replica_id))
            rows = pipe.execute()
        replicas = []
        for replica_id, row in zip(ids, rows, strict=True):
            if not row:
                continue
            try:
                replicas.append(Replica.from_fields(_decode_hash(row)))
            except Exception as error:
                if unreadable is None:
                    raise
                unreadable[replica_id] = _describe(error)
        return replicas

    def replica_field(self, replica_ids: Iterable[str], field: str) -> dict[str, str]:
        """One field of each replica record that has it (e.g. a batched replica's batch sizes).

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.redis.hset(store.replica_key("r1"), "batch_sizes", "{}")
        1
        >>> store.replica_field(["r1", "r2"], "batch_sizes")
        {'r1': '{}'}
        """
        ids = list(replica_ids)
        if not ids:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for replica_id in ids:
                pipe.hget(self.replica_key(replica_id), field)
            values = pipe.execute()
        return {replica_id: _text(value) for replica_id, value in zip(ids, values) if value is not None}

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

    def register_node(self, node: Node, ttl_s: float, claim: Optional[NodeClaim] = None,
                      replacing: Optional[NodeClaim] = None) -> None:
        """Record the node and make it alive for ``ttl_s`` seconds.

        With ``claim`` (what its agent heartbeats with) the node is taken only if no
        other agent holds it, or if the one holding it is ``replacing`` (a claim the
        caller found stale); otherwise :class:`NodeTaken` names the holder.
        """
        ttl_ms = int(ttl_s * 1000)
        if claim is None:
            with self.redis.pipeline() as pipe:
                pipe.hset(self.NODES_KEY, node.node_id, node.to_json())
                pipe.set(self.node_alive_key(node.node_id), str(node.agent_pid or ""), px=ttl_ms)
                pipe.execute()
        else:
            holder = self._claim_node(
                keys=[self.node_alive_key(node.node_id), self.NODES_KEY],
                args=[claim.text, ttl_ms, node.node_id, replacing.text if replacing else "", node.to_json()],
            )
            if _text(holder) != claim.text:
                raise NodeTaken(node.node_id, NodeClaim.parse(holder))
        self.notify(f"node:{node.node_id}")

    def heartbeat_node(self, node_id: str, ttl_s: float, claim: Optional[NodeClaim] = None) -> bool:
        """Extend the node's liveness; False if it had already expired.

        With ``claim``, only while that claim holds the node: :class:`NodeTaken` if
        another agent's does.
        """
        ttl_ms = int(ttl_s * 1000)
        if claim is None:
            return bool(self.redis.pexpire(self.node_alive_key(node_id), ttl_ms))
        result = self._heartbeat_node(keys=[self.node_alive_key(node_id)], args=[claim.text, ttl_ms])
        if isinstance(result, (bytes, str)):
            raise NodeTaken(node_id, NodeClaim.parse(result))
        return result == 1

    def node_claim(self, node_id: str) -> tuple[Optional[NodeClaim], int]:
        """Who holds the node, and for how many more milliseconds (None, 0 if nobody)."""
        with self.redis.pipeline() as pipe:
            pipe.get(self.node_alive_key(node_id))
            pipe.pttl(self.node_alive_key(node_id))
            value, pttl = pipe.execute()
        if value is None:
            return None, 0
        return NodeClaim.parse(value), max(0, int(pttl))

    def unregister_node(self, node_id: str, claim: Optional[NodeClaim] = None) -> None:
        """Remove the node (with ``claim``: unless another agent holds it now)."""
        self._unregister_node(keys=[self.node_alive_key(node_id), self.NODES_KEY],
                              args=[claim.text if claim else "", node_id])
        self.notify(f"node:{node_id}")

    def list_nodes(self) -> list[Node]:
        """Every node record, sorted by id, with whether it is alive; a record that
        cannot be read is left out (and logged once)."""
        records = self.redis.hgetall(self.NODES_KEY)
        if not records:
            return []
        ids = sorted(_text(k) for k in records)
        alive = self.redis.mget([self.node_alive_key(i) for i in ids])
        nodes = []
        for node_id, flag in zip(ids, alive, strict=True):
            try:
                nodes.append(Node.from_json(records[node_id.encode()], alive=flag is not None))
            except Exception as error:
                self.report_unreadable(f"the record of node {node_id}", _describe(error))
        return nodes

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

    def acquire_lease(self, holder: str, ttl_s: float) -> Optional[str]:
        """Become or stay the leading controller for ``ttl_s`` seconds.

        Returns the lease token (``"<epoch>:<holder>"``; the epoch grows with each new
        leadership) while ``holder`` leads, None while another controller does. The
        token is the ``fence`` of the leader's writes.

        >>> import fakeredis
        >>> store = Store(fakeredis.FakeRedis())
        >>> store.acquire_lease("a", 5), store.acquire_lease("b", 5), store.acquire_lease("a", 5)
        ('1:a', None, '1:a')
        """
        token = self._acquire_lease(keys=[self.LEASE_KEY, self.EPOCH_KEY], args=[holder, int(ttl_s * 1000)])
        return _text(token) if token else None

    def renew_lease(self, token: str, ttl_s: float) -> bool:
        """Extend the lease for ``ttl_s`` seconds if it still holds ``token``; False if it was lost."""
        return bool(self._renew_lease(keys=[self.LEASE_KEY], args=[token, int(ttl_s * 1000)]))

    def lease_holder(self) -> Optional[str]:
        """The id of the leading controller (None if none leads)."""
        value = _text(self.redis.get(self.LEASE_KEY))
        return value.partition(":")[2] if value else None

    def controller_alive(self) -> bool:
        """True while some controller holds the lease."""
        return bool(self.redis.exists(self.LEASE_KEY))

    def release_lease(self, holder: str) -> None:
        """Give up the lease if ``holder`` (a controller id or its token) holds it."""
        self._release_lease(keys=[self.LEASE_KEY], args=[holder])

    def all_replicas(self, unreadable: Optional[dict[str, str]] = None) -> list[Replica]:
        """The replicas of every deployment. A record that cannot be read raises, or
        with ``unreadable`` is left out and noted there by deployment name."""
        names = sorted(_text(n) for n in self.redis.smembers(self.DEPLOYMENTS_KEY))
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(self.replicas_key(name))
            members = pipe.execute() if names else []
        owner = {_text(replica_id): name for name, ids in zip(names, members, strict=True) for replica_id in ids}
        errors: Optional[dict[str, str]] = None if unreadable is None else {}
        replicas = self._replicas_by_ids(owner, errors)
        for replica_id, error in (errors or {}).items():
            unreadable[owner[replica_id]] = f"the record of replica {replica_id} cannot be read: {error}"
        return replicas


@dataclass(frozen=True)
class DeploymentRecords:
    """One deployment as :class:`ClusterReader` read it: its goal, health and replicas at
    ``revision``, and why part of it cannot be read (``error``, "" when all of it can).

    ``goal`` is None when it cannot be read; replicas whose records cannot be read are
    left out (then ``error`` names the first). ``nodes`` are the nodes its replicas that
    are not gone are placed on.
    """

    name: str
    revision: int
    goal: Optional[Goal]
    health: DeploymentHealth
    replicas: tuple[Replica, ...]
    error: str = ""
    nodes: frozenset[str] = frozenset()


class ClusterReader:
    """Every deployment's goal, health and replicas, re-reading only those that changed.

    A read takes the revisions of all deployments (``{p}:revisions``, which each write
    to a deployment's goal, health, replica set or replica records moves, in the same
    atomic step) and re-reads only the deployments whose revision moved since the last
    read, in two pipelines: its round trips are the same however many deployments and
    replicas there are, and its work grows with what changed. A deployment that could
    not be read whole is read again each time; every ``full_read_s`` everything is read
    again anyway, so a write that did not move a revision (a client of an older version)
    is seen within that time. With ``with_replicas`` False it reads goals and healths
    only (the records then have no replicas).

    >>> import fakeredis
    >>> store = Store(fakeredis.FakeRedis())
    >>> goal = Goal(name="echo", generation=0, version="1", spec_hash="s", num_replicas=1, options={},
    ...             code_sha="c", init_sha="i")
    >>> _ = store.update_goal("echo", lambda previous: goal, "deploy", missing_ok=True)
    >>> reader = ClusterReader(store)
    >>> records, changed = reader.read()
    >>> records["echo"].goal.generation, sorted(changed)
    (1, ['echo'])
    >>> reader.read()[1]                  # nothing moved: nothing is read again
    set()
    >>> store.create_replica(Replica("echo-1", "echo", "s", "1"))
    >>> [r.replica_id for r in reader.read()[0]["echo"].replicas]
    ['echo-1']
    """

    def __init__(self, store: "Store", full_read_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, with_replicas: bool = True) -> None:
        self.store = store
        self.with_replicas = with_replicas
        self.full_read_s = full_read_s
        self.clock = clock
        self.records: dict[str, DeploymentRecords] = {}
        self.full_read_at: Optional[float] = None

    def forget(self) -> None:
        """Read everything again next time."""
        self.records = {}
        self.full_read_at = None

    def read(self) -> tuple[dict[str, DeploymentRecords], set[str]]:
        """Every deployment's records by name, and the names of those read again now."""
        store = self.store
        with store.redis.pipeline(transaction=True) as pipe:
            pipe.smembers(store.DEPLOYMENTS_KEY)
            pipe.hgetall(store.REVISIONS_KEY)
            members, revision_rows = pipe.execute()
        names = sorted(_text(n) for n in members)
        revisions = {_text(k): int(v) for k, v in revision_rows.items()}
        clock = self.clock()
        if self.full_read_at is None or clock - self.full_read_at >= self.full_read_s:
            self.records = {}
            self.full_read_at = clock
        known = self.records
        changed = [name for name in names
                   if name not in known or known[name].error or known[name].revision != revisions.get(name, 0)]
        fresh = self._read(changed, revisions) if changed else {}
        self.records = {name: fresh[name] if name in fresh else known[name] for name in names}
        return self.records, set(changed)

    def _read(self, names: list[str], revisions: dict[str, int]) -> dict[str, DeploymentRecords]:
        """Read ``names`` again: goals, healths and replica sets in one pipeline, the
        replica records in another."""
        store = self.store
        with store.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(store.goal_key(name))
                pipe.get(store.health_key(name))
                if self.with_replicas:
                    pipe.smembers(store.replicas_key(name))
            rows = pipe.execute()
        step = 3 if self.with_replicas else 2
        ids = {name: sorted(_text(i) for i in rows[step * index + 2]) if self.with_replicas else []
               for index, name in enumerate(names)}
        hashes: Iterator[dict] = iter(())
        if any(ids.values()):
            with store.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    for replica_id in ids[name]:
                        pipe.hgetall(store.replica_key(replica_id))
                hashes = iter(pipe.execute())
        records = {}
        for index, name in enumerate(names):
            goal_text, health_text = rows[step * index], rows[step * index + 1]
            errors: list[str] = []
            goal = None
            if goal_text:
                try:
                    goal = Goal.from_json(goal_text)
                except Exception as error:
                    errors.append(f"its goal cannot be read: {_describe(error)}")
            try:
                health = DeploymentHealth.from_json(health_text) if health_text else DeploymentHealth()
            except Exception as error:
                health = DeploymentHealth()
                errors.append(f"its health cannot be read: {_describe(error)}")
            replicas = []
            for replica_id in ids[name]:
                row = next(hashes)
                if not row:
                    continue     # forgotten since its set was read
                try:
                    replicas.append(Replica.from_fields(_decode_hash(row)))
                except Exception as error:
                    errors.append(f"the record of replica {replica_id} cannot be read: {_describe(error)}")
            records[name] = DeploymentRecords(
                name=name, revision=revisions.get(name, 0), goal=goal, health=health, replicas=tuple(replicas),
                error=errors[0] if errors else "",
                nodes=frozenset(r.node_id for r in replicas if r.node_id and not r.is_gone))
        return records


def wait_for_events(pubsub: redis.client.PubSub, timeout_s: float, also: Sequence[int] = ()) -> bool:
    """Wait until a notification arrives (then swallow the backlog), one of the
    descriptors ``also`` turns readable, or the timeout.

    Returns True if something was notified.
    """
    if also:
        connection = pubsub.connection
        sock = getattr(connection, "_sock", None)
        try:
            if sock is not None and not connection.can_read(timeout=0):
                select.select([sock, *also], [], [], timeout_s)
            timeout_s = 0.0
        except (OSError, ValueError, redis.RedisError):
            pass   # a broken connection: get_message below reconnects, waiting as before
    message = pubsub.get_message(timeout=timeout_s)
    seen = message is not None
    while message is not None:
        message = pubsub.get_message(timeout=0)
    return seen


def _describe(error: BaseException) -> str:
    """An error as one line.

    >>> _describe(ValueError("Expecting value: line 1 column 1 (char 0)"))
    'ValueError: Expecting value: line 1 column 1 (char 0)'
    """
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# How an autoscaling history entry's JSON starts (set_autoscale_state writes "action" first).
_AUTOSCALE_ENTRY_PREFIX = json.dumps({"action": AUTOSCALE_ACTION})[:-1]


def _count_serving(names: list[str], unacked: dict) -> dict[str, int]:
    """Per deployment of ``names``, the entries of kombu's unacked hash routed to its queue."""
    queues = {queue_name(name): name for name in names}
    counts = dict.fromkeys(names, 0)
    for entry in unacked.values():
        name = queues.get(unacked_routing_key(entry) or "")
        if name is not None:
            counts[name] += 1
    return counts


def _decode_hash(fields: dict) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}
