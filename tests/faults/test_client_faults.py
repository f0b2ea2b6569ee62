"""What callers meet when things go wrong, through a handle and over HTTP.

Answers read are deleted from Redis; a deployment whose rollout failed with no
replica left refuses calls at once; ``max_queued_requests`` refuses calls beyond it;
a Redis outage is named as such at once; a deploy or scale no node can ever hold
fails at once and every wait shows its progress; the gateway bounds and queues many
clients and cuts off slow ones.

Most tests share the test run's cluster and a gateway of their own; the outage test
starts a cluster of its own, and the slow-client tests a gateway with short timeouts.
Time bounds (``< 5 s``) detect hangs; they are no speed claims.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

import taskserve
from taskserve.redis_server import free_port
from taskserve.store import queue_name, result_key, result_key_pattern
from taskserve.wire import Outcome, encode_answer

from ..helpers import REPO, Cluster, running_gateway, start_cluster, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with running_gateway(cluster) as client:
        yield client


def wait_for_route(http: httpx.Client, prefix: str, name: str) -> None:
    wait_until(lambda: http.get("/-/routes").json().get(prefix) == name, timeout=5, interval=0.02,
               message=f"route {prefix} -> {name}")


class Marked:
    """Answers ``"<marker>:<x>"``, so its answers can be found in Redis."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, x):
        if isinstance(x, taskserve.http.Request):
            x = x.json()
        return f"{self.marker}:{x}"

    def wait(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def answers_holding(client, marker: str) -> list[bytes]:
    """The keys of the Celery results in Redis whose answer holds ``marker``."""
    keys = list(client.scan_iter(match=result_key_pattern(""), count=1000))
    values = client.mget(keys) if keys else []
    return [key for key, value in zip(keys, values) if value and marker.encode() in value]


# --------------------------------------------------------------------------- 1. answers read leave Redis


def test_answers_read_are_deleted_from_redis(connected, unique_name, http):
    marker = uuid.uuid4().hex
    model = taskserve.deployment(Marked).options(name=unique_name, version="1", num_cpus=0.1,
                                                 max_concurrent_queries=4)
    model.deploy(marker)
    wait_for_route(http, f"/{unique_name}", unique_name)
    handle = model.get_handle()
    store = taskserve.connect(connected.url)

    responses = [handle.remote(i) for i in range(20)]
    assert [response.result(timeout=30) for response in responses] == [f"{marker}:{i}" for i in range(20)]
    assert responses[3].result() == f"{marker}:3"       # asked again: the same answer
    assert answers_holding(store.redis, marker) == []     # deleted as they were read

    async def over_http() -> list[str]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=30) as client:
            answers = await asyncio.gather(*(client.post(f"/{unique_name}", json=i) for i in range(20)))
        return [answer.json() for answer in answers]

    assert asyncio.run(over_http()) == [f"{marker}:{i}" for i in range(20)]
    # The gateway deletes off the request's path: soon after, not before the answer.
    wait_until(lambda: answers_holding(store.redis, marker) == [], timeout=10,
               message="the gateway to delete the answers it read")
    model.delete()


# --------------------------------------------------------------------------- 2. nothing can serve


class Broken:
    def __init__(self) -> None:
        raise ValueError("no weights at /models/broken.bin")

    def __call__(self, x):
        return x


def test_calls_to_a_deployment_whose_replicas_all_failed_fail_at_once(connected, unique_name, http):
    broken = taskserve.deployment(Broken).options(name=unique_name, num_cpus=0.1)
    with pytest.raises(taskserve.DeploymentError, match="no weights"):
        broken.deploy()

    handle = taskserve.get_deployment(unique_name).get_handle()
    started = time.monotonic()
    with pytest.raises(taskserve.DeploymentUnavailable) as caught:
        handle.remote(1).result(timeout=60)
    assert time.monotonic() - started < 5
    assert isinstance(caught.value, taskserve.TaskserveError)
    assert "has no replica that can serve: constructor failed 3 times" in str(caught.value)
    assert "ValueError: no weights at /models/broken.bin" in str(caught.value)

    def refused() -> httpx.Response | None:
        # A request sent before the gateway re-read its routes waits in the queue: ask again.
        try:
            answer = http.post(f"/{unique_name}", json=1, timeout=2)
        except httpx.TimeoutException:
            return None
        return answer if answer.status_code == 503 and answer.json()["error"] == "Unavailable" else None

    answer = wait_until(refused, timeout=5, message="the gateway to refuse calls to the broken deployment")
    assert answer.json()["message"] == str(caught.value)
    taskserve.delete_deployment(unique_name)


def test_calls_to_a_deployment_scaled_to_zero_wait_in_the_queue(connected, unique_name):
    idle = taskserve.deployment(Marked).options(name=unique_name, num_replicas=0, version="1")
    idle.deploy("idle")
    response = idle.get_handle().remote(1)        # queued, not refused
    with pytest.raises(TimeoutError):
        response.result(timeout=0.5)
    idle.options(num_replicas=1, num_cpus=0.1).deploy("idle")
    assert response.result(timeout=30) == "idle:1"
    idle.delete()


