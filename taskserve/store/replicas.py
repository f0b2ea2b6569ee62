"""Replica records: made, placed, stopped and forgotten by the controller (fenced by its
lease), their state written by agents and replicas, read by everyone.

Each write is one Lua script that also moves the deployment's revision (see
``scripts/bump.lua``), so :class:`taskserve.store.ClusterReader` sees it.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..state import DeploymentHealth, Goal, Replica
from .base import StoreBase, as_text, decode_hash, describe_error


class Replicas(StoreBase):
    """The replicas part of :class:`taskserve.store.Store`."""

    def create_replica(self, replica: Replica, fence: Optional[str] = None) -> None:
        keys = [self.replica_key(replica.replica_id), self.replicas_key(replica.deployment),
                self.REVISIONS_KEY, self.REVISION_KEY]
        if replica.node_id:
            keys.append(self.node_replicas_key(replica.node_id))
        args = [replica.replica_id, replica.deployment]
        for name, value in replica.to_fields().items():
            args += [name, value]
        self._fenced(self._scripts.create_replica, keys, args, fence)

    def place_replica(self, replica_id: str, node_id: str, gpu_ids: str = "", fence: Optional[str] = None) -> bool:
        """Assign a replica to a node (if its record still exists); True if it did."""
        keys = [self.replica_key(replica_id), self.node_replicas_key(node_id), self.REVISIONS_KEY, self.REVISION_KEY]
        return bool(self._fenced(self._scripts.place_replica, keys, [replica_id, node_id, gpu_ids], fence))

    def update_replica(self, replica_id: str, fence: Optional[str] = None, **fields: object) -> bool:
        """Set some fields of a replica record if it still exists; True if it did."""
        args: list[str] = []
        for name, value in fields.items():
            if isinstance(value, bool):
                value = "1" if value else ""
            args += [name, "" if value is None else str(getattr(value, "value", value))]
        keys = [self.replica_key(replica_id), self.REVISIONS_KEY, self.REVISION_KEY]
        return bool(self._fenced(self._scripts.update_replica, keys, args, fence))

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
        self._fenced(self._scripts.forget_replica, keys, [replica.replica_id, replica.deployment], fence)

    def get_replica(self, replica_id: str) -> Optional[Replica]:
        fields = self.redis.hgetall(self.replica_key(replica_id))
        return Replica.from_fields(decode_hash(fields)) if fields else None

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
                replicas.append(Replica.from_fields(decode_hash(row)))
            except Exception as error:
                if unreadable is None:
                    raise
                unreadable[replica_id] = describe_error(error)
        return replicas

    def replicas_of(self, name: str, unreadable: Optional[dict[str, str]] = None) -> list[Replica]:
        """The replicas of ``name``; with ``unreadable``, a record that cannot be read is
        left out and noted there (else it raises)."""
        return self._replicas_by_ids((as_text(i) for i in self.redis.smembers(self.replicas_key(name))), unreadable)

    def replica_ids_on_node(self, node_id: str) -> list[str]:
        """The ids of the replicas assigned to a node, whether their records exist or not."""
        return [as_text(i) for i in self.redis.smembers(self.node_replicas_key(node_id))]

    def replicas_on_node(self, node_id: str) -> list[Replica]:
        return self._replicas_by_ids(self.replica_ids_on_node(node_id))

    def all_replicas(self, unreadable: Optional[dict[str, str]] = None) -> list[Replica]:
        """The replicas of every deployment. A record that cannot be read raises, or
        with ``unreadable`` is left out and noted there by deployment name."""
        names = sorted(as_text(n) for n in self.redis.smembers(self.DEPLOYMENTS_KEY))
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(self.replicas_key(name))
            members = pipe.execute() if names else []
        owner = {as_text(replica_id): name for name, ids in zip(names, members, strict=True) for replica_id in ids}
        errors: Optional[dict[str, str]] = None if unreadable is None else {}
        replicas = self._replicas_by_ids(owner, errors)
        for replica_id, error in (errors or {}).items():
            unreadable[owner[replica_id]] = f"the record of replica {replica_id} cannot be read: {error}"
        return replicas

    def snapshot(self, name: str, unreadable: Optional[dict[str, str]] = None,
                 ) -> tuple[Optional[Goal], DeploymentHealth, list[Replica]]:
        """Goal, health and replicas of one deployment, read in one transaction. A
        replica record that cannot be read raises, or with ``unreadable`` is left out and
        its error noted there by replica id."""
        for _ in range(10):
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self.goal_key(name))
                pipe.get(self.health_key(name))
                pipe.smembers(self.replicas_key(name))
                goal_text, health_text, ids = pipe.execute()
            ids = sorted(as_text(i) for i in ids)
            # The records are read in a second transaction; re-read if the set moved.
            with self.redis.pipeline(transaction=True) as pipe:
                for replica_id in ids:
                    pipe.hgetall(self.replica_key(replica_id))
                pipe.smembers(self.replicas_key(name))
                *rows, ids_after = pipe.execute()
            if sorted(as_text(i) for i in ids_after) == ids:
                break
        goal = Goal.from_json(goal_text) if goal_text else None
        health = DeploymentHealth.from_json(health_text) if health_text else DeploymentHealth()
        replicas = []
        for replica_id, row in zip(ids, rows, strict=True):
            if not row:
                continue
            try:
                replicas.append(Replica.from_fields(decode_hash(row)))
            except Exception as error:
                if unreadable is None:
                    raise
                unreadable[replica_id] = describe_error(error)
        return goal, health, replicas
