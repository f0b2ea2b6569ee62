"""The node agent's pure plan: from its records and its processes, decide what to do.

:func:`plan_node` does no I/O. Every rule by which a node agent keeps its replica
processes matching their records lives here, so it can be read in one place and
tested with plain tables; :class:`taskserve.node.agent.NodeAgent` gathers the
inputs and carries the actions out.

- a record that should run, is ``PENDING`` and has no process gets one (:class:`Spawn`),
  unless its replica id is not one taskserve writes (:func:`~taskserve.state.check_id`:
  it becomes file names) or its deployment name is invalid: then it is ``FAILED``
  with failure "start", and nothing is created for it;
- a record that should run and is recorded as alive (``STARTING``, ``RUNNING``,
  ``RECONFIGURING``, ``DRAINING``) but has no process is ``STOPPED``
  ("process not found on its node");
- a record asked to stop that has a process is drained: SIGTERM once (and the
  record ``DRAINING``), SIGKILL once its graceful timeout is over;
- a record asked to stop that has no process and is not gone is ``STOPPED``;
- a process whose record is gone (the controller forgot it) is drained too;
- a process that exited is forgotten (:class:`Reap`); the requests it held go back
  on their queue (:class:`Restore`, always: a replica killed or crashing while it
  drained must not lose its request); its record becomes ``STOPPED`` if it was
  drained, ``FAILED`` with failure "start" if it never served (it exited with
  :data:`~taskserve.node.protocol.EXIT_CONSTRUCTOR_FAILED`, or while ``PENDING`` or
  ``STARTING``), and ``FAILED`` with failure "crash" otherwise.

Example::

    >>> record = Replica(replica_id="echo-1", deployment="echo", spec_hash="s", version="v1",
    ...                  node_id="node-a", state=ReplicaState.PENDING)
    >>> plan_node([record], [], now=0.0)
    [Spawn(replica_id='echo-1')]
    >>> [type(action).__name__ for action in plan_node([record], [ProcessView("echo-1", exit_code=1)], now=0.0)]
    ['Restore', 'Mark', 'Reap']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional, Union

from ..spec import check_name
from ..state import Replica, ReplicaState, check_id
from .protocol import EXIT_CONSTRUCTOR_FAILED

PROCESS_NOT_FOUND = "process not found on its node"
AGENT_RESTARTED = "its node agent restarted; the process is gone"

# Recorded as alive: a record in one of these states needs a process.
ALIVE_STATES = (ReplicaState.STARTING, ReplicaState.RUNNING, ReplicaState.RECONFIGURING, ReplicaState.DRAINING)
# A process that exits in one of these states never served: a failed start.
STARTING_STATES = (ReplicaState.PENDING, ReplicaState.STARTING)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ProcessView:
    """What the agent knows of one replica process it started, as plain data.

    ``exit_code`` is None while the process runs; ``drain_deadline`` is set once it
    was sent SIGTERM (the time after which it gets SIGKILL), ``killed`` once it was
    sent SIGKILL.

    >>> ProcessView("echo-1").exited, ProcessView("echo-1", exit_code=0, drain_deadline=5.0).draining
    (False, True)
    """

    replica_id: str
    exit_code: Optional[int] = None
    drain_deadline: Optional[float] = None
    killed: bool = False
    graceful_timeout_s: float = 20.0

    @property
    def exited(self) -> bool:
        return self.exit_code is not None

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Spawn:
    """Start the replica's process (``STARTING``), unless its runtime env still builds."""

    replica_id: str


@dataclass(frozen=True)
class Signal:
    """Send the process SIGTERM (``kind="term"``: it drains) or SIGKILL (``"kill"``).

    ``drain_deadline`` is the time after which a draining process gets SIGKILL: the
    agent remembers it with the SIGTERM.
    """

    replica_id: str
    kind: Literal["term", "kill"]
    drain_deadline: float