def test_an_answer_whose_publication_was_missed_is_read_from_its_key(connected, unique_name):
    # As after Celery's result consumer reconnected: the answer is stored, its
    # publication never heard. The waiting caller finds it by reading the key.
    idle = taskserve.deployment(Marked).options(name=unique_name, num_replicas=0, version="1")
    idle.deploy("idle")
    response = idle.get_handle().remote(1)
    answer: list = []
    waiter = threading.Thread(target=lambda: answer.append(response.result(timeout=30)))
    waiter.start()
    time.sleep(0.3)    # the caller is subscribed and waiting
    client = redis.Redis.from_url(connected.url)
    client.set(result_key(response.request_id), encode_answer(response.request_id, Outcome(True, "stored only")))
    waiter.join(timeout=10)
    assert answer == ["stored only"]
    wait_until(lambda: not client.exists(result_key(response.request_id)), timeout=5,
               message="the answer read to be deleted")
    client.delete(queue_name(unique_name))
    idle.delete()


# --------------------------------------------------------------------------- 3. max_queued_requests


def test_requests_beyond_max_queued_requests_are_refused_at_once(connected, unique_name, http):
    limited = taskserve.deployment(Marked).options(name=unique_name, num_replicas=0, version="1",
                                                   max_queued_requests=3, request_timeout_s=0.3)
    limited.deploy("limited")
    wait_for_route(http, f"/{unique_name}", unique_name)
    store = taskserve.connect(connected.url)
    handle = limited.get_handle()
    queued = [handle.remote(i) for i in range(3)]
    with pytest.raises(taskserve.BackPressureError, match="has 3 requests waiting, its max_queued_requests of 3"):
        handle.remote(3)

    started = time.monotonic()
    answer = http.post(f"/{unique_name}", json=3)
    assert time.monotonic() - started < 5
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"] == "BackPressure"
    assert "has 3 requests waiting, its max_queued_requests of 3" in answer.json()["message"]

    store.redis.delete(queue_name(unique_name))     # room again: a request is queued (and times out)
    answer = http.post(f"/{unique_name}", json=4)
    assert answer.status_code == 503 and answer.json()["error"] == "Timeout"
    assert store.redis.llen(queue_name(unique_name)) == 1

    store.redis.delete(queue_name(unique_name))
    limited.delete()
    assert len(queued) == 3


# --------------------------------------------------------------------------- 4. Redis away


def test_calls_during_a_redis_outage_say_so_at_once(tmp_path):
    cluster = start_cluster(tmp_path)
    try:
        model = taskserve.deployment(Marked).options(name="outage", version="1", num_cpus=0.1,
                                                     max_concurrent_queries=2, graceful_shutdown_timeout_s=0)
        model.deploy("up")
        handle = model.get_handle()
        with running_gateway(cluster) as http:
            wait_for_route(http, "/outage", "outage")
            assert handle.remote(1).result(timeout=30) == "up:1"
            assert http.post("/outage", json=1).json() == "up:1"
            in_flight = handle.wait.remote(30)
            wait_until(lambda: taskserve.connect(cluster.url).redis.llen(queue_name("outage")) == 0,
                       message="the replica to take the slow request")

            cluster.redis.stop()
            expected = f"cannot reach Redis at {cluster.url} ("

            started = time.monotonic()
            with pytest.raises(taskserve.RedisUnavailable) as caught:
                handle.remote(2).result(timeout=60)
            assert time.monotonic() - started < 5
            assert expected in str(caught.value) and isinstance(caught.value, ConnectionError)

            # A call already sent waits the outage out within its timeout (its answer
            # comes once Redis is back); when the time is up, it says Redis is away.
            started = time.monotonic()
            with pytest.raises(taskserve.RedisUnavailable, match="cannot reach Redis at"):
                in_flight.result(timeout=2)
            assert 1.0 < time.monotonic() - started < 10

            started = time.monotonic()
            answer = http.post("/outage", json=2, timeout=60)
            assert time.monotonic() - started < 5
            assert answer.status_code == 503 and answer.json()["error"] == "Unavailable"
            assert f"the gateway {expected}" in answer.json()["message"]
    finally:
        cluster.shutdown()


# --------------------------------------------------------------------------- 5. waits that cannot end


