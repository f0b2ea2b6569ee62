"""The records that describe a cluster: goals, replicas, nodes and autoscaling decisions.

They are plain data. :mod:`taskserve.store` reads and writes them in Redis,
:mod:`taskserve.planner` decides what to do with them.

Example::

    >>> replica = Replica(replica_id="echo#ab12", deployment="echo", spec_hash="f00",
    ...                   version="v1", node_id="node-a", state=ReplicaState.RUNNING)
    >>> replica.is_available
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

PACKAGE_SCHEME = "taskserve-pkg://"
DEFAULT_HEARTBEAT_TTL_S = 10.0

# What an id read from Redis may be where it becomes a file name (a replica's log, a
# working_dir's directory, an environment's): one path component, never "." or "..",
# no "/", no control character. Replica ids are "<deployment>-<hex>".
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.#-]{0,127}")


def check_id(value: object, what: str = "replica id") -> str:
    """Return ``value`` if it is safe as a file name, else raise ``ValueError`` naming it.

    Every reader that turns an id from Redis into a path goes through this: a record
    written by hand under an id like ``../../x`` must not write outside its directory.

    >>> check_id("echo-5f3a9c01")
    'echo-5f3a9c01'
    >>> check_id("../../outside/escaped")
    Traceback (most recent call last):
    ...
    ValueError: invalid replica id '../../outside/escaped': an id is 1 to 128 letters, digits, '_', '-', '.' or '#', not starting with '.' or '-'; a record under it was not written by taskserve
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: an id is 1 to 128 letters, digits, '_', '-', '.' or '#', "
                         "not starting with '.' or '-'; a record under it was not written by taskserve")
    return value


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that name a field of the dataclass ``cls``.

    Records are read with it so that one written by a newer version (with fields
    this one does not know) still reads.

    >>> known_fields(Resources, {"num_cpus": 2, "num_tpus": 8})
    {'num_cpus': 2}
    """
    names = {item.name for item in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def package_sha(runtime_env: Optional[dict]) -> Optional[str]:
    """The sha of the uploaded working_dir a resolved runtime_env refers to.

    >>> package_sha({"working_dir": "taskserve-pkg://ab12.zip"})
    'ab12'
    """
    working_dir = (runtime_env or {}).get("working_dir") or ""
    if working_dir.startswith(PACKAGE_SCHEME):
        return working_dir[len(PACKAGE_SCHEME):].removesuffix(".zip")
    return None


def without_count(options: dict[str, Any]) -> dict[str, Any]:
    """A goal's options without ``num_replicas``, which goals written by earlier versions kept
    there too (the goal's own ``num_replicas`` is the count).

    >>> without_count({"num_replicas": 3, "num_cpus": 1})
    {'num_cpus': 1}
    """
    if "num_replicas" not in options:
        return options
    return {key: value for key, value in options.items() if key != "num_replicas"}


def config_hash(user_config: Any) -> str:
    """A short stable hash of a JSON-able ``user_config``.

    >>> config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})
    True
    >>> config_hash(None)     # no user_config: nothing to reconfigure
    ''
    """
    if user_config is None:
        return ""
    text = json.dumps(user_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class ReplicaState(str, Enum):
    """The life of a replica process, as docs/reference.md, Python API lists it."""

    PENDING = "PENDING"          # not placed on a node yet, or its environment is building
    STARTING = "STARTING"        # process spawned; constructor running
    RUNNING = "RUNNING"          # constructor returned; consuming requests
    RECONFIGURING = "RECONFIGURING"
    DRAINING = "DRAINING"        # finishing what it has, taking nothing new
    STOPPED = "STOPPED"          # exited after a drain, or its node went away
    FAILED = "FAILED"            # its constructor raised or the process died


class DeploymentState(str, Enum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


@dataclass(frozen=True)
class Resources:
    """What a replica reserves on a node (or what a node offers)."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    memory: int = 0

    def fits_in(self, free: "Resources") -> bool:
        eps = 1e-9
        return (
            self.num_cpus <= free.num_cpus + eps
            and self.num_gpus <= free.num_gpus + eps
            and self.memory <= free.memory
        )

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(self.num_cpus + other.num_cpus, self.num_gpus + other.num_gpus, self.memory + other.memory)

    def __sub__(self, other: "Resources") -> "Resources":
        return Resources(self.num_cpus - other.num_cpus, self.num_gpus - other.num_gpus, self.memory - other.memory)


