"""Batched deployments end to end: real Redis, controller, agent and replica processes.

Most tests steer one batch exactly with a *gate*: a first request (``hold:<path>``)
runs alone and waits for the file ``<path>``; the requests sent meanwhile are all
taken by the replica (its queue empties), and once the gate opens they run together
as the next batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kombu
import psutil
import pytest
import redis

import taskserve
from taskserve.batching import BATCH_SIZES_FIELD, batch
from taskserve.celery_app import TASK_NAME, make_app
from taskserve.connection import current_store
from taskserve.node.batch_server import BatchTransport
from taskserve.node.inflight import read_tags
from taskserve.store import UNACKED_KEY, queue_name

from .helpers import REPO, replica_pids, running_gateway, start_cluster, wait_until

pytestmark = pytest.mark.integration

GATE_TIMEOUT_S = 60.0


class Batched:
    """Answers each item with ``[item, batch size, pid]``. Items that steer it:

    * ``hold:<path>``: touch ``<path>.held``, then wait until ``<path>`` exists;
    * ``stall:<seconds>:<path>``: the first time, write ``<pid> <batch size>`` to
      ``<path>`` and sleep ``<seconds>``;
    * ``boom``: the batch raises; ``short``: it returns one result too few.
    """

    @batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    def __call__(self, items: list) -> list:
        for item in items:
            if isinstance(item, str) and item.startswith("hold:"):
                gate = Path(item.split(":", 1)[1])
                Path(f"{gate}.held").touch()
                deadline = time.monotonic() + GATE_TIMEOUT_S
                while not gate.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            if isinstance(item, str) and item.startswith("stall:"):
                _, seconds, path = item.split(":", 2)
                if not os.path.exists(path):
                    Path(path).write_text(f"{os.getpid()} {len(items)}")
                    time.sleep(float(seconds))
        if "boom" in items:
            raise ValueError(f"cannot score a batch of {len(items)} with boom in it")
        answers = [[item, len(items), os.getpid()] for item in items]
        return answers[:-1] if "short" in items else answers

    def pid(self) -> int:
        return os.getpid()


class Tunable(Batched):
    def reconfigure(self, config: dict) -> None:
        self.__call__.set_max_batch_size(config["max_batch_size"])


class Doubler:
    """HTTP: each request's JSON ``{"x": n}`` answered with ``{"double": 2n, "batch": size}``."""

    @batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    def __call__(self, requests: list) -> list:
        time.sleep(0.1)
        return [{"double": 2 * request.json()["x"], "batch": len(requests)} for request in requests]


@batch(max_batch_size=8)
def triple(items: list) -> list:
    return [[3 * x, len(items)] for x in items]


def deploy(cls: Any, name: str, **options: Any) -> Any:
    deployment = taskserve.deployment(cls).options(name=name, num_cpus=0.1, **options)
    deployment.deploy()
    return deployment


def hold(handle: Any, gate: Path) -> Any:
    """Send ``hold:<gate>``; return its response once the replica runs it."""
    response = handle.remote(f"hold:{gate}")
    wait_until(Path(f"{gate}.held").exists, timeout=30, message="the holding request to run")
    return response


def wait_for_empty_queue(url: str, name: str) -> None:
    """Until every request sent is taken by a replica."""
    client = redis.Redis.from_url(url)
    wait_until(lambda: client.llen(queue_name(name)) == 0, timeout=30, message=f"the queue of {name} to empty")


def replica_log(cluster: Any, name: str) -> str:
    [replica] = taskserve.get_deployment(name).status().replicas
    [path] = Path(cluster.workdir).rglob(f"{replica.replica_id}.log")
    return path.read_text()


# --------------------------------------------------------------------------- answers


