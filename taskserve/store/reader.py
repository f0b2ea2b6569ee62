"""Reading every deployment at once, re-reading only those that changed (the
controller's pass, the gateway's routes and metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from ..state import DeploymentHealth, Goal, Replica
from .base import as_text, decode_hash, describe_error

if TYPE_CHECKING:
    from . import Store


@dataclass(frozen=True)
class DeploymentRecords:
    """One deployment as :class:`ClusterReader` read it: its goal, health and replicas at
    ``revision``, and why part of it cannot be read (``error``, "" when all of it can).

    ``goal`` is None when it cannot be read; replicas whose records cannot be read are
    left out (then ``error`` names the first, and ``unreadable_replicas`` holds each one's
    id and why). ``nodes`` are the nodes its replicas that are not gone are placed on.
    """

    name: str
    revision: int
    goal: Optional[Goal]
    health: DeploymentHealth
    replicas: tuple[Replica, ...]
    error: str = ""
    nodes: frozenset[str] = frozenset()
    unreadable_replicas: tuple[tuple[str, str], ...] = ()


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
    >>> from taskserve.store import Store
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
        names = sorted(as_text(n) for n in members)
        revisions = {as_text(k): int(v) for k, v in revision_rows.items()}
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
        ids = {name: sorted(as_text(i) for i in rows[step * index + 2]) if self.with_replicas else []
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
                    errors.append(f"its goal cannot be read: {describe_error(error)}")
            try:
                health = DeploymentHealth.from_json(health_text) if health_text else DeploymentHealth()
            except Exception as error:
                health = DeploymentHealth()
                errors.append(f"its health cannot be read: {describe_error(error)}")
            replicas = []
            unreadable = []
            for replica_id in ids[name]:
                row = next(hashes)
                if not row:
                    continue     # forgotten since its set was read
                try:
                    replicas.append(Replica.from_fields(decode_hash(row)))
                except Exception as error:
                    unreadable.append((replica_id, describe_error(error)))
                    errors.append(f"the record of replica {replica_id} cannot be read: {describe_error(error)}")
            records[name] = DeploymentRecords(
                name=name, revision=revisions.get(name, 0), goal=goal, health=health, replicas=tuple(replicas),
                error=errors[0] if errors else "",
                nodes=frozenset(r.node_id for r in replicas if r.node_id and not r.is_gone),
                unreadable_replicas=tuple(unreadable))
        return records