@dataclass(frozen=True)
class Canary:
    """A new version served beside the stable one to a share of the requests (SPEC §9).

    It holds what its replicas run (``version`` to ``has_reconfigure``, as a goal does),
    the split (``traffic_percent``), the automatic abort's thresholds, and ``baseline``:
    the stable version's counters when the canary started, so the two are compared
    over the same time.

    >>> canary = Canary(version="2", spec_hash="s2", code_sha="c2", init_sha="i2", options={},
    ...                 traffic_percent=10)
    >>> canary.replica_count(5), canary.replica_count(30)
    (1, 3)
    """

    version: str
    spec_hash: str
    code_sha: str
    init_sha: str
    options: dict[str, Any]
    traffic_percent: float
    min_requests: int = 20
    max_error_rate_increase: float = 0.05
    max_p95_ratio: Optional[float] = None
    kind: str = "class"
    has_reconfigure: bool = False
    baseline: dict[str, int] = field(default_factory=dict)
    user_config_signature: str = ""     # of options["user_config"] (taskserve.signing)
    started_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", without_count(self.options))

    def replica_count(self, stable_replicas: int) -> int:
        """``max(1, ceil(n × P / 100))`` replicas beside the ``n`` stable ones."""
        return max(1, math.ceil(stable_replicas * self.traffic_percent / 100 - 1e-9))


