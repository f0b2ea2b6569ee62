"""An idle replica sleeps, and a drain does not wait its sleep out.

Replicas block on their queue for ``BRPOP_TIMEOUT_S`` (10 s) at a time, so an idle one
wakes rarely; closing the consumer (a drain) ends that wait with ``CLIENT UNBLOCK``.
The worker's event loop polls for up to ``IDLE_WAKE_S`` (kombu's: 1 s); a stop signal
wakes it at once. These tests use the replica's own transport against the shared
cluster's real Redis, and a real replica.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import kombu
import psutil
import pytest
from kombu.asynchronous import Hub

import taskserve
from taskserve.connection import make_store
from taskserve.node.agent import IDLE_RESYNC_S
from taskserve.node.transport import BRPOP_TIMEOUT_S, IDLE_WAKE_S, ReplicaTransport, quiet_hub, wake_on_signal
from taskserve.store import wait_for_events

from .helpers import Cluster, replica_pids, wait_until


class Idle:
    def __call__(self, x):
        return x


def blocked_brpops(connection: kombu.Connection, client_name: str) -> int:
    """How many clients named ``client_name`` are blocked in a BRPOP now (the shared
    cluster's replicas of other tests block in theirs too)."""
    client = connection.default_channel.Client(connection_pool=connection.default_channel.pool)
    return sum(1 for entry in client.client_list()
               if entry.get("name") == client_name and entry.get("cmd") == "brpop" and "b" in entry.get("flags", ""))


def test_closing_an_idle_consumer_ends_its_brpop_without_waiting_it_out(connected: Cluster,
                                                                       unique_name: str) -> None:
    with kombu.Connection(connected.url, transport=ReplicaTransport) as observer:
        consumer = kombu.Connection(connected.url, transport=ReplicaTransport,
                                    transport_options={"client_name": unique_name})
        queue = consumer.SimpleQueue(unique_name)
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.2)              # leaves its BRPOP waiting in Redis
        assert blocked_brpops(observer, unique_name) == 1
        started = time.monotonic()
        queue.close()
        consumer.close()
        # Waiting out the BRPOP would take up to BRPOP_TIMEOUT_S; the unblock takes a round trip.
        assert time.monotonic() - started < BRPOP_TIMEOUT_S / 2
        assert blocked_brpops(observer, unique_name) == 0


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


def test_a_stop_signal_wakes_a_sleeping_hub_and_still_reaches_celerys_handler():
    hub = Hub()
    assert quiet_hub(hub)
    waker = hub._create_waker()
    handled: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: handled.append(number))
    try:
        wake_on_signal(signal.SIGUSR1, hub)
        assert select.select([waker.fileno()], [], [], 0)[0] == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handled == [signal.SIGUSR1]
        assert select.select([waker.fileno()], [], [], 0)[0] == [waker.fileno()]   # the poll returns now
    finally:
        signal.signal(signal.SIGUSR1, previous)
        hub.close()


def test_an_idle_replica_stops_at_sigterm_without_waiting_out_its_poll(connected, unique_name):
    model = taskserve.deployment(Idle).options(name=unique_name, num_cpus=0.1)
    model.deploy()
    assert model.get_handle().remote(1).result(timeout=30) == 1
    [pid] = replica_pids(unique_name)
    time.sleep(1.5)    # past kombu's 1 s poll: the replica is in one of its long polls now
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout=30, message="the replica to exit")
    # Noticed only at the next timer, the stop would take up to IDLE_WAKE_S.
    assert time.monotonic() - started < IDLE_WAKE_S / 2
    model.delete()


def test_an_agents_wait_for_notifications_ends_at_a_replicas_exit_descriptor(connected):
    """How a forked replica's exit wakes its idle agent at once (its fork server's report)."""
    store = make_store(connected.url)
    pubsub = store.subscribe()
    exits, report = os.pipe()
    try:
        threading.Timer(0.1, os.write, (report, b"x")).start()
        started = time.monotonic()
        assert wait_for_events(pubsub, 60, also=[exits]) is False
        assert time.monotonic() - started < 30     # not the 60 s timeout
        os.read(exits, 1)
        store.notify("replica:x")                  # notifications still end the wait, and say so
        assert wait_for_events(pubsub, 60, also=[exits]) is True
    finally:
        pubsub.close()
        os.close(exits)
        os.close(report)


def test_an_idle_agent_stops_at_sigterm_without_waiting_out_its_wait(connected, unique_name):
    """An agent with nothing to poll waits up to IDLE_RESYNC_S for a notification; its stop
    must end that wait at once (a cluster's shutdown stops its agents one by one)."""
    node = f"idle-{unique_name[-8:]}"
    connected.start_agent(node, 1)
    time.sleep(1.0)     # registered and idle: in its long wait now
    started = time.monotonic()
    assert connected.stop(f"agent-{node}") == 0
    assert time.monotonic() - started < IDLE_RESYNC_S / 2
