"""Replicas under faults: a hung check_health, garbage in the queue, a request that
kills its replica, Redis restarting mid-request, results nobody reads."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

import taskserve
from taskserve import redis_server
from taskserve.celery_app import TASK_NAME, make_app
from taskserve.store import queue_name, result_key

from ..helpers import replica_pids, start_cluster, wait_until

pytestmark = pytest.mark.integration


def replica_log(cluster, name: str) -> str:
    [replica] = taskserve.get_deployment(name).status().replicas
    [path] = Path(cluster.workdir).rglob(f"{replica.replica_id}.log")
    return path.read_text()


# --------------------------------------------------------------------------- check_health


def test_a_hung_check_health_holds_up_no_request_and_gets_the_replica_replaced(connected, unique_name, tmp_path):
    sick, hung = tmp_path / "sick", tmp_path / "hung"

    class Hangs:
        def __call__(self, x):
            return [x, os.getpid()]

        def check_health(self):
            if sick.exists():
                hung.write_text(str(os.getpid()))
                threading.Event().wait()

    model = taskserve.deployment(Hangs).options(name=unique_name, version="1", num_cpus=0.1,
                                                health_check_period_s=0.5, health_check_timeout_s=2)
    model.deploy()
    [pid] = replica_pids(unique_name)
    handle = model.get_handle()
    sick.touch()
    wait_until(hung.exists, timeout=30, message="check_health to hang")
    sick.unlink()                                  # its replacement is healthy

    # check_health hangs in the replica, and it answers anyway.
    assert hung.read_text() == str(pid)
    assert handle.remote("during").result(timeout=10) == ["during", pid]

    wait_until(lambda: pid not in replica_pids(unique_name, state=None), timeout=60,
               message="the replica whose check hangs to be replaced")
    wait_until(lambda: len(replica_pids(unique_name)) == 1 and model.status().status == "HEALTHY", timeout=60,
               message="a healthy replacement")
    assert handle.remote("after").result(timeout=10)[0] == "after"
    model.delete()


# --------------------------------------------------------------------------- poison messages


class Echo:
    def __call__(self, x):
        return x

    def pid(self):
        return os.getpid()


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


def test_garbage_in_the_queue_is_dropped_with_a_reason_and_the_replica_serves_on(connected, unique_name):
    model = taskserve.deployment(Echo).options(name=unique_name, num_cpus=0.1)
    model.deploy()
    handle = model.get_handle()
    pid = handle.pid.remote().result(timeout=10)
    url = connected.url
    request = _envelope_of(url, unique_name, ("__call__", ["from the template"], {}))
    garbage: dict[str, tuple[bytes, str]] = {
        "random bytes": (bytes(range(256)), "not JSON (JSONDecodeError"),
        "non-JSON text": (b"GET / HTTP/1.1", "not JSON (JSONDecodeError"),
        "a bare JSON string": (b'"hello"', "a JSON str, not a message envelope: 'hello'"),
        "a JSON object": (b'{"hello": "world"}', "not a message envelope (KeyError: 'properties')"),
        "an envelope without delivery_info": (
            json.dumps({"body": "", "properties": {"delivery_tag": "t"}}).encode(),
            "not a message envelope (no delivery_tag or delivery_info)"),
        "a body that is not JSON": (_with_body(request, b"{not json"), "its body cannot be decoded (DecodeError"),
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
    queue = queue_name(unique_name)
    for kind, (item, _) in garbage.items():
        client.lpush(queue, item)
        assert handle.remote(kind).result(timeout=10) == kind
    for kind, ((task_name, args, kwargs), _) in tasks.items():
        make_app(url).send_task(task_name, args=args, kwargs=kwargs, queue=queue)
        assert handle.remote(kind).result(timeout=10) == kind
    # A pickled request to a JSON deployment is refused, not unpickled.
    make_app(url, "pickle").send_task(TASK_NAME, args=("__call__", [{1, 2}], {}), queue=queue)
    assert handle.remote("after pickle").result(timeout=10) == "after pickle"

    assert handle.pid.remote().result(timeout=10) == pid
    assert replica_pids(unique_name) == {pid}
    assert client.llen(queue) == 0
    log = replica_log(connected, unique_name)
    dropped = [line for line in log.splitlines() if " ERROR taskserve.node.replica: dropped " in line]
    reasons = [why for _, why in garbage.values()] + [why for _, why in tasks.values()]
    reasons.append("its body cannot be decoded (ContentDisallowed: Refusing to deserialize untrusted content")
    assert len(dropped) == len(reasons), "\n".join(dropped)
    for line, why in zip(dropped, reasons):
        assert f"dropped an item of {queue}: {why}" in line or f"dropped a message of {queue}: {why}" in line
    assert "Traceback" not in log
    model.delete()


# --------------------------------------------------------------------------- max_deliveries


def test_a_request_that_killed_its_replica_max_deliveries_times_is_answered_with_an_error(
        connected, unique_name, tmp_path):
    ran = tmp_path / "ran"

    class Fragile:
        def __call__(self, x):
            with open(ran, "a") as log:
                log.write(f"{x}\n")
            once = tmp_path / x
            if x == "always crashes" or (x == "crashes once" and not once.exists()):
                once.touch()
                os._exit(1)                        # the replica dies serving x
            return x

    model = taskserve.deployment(Fragile).options(name=unique_name, num_cpus=0.1, max_deliveries=2)
    model.deploy()
    handle = model.get_handle()

    # Put back after each crash, and counted by the node agent; run twice, then refused.
    with pytest.raises(taskserve.ReplicaError) as caught:
        handle.remote("always crashes").result(timeout=120)
    assert caught.value.type_name == "ReplicaCrashed"
    assert caught.value.message == ("a replica died 2 times while serving this request; "
                                    "it is not delivered again (max_deliveries=2)")
    assert ran.read_text() == "always crashes\n" * 2

    # Below the limit, a request put back after a crash runs again.
    assert handle.remote("crashes once").result(timeout=120) == "crashes once"
    assert ran.read_text() == "always crashes\n" * 2 + "crashes once\n" * 2
    assert handle.remote("fine").result(timeout=30) == "fine"
    model.delete()


# --------------------------------------------------------------------------- Redis restarts


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    # As redis-server binds (SO_REUSEADDR): the connections Redis closed when it
    # stopped linger in TIME_WAIT on its port, and a plain bind fails on them.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def test_a_request_in_flight_when_redis_restarts_is_answered_once(tmp_path, monkeypatch):
    monkeypatch.setattr(redis_server, "port_is_free", _port_is_free)
    started, ran = tmp_path / "started", tmp_path / "ran"

    class Slow:
        def __call__(self, x):
            started.touch()
            with open(ran, "a") as log:
                log.write(f"{x}\n")
            time.sleep(2)
            return [x, os.getpid()]

    cluster = start_cluster(tmp_path / "cluster", ("node-a",), 4, redis_data_dir=tmp_path / "redis")
    try:
        model = taskserve.deployment(Slow).options(name="slow", version="1", num_cpus=0.5)
        model.deploy()
        [pid] = replica_pids("slow")
        response = model.get_handle().remote("in flight")
        wait_until(started.exists, timeout=30, message="the request to be served")

        cluster.restart_redis()

        assert response.result(timeout=60) == ["in flight", pid]
        client = redis.Redis.from_url(cluster.url)
        assert client.hlen("unacked") == 0         # acknowledged: it is not delivered again
        assert client.llen(queue_name("slow")) == 0
        assert model.get_handle().remote("next").result(timeout=30) == ["next", pid]
        assert ran.read_text() == "in flight\nnext\n"
        model.delete()
    finally:
        cluster.shutdown()


# --------------------------------------------------------------------------- result_ttl_s


def test_results_expire_after_result_ttl_s(connected, unique_name):
    model = taskserve.deployment(Echo).options(name=unique_name, num_cpus=0.1, result_ttl_s=30)
    model.deploy()
    response = model.get_handle().remote("kept briefly")
    client = redis.Redis.from_url(connected.url)
    # Read before the answer: a handle deletes the answer it read.
    ttl = wait_until(lambda: max(client.ttl(result_key(response.request_id)), 0), timeout=10,
                     message="the answer to be stored")
    assert ttl <= 30
    assert response.result(timeout=10) == "kept briefly"
    model.delete()