@dataclass(frozen=True)
class Goal:
    """What a deployment should be: written by ``deploy()``, read by the controller.

    ``spec_hash`` identifies what a replica process runs (version, init args,
    resources...): replicas with another ``spec_hash`` are outdated. ``generation``
    grows by one with every write. The replica count is ``num_replicas`` alone:
    ``options`` hold every other option (a goal written with the count in its options
    too, as earlier versions wrote it, reads the same).
    """

    name: str
    generation: int
    version: str
    spec_hash: str
    num_replicas: int
    options: dict[str, Any]
    code_sha: str
    init_sha: str
    kind: str = "class"                 # "class" or "function"
    deleting: bool = False
    created_at: float = 0.0
    user_version: Optional[str] = None  # the version the user set, None if generated
    restart_nonce: str = ""             # changed by `taskserve restart`: same version, new processes
    has_reconfigure: bool = False       # the class defines reconfigure(self, config)
    canary: Optional[Canary] = None     # a new version beside this one (SPEC §9)
    user_config_signature: str = ""     # of options["user_config"], for code_sha (taskserve.signing)
    signature: str = ""                 # of the whole goal but its generation and time (taskserve.signing)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", without_count(self.options))
        if isinstance(self.canary, dict):   # read from JSON, or a goal of the history
            object.__setattr__(self, "canary", Canary(**known_fields(Canary, self.canary)))

    def blob_shas(self) -> set[str]:
        """The uploaded blobs this goal needs: its code and its working_dir package (its
        canary's too)."""
        shas = {self.code_sha}
        for options in (self.options, self.canary.options if self.canary else {}):
            package = package_sha(options.get("runtime_env"))
            if package:
                shas.add(package)
        if self.canary:
            shas.add(self.canary.code_sha)
        return shas

    def canary_goal(self) -> Optional["Goal"]:
        """The goal of the canary's replicas (``None`` without a canary): its version and
        options, ``Canary.replica_count`` replicas.

        >>> goal = Goal(name="m", generation=3, version="1", spec_hash="s1", num_replicas=10, options={},
        ...             code_sha="c1", init_sha="i1",
        ...             canary={"version": "2", "spec_hash": "s2", "code_sha": "c2", "init_sha": "i2",
        ...                     "options": {"num_cpus": 1}, "traffic_percent": 25})
        >>> canary = goal.canary_goal()
        >>> canary.version, canary.num_replicas, canary.spec_hash
        ('2', 3, 's2')
        """
        canary = self.canary
        if canary is None:
            return None
        count = canary.replica_count(self.num_replicas)
        return Goal(name=self.name, generation=self.generation, version=canary.version, spec_hash=canary.spec_hash,
                    num_replicas=count, options=canary.options,
                    code_sha=canary.code_sha, init_sha=canary.init_sha, kind=canary.kind,
                    created_at=self.created_at, user_version=canary.version, has_reconfigure=canary.has_reconfigure,
                    user_config_signature=canary.user_config_signature)

    @property
    def user_config_hash(self) -> str:
        """Identifies the goal's ``user_config``; replicas report the one they run."""
        return config_hash(self.options.get("user_config"))

    @property
    def replica_spec(self) -> str:
        """What a replica of this goal runs; replicas with another value are outdated."""
        return f"{self.spec_hash}.{self.restart_nonce}" if self.restart_nonce else self.spec_hash

    @property
    def resources(self) -> Resources:
        return Resources(
            float(self.options.get("num_cpus") or 0),
            float(self.options.get("num_gpus") or 0),
            int(self.options.get("memory") or 0),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Goal":
        """Read a goal; fields this version does not know are left out.

        >>> goal = Goal.from_json('{"name": "echo", "generation": 1, "version": "v1", "spec_hash": "s",'
        ...                       ' "num_replicas": 1, "options": {}, "code_sha": "c", "init_sha": "i",'
        ...                       ' "priority": 5}')
        >>> goal.name, goal.generation
        ('echo', 1)
        """
        return cls(**known_fields(cls, json.loads(text)))


@dataclass(frozen=True)
class Replica:
    """One replica as Redis knows it.

    The controller writes ``desired`` ("run" or "stop") and the placement; the node
    agent and the replica process write ``state``, ``pid`` and ``message``.
    """

    replica_id: str
    deployment: str
    spec_hash: str
    version: str
    node_id: str = ""                    # "" while PENDING placement
    state: ReplicaState = ReplicaState.PENDING
    desired: str = "run"
    pid: Optional[int] = None
    message: str = ""
    failure: str = ""                    # "start" (constructor raised) or "crash"
    created_at: float = 0.0
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    memory: int = 0
    unhealthy: bool = False              # check_health() failed 3 times in a row
    user_config: str = "null"            # JSON of the user_config the replica should run
    config_hash: str = ""                # hash of that user_config (written by the controller)
    user_config_signature: str = ""      # the client's signature of it (checked by the replica)
    applied_config_hash: str = ""        # the one reconfigure() last accepted (written by the replica)
    config_error: str = ""               # traceback of reconfigure() rejecting config_hash
    gpu_ids: str = ""                    # "0,1": the node's GPUs this replica holds
    code_sha: str = ""                   # what the process loads (see taskserve.code)
    config: str = "{}"                   # JSON: the goal options the process needs
    canary: bool = False                 # runs the goal's canary, from the canary queue
    in_flight: int = 0                   # requests it holds, as it last reported (written by the replica)

    @property
    def is_available(self) -> bool:
        return (
            self.state == ReplicaState.RUNNING
            and self.desired == "run"
            and not self.unhealthy
            and self.applied_config_hash == self.config_hash
        )

    @property
    def is_gone(self) -> bool:
        return self.state in (ReplicaState.STOPPED, ReplicaState.FAILED)

    @property
    def resources(self) -> Resources:
        return Resources(self.num_cpus, self.num_gpus, self.memory)

    @property
    def gpu_id_list(self) -> list[int]:
        return [int(gpu_id) for gpu_id in self.gpu_ids.split(",") if gpu_id]

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields of this record."""
        fields = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, bool):
                value = "1" if value else ""
            fields[item.name] = "" if value is None else str(value)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Replica":
        """Read a replica hash; fields this version does not know are left out.

        >>> Replica.from_fields({"replica_id": "echo-1", "deployment": "echo", "zone": "a"}).state
        <ReplicaState.PENDING: 'PENDING'>

        A field that cannot be what it says raises :class:`RecordError`, naming it:

        >>> Replica.from_fields({"replica_id": "echo-1", "deployment": "echo", "pid": "abc"})
        Traceback (most recent call last):
        ...
        taskserve.state.RecordError: pid is not a number: 'abc'
        """
        for key in ("replica_id", "deployment"):
            if not fields.get(key):
                raise RecordError(f"it has no {key}")
        state = fields.get("state") or "PENDING"
        if state not in ReplicaState.__members__:
            raise RecordError(f"state is not a replica state: {state!r}")
        return cls(
            replica_id=fields["replica_id"],
            deployment=fields["deployment"],
            spec_hash=fields.get("spec_hash", ""),
            version=fields.get("version", ""),
            node_id=fields.get("node_id", ""),
            state=ReplicaState(state),
            desired=fields.get("desired") or "run",
            pid=_number(fields, "pid", int, None),
            message=fields.get("message", ""),
            failure=fields.get("failure", ""),
            created_at=_number(fields, "created_at", float, 0.0),
            num_cpus=_number(fields, "num_cpus", float, 0.0),
            num_gpus=_number(fields, "num_gpus", float, 0.0),
            memory=_number(fields, "memory", int, 0),
            unhealthy=fields.get("unhealthy") == "1",
            user_config=fields.get("user_config") or "null",
            config_hash=fields.get("config_hash", ""),
            user_config_signature=fields.get("user_config_signature", ""),
            applied_config_hash=fields.get("applied_config_hash", ""),
            config_error=fields.get("config_error", ""),
            gpu_ids=fields.get("gpu_ids", ""),
            code_sha=fields.get("code_sha", ""),
            config=fields.get("config") or "{}",
            canary=fields.get("canary") == "1",
            in_flight=_number(fields, "in_flight", int, 0),
        )


class RecordError(ValueError):
    """A record read from Redis holds a field that cannot be what it says (one line naming it)."""


def _number(fields: dict[str, str], key: str, convert: Any, default: Any) -> Any:
    """``convert(fields[key])``, ``default`` when it is missing or empty, else :class:`RecordError`.

    >>> _number({"memory": "1024"}, "memory", int, 0), _number({}, "memory", int, 0)
    (1024, 0)
    """
    text = fields.get(key)
    if not text:
        return default
    try:
        value = convert(text)
    except ValueError:
        raise RecordError(f"{key} is not a number: {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f"{key} is not a finite number: {text!r}")
    return value


@dataclass(frozen=True)
class Node:
    """A node agent's machine: what it offers and whether it heartbeats."""

    node_id: str
    total: Resources
    labels: dict[str, str] = field(default_factory=dict)
    alive: bool = True
    hostname: str = ""
    agent_pid: Optional[int] = None
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S   # without a heartbeat for this long, it looks dead
    log_dir: str = ""                   # where the agent writes <replica_id>.log, on ``hostname``

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, alive: bool = True) -> "Node":
        """Read a node record (``alive`` is not in it); unknown fields are left out.

        >>> Node.from_json('{"node_id": "a", "total": {"num_cpus": 2, "num_tpus": 1}, "rack": "r1"}').total
        Resources(num_cpus=2, num_gpus=0.0, memory=0)
        """
        data = known_fields(cls, json.loads(text))
        data["total"] = Resources(**known_fields(Resources, data.get("total") or {}))
        data["alive"] = alive
        return cls(**data)