@dataclass(frozen=True)
class Mark:
    """Write the replica's record: its ``state``, and ``failure`` and ``message``
    unless they are None (left as they are).

    With ``message_from_log`` the message is filled in by the agent: the one the
    replica wrote to its record, else the tail of its log.

    >>> Mark("echo-1", ReplicaState.STOPPED, message="").fields()
    {'state': <ReplicaState.STOPPED: 'STOPPED'>, 'message': ''}
    """

    replica_id: str
    state: ReplicaState
    failure: Optional[str] = None
    message: Optional[str] = None
    message_from_log: bool = False

    def fields(self) -> dict[str, object]:
        """The record fields to write (the message from the log excepted)."""
        fields: dict[str, object] = {"state": self.state}
        if self.failure is not None:
            fields["failure"] = self.failure
        if self.message is not None:
            fields["message"] = self.message
        return fields


@dataclass(frozen=True)
class Restore:
    """Put the requests a dead replica process held back on their queue."""

    replica_id: str


@dataclass(frozen=True)
class Reap:
    """Forget an exited process: close its log, remove its in-flight file."""

    replica_id: str


NodeAction = Union[Spawn, Signal, Mark, Restore, Reap]


# --------------------------------------------------------------------------- the node id


def heartbeat_interval(ttl_s: float) -> float:
    """How often an agent renews its node's liveness: a quarter of the TTL, at most 1 s.

    >>> heartbeat_interval(10.0), heartbeat_interval(2.0)
    (1.0, 0.5)
    """
    return min(1.0, ttl_s / 4)


def claim_verdict(same_host: bool, pid_running: Optional[bool]) -> Literal["refuse", "replace", "wait"]:
    """What a starting agent does about another agent's claim on its node id.

    ``same_host``: the claim names this host (and a pid); ``pid_running``: whether
    that pid still runs an agent here (None when it cannot be known: another host).

    - its process runs here: "refuse" at once, the node has a live agent;
    - its process is gone from here: "replace" the claim at once (that agent died);
    - another host: "wait" for the claim to expire, refusing if it is renewed.

    >>> claim_verdict(True, True), claim_verdict(True, False), claim_verdict(False, None)
    ('refuse', 'replace', 'wait')
    """
    if same_host and pid_running is not None:
        return "refuse" if pid_running else "replace"
    return "wait"


def renewed(pttl_ms: int, later_pttl_ms: int, elapsed_s: float) -> bool:
    """Whether a key's remaining TTL went up between two reads ``elapsed_s`` apart:
    someone renewed it (a live agent heartbeats). A TTL that only ran down did not.

    >>> renewed(1500, 1450, 0.05), renewed(1500, 1990, 0.05), renewed(1500, 0, 0.05)
    (False, True, False)
    """
    return later_pttl_ms > pttl_ms - elapsed_s * 1000 + 20


# --------------------------------------------------------------------------- plan


def plan_node(
    records: Union[Mapping[str, Replica], Iterable[Replica]],
    processes: Union[Mapping[str, ProcessView], Iterable[ProcessView]],
    now: float,
) -> list[NodeAction]:
    """Decide the next actions of a node agent.

    ``records`` are the records of the replicas assigned to this node, ``processes``
    the processes the agent started and has not reaped yet (see :class:`ProcessView`),
    ``now`` the clock the drain deadlines count in. The actions come replica by
    replica in the order of their ids; for an exited process they are
    :class:`Restore`, then :class:`Mark`, then :class:`Reap`, so that the record is
    written before the process is forgotten.

    >>> stop = Replica(replica_id="echo-1", deployment="echo", spec_hash="s", version="v1",
    ...                node_id="node-a", state=ReplicaState.RUNNING, desired="stop")
    >>> term, mark = plan_node([stop], [ProcessView("echo-1", graceful_timeout_s=20.0)], now=100.0)
    >>> term, mark.state.value
    (Signal(replica_id='echo-1', kind='term', drain_deadline=120.0), 'DRAINING')
    >>> plan_node([stop], [ProcessView("echo-1", drain_deadline=120.0)], now=120.0)
    [Signal(replica_id='echo-1', kind='kill', drain_deadline=120.0)]
    """
    by_record = _by_id(records)
    by_process = _by_id(processes)
    actions: list[NodeAction] = []
    for replica_id in sorted(by_record.keys() | by_process.keys()):
        record = by_record.get(replica_id)
        process = by_process.get(replica_id)
        if process is None:
            actions += _without_process(record)
        elif process.exited:
            actions += _exited(process, record)
        elif record is None or record.desired != "run":
            actions += _drain(process, record, now)
    return actions


