"""Nodes: each agent's record, and its claim on the node id, kept alive by heartbeats.

A node is alive while its ``node-alive`` key exists; the agent that holds it (its
:class:`NodeClaim`) extends it, and no second agent takes a node id a live one holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Union

from ..state import Node
from .base import as_text, describe_error
from .events import Events


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
        text = as_text(text) or ""
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


class Nodes(Events):
    """The nodes part of :class:`taskserve.store.Store`."""

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
            holder = self._scripts.claim_node(
                keys=[self.node_alive_key(node.node_id), self.NODES_KEY],
                args=[claim.text, ttl_ms, node.node_id, replacing.text if replacing else "", node.to_json()],
            )
            if as_text(holder) != claim.text:
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
        result = self._scripts.heartbeat_node(keys=[self.node_alive_key(node_id)], args=[claim.text, ttl_ms])
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
        self._scripts.unregister_node(keys=[self.node_alive_key(node_id), self.NODES_KEY],
                                      args=[claim.text if claim else "", node_id])
        self.notify(f"node:{node_id}")

    def list_nodes(self) -> list[Node]:
        """Every node record, sorted by id, with whether it is alive; a record that
        cannot be read is left out (and logged once)."""
        records = self.redis.hgetall(self.NODES_KEY)
        if not records:
            return []
        ids = sorted(as_text(k) for k in records)
        alive = self.redis.mget([self.node_alive_key(i) for i in ids])
        nodes = []
        for node_id, flag in zip(ids, alive, strict=True):
            try:
                nodes.append(Node.from_json(records[node_id.encode()], alive=flag is not None))
            except Exception as error:
                self.report_unreadable(f"the record of node {node_id}", describe_error(error))
        return nodes
