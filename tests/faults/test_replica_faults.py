"""Replicas under faults: a hung check_health, garbage in the queue, a request that
kills its replica, Redis restarting mid-request, results nobody reads.

Each fault runs under a steady load of requests with known ids, for a row of the
fault table, but for two tests: garbage pushed one item at a time, each followed by
a request (its row is that of the same garbage pushed under load), and an answer's
time to live, which is not a fault of serving.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
import redis

import taskserve
from taskserve.celery_app import TASK_NAME, make_app
from taskserve.store import UNACKED_KEY, queue_name, result_key

from ..helpers import replica_pids, start_cluster, wait_until
from .harness import REFUSED_WHILE_REDIS_DOWN, Recorder, SteadyLoad, check_row, deploy_recorder

pytestmark = pytest.mark.integration


def replica_log(cluster, name: str) -> str:
    [replica] = taskserve.get_deployment(name).status().replicas
    [path] = Path(cluster.workdir).rglob(f"{replica.replica_id}.log")
    return path.read_text()


# --------------------------------------------------------------------------- check_health


def test_a_hung_check_health_holds_up_no_request_and_gets_the_replica_replaced(connected, unique_name, tmp_path):
    sick, hung = tmp_path / "sick", tmp_path / "hung"

    class Hangs(Recorder):
        def served_by(self, x):
            return [x, os.getpid()]

        def check_health(self):
            if sick.exists():
                hung.write_text(str(os.getpid()))
                threading.Event().wait()

    model, served = deploy_recorder(connected.url, unique_name, target=Hangs, version="1",
                                    health_check_period_s=0.5, health_check_timeout_s=2)
    [pid] = replica_pids(unique_name)
    handle = model.get_handle()
    with SteadyLoad(handle, threads=2) as load:
        load.wait_for_answers(20)
        fault_at = time.monotonic()
        sick.touch()
        wait_until(hung.exists, timeout=30, message="check_health to hang")
        sick.unlink()                                  # its replacement is healthy

        # check_health hangs in the replica, and it answers anyway.
        assert hung.read_text() == str(pid)
        assert handle.served_by.remote("during").result(timeout=10) == ["during", pid]

        wait_until(lambda: pid not in replica_pids(unique_name, state=None), timeout=60,
                   message="the replica whose check hangs to be replaced")
        wait_until(lambda: len(replica_pids(unique_name)) == 1 and model.status().status == "HEALTHY", timeout=60,
                   message="a healthy replacement")
        assert handle.served_by.remote("after").result(timeout=10)[0] == "after"
        load.wait_for_more_answers(20)
    result = load.result("check_health hung (the replica's only one)", redis.Redis.from_url(connected.url),
                         served, fault_at, notes="it serves on meanwhile, then is drained and replaced")
    check_row(load, result)
    model.delete()


# --------------------------------------------------------------------------- poison messages


def _envelope_of(url: str, deployment: str, args: tuple) -> dict:
    """What kombu puts in the queue list for a request, taken from a queue nobody reads."""
    scratch = queue_name(f"{deployment}-unread")
    make_app(url).send_task(TASK_NAME, args=args, queue=scratch)
    raw = redis.Redis.from_url(url).rpop(scratch)
    return json.loads(raw)


def _with_body(envelope: dict, body: bytes) -> bytes:
    changed = json.loads(json.dumps(envelope))
    changed["body"] = base64.b64encode(body).decode()
    changed["properties"]["delivery_tag"] = str(uuid.uuid4())
    return json.dumps(changed).encode()


def _garbage(url: str, deployment: str) -> list[tuple[str, Callable[[], object], str]]:
    """Items that are not taskserve requests, in the order they are to be pushed: what
    each is, a function pushing it onto the deployment's queue, and the reason the
    replica logs as it drops it."""
    request = _envelope_of(url, deployment, ("__call__", ["from the template"], {}))
    garbage: dict[str, tuple[bytes, str]] = {
        "random bytes": (bytes(range(256)), "not JSON (JSONDecodeError"),
        "non-JSON text": (b"GET / HTTP/1.1", "not JSON (JSONDecodeError"),
        "a bare JSON string": (b'"hello"', "a JSON str, not a message envelope: 'hello'"),
        "a JSON object": (b'{"hello": "world"}', "not a message envelope (KeyError: 'properties')"),
        "an envelope without delivery_info": (
            json.dumps({"body": "", "properties": {"delivery_tag": "t"}}).encode(),
            "not a message envelope (no delivery_tag or delivery_info)"),
        "a body that is not JSON": (_with_body(request, b"{not json"), "its body cannot be decoded (JSONDecodeError"),
        "a body that is not Celery's": (_with_body(request, b'"hello"'), "its body is not Celery's"),
    }
    tasks = {
        "another producer's task": (("billing.charge", [7], {}), "a task named 'billing.charge', not taskserve.call"),
        "a taskserve task with too few args": ((TASK_NAME, [1, 2], {}),
                                               "its arguments are not (method, args, kwargs): [1, 2]"),
        "a taskserve task with malformed args": ((TASK_NAME, ["__call__", "x", 5], {}),
                                                 "its arguments are not (method, args, kwargs): ['__call__', 'x', 5]"),
        "a taskserve task with keyword arguments": ((TASK_NAME, ["__call__", [], {}], {"method": "__call__"}),
                                                    "it has keyword arguments: {'method': '__call__'}"),
    }
    client = redis.Redis.from_url(url)
    queue = queue_name(deployment)
    items = [(kind, functools.partial(client.lpush, queue, item), why) for kind, (item, why) in garbage.items()]
    for kind, ((task_name, args, kwargs), why) in tasks.items():
        send = functools.partial(make_app(url).send_task, task_name, args=args, kwargs=kwargs, queue=queue)
        items.append((kind, send, why))
    # A pickled request to a JSON deployment is refused, not unpickled.
    items.append(("a pickled request",
                  functools.partial(make_app(url, "pickle").send_task, TASK_NAME, args=("__call__", [{1, 2}], {}),
                                    queue=queue),
                  "a pickled body, and this deployment's serializer is json"))
    return items


def _check_garbage_dropped(cluster, deployment: str, pid: int, reasons: list[str]) -> None:
    """The replica (still ``pid``) dropped each item, in order, with one log line saying why."""
    handle = taskserve.get_deployment(deployment).get_handle()
    assert handle.pid.remote().result(timeout=10) == pid
    assert replica_pids(deployment) == {pid}
    queue = queue_name(deployment)
    assert redis.Redis.from_url(cluster.url).llen(queue) == 0
    log = replica_log(cluster, deployment)
    # A taskserve.call task with an id (a plain producer's, malformed) is a dead job its
    # producer reads the reason of; anything else is dropped.
    dropped = [line for line in log.splitlines()
               if re.search(r" ERROR taskserve\.node\.\w+: (dropped |job \S+ is dead: its message cannot be run)", line)]
    assert len(dropped) == len(reasons), "\n".join(dropped)
    for line, why in zip(dropped, reasons):
        assert f"dropped an item of {queue}: {why}" in line or f"dropped a message of {queue}: {why}" in line \
            or f"is dead: its message cannot be run: {why}" in line, (line, why)
    assert "Traceback" not in log


def test_garbage_in_the_queue_is_dropped_with_a_reason_and_the_replica_serves_on(connected, unique_name):
    model, _ = deploy_recorder(connected.url, unique_name)
    handle = model.get_handle()
    pid = handle.pid.remote().result(timeout=10)
    garbage = _garbage(connected.url, unique_name)
    for kind, push, _ in garbage:
        push()
        assert handle.remote(kind).result(timeout=10) == kind
    _check_garbage_dropped(connected, unique_name, pid, [why for _, _, why in garbage])
    model.delete()


def test_garbage_pushed_under_load_costs_no_request(connected, unique_name):
    model, served = deploy_recorder(connected.url, unique_name)
    handle = model.get_handle()
    pid = handle.pid.remote().result(timeout=10)
    garbage = _garbage(connected.url, unique_name)
    with SteadyLoad(handle, threads=3) as load:
        load.wait_for_answers(30)
        fault_at = time.monotonic()
        for _, push, _ in garbage:          # between requests of the load
            push()
            load.wait_for_more_answers(3, timeout_s=30)
        load.wait_for_more_answers(30)
    result = load.result(f"garbage in the queue ({len(garbage)} items that are not requests)",
                         redis.Redis.from_url(connected.url), served, fault_at,
                         notes="each dropped with one log line saying why; the replica serves on")
    check_row(load, result)
    _check_garbage_dropped(connected, unique_name, pid, [why for _, _, why in garbage])
    model.delete()


# --------------------------------------------------------------------------- max_deliveries


def test_a_request_that_killed_its_replica_max_deliveries_times_is_answered_with_an_error(
        connected, unique_name, tmp_path):
    ran = tmp_path / "ran"

    class Fragile(Recorder):
        def fragile(self, x):
            with open(ran, "a") as log:
                log.write(f"{x}\n")
            once = tmp_path / x
            if x == "always crashes" or (x == "crashes once" and not once.exists()):
                once.touch()
                os._exit(1)                        # the replica dies serving x
            return x

    model, served = deploy_recorder(connected.url, unique_name, target=Fragile, max_deliveries=2)
    handle = model.get_handle()
    with SteadyLoad(handle, threads=2) as load:
        load.wait_for_answers(20)
        fault_at = time.monotonic()
        # Put back after each crash, and counted by the node agent; run twice, then refused.
        with pytest.raises(taskserve.ReplicaError) as caught:
            handle.fragile.remote("always crashes").result(timeout=120)
        assert caught.value.type_name == "ReplicaCrashed"
        assert caught.value.message == ("a replica died 2 times while serving this request; "
                                        "it is not delivered again (max_deliveries=2)")
        assert ran.read_text() == "always crashes\n" * 2

        # Below the limit, a request put back after a crash runs again.
        assert handle.fragile.remote("crashes once").result(timeout=120) == "crashes once"
        assert ran.read_text() == "always crashes\n" * 2 + "crashes once\n" * 2
        assert handle.fragile.remote("fine").result(timeout=30) == "fine"
        load.wait_for_more_answers(20)
    result = load.result("a request that kills its replica (3 crashes, max_deliveries=2)",
                         redis.Redis.from_url(connected.url), served, fault_at,
                         notes="it is answered with ReplicaCrashed after 2; the load waits for each restart")
    check_row(load, result)
    model.delete()


# --------------------------------------------------------------------------- Redis restarts




def test_a_request_in_flight_when_redis_restarts_is_answered_once(tmp_path):
    started, ran = tmp_path / "started", tmp_path / "ran"

    class Slow(Recorder):
        def slow(self, x):
            started.touch()
            with open(ran, "a") as log:
                log.write(f"{x}\n")
            time.sleep(2)
            return [x, os.getpid()]

    cluster = start_cluster(tmp_path / "cluster", ("node-a",), 4, redis_data_dir=tmp_path / "redis")
    try:
        model, served = deploy_recorder(cluster.url, "slow", target=Slow, version="1", num_cpus=0.5)
        [pid] = replica_pids("slow")
        handle = model.get_handle()
        with SteadyLoad(handle, threads=2) as load:
            load.wait_for_answers(20)
            response = handle.slow.remote("in flight")
            wait_until(started.exists, timeout=30, message="the request to be served")

            # The caller is already waiting when Redis goes away, and waits it out.
            answer: list = []
            waiter = threading.Thread(target=lambda: answer.append(response.result(timeout=60)))
            waiter.start()
            fault_at = time.monotonic()
            cluster.restart_redis()
            back_at = time.monotonic()
            waiter.join(timeout=90)
            assert answer == [["in flight", pid]]
            load.wait_for_more_answers(20)
        client = redis.Redis.from_url(cluster.url)
        result = load.result("Redis restarted (from its AOF) with a request in flight", client, served, fault_at,
                             failed_because=REFUSED_WHILE_REDIS_DOWN,
                             notes=f"down {back_at - fault_at:.1f}s; the request in flight, "
                                   "and each queued one, is answered once")
        check_row(load, result, refused_between=(fault_at, back_at))
        assert client.hlen(UNACKED_KEY) == 0         # acknowledged: it is not delivered again
        assert client.llen(queue_name("slow")) == 0
        assert handle.slow.remote("next").result(timeout=30) == ["next", pid]
        assert ran.read_text() == "in flight\nnext\n"
        model.delete()
    finally:
        cluster.shutdown()


# --------------------------------------------------------------------------- result_ttl_s


def test_results_expire_after_result_ttl_s(connected, unique_name):
    model, _ = deploy_recorder(connected.url, unique_name, result_ttl_s=30)
    response = model.get_handle().remote("kept briefly")
    client = redis.Redis.from_url(connected.url)
    # Read before the answer: a handle deletes the answer it read.
    ttl = wait_until(lambda: max(client.ttl(result_key(response.request_id)), 0), timeout=10,
                     message="the answer to be stored")
    assert ttl <= 30
    assert response.result(timeout=10) == "kept briefly"
    model.delete()