def test_concurrent_calls_are_answered_each_with_its_own_element_in_batches(connected, unique_name):
    model = deploy(Batched, unique_name)
    handle = model.get_handle()
    pid = handle.pid.remote().result(timeout=10)              # methods that are not batched run alone

    responses = [handle.remote(i) for i in range(100)]
    answers = [response.result(timeout=30) for response in responses]
    assert [answer[0] for answer in answers] == list(range(100))
    assert {answer[2] for answer in answers} == {pid}
    sizes = [answer[1] for answer in answers]
    assert max(sizes) > 1 and max(sizes) <= 16
    assert handle.remote("alone").result(timeout=10) == ["alone", 1, pid]

    # Each call passes one item.
    with pytest.raises(taskserve.ReplicaError) as caught:
        handle.remote(1, 2).result(timeout=10)
    assert (caught.value.type_name, caught.value.message) == (
        "TypeError", "__call__ is batched: each call passes exactly one item, as .remote(item); "
                     "this one passed 2 positional and 0 keyword arguments")

    # The replica's record counts the batch sizes as a Prometheus histogram.
    store = current_store()
    [replica] = model.status().replicas
    sent = [101]                 # batched items so far: the 100, and "alone"

    def recorded() -> bool:
        text = store.redis.hget(store.replica_key(replica.replica_id), BATCH_SIZES_FIELD)
        if text and json.loads(text)["__call__"]["sum"] == sent[0]:
            return True
        handle.remote("again").result(timeout=10)
        sent[0] += 1
        return False

    wait_until(recorded, timeout=30, interval=0.3, message="the batch sizes in the replica's record")
    histogram = json.loads(store.redis.hget(store.replica_key(replica.replica_id), BATCH_SIZES_FIELD))
    assert histogram["__call__"]["buckets"]["+Inf"] == histogram["__call__"]["count"] < sent[0]
    model.delete()


def test_http_requests_are_batched_and_each_gets_its_own_answer(connected, unique_name):
    model = deploy(Doubler, unique_name, route_prefix=f"/{unique_name}")
    with running_gateway(connected) as http:
        wait_until(lambda: http.post(f"/{unique_name}", json={"x": 0}).status_code == 200, timeout=30,
                   message="the route to serve")
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda x: http.post(f"/{unique_name}", json={"x": x}), range(60)))
        # The replica records its batch sizes at most once a second; Prometheus reads them.
        count_line = f'taskserve_batch_size_count{{deployment="{unique_name}"'
        metrics = wait_until(lambda: (lambda text: count_line in text and text)(http.get("/-/metrics").text),
                             timeout=30, message="the batch sizes in the metrics")
        served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(count_line))
        assert served >= 1
    assert [answer.status_code for answer in answers] == [200] * 60
    assert [answer.json()["double"] for answer in answers] == [2 * x for x in range(60)]
    assert max(answer.json()["batch"] for answer in answers) > 1
    model.delete()


def test_a_batched_function_deployment(connected, unique_name):
    model = deploy(triple, unique_name)
    handle = model.get_handle()
    answers = [response.result(timeout=30) for response in [handle.remote(x) for x in range(30)]]
    assert [answer[0] for answer in answers] == [3 * x for x in range(30)]
    assert 1 < max(answer[1] for answer in answers) <= 8
    model.delete()


