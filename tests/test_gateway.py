"""The HTTP gateway: route tables and wire format (pure), then real HTTP to a real cluster.

The integration tests share the test run's cluster and start ``taskserve gateway`` as a
subprocess on a free port; requests go over real HTTP with httpx.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator

import fakeredis
import httpx
import pytest
import redis
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

import taskserve
from taskserve.celery_app import TASK_NAME, make_app
from taskserve.gateway.app import listen
from taskserve.gateway.messaging import ResultWaiter, TaskSender
from taskserve.gateway.routes import Route, RouteTable
from taskserve.http import HTTP_METHOD, Request, Response, decode_response, encode_request, encode_response
from taskserve.redis_server import free_port
from taskserve.state import Goal
from taskserve.store import queue_name, result_key
from taskserve.wire import Outcome, encode_answer
from workers.threshold import Threshold as SeedThreshold

from .helpers import REPO, Cluster, running_gateway, wait_until

# --------------------------------------------------------------------------- pure parts


def goal(name: str, **options) -> Goal:
    return Goal(name=name, generation=1, version="1", spec_hash="s", num_replicas=1, options=options,
                code_sha="c", init_sha="i", deleting=options.pop("deleting", False))


def test_route_table_longest_prefix_wins_on_path_segments():
    table = RouteTable.from_goals([
        goal("api", route_prefix="/api"),
        goal("api_v2", route_prefix="/api/v2"),
        goal("echo"),                                   # None: /<name>
        goal("hidden", route_prefix=False),             # not served
        goal("gone", deleting=True),
    ])
    assert table.to_dict() == {"/api": "api", "/api/v2": "api_v2", "/echo": "echo"}
    assert table.match("/api/v2/models").deployment == "api_v2"
    assert table.match("/api/v2").deployment == "api_v2"
    assert table.match("/api/v1").deployment == "api"
    assert table.match("/api").deployment == "api"
    assert table.match("/apiary") is None
    assert table.match("/hidden") is None and table.match("/gone") is None
    assert table.match("/") is None
    assert RouteTable([Route("/", "root"), Route("/a", "a")]).match("/b/c").deployment == "root"


def test_route_table_gives_a_contested_prefix_to_the_first_name():
    table = RouteTable([Route("/m", "zeta"), Route("/m", "alpha")])
    assert table.match("/m").deployment == "alpha"
    assert table.conflicts == [("/m", "alpha", "zeta")]


def test_route_table_carries_timeout_and_serializer():
    [route] = RouteTable.from_goals([goal("p", serializer="pickle", request_timeout_s=2.5)]).routes
    assert (route.serializer, route.timeout_s) == ("pickle", 2.5)


@pytest.mark.parametrize("value, reason", [
    ("api", "starts with '/'"), ("/api/", "trailing '/'"), ("/a//b", "'//'"), ("/a b", "spaces"),
    ("/-/metrics", "belong to the gateway"), (True, "valid string"),
])
def test_bad_route_prefix_is_refused_at_the_decorator(value, reason):
    with pytest.raises((TypeError, ValueError), match=reason):
        taskserve.deployment(route_prefix=value)(lambda request: None)


def test_request_travels_as_plain_data():
    headers = [("Content-Type", "application/json"), ("X-Tag", "a"), ("x-tag", "b")]
    request = Request.from_payload(encode_request("POST", "/m/x", "a=1&a=2&b=", headers, b'{"k": [1]}'))
    assert (request.method, request.path) == ("POST", "/m/x")
    assert request.query_params == {"a": "1", "b": ""}
    assert request.headers["x-tag"] == "a, b" and request.headers["CONTENT-TYPE"] == "application/json"
    assert request.body == b'{"k": [1]}' and request.json() == {"k": [1]}
    binary = bytes(range(256))
    assert Request.from_payload(encode_request("PUT", "/", "", [], binary)).body == binary


def test_return_values_become_http_answers():
    assert decode_response(encode_response([1, "é"])) == (200, [("content-type", "application/json")],
                                                          '[1,"é"]'.encode())
    assert decode_response(encode_response(b"\xff\x00")) == (200, [("content-type", "application/octet-stream")],
                                                              b"\xff\x00")
    status, headers, body = decode_response(encode_response(
        Response("made", status=201, headers={"Location": "/m/1", "Content-Length": "99"})))
    assert (status, body) == (201, b"made")
    assert headers == [("content-type", "text/plain; charset=utf-8"), ("location", "/m/1")]
    with pytest.raises(TypeError, match="type set, which cannot be sent as JSON"):
        encode_response({1, 2})
    with pytest.raises(ValueError, match="invalid HTTP status 1000"):
        Response(status=1000)


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_the_gateway_enqueues_the_message_celery_would(cluster, serializer):
    """Replicas (and Celery's tools) must read the gateway's messages as they read send_task's.
    An HTTP request is plain data: it travels as JSON whatever the deployment's serializer."""
    route = Route("/x", "sender-check", serializer=serializer, timeout_s=60)
    queue = queue_name(route.deployment)
    client = redis.Redis.from_url(cluster.url)
    payload = {"method": "GET", "path": "/x", "a": [1]}
    make_app(cluster.url).send_task(TASK_NAME, args=(HTTP_METHOD, [payload], {}), queue=queue,
                                            task_id="t1", expires=60)
    celery_message = json.loads(client.rpop(queue))
    ours = json.loads(TaskSender(cluster.url, client=None).message(route, "t1", payload))

    for message in (ours, celery_message):
        message["body"] = json.loads(base64.b64decode(message["body"]))
    assert ours["body"] == celery_message["body"]
    assert {k: v for k, v in ours.items() if k != "headers" and k != "properties" and k != "body"} == \
        {k: v for k, v in celery_message.items() if k != "headers" and k != "properties" and k != "body"}
    differ = {"expires", "expiration", "ignore_result", "delivery_tag", "reply_to", "origin",   # per message
              "argsrepr",                                                           # shorter, see TaskSender
              "taskserve"}                                                          # taskserve's own options
    assert {k: v for k, v in ours["headers"].items() if k not in differ} == \
        {k: v for k, v in celery_message["headers"].items() if k not in differ}
    assert {k: v for k, v in ours["properties"].items() if k not in differ} == \
        {k: v for k, v in celery_message["properties"].items() if k not in differ}
    assert ours["headers"]["argsrepr"] == "('__http__', 'GET /x')"
    assert abs(int(ours["properties"]["expiration"]) - int(celery_message["properties"]["expiration"])) < 5000
    expires = [datetime.fromisoformat(m["headers"]["expires"]) for m in (ours, celery_message)]
    assert abs((expires[0] - expires[1]).total_seconds()) < 5


# --------------------------------------------------------------------------- a real gateway


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with running_gateway(cluster) as client:
        yield client


def wait_for_route(http: httpx.Client, prefix: str, name: str | None, timeout: float = 2.0) -> None:
    """The route table shows ``prefix -> name`` (None: no such route) within ``timeout`` seconds."""
    wait_until(lambda: http.get("/-/routes").json().get(prefix) == name, timeout=timeout, interval=0.02,
               message=f"route {prefix} -> {name}")


class HalfModel:
    """The seed's random model, made certain: every score is 0.5."""

    def random(self) -> float:
        return 0.5


class DeterministicThreshold(SeedThreshold.func_or_class):
    def __init__(self) -> None:
        self.model = HalfModel()


def test_seed_threshold_example_over_http(connected, unique_name, http):
    threshold = taskserve.deployment(DeterministicThreshold).options(name=unique_name, version="1", num_cpus=0.1)
    threshold.options(user_config={"threshold": 0.01}).deploy()
    wait_for_route(http, f"/{unique_name}", unique_name)
    answer = http.get(f"/{unique_name}")
    assert (answer.status_code, answer.headers["content-type"], answer.json()) == (200, "application/json", True)
    [pid] = {r.pid for r in threshold.status().replicas}

    threshold.options(user_config={"threshold": 0.99}).deploy()
    assert http.post(f"/{unique_name}", json={"ignored": 1}).json() is False
    assert {r.pid for r in threshold.status().replicas} == {pid}       # reconfigured in place
    threshold.delete()


class Inspector:
    """Answers each path under its prefix in another way."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request):
        self.calls += 1
        action = request.path.rsplit("/", 1)[-1]
        if action == "fail":
            raise ValueError(f"bad input: {request.query_params.get('q')}")
        if action == "bytes":
            return bytes(range(256))
        if action == "teapot":
            return taskserve.http.Response({"short": "stout"}, status=418, headers={"X-Kind": "teapot"})
        if action == "size":
            return len(request.body)
        if action == "set":
            return {1, 2}
        return {"method": request.method, "path": request.path, "query": request.query_params,
                "tag": request.headers.get("X-Tag"), "body": request.json() if request.body else None,
                "calls": self.calls}


@pytest.fixture(scope="module")
def inspector(cluster: Cluster) -> Iterator[str]:
    taskserve.connect(cluster.url)
    name = "inspector"
    deployment = taskserve.deployment(Inspector).options(name=name, route_prefix="/inspect/me", version="1",
                                                         num_cpus=0.1, max_concurrent_queries=4)
    deployment.deploy()
    yield "/inspect/me"
    deployment.delete()


def test_request_object_reaches_call_and_answers_come_back(http, inspector):
    answer = http.post(f"{inspector}/a/b?x=1&x=2&y=", json={"k": [1, 2]}, headers={"x-tag": "t"})
    assert answer.status_code == 200
    assert answer.json() == {"method": "POST", "path": f"{inspector}/a/b", "query": {"x": "1", "y": ""},
                             "tag": "t", "body": {"k": [1, 2]}, "calls": answer.json()["calls"]}
    assert http.put(inspector).json()["method"] == "PUT"

    raw = http.get(f"{inspector}/bytes")
    assert (raw.headers["content-type"], raw.content) == ("application/octet-stream", bytes(range(256)))

    teapot = http.get(f"{inspector}/teapot")
    assert (teapot.status_code, teapot.headers["x-kind"], teapot.json()) == (418, "teapot", {"short": "stout"})

    assert http.post(f"{inspector}/size", content=b"x" * 1_000_000).json() == 1_000_000


def test_concurrent_requests_each_get_their_own_answer(http, inspector):
    async def send_all() -> list[int]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=30) as client:
            answers = await asyncio.gather(*(client.post(f"{inspector}/size", content=b"x" * size)
                                             for size in range(100)))
        return [answer.json() for answer in answers]

    assert asyncio.run(send_all()) == list(range(100))


def test_pickle_deployments_are_served_too(connected, unique_name, http):
    def double(request):
        return {"doubled": 2 * request.json()}

    doubler = taskserve.deployment(name=unique_name, serializer="pickle", version="1", num_cpus=0.1)(double)
    doubler.deploy()
    wait_for_route(http, f"/{unique_name}", unique_name)
    assert http.post(f"/{unique_name}", json=21).json() == {"doubled": 42}
    doubler.delete()


def test_errors_404_500_and_413(cluster, http, inspector):
    missing = http.get("/no/such/deployment")
    assert missing.status_code == 404
    assert missing.json() == {"error": "NotFound",
                              "message": "no deployment serves /no/such/deployment; GET /-/routes lists the routes"}
    assert http.get("/inspect").status_code == 404            # a prefix matches whole path segments only
    assert http.get("/-/nothing").status_code == 404

    failed = http.get(f"{inspector}/fail?q=xyz")
    assert failed.status_code == 500
    assert failed.json() == {"error": "ValueError", "message": "bad input: xyz"}     # no traceback
    unsendable = http.get(f"{inspector}/set")
    assert unsendable.status_code == 500 and unsendable.json()["error"] == "TypeError"
    assert "type set, which cannot be sent as JSON" in unsendable.json()["message"]

    limit = 10 * 1024 * 1024
    too_large = http.post(f"{inspector}/size", content=b"x" * (limit + 1))
    assert too_large.status_code == 413 and too_large.json()["error"] == "PayloadTooLarge"
    chunked = http.post(f"{inspector}/size", content=iter([b"x" * limit, b"y"]))      # no Content-Length
    assert chunked.status_code == 413
    assert http.post(f"{inspector}/size", content=b"x" * limit).json() == limit

    with running_gateway(cluster, "--debug") as debug_http:
        wait_for_route(debug_http, inspector, "inspector")
        failed = debug_http.get(f"{inspector}/fail?q=xyz").json()
        assert failed["error"] == "ValueError" and "Traceback" in failed["traceback"]
        assert "in __call__" in failed["traceback"]


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request):
        self.calls += 1
        return self.calls


def test_no_answer_in_time_is_503_and_the_request_expires_unserved(connected, unique_name, http):
    counter = taskserve.deployment(Counter).options(name=unique_name, version="1", num_replicas=0,
                                                    request_timeout_s=0.5, num_cpus=0.1)
    counter.deploy()
    wait_for_route(http, f"/{unique_name}", unique_name)
    started = time.monotonic()
    answer = http.get(f"/{unique_name}")
    assert answer.status_code == 503 and answer.json()["error"] == "Timeout"
    assert "request_timeout_s of 0.5s" in answer.json()["message"]
    assert 0.5 <= time.monotonic() - started < 5

    # The request still waits in the queue, but no replica will run it: it expired.
    counter.options(num_replicas=1).deploy()
    assert http.get(f"/{unique_name}").json() == 1
    counter.delete()


def test_routes_follow_deploys_and_deletes(connected, unique_name, http):
    def named(name):
        def answer(request):
            return name
        return answer

    outer = taskserve.deployment(name=f"{unique_name}-outer", route_prefix=f"/{unique_name}",
                                 version="1", num_cpus=0.1)(named("outer"))
    inner = taskserve.deployment(name=f"{unique_name}-inner", route_prefix=f"/{unique_name}/in",
                                 version="1", num_cpus=0.1)(named("inner"))
    hidden = taskserve.deployment(name=f"{unique_name}-hidden", route_prefix=False,
                                  version="1", num_replicas=0)(named("hidden"))
    outer.deploy()
    wait_for_route(http, f"/{unique_name}", outer.name, timeout=1.5)
    assert http.get(f"/{unique_name}/in/x").json() == "outer"
    inner.deploy()
    wait_for_route(http, f"/{unique_name}/in", inner.name, timeout=1.5)
    assert http.get(f"/{unique_name}/in/x").json() == "inner"          # the longest prefix wins
    assert http.get(f"/{unique_name}/inside").json() == "outer"
    hidden.deploy()
    assert hidden.name not in http.get("/-/routes").json().values()
    assert http.get(f"/{hidden.name}").status_code == 404

    inner.delete()
    wait_for_route(http, f"/{unique_name}/in", None, timeout=1.5)
    assert http.get(f"/{unique_name}/in/x").json() == "outer"
    outer.delete()
    hidden.delete()
    wait_for_route(http, f"/{unique_name}", None, timeout=1.5)
    assert http.get(f"/{unique_name}").status_code == 404


def scrape(http: httpx.Client) -> dict[tuple, float]:
    """Every sample of ``/-/metrics`` as ``{(name, sorted labels): value}``."""
    answer = http.get("/-/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text) for sample in family.samples
    }


def test_metrics_move_with_requests_and_the_cluster(connected, unique_name, http, inspector):
    before = scrape(http)
    for _ in range(3):
        assert http.get(f"{inspector}/x").status_code == 200
    assert http.get(f"{inspector}/fail").status_code == 500
    assert http.get("/not-routed").status_code == 404
    after = scrape(http)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("taskserve_http_requests_total", deployment="inspector", method="GET", status="200") == 3
    assert moved("taskserve_http_requests_total", deployment="inspector", method="GET", status="500") == 1
    assert moved("taskserve_http_requests_total", deployment="", method="GET", status="404") == 1
    assert moved("taskserve_http_request_duration_seconds_count", deployment="inspector", status="200") == 3
    assert moved("taskserve_http_request_duration_seconds_sum", deployment="inspector", status="200") > 0
    assert moved("taskserve_http_errors_total", deployment="inspector", status="500", error="replica_error") == 1
    assert moved("taskserve_http_errors_total", deployment="", status="404", error="not_found") == 1
    assert after[("taskserve_http_requests_in_flight", (("deployment", "inspector"),))] == 0
    assert after[("taskserve_replicas", (("deployment", "inspector"), ("state", "RUNNING"), ("version", "1")))] == 1
    assert after[("taskserve_queue_depth", (("deployment", "inspector"),))] == 0
    assert ("taskserve_rollouts_in_progress", ()) in after

    # Requests nobody serves pile up in the queue; a deploy without replicas is a finished rollout.
    idle = taskserve.deployment(Counter).options(name=unique_name, num_replicas=0, request_timeout_s=0.2)
    idle.deploy()
    wait_for_route(http, f"/{unique_name}", unique_name)
    assert [http.get(f"/{unique_name}").status_code for _ in range(2)] == [503, 503]
    # The cluster gauges come from the gateway's status snapshot: at most ~0.5 s old.
    wait_until(lambda: scrape(http).get(("taskserve_queue_depth", (("deployment", unique_name),))) == 2,
               timeout=5, message="the queue depth in the metrics")
    idle.delete()


def test_gateway_on_a_port_in_use_fails_in_one_line(cluster):
    port = free_port()
    with running_gateway_port(port):
        result = subprocess.run([sys.executable, "-m", "taskserve", "gateway", "--port", str(port)],
                                capture_output=True, text=True, env=cluster.env(), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the gateway cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pick another port with --port (taskserve up: --http-port), or stop what uses it"]


def test_gateway_without_redis_fails_in_one_line(cluster):
    env = {k: v for k, v in cluster.env().items() if k != "TASKSERVE_ADDRESS"}
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run([sys.executable, "-m", "taskserve", "gateway", "--port", str(free_port()),
                             "--address", nowhere], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach Redis at {nowhere}") and "taskserve up" in line


@contextmanager
def running_gateway_port(port: int) -> Iterator[None]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def test_celery_inspect_sees_replicas_as_workers(cluster, http, inspector):
    replica_ids = {r.replica_id for r in taskserve.get_deployment("inspector").status().replicas}
    result = subprocess.run([sys.executable, "-m", "celery", "-b", cluster.url, "inspect", "active_queues",
                             "-t", "3"], capture_output=True, text=True, timeout=60, env=cluster.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(replica_id in result.stdout for replica_id in replica_ids), result.stdout
    assert "taskserve.inspector" in result.stdout


@pytest.mark.integration
def test_up_serves_http_on_its_http_port(tmp_path):
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TASKSERVE_ADDRESS"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    log = open(tmp_path / "up.log", "ab")
    up = subprocess.Popen(
        [sys.executable, "-m", "taskserve", "up", "--redis-port", str(free_port()), "--num-cpus", "2",
         "--http-port", str(http_port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)

        def echoed() -> dict | None:
            try:
                answer = client.get("/echo/hello?x=1")
            except httpx.TransportError:
                assert up.poll() is None, (tmp_path / "up.log").read_text()
                return None
            return answer.json() if answer.status_code == 200 else None

        echo = wait_until(echoed, timeout=90, interval=0.2, message="the example deployment to answer over HTTP")
        # The example echoes its argument: here the request itself.
        assert (echo["method"], echo["path"], echo["query_params"]) == ("GET", "/echo/hello", {"x": "1"})
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{http_port}/-/healthz", timeout=2)


# --------------------------------------------------------------------------- answers on one subscription


def stored_result(task_id: str, value: object) -> bytes:
    """A Celery result record of a successful request, as a replica stores it."""
    return encode_answer(task_id, Outcome(True, value))


async def started_waiter(url: str, **kwargs: object) -> tuple[redis.asyncio.Redis, ResultWaiter]:
    client = redis.asyncio.Redis.from_url(url, **kwargs)
    waiter = ResultWaiter(client, on_event=lambda: None)
    await waiter.start()
    return client, waiter


def test_task_ids_fall_under_their_gateways_pattern_only():
    client = fakeredis.aioredis.FakeRedis()
    first, second = ResultWaiter(client, lambda: None), ResultWaiter(client, lambda: None)
    ids = [first.new_task_id() for _ in range(3)]
    assert len(set(ids)) == 3 and first.gateway_id != second.gateway_id
    for task_id in ids:
        assert fnmatch.fnmatchcase(result_key(task_id), first.pattern)
        assert not fnmatch.fnmatchcase(result_key(task_id), second.pattern)
    # A handle's task id (a UUID) matches no gateway.
    assert not fnmatch.fnmatchcase(result_key("d9b1c2e3-0000-4000-8000-000000000000"), first.pattern)


def test_a_result_published_before_the_request_is_pushed_is_delivered(cluster):
    """No subscription per request: an answer that comes before the push completes is not missed."""
    async def run() -> None:
        client, waiter = await started_waiter(cluster.url)
        try:
            task_id = waiter.new_task_id()
            with waiter.expecting(task_id) as pending:
                value = stored_result(task_id, "early")
                await client.set(result_key(task_id), value)
                await client.publish(result_key(task_id), value)
                answer = await waiter.wait(pending, 10)
            assert answer.value == "early"
            assert waiter.pending == {}
        finally:
            await waiter.close()
            await client.aclose()

    asyncio.run(run())


def test_an_answer_whose_message_never_came_is_read_from_its_key(cluster):
    async def run() -> None:
        client, waiter = await started_waiter(cluster.url)
        try:
            task_id = waiter.new_task_id()
            with waiter.expecting(task_id) as pending:
                await client.set(result_key(task_id), stored_result(task_id, "stored, not published"))
                answer = await waiter.wait(pending, 30)      # the sweep finds it
            assert answer.value == "stored, not published"
        finally:
            await waiter.close()
            await client.aclose()

    asyncio.run(run())


def test_answers_stored_while_the_subscription_was_down_are_delivered(cluster):
    async def run() -> None:
        name = f"waiter-{uuid.uuid4().hex[:8]}"
        client, waiter = await started_waiter(cluster.url, client_name=name)
        admin = redis.asyncio.Redis.from_url(cluster.url)
        try:
            task_id = waiter.new_task_id()
            with waiter.expecting(task_id) as pending:
                waiting = asyncio.ensure_future(waiter.wait(pending, 30))
                [pubsub] = [c for c in await admin.client_list() if c["name"] == name and "P" in c["flags"]]
                await admin.client_kill_filter(_id=pubsub["id"])
                # Stored while the gateway is (re)subscribing: its message may be lost.
                await client.set(result_key(task_id), stored_result(task_id, "during the outage"))
                assert (await waiting).value == "during the outage"
            # Once subscribed again, the next answer comes by message as before.
            deadline = time.monotonic() + 30
            while waiter.lost is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            task_id = waiter.new_task_id()
            with waiter.expecting(task_id) as pending:
                value = stored_result(task_id, "after")
                await client.set(result_key(task_id), value)
                await client.publish(result_key(task_id), value)
                assert (await waiter.wait(pending, 30)).value == "after"
        finally:
            await waiter.close()
            await client.aclose()
            await admin.aclose()

    asyncio.run(run())


def test_a_request_without_an_answer_times_out(cluster):
    async def run() -> None:
        client, waiter = await started_waiter(cluster.url)
        try:
            with waiter.expecting(waiter.new_task_id()) as pending:
                with pytest.raises(TimeoutError):
                    await waiter.wait(pending, 0.2)
        finally:
            await waiter.close()
            await client.aclose()

    asyncio.run(run())


def test_requests_sent_together_are_pushed_together_in_order():
    async def run() -> None:
        client = fakeredis.aioredis.FakeRedis()
        sender = TaskSender("redis://127.0.0.1:6379/0", client)
        batches: list[int] = []
        push = sender._push

        async def counted(batch: list) -> None:
            batches.append(len(batch))
            await push(batch)

        sender._push = counted                     # type: ignore[method-assign]
        free, limited = Route("/free", "free"), Route("/limited", "limited", max_queued=3)
        payload = {"method": "POST", "path": "/x"}
        outcomes = await asyncio.gather(
            *(sender.send(free if i % 2 == 0 else limited, f"t{i}", payload) for i in range(12)),
            return_exceptions=True)
        assert batches == [12]                     # one round trip for the twelve
        refused = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, taskserve.BackPressureError)]
        assert refused == [7, 9, 11]               # the limited queue took its first three
        pushed = [outcome for i, outcome in enumerate(outcomes) if i not in refused]
        assert [queue for queue, _ in pushed] == [queue_name("free" if i % 2 == 0 else "limited")
                                                  for i in range(12) if i not in refused]

        def ids(queue: str) -> list[str]:
            return [json.loads(m)["headers"]["id"] for m in reversed(items[queue])]   # consumers pop the right end

        items = {queue: await client.lrange(queue, 0, -1) for queue in (queue_name("free"), queue_name("limited"))}
        assert ids(queue_name("free")) == [f"t{i}" for i in range(0, 12, 2)]
        assert ids(queue_name("limited")) == ["t1", "t3", "t5"]
        # Each send names the very item it pushed (what a shutting-down gateway takes back).
        assert sorted(item for _, item in pushed) == sorted(items[queue_name("free")] + items[queue_name("limited")])

        (alone,) = await asyncio.gather(sender.send(free, "alone", payload))
        assert alone[0] == queue_name("free") and json.loads(alone[1])["headers"]["id"] == "alone"
        assert batches == [12, 1]

    asyncio.run(run())


def test_a_failed_push_fails_the_requests_sent_with_it():
    class Down:
        def pipeline(self, transaction: bool = True) -> object:
            raise redis.ConnectionError("Connection refused")

        async def lpush(self, *args: object) -> int:
            raise redis.ConnectionError("Connection refused")

    async def run() -> None:
        sender = TaskSender("redis://127.0.0.1:6379/0", Down())   # type: ignore[arg-type]
        payload = {"method": "GET", "path": "/x"}
        outcomes = await asyncio.gather(*(sender.send(Route("/x", "x"), f"t{i}", payload) for i in range(3)),
                                        return_exceptions=True)
        assert all(isinstance(outcome, redis.ConnectionError) for outcome in outcomes)
        with pytest.raises(redis.ConnectionError):
            await sender.send(Route("/x", "x"), "t3", payload)    # alone: a plain LPUSH, same error

    asyncio.run(run())


def named_echo(name: str):
    def answer(request):
        return [name, request.json()]
    return answer


def test_64_concurrent_requests_to_interleaved_deployments_each_get_their_own_answer(connected, unique_name, http):
    names = [f"{unique_name}-a", f"{unique_name}-b"]
    deployments = [taskserve.deployment(name=name, version="1", num_cpus=0.1, max_concurrent_queries=4)(named_echo(name))
                   for name in names]
    for deployment in deployments:
        deployment.deploy()
    for name in names:
        wait_for_route(http, f"/{name}", name)

    async def send_all() -> list[list]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=30, limits=limits) as client:
            answers = await asyncio.gather(*(client.post(f"/{names[i % 2]}", json={"i": i}) for i in range(64)))
        assert {answer.status_code for answer in answers} == {200}
        return [answer.json() for answer in answers]

    assert asyncio.run(send_all()) == [[names[i % 2], {"i": i}] for i in range(64)]
    for deployment in deployments:
        deployment.delete()


# --------------------------------------------------------------------------- the HTTP protocol


@pytest.mark.integration
def test_gateways_share_a_port_with_reuse_port():
    port = free_port()
    first = listen("127.0.0.1", port, reuse_port=True)
    try:
        second = listen("127.0.0.1", port, reuse_port=True)
        second.close()
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(Address already in use\\)"):
            listen("127.0.0.1", port)                       # one that did not ask cannot join
    finally:
        first.close()


def installed_parsers() -> list[str]:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return ["h11"]
    return ["h11", "httptools"]


def parsers_and_loops() -> list[tuple[str, str]]:
    """Each installed parser on asyncio's loop; httptools on uvloop too, when both are installed."""
    combinations = [(parser, "asyncio") for parser in installed_parsers()]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return combinations
    return combinations + ([("httptools", "uvloop")] if "httptools" in installed_parsers() else [])


@pytest.mark.parametrize("parser,event_loop", parsers_and_loops())
def test_both_http_parsers_cut_off_slow_clients_and_answer_in_order(connected, unique_name, tmp_path, parser,
                                                                     event_loop):
    from .faults.test_client_faults import gateway_process, read_until_closed

    model = taskserve.deployment(name=unique_name, version="1", num_cpus=0.1)(named_echo(unique_name))
    model.deploy()
    with gateway_process(connected, tmp_path, header_timeout_s=1.0, body_timeout_s=1.0,
                         http_parser=parser, event_loop=event_loop) as (port, _):
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/routes").json().get(f"/{unique_name}"),
                   timeout=5, message="the route")

        # Two requests in one write: two answers, in order, in one answer each.
        request = (f"POST /{unique_name} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                   "content-length: {length}\r\n\r\n{body}")
        bodies = ['{"n": 1}', '{"n": 2}']
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall("".join(request.format(length=len(b), body=b) for b in bodies).encode())
            sock.settimeout(30)
            received = b""
            while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"]"):
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            # The head timer runs again once both are answered: the idle connection is cut off.
            rest = read_until_closed(sock, timeout_s=30)
        assert received.count(b"HTTP/1.1 200") == 2
        assert received.index(b'{"n":1}') < received.index(b'{"n":2}')
        assert rest.startswith(b"HTTP/1.1 408 ") and json.loads(rest.partition(b"\r\n\r\n")[2])["error"] == \
            "RequestTimeout"

        # A head that never ends: 408 once it is late.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"GET /{unique_name} HTTP/1.1\r\nhost: 127.0.0.1\r\n".encode())
            assert read_until_closed(sock, timeout_s=30).startswith(b"HTTP/1.1 408 ")

        # A head over the limit: refused at once, the connection closed.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"GET /{unique_name} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {'a' * 40_000}\r\n".encode())
            answer = read_until_closed(sock, timeout_s=30)
        assert answer.startswith(b"HTTP/1.1 431 " if parser == "httptools" else b"HTTP/1.1 400 "), answer[:80]

        # A body that stops coming: 408 with connection: close.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /{unique_name} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n[1".encode())
            answer = read_until_closed(sock, timeout_s=30)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()

        assert httpx.post(f"http://127.0.0.1:{port}/{unique_name}", json=3).json() == [unique_name, 3]
    model.delete()
