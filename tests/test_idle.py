"""An idle replica's consumer: a long BRPOP that a drain does not wait out, and loses nothing.

Replicas block on their queue for ``BRPOP_TIMEOUT_S`` (10 s) at a time, so an idle one
wakes rarely; closing the consumer (a drain) ends that wait with ``CLIENT UNBLOCK``.
These tests use the replica's own transport against the shared cluster's real Redis.
"""

from __future__ import annotations

import time

import kombu
import pytest

from taskserve.node.replica import BRPOP_TIMEOUT_S, ReplicaTransport

from .helpers import Cluster


def blocked_brpops(connection: kombu.Connection) -> int:
    """How many clients of this Redis are blocked in a BRPOP now."""
    client = connection.default_channel.Client(connection_pool=connection.default_channel.pool)
    return sum(1 for entry in client.client_list() if entry.get("cmd") == "brpop" and "b" in entry.get("flags", ""))


def test_closing_an_idle_consumer_ends_its_brpop_without_waiting_it_out(connected: Cluster,
                                                                       unique_name: str) -> None:
    with kombu.Connection(connected.url, transport=ReplicaTransport) as observer:
        consumer = kombu.Connection(connected.url, transport=ReplicaTransport)
        queue = consumer.SimpleQueue(unique_name)
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.2)              # leaves its BRPOP waiting in Redis
        assert blocked_brpops(observer) >= 1
        started = time.monotonic()
        queue.close()
        consumer.close()
        # Waiting out the BRPOP would take up to BRPOP_TIMEOUT_S; the unblock takes a round trip.
        assert time.monotonic() - started < BRPOP_TIMEOUT_S / 2
        assert blocked_brpops(observer) == 0


def test_a_message_taken_by_the_brpop_a_drain_ends_goes_back_to_the_queue(connected: Cluster,
                                                                          unique_name: str) -> None:
    consumer = kombu.Connection(connected.url, transport=ReplicaTransport)
    queue = consumer.SimpleQueue(unique_name)
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.2)                  # its BRPOP now waits in Redis
    with kombu.Connection(connected.url) as producer:
        producer.SimpleQueue(unique_name).put({"n": 1})   # popped by that BRPOP at once
    queue.close()
    consumer.close()                            # read, never acknowledged: restored
    with kombu.Connection(connected.url) as reader:
        again = reader.SimpleQueue(unique_name)
        message = again.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        again.close()