def adopt(
    records: Union[Mapping[str, Replica], Iterable[Replica]],
    processes: Union[Mapping[str, ProcessView], Iterable[ProcessView]] = (),
) -> list[Mark]:
    """What a node agent that (re)starts does with the records naming its node.

    A record that is not gone but has no process (an earlier agent started it, and
    its process went with that agent) is ``STOPPED``, so the controller replaces it.

    >>> old = Replica(replica_id="echo-1", deployment="echo", spec_hash="s", version="v1",
    ...               node_id="node-a", state=ReplicaState.RUNNING)
    >>> [(mark.replica_id, mark.state.value, mark.message) for mark in adopt([old])]
    [('echo-1', 'STOPPED', 'its node agent restarted; the process is gone')]
    """
    by_process = _by_id(processes)
    by_record = _by_id(records)
    return [
        Mark(replica_id, ReplicaState.STOPPED, message=AGENT_RESTARTED)
        for replica_id, record in sorted(by_record.items())
        if not record.is_gone and replica_id not in by_process
    ]


# --------------------------------------------------------------------------- rules


def record_problem(record: Replica) -> Optional[str]:
    """Why a replica record cannot be started (None: it can), for what it names that
    becomes a path or a process: its id and its deployment's name.

    >>> record_problem(Replica(replica_id="../../outside/escaped", deployment="echo", spec_hash="s", version="1"))
    "invalid replica id '../../outside/escaped': an id is 1 to 128 letters, digits, '_', '-', '.' or '#', not starting with '.' or '-'; a record under it was not written by taskserve"
    """
    try:
        check_id(record.replica_id)
        check_name(record.deployment)
    except ValueError as error:
        return str(error)
    return None


def _without_process(record: Optional[Replica]) -> list[NodeAction]:
    if record is None:
        return []
    if record.desired == "run":
        if record.state == ReplicaState.PENDING:
            problem = record_problem(record)
            if problem is not None:
                return [Mark(record.replica_id, ReplicaState.FAILED, failure="start", message=problem)]
            return [Spawn(record.replica_id)]
        if record.state in ALIVE_STATES:
            return [Mark(record.replica_id, ReplicaState.STOPPED, message=PROCESS_NOT_FOUND)]
        return []
    if not record.is_gone:
        return [Mark(record.replica_id, ReplicaState.STOPPED)]
    return []


def _drain(process: ProcessView, record: Optional[Replica], now: float) -> list[NodeAction]:
    if process.drain_deadline is None:
        actions: list[NodeAction] = [Signal(process.replica_id, "term", now + process.graceful_timeout_s)]
        if record is not None and record.state != ReplicaState.DRAINING:
            actions.append(Mark(process.replica_id, ReplicaState.DRAINING))
        return actions
    if now >= process.drain_deadline and not process.killed:
        return [Signal(process.replica_id, "kill", process.drain_deadline)]
    return []


def _exited(process: ProcessView, record: Optional[Replica]) -> list[NodeAction]:
    # Restored whatever the exit: a drained process that exited cleanly holds
    # nothing, one killed or crashing while it drained held a request to serve.
    actions: list[NodeAction] = [Restore(process.replica_id)]
    if record is not None:
        actions.append(_exit_mark(process, record))
    actions.append(Reap(process.replica_id))
    return actions


def _exit_mark(process: ProcessView, record: Replica) -> Mark:
    if process.draining:
        return Mark(process.replica_id, ReplicaState.STOPPED, failure="", message="")
    if process.exit_code == EXIT_CONSTRUCTOR_FAILED or record.state in STARTING_STATES:
        # It never served: a failed start, whether its constructor raised or not.
        return Mark(process.replica_id, ReplicaState.FAILED, failure="start", message_from_log=True)
    return Mark(process.replica_id, ReplicaState.FAILED, failure="crash",
                message=f"replica process exited with code {process.exit_code}")


def _by_id(items: Union[Mapping[str, object], Iterable[object]]) -> dict:
    if isinstance(items, Mapping):
        return {item.replica_id: item for item in items.values()}
    return {item.replica_id: item for item in items}