@dataclass(frozen=True)
class DeploymentHealth:
    """What the controller last concluded about a deployment."""

    status: DeploymentState = DeploymentState.UPDATING
    message: str = ""
    observed_generation: int = 0
    failed_starts: int = 0
    last_error: str = ""
    last_failure_at: float = 0.0
    outcome_generation: int = 0         # the generation whose outcome `outcome` is
    outcome: str = ""                   # "", "done" or "failed"

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> "DeploymentHealth":
        """Read the controller's conclusion; unknown fields (and statuses) are left out.

        >>> DeploymentHealth.from_json('{"status": "HEALTHY", "message": "", "zone": "a"}').status
        <DeploymentState.HEALTHY: 'HEALTHY'>
        >>> DeploymentHealth.from_json('{"status": "PAUSED"}').status
        <DeploymentState.UPDATING: 'UPDATING'>
        """
        data = known_fields(cls, json.loads(text))
        try:
            data["status"] = DeploymentState(data.get("status") or DeploymentState.UPDATING.value)
        except ValueError:
            data["status"] = DeploymentState.UPDATING
        return cls(**data)


@dataclass(frozen=True)
class AutoscaleState:
    """What the controller decided for an autoscaled deployment (its ``scale`` key in Redis).

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
    def from_json(cls, text: str | bytes) -> "AutoscaleState":
        """Read a state; raises ``ValueError`` (or ``TypeError``) for one that is not a state."""
        data = json.loads(text)
        if not isinstance(data, dict) or isinstance(data.get("target"), bool) or \
                not isinstance(data.get("target"), int) or data["target"] < 0:
            raise ValueError(f"not an autoscaling state: {_shortened(text)}")
        return cls(
            target=data["target"],
            reason=str(data.get("reason") or ""),
            waiting=int(data.get("waiting") or 0),
            serving=int(data.get("serving") or 0),
            at=float(data.get("at") or 0.0),
            changed_at=float(data.get("changed_at") or 0.0),
        )


def _shortened(value: str | bytes, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
