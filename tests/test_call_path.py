"""A handle call's own path, on the test run's Redis: its answer arrives on the process's
one pattern subscription, a lost subscription wakes the waiting calls and comes back by
itself, and a replica writes each answer once. (The message a call pushes is the one
``send_task`` would: tests/test_wire.py.)

End to end through replicas: tests/test_deployments.py and tests/faults/.
"""

from __future__ import annotations

import threading

import kombu
import pytest
import redis

import taskserve
from taskserve.answers import AnswerListener
from taskserve.node.transport import ReplicaTransport
from taskserve.store import result_key
from taskserve.wire import Outcome, decode_answer, encode_answer

from .helpers import Cluster, wait_until


@pytest.fixture
def client(cluster: Cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.url)


def publish_answer(client: redis.Redis, task_id: str, value: object) -> None:
    meta = encode_answer(task_id, Outcome(True, value))
    client.set(result_key(task_id), meta)
    client.publish(result_key(task_id), meta)


def test_the_listener_hands_each_answer_to_its_waiter(cluster, client):
    listener = AnswerListener(redis.Redis.from_url(cluster.url))
    ids = [listener.new_task_id() for _ in range(3)]
    waiters = [listener.expect(task_id) for task_id in ids]
    publish_answer(client, ids[1], "second")
    assert waiters[1].event.wait(5)
    assert decode_answer(waiters[1].data).value == "second"
    assert not waiters[0].event.is_set() and not waiters[2].event.is_set()
    publish_answer(client, "someone-else.1", "not ours")     # another process's answer: not heard
    publish_answer(client, ids[0], "first")
    assert waiters[0].event.wait(5) and decode_answer(waiters[0].data).value == "first"
    client.delete(*(result_key(task_id) for task_id in ids[:2]), result_key("someone-else.1"))


def test_a_lost_subscription_wakes_the_waiters_and_comes_back(cluster, client):
    listener = AnswerListener(redis.Redis.from_url(cluster.url))
    task_id = listener.new_task_id()
    waiter = listener.expect(task_id)
    client.client_kill_filter(_type="pubsub", skipme=True)
    assert waiter.event.wait(5), "the waiter was not woken when the subscription was lost"
    assert waiter.data is None                              # woken to read its key, not answered
    waiter.event.clear()
    wait_until(lambda: listener.lost is None, timeout=10, message="the listener to subscribe again")
    publish_answer(client, task_id, "after")
    # Subscribed again, it also wakes its waiters to read their keys: wait for the data itself.
    wait_until(lambda: waiter.data is not None, timeout=5, message="the answer published after the loss")
    assert decode_answer(waiter.data).value == "after"
    client.delete(result_key(task_id))


def test_a_listener_nobody_waits_on_stops_retrying_and_starts_again(cluster, client):
    listener = AnswerListener(redis.Redis.from_url(cluster.url))
    waiter = listener.expect(listener.new_task_id())
    del waiter                                              # the response was dropped unread
    client.client_kill_filter(_type="pubsub", skipme=True)
    wait_until(lambda: listener.thread is None, timeout=10, message="the idle listener to stop")
    task_id = listener.new_task_id()
    waiter = listener.expect(task_id)                       # subscribed again before it returns
    publish_answer(client, task_id, "again")
    wait_until(lambda: waiter.data is not None, timeout=5, message="the answer to the new reader")
    client.delete(result_key(task_id))


class Echo:
    def __call__(self, value):
        return value


def test_a_replica_writes_each_answer_once_and_never_reads_it_back(connected, unique_name):
    """The replica stores the answer with its acknowledgement; Celery, told by the
    message's ``ignore_result`` header, would store it again after reading it back (a GET
    of the result key a request, for nothing). The one other write is the mark that it was
    taken (``SET ... NX``, in the same round trip as recording it taken)."""
    model = taskserve.deployment(Echo).options(name=unique_name, num_cpus=0.1)
    model.deploy()
    handle = model.get_handle()
    assert handle.remote("warm").result(timeout=30) == "warm"
    commands: list[str] = []
    monitor_client = redis.Redis.from_url(connected.url)

    def watch() -> None:
        with monitor_client.monitor() as monitor:
            for event in monitor.listen():
                commands.append(event["command"])
                if "stop-watching" in event["command"]:
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_until(lambda: any(c.get("cmd") == "monitor" for c in monitor_client.client_list()), timeout=10)
    response = handle.remote("once")
    key = result_key(response.request_id)
    assert response.result(timeout=30) == "once"
    redis.Redis.from_url(connected.url).get("stop-watching")
    watcher.join(timeout=30)
    touching = [command.split(" ", 1)[0].strip('"').upper() for command in commands if key in command]
    # Marked taken (SET ... NX, as it is taken), then the answer, written once; never read back.
    assert touching.count("GET") == 0 and touching.count("SET") == 1 and touching.count("SETEX") == 1, touching
    model.delete()


def test_a_replicas_channel_keeps_one_client_for_its_commands(cluster):
    """kombu makes a ``redis.Redis`` per command batch (taken, acknowledged); a replica's
    channel keeps one per connection pool."""
    with kombu.Connection(cluster.url, transport=ReplicaTransport) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
            assert first.ping()
        given = redis.Redis.from_url(cluster.url)
        with channel.conn_or_acquire(given) as client:
            assert client is given
        channel._pool = None                           # a new pool: a client over it
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
        given.close()
