"""The private names of kombu and Celery that the replica relies on still exist.

The replica subclasses kombu's Redis transport and Celery's consumer where their public
API does not reach (docs/architecture.md lists why each is used). pyproject.toml bounds
both packages to the versions tested; this test fails with a clear message, naming the
name and the version, the day an upgrade removes one of them.
"""

from __future__ import annotations

import inspect

import celery
import kombu
import pytest
from celery.concurrency.solo import TaskPool
from celery.worker.consumer import Consumer
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

# (owner, attribute, what taskserve uses it for)
PRIVATE_NAMES = [
    (kombu_redis.Channel, "_brpop_start", "remember the BRPOP connection's client id (a drain ends its wait)"),
    (kombu_redis.Channel, "_brpop_read", "drop a queue item that is not JSON instead of stopping the worker"),
    (kombu_redis.Channel, "_in_poll", "know whether a BRPOP is under way when the channel closes"),
    (kombu_redis.Channel, "_queue_cycle", "take the active queues' lists in taskserve's priority order"),
    (kombu_redis.Channel, "_brpop_sent_at", "the same (kombu notes when its BRPOP went out)"),
    (kombu_redis.Channel, "_create_client", "keep one Redis client per connection pool"),
    (kombu_redis.Channel, "conn_or_acquire", "the client an answer's transaction runs on"),
    (kombu_redis.Channel, "_do_restore_message", "put a message back on its queue (the node agent)"),
    (kombu_redis.Transport, "_deliver", "drop a message that is not an envelope"),
    (kombu_redis.MultiChannelPoller, "maybe_refresh_binding_expiry", "check expiring bindings every 10 s, not 1 s"),
    (kombu_redis.QoS, "_remove_from_indices", "acknowledge a message in the answer's transaction"),
    (kombu_redis.QoS, "restore_by_tag", "put back what a dead replica held (the node agent)"),
    (kombu_redis.QoS, "pipe_or_acquire", "record a batch's message and its queue length in one round trip"),
    (kombu_redis.QoS, "unacked_key", "read what a dead replica held (the node agent)"),
    (kombu_redis.QoS, "unacked_index_key", "record a message as taken (the batch server)"),
    (virtual.QoS, "ack", "acknowledge in memory what the answer's transaction acknowledged in Redis"),
    (virtual.Message, "_raw", "the message as kombu stores it in its unacknowledged hash"),
    (Hub, "_create_waker", "wake the worker's loop from a signal handler and from other threads"),
    (Timer, "max_interval", "let an idle worker's loop sleep 10 s"),
    (Consumer, "create_task_handler", "hand every message to taskserve's server"),
    (Consumer, "_update_prefetch_count", "keep the prefetch at max_ongoing_requests"),
    (Consumer, "initial_prefetch_count", "the prefetch: max_ongoing_requests"),
    (TaskPool, "on_stop", "wait for the calls in hand before the worker closes its connection"),
]


@pytest.mark.parametrize("owner, name, why", PRIVATE_NAMES, ids=[f"{o.__name__}.{n}" for o, n, _ in PRIVATE_NAMES])
def test_a_private_name_the_replica_relies_on_still_exists(owner, name, why):
    assert exists(owner, name), (
        f"{owner.__module__}.{owner.__qualname__}.{name} is gone in kombu {kombu.__version__} / celery "
        f"{celery.__version__}; taskserve uses it to {why}. Pin the versions in pyproject.toml back, or "
        "adapt taskserve/node/transport.py (docs/architecture.md lists every such name)")


def test_a_name_that_is_gone_is_noticed():
    assert not exists(kombu_redis.Channel, "_brpop_start_renamed")


def exists(owner: type, name: str) -> bool:
    """Whether ``owner`` has ``name``: as a class attribute, or as one its ``__init__`` sets."""
    return hasattr(owner, name) or name in inspect.signature(owner.__init__).parameters \
        or _set_in_init(owner, name)


def _set_in_init(owner: type, name: str) -> bool:
    """Whether ``owner.__init__`` assigns ``self.<name>`` (an instance attribute)."""
    try:
        return f"self.{name} =" in inspect.getsource(owner.__init__)
    except (OSError, TypeError):
        return False