class Overlapping:
    """Answers each item with ``[item, batch size, most batches seen running at once]``."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    @batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    def __call__(self, items: list) -> list:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return [[item, len(items), self.most] for item in items]


def test_pickled_requests_and_two_batches_at_once_with_max_concurrent_queries(connected, unique_name):
    model = deploy(Overlapping, unique_name, serializer="pickle", max_concurrent_queries=2)
    handle = model.get_handle()
    answers = [response.result(timeout=30) for response in [handle.remote({i}) for i in range(64)]]
    assert [answer[0] for answer in answers] == [{i} for i in range(64)]     # a set: pickled both ways
    assert max(answer[1] for answer in answers) == 8
    assert max(answer[2] for answer in answers) == 2
    model.delete()


# --------------------------------------------------------------------------- failures


def test_an_exception_fails_every_request_of_its_batch(connected, unique_name, tmp_path):
    model = deploy(Batched, unique_name)
    handle = model.get_handle()
    gate = tmp_path / "gate"
    holding = hold(handle, gate)
    items = ["a", "boom", "c", "d", "e"]
    responses = [handle.remote(item) for item in items]
    wait_for_empty_queue(connected.url, unique_name)
    gate.touch()

    assert holding.result(timeout=30)[:2] == [f"hold:{gate}", 1]
    errors = []
    for response in responses:
        with pytest.raises(taskserve.ReplicaError) as caught:
            response.result(timeout=30)
        errors.append(caught.value)
    assert {(e.type_name, e.message) for e in errors} == {("ValueError", "cannot score a batch of 5 with boom in it")}
    assert len({e.traceback_text for e in errors}) == 1 and "in __call__" in errors[0].traceback_text
    assert handle.remote("after").result(timeout=10)[:2] == ["after", 1]      # the replica serves on
    model.delete()


def test_a_result_of_the_wrong_length_fails_every_request_naming_the_lengths(connected, unique_name, tmp_path):
    model = deploy(Batched, unique_name)
    handle = model.get_handle()
    gate = tmp_path / "gate"
    holding = hold(handle, gate)
    responses = [handle.remote(item) for item in ["short", "b", "c", "d"]]
    wait_for_empty_queue(connected.url, unique_name)
    gate.touch()

    holding.result(timeout=30)
    for response in responses:
        with pytest.raises(taskserve.ReplicaError) as caught:
            response.result(timeout=30)
        assert caught.value.type_name == "BatchLengthError"
        assert caught.value.message == ("Batched.__call__ returned 3 results for a batch of 4 items; "
                                        "a batched method returns exactly one result per item, in order")
    model.delete()


def test_garbage_in_the_queue_is_dropped_and_the_batched_replica_serves_on(connected, unique_name):
    model = deploy(Batched, unique_name)
    handle = model.get_handle()
    pid = handle.pid.remote().result(timeout=10)
    client = redis.Redis.from_url(connected.url)
    client.lpush(queue_name(unique_name), b"GET / HTTP/1.1")
    make_app(connected.url).send_task("billing.charge", args=[7], queue=queue_name(unique_name))
    make_app(connected.url).send_task(TASK_NAME, args=["__call__", "x", 5], queue=queue_name(unique_name))
    assert handle.remote("after").result(timeout=10) == ["after", 1, pid]
    log = replica_log(connected, unique_name)
    assert f"dropped an item of {queue_name(unique_name)}: not JSON (JSONDecodeError" in log
    assert f"dropped a message of {queue_name(unique_name)}: a task named 'billing.charge', not taskserve.call" in log
    # A malformed taskserve.call from a plain producer is a dead job: its producer reads why.
    assert "is dead: its message cannot be run: its arguments are not (method, args, kwargs): ['__call__', 'x', 5]" \
        in log
    assert "Traceback" not in log
    model.delete()


# --------------------------------------------------------------------------- delivery guarantees


def test_a_replica_killed_mid_batch_has_every_request_of_the_batch_answered_by_its_replacement(
        connected, unique_name, tmp_path):
    model = deploy(Batched, unique_name, version="1")
    handle = model.get_handle()
    [pid] = replica_pids(unique_name)
    gate, running = tmp_path / "gate", tmp_path / "running"
    holding = hold(handle, gate)
    items = [f"stall:600:{running}", "k1", "k2", "k3", "k4", "k5"]
    responses = [handle.remote(item) for item in items]
    wait_for_empty_queue(connected.url, unique_name)
    gate.touch()
    holding.result(timeout=30)
    # The file exists a moment before its line is written: wait for the line.
    started = wait_until(lambda: running.exists() and running.read_text(), timeout=30, message="the batch to start")
    assert started == f"{pid} 6"

    # Every request of the batch is in the in-flight file while it runs.
    [replica] = model.status().replicas
    [inflight] = Path(connected.workdir).rglob(f"{replica.replica_id}.inflight")
    assert len(read_tags(inflight)) == 6
    os.kill(pid, signal.SIGKILL)

    answers = [response.result(timeout=120) for response in responses]
    assert [answer[0] for answer in answers] == items
    assert pid not in {answer[2] for answer in answers}
    model.delete()


def test_a_drained_replica_finishes_its_batch_and_puts_back_what_it_had_not_started(
        connected, unique_name, tmp_path):
    model = deploy(Batched, unique_name, version="1")
    handle = model.get_handle()
    [pid] = replica_pids(unique_name)
    gate, running = tmp_path / "gate", tmp_path / "running"
    holding = hold(handle, gate)
    in_hand = [f"stall:3:{running}", "x1", "x2"]
    first = [handle.remote(item) for item in in_hand]
    wait_for_empty_queue(connected.url, unique_name)
    gate.touch()
    holding.result(timeout=30)
    wait_until(running.exists, timeout=30, message="the batch to start")
    waiting = [handle.remote(item) for item in ["y1", "y2"]]      # taken by the replica, not started
    wait_for_empty_queue(connected.url, unique_name)

    os.kill(pid, signal.SIGTERM)
    assert [response.result(timeout=30) for response in first] == [[item, 3, pid] for item in in_hand]
    later = [response.result(timeout=120) for response in waiting]
    assert [answer[0] for answer in later] == ["y1", "y2"]
    assert pid not in {answer[2] for answer in later}
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout=30, message="the drained replica to exit")
    model.delete()


# --------------------------------------------------------------------------- reconfigure


def test_reconfigure_changes_max_batch_size_without_a_restart(connected, unique_name, tmp_path):
    model = deploy(Tunable, unique_name, user_config={"max_batch_size": 2})
    handle = model.get_handle()
    [pid] = replica_pids(unique_name)
    answers = [response.result(timeout=30) for response in [handle.remote(i) for i in range(40)]]
    assert max(answer[1] for answer in answers) == 2

    taskserve.reconfigure_deployment(unique_name, {"max_batch_size": 8})
    assert replica_pids(unique_name) == {pid}
    gate = tmp_path / "gate"
    holding = hold(handle, gate)
    responses = [handle.remote(i) for i in range(8)]
    wait_for_empty_queue(connected.url, unique_name)     # held at once: the prefetch grew too
    gate.touch()
    holding.result(timeout=30)
    assert [response.result(timeout=30) for response in responses] == [[i, 8, pid] for i in range(8)]
    assert handle.pid.remote().result(timeout=10) == pid
    model.delete()


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_the_benchmark_smoke_run():
    env = {key: value for key, value in os.environ.items() if key != "TASKSERVE_ADDRESS"}
    process = subprocess.run([sys.executable, "-m", "benchmarks.bench_batching", "--smoke"], cwd=REPO, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
    assert process.returncode == 0, process.stdout + process.stderr
    for line in ("| unbatched |", "| adaptive  |", "| fixed     |", "throughput batched/unbatched"):
        assert line in process.stdout, process.stdout


# --------------------------------------------------------------------------- Redis restarts




def test_a_batch_in_flight_when_redis_restarts_is_answered_once(tmp_path):
    running = tmp_path / "running"
    cluster = start_cluster(tmp_path / "cluster", ("node-a",), 4, redis_data_dir=tmp_path / "redis")
    try:
        model = deploy(Batched, "restarts", version="1")
        handle = model.get_handle()
        [pid] = replica_pids("restarts")
        gate = tmp_path / "gate"
        holding = hold(handle, gate)
        items = [f"stall:2:{running}", "r1", "r2"]
        responses = [handle.remote(item) for item in items]
        wait_for_empty_queue(cluster.url, "restarts")
        gate.touch()
        holding.result(timeout=30)
        wait_until(running.exists, timeout=30, message="the batch to start")

        cluster.restart_redis()

        assert [response.result(timeout=60) for response in responses] == [[item, 3, pid] for item in items]
        client = redis.Redis.from_url(cluster.url)
        wait_until(lambda: client.hlen(UNACKED_KEY) == 0, timeout=30, message="every request acknowledged")
        # Taking requests again, from the same process.
        answers = [response.result(timeout=60) for response in [handle.remote(i) for i in range(10)]]
        assert answers == [[i, answer[1], pid] for i, answer in enumerate(answers)]
        assert client.llen(queue_name("restarts")) == 0
        model.delete()
    finally:
        cluster.shutdown()


def test_taking_a_message_reads_the_length_of_its_queue_in_the_same_round_trip(connected, unique_name):
    queue = queue_name(f"{unique_name}-scratch")
    for i in range(4):
        make_app(connected.url).send_task(TASK_NAME, args=("__call__", [i], {}), queue=queue)
    app = make_app(connected.url)
    app.conf.broker_transport = BatchTransport
    seen: list[tuple[Any, int]] = []
    messages: list[Any] = []

    def taken(message: Any) -> None:
        seen.append((message.decode()[0][1], message.channel.qos.queue_length))
        messages.append(message)

    with app.connection_for_read() as connection:
        kombu.Consumer(connection.channel(), queues=[app.amqp.queues[queue]], no_ack=False,
                       on_message=taken).consume()
        while len(seen) < 4:
            connection.drain_events(timeout=5)
        for message in messages:
            message.ack()
    assert seen == [([0], 3), ([1], 2), ([2], 1), ([3], 0)]