def test_a_scale_or_deploy_no_node_can_hold_fails_at_once(connected, unique_name):
    huge = taskserve.deployment(Marked).options(name=unique_name, num_replicas=0, num_cpus=64, version="1")
    huge.deploy("huge")                                  # no replica: nothing to place

    outcome: list[BaseException] = []

    def scale() -> None:
        try:
            taskserve.scale_deployment(unique_name, 1)
        except BaseException as error:                   # asserted below
            outcome.append(error)

    waiter = threading.Thread(target=scale, daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "scale_deployment kept waiting for a replica no node can hold"
    [error] = outcome
    assert isinstance(error, taskserve.DeploymentError)
    assert "needs 64 CPUs and no node has 64 CPUs" in str(error)

    # The goal stays, UPDATING: calls wait in the queue rather than fail.
    response = huge.get_handle().remote(1)
    with pytest.raises(TimeoutError):
        response.result(timeout=0.3)

    with pytest.raises(taskserve.DeploymentError, match="no node has 128 CPUs"):
        huge.options(num_cpus=128, num_replicas=2, version="2").deploy("huge")
    taskserve.delete_deployment(unique_name)
    taskserve.connect(connected.url).redis.delete(queue_name(unique_name))


def test_scale_shows_its_progress(connected, unique_name):
    model = taskserve.deployment(Marked).options(name=unique_name, version="1", num_cpus=0.1)
    model.deploy("x")
    script = f"import taskserve; taskserve.scale_deployment({unique_name!r}, 2)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=connected.env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"taskserve: {unique_name}: scaling to 2 replicas (generation 2)"
    assert lines[-1] == f"taskserve: {unique_name}: version 1 is healthy"
    model.delete()


# --------------------------------------------------------------------------- 6. many clients, slow clients


def test_500_concurrent_requests_are_all_answered(connected, unique_name, http):
    model = taskserve.deployment(Marked).options(name=unique_name, version="1", num_cpus=0.1, num_replicas=2,
                                                 max_concurrent_queries=8)
    model.deploy("many")
    wait_for_route(http, f"/{unique_name}", unique_name)

    async def send_all() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post(f"/{unique_name}", json=i) for i in range(500)),
                                        return_exceptions=True)

    answers = asyncio.run(send_all())
    failures = [answer for answer in answers if isinstance(answer, BaseException)]
    assert not failures, failures[:3]
    for i, answer in enumerate(answers):
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 200:
            assert answer.json() == f"many:{i}"
        else:
            assert "retry-after" in answer.headers, answer.text
    model.delete()


@contextmanager
def gateway_process(cluster: Cluster, workdir: Path, open_files: int | None = None,
                    **options: float) -> Iterator[tuple[int, Path]]:
    """A gateway started through ``serve(**options)`` (options the CLI does not take),
    optionally with a low open-file limit; its port and log."""
    port = free_port()
    arguments = "".join(f", {key}={value!r}" for key, value in options.items())
    code = ("import logging; logging.basicConfig(level=logging.INFO); from taskserve.gateway.app import serve; "
            f"serve({cluster.url!r}, port={port}{arguments})")
    log_path = workdir / f"gateway-{port}.log"

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-c", code], env=cluster.env(), cwd=REPO,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   preexec_fn=limit_open_files)

    def healthy() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout=30, message="the gateway to answer /-/healthz")
        yield port, log_path
    finally:
        process.terminate()
        process.wait(timeout=60)


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout_s``)."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return received


def test_slow_clients_are_cut_off(connected, unique_name, tmp_path):
    model = taskserve.deployment(Marked).options(name=unique_name, version="1", num_cpus=0.1)
    model.deploy("slow")
    with gateway_process(connected, tmp_path, header_timeout_s=2.0, body_timeout_s=2.0) as (port, _):
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/routes").json().get(f"/{unique_name}"),
                   timeout=5, message="the route")

        # Headers at one byte a second: disconnected once the head is 2 s late.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(1.0)             # the client's pace: a byte, then up to a second for an answer
            started = time.monotonic()
            answer = b""
            for byte in f"GET /{unique_name} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: {'a' * 60}\r\n\r\n".encode():
                try:
                    sock.sendall(bytes([byte]))
                    answer = sock.recv(4096)
                except socket.timeout:
                    continue
                except OSError:              # reset: disconnected too
                    break
                break                        # an answer, or b"" for a closed connection
            elapsed = time.monotonic() - started
        assert elapsed < 2.0 + 3, "a client sending its headers a byte a second was never cut off"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer

        # A body that stops coming: 408, and the connection is closed.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /{unique_name} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                         "content-length: 100\r\n\r\n[1, 2".encode())
            started = time.monotonic()
            answer = read_until_closed(sock, timeout_s=30)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert elapsed < 2.0 + 3
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "RequestTimeout"

        # A client that keeps pace is served as ever.
        assert httpx.post(f"http://127.0.0.1:{port}/{unique_name}", json=1).json() == "slow:1"
    model.delete()


def test_out_of_file_descriptors_the_gateway_logs_rarely_and_recovers(connected, tmp_path):
    with gateway_process(connected, tmp_path, open_files=64) as (port, log_path):
        clients = []
        try:
            for _ in range(100):
                clients.append(socket.create_connection(("127.0.0.1", port)))
            wait_until(lambda: "Too many open files" in log_path.read_text(), timeout=10,
                       message="the gateway to run out of file descriptors")
            before = log_path.read_text().count("\n")
            window_s = 3.0
            time.sleep(window_s)                  # a window to count log lines in, not a synchronisation
            lines = log_path.read_text().splitlines()[before:]
        finally:
            for client in clients:
                client.close()
        assert len(lines) <= 5, "\n".join(lines[:20])

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=30, message="the gateway to serve again")
