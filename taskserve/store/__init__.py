"""Every Redis key taskserve uses, and every atomic change to them.

No module outside this package spells a key name. :class:`Store` is the typed access
to the cluster state in one Redis database, made of one part per concern:

=================  ==========================================================================
module             what it holds
=================  ==========================================================================
``keys``           every key name and prefix, with the table of the keys: type, who writes
                   them, who reads them, when they expire
``goals``          goals (every goal change is ``update_goal``), code blobs, history, health
``replicas``       replica records: made, placed, updated, forgotten; ``snapshot``
``nodes``          node records and the agents' claims on them (``NodeClaim``, ``NodeTaken``)
``lease``          the controller's lease; ``base`` its fence (``LeaseLost``)
``queues``         the deployments' queues: waiting and served requests (the autoscaler's
                   load), canary queues emptied, redeliveries
``autoscale``      the controller's autoscaling decisions (``AutoscaleState``)
``jobs``           jobs: records, the sets of each state, idempotency keys, delayed messages
``stats``          what the replicas served, per version (the canary's error rates)
``events``         change notifications (``notify``, ``subscribe``, ``wait_for_events``)
``reader``         ``ClusterReader``: every deployment, re-reading only what changed
``lua``            the Lua scripts of ``scripts/*.lua``, read once and registered per client
=================  ==========================================================================

Example::

    >>> import fakeredis
    >>> store = Store(fakeredis.FakeRedis())
    >>> store.list_goals()
    []
"""

from __future__ import annotations

from .autoscale import AUTOSCALE_ACTION, AUTOSCALE_HISTORY_LIMIT, Autoscale, AutoscaleState
from .base import LeaseLost
from .events import wait_for_events
from .goals import HISTORY_LIMIT, GoalChange, Goals
from .jobs import Jobs, JobSummary, Started, Submitted
from .keys import (
    CANARY_QUEUE_SUFFIX,
    EVENTS_CHANNEL,
    KEY_PATTERN,
    PREFIX,
    QUEUE_PREFIX,
    RESULT_KEY_PREFIX,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    canary_queue_name,
    queue_list,
    queue_lists,
    queue_name,
    replica_queue,
    result_key,
    result_key_pattern,
)
from .lease import Lease
from .nodes import NodeClaim, Nodes, NodeTaken
from .queues import Queues, unacked_routing_key
from .reader import ClusterReader, DeploymentRecords
from .replicas import Replicas
from .stats import Stats

__all__ = [
    "AUTOSCALE_ACTION", "AUTOSCALE_HISTORY_LIMIT", "CANARY_QUEUE_SUFFIX", "EVENTS_CHANNEL", "HISTORY_LIMIT",
    "KEY_PATTERN", "PREFIX", "QUEUE_PREFIX", "RESULT_KEY_PREFIX", "UNACKED_INDEX_KEY", "UNACKED_KEY",
    "AutoscaleState", "ClusterReader", "DeploymentRecords", "GoalChange", "JobSummary", "LeaseLost", "NodeClaim", "NodeTaken",
    "Started", "Store", "Submitted", "canary_queue_name", "queue_list", "queue_lists", "queue_name", "replica_queue", "result_key",
    "result_key_pattern", "unacked_routing_key", "wait_for_events",
]


class Store(Goals, Replicas, Nodes, Lease, Queues, Jobs, Autoscale, Stats):
    """Typed access to the cluster state in one Redis database (see the module's table
    for which part does what)."""
