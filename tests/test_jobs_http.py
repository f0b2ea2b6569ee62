"""Jobs over HTTP on a real cluster and a real gateway: ``Prefer: respond-async`` answers
202 with the job's status URL, ``GET /-/jobs/<id>`` follows it through its states to its
result, ``DELETE`` cancels, ``Idempotency-Key`` and ``Priority`` headers, and the job
lines of ``/-/metrics`` and ``/-/api/status``."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import taskserve
from taskserve.http import Response

from .helpers import Cluster, running_gateway, wait_until

ASYNC = {"Prefer": "respond-async"}


class Orders:
    """An HTTP deployment: each request's JSON names a Redis list to log its run in, and
    optionally a key to wait for (noticing a cancel meanwhile), a failure, or a body kind."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    def __call__(self, request: Any) -> Any:
        order = request.json()
        name = order["name"]
        context = taskserve.job_context()
        self.client.rpush(order["log"], name)
        if context is not None:
            context.report(progress=0.5, message=f"{name} half way")
        deadline = time.monotonic() + 60
        while order.get("hold") and not self.client.exists(order["hold"]) and time.monotonic() < deadline:
            if context is not None and context.cancelled:
                self.client.rpush(order["log"], f"{name}:noticed-cancel")
                return "stopped"
            time.sleep(0.02)
        if order.get("fail"):
            raise ValueError(f"{name} failed")
        if order.get("kind") == "bytes":
            return Response(b"\xff\x00", headers={"x-kind": "bytes"})
        if order.get("kind") == "text":
            return Response(f"plain {name}", status=201)
        return {"done": name, "attempt": context.attempt if context else 0, "path": request.path}

    def double(self, x: int) -> int:
        return 2 * x


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with running_gateway(cluster) as client:
        yield client


@pytest.fixture
def orders(connected, unique_name, http):
    model = taskserve.deployment(Orders).options(name=unique_name, num_cpus=0.1, version="1")
    model.deploy(connected.url)
    wait_until(lambda: http.get("/-/routes").json().get(f"/{unique_name}") == unique_name, timeout=15,
               message="the route")
    yield model
    model.delete()


@pytest.fixture
def log_key() -> str:
    return f"test-jobs-http:log:{uuid.uuid4().hex}"


def runs(connected, key: str) -> list[str]:
    return [item.decode() for item in redis.Redis.from_url(connected.url).lrange(key, 0, -1)]


def release(connected, key: str) -> None:
    redis.Redis.from_url(connected.url).set(key, "1", ex=300)


def submit(http: httpx.Client, name: str, order: dict, headers: dict | None = None) -> str:
    answer = http.post(f"/{name}", json=order, headers={**ASYNC, **(headers or {})})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert answer.json() == {"job_id": job_id, "status_url": f"/-/jobs/{job_id}"}
    assert answer.headers["location"] == f"/-/jobs/{job_id}"
    return job_id


def state_of(http: httpx.Client, job_id: str) -> dict:
    answer = http.get(f"/-/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for_state(http: httpx.Client, job_id: str, state: str, timeout: float = 30) -> dict:
    return wait_until(lambda: (lambda body: body if body["state"] == state else None)(state_of(http, job_id)),
                      timeout=timeout, message=f"job {job_id} to be {state}")


def test_prefer_respond_async_answers_202_and_the_status_url_follows_the_job_to_its_result(connected, orders,
                                                                                            http, log_key):
    name = orders.name
    hold = f"{log_key}:hold"
    answer = http.post(f"/{name}/scan", json={"name": "blocker", "log": log_key, "hold": hold}, headers=ASYNC)
    assert answer.status_code == 202 and answer.headers["preference-applied"] == "respond-async"
    blocker = answer.json()["job_id"]
    assert len(blocker) == 32 and answer.headers["location"] == f"/-/jobs/{blocker}"
    second = submit(http, name, {"name": "second", "log": log_key})

    running = wait_until(lambda: (lambda body: body if body["progress"] else None)(state_of(http, blocker)),
                         timeout=30, message="the blocker's progress")
    assert (running["state"], running["progress"], running["message"], running["attempts"]) == (
        "RUNNING", 0.5, "blocker half way", 1)
    queued = state_of(http, second)
    assert (queued["state"], queued["attempts"], queued["deployment"], queued["progress"]) == ("QUEUED", 0, name, None)
    assert queued["created_at"] <= time.time() and queued["started_at"] is None and "result" not in queued

    release(connected, hold)
    done = wait_for_state(http, blocker, "SUCCEEDED")
    assert done["result"] == {"status": 200, "headers": {"content-type": "application/json"},
                              "content_type": "application/json", "body_encoding": "json",
                              "body": {"done": "blocker", "attempt": 1, "path": f"/{name}/scan"}}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] and done["error"] is None
    assert wait_for_state(http, second, "SUCCEEDED")["result"]["body"]["done"] == "second"
    assert state_of(http, blocker) == done                          # read any number of times
    assert taskserve.get_job(blocker).status().state == "SUCCEEDED"   # the same job from Python
    assert runs(connected, log_key) == ["blocker", "second"]


def test_a_job_answer_that_is_not_json_comes_as_text_or_base64_and_a_failure_as_its_error(orders, http, log_key):
    name = orders.name
    text = submit(http, name, {"name": "t", "log": log_key, "kind": "text"})
    binary = submit(http, name, {"name": "b", "log": log_key, "kind": "bytes"})
    failing = submit(http, name, {"name": "f", "log": log_key, "fail": True})
    assert wait_for_state(http, text, "SUCCEEDED")["result"] == {
        "status": 201, "headers": {"content-type": "text/plain; charset=utf-8"},
        "content_type": "text/plain; charset=utf-8", "body": "plain t", "body_encoding": "text"}
    result = wait_for_state(http, binary, "SUCCEEDED")["result"]
    assert (result["body"], result["body_encoding"], result["headers"]["x-kind"]) == ("/wA=", "base64", "bytes")
    failed = wait_for_state(http, failing, "FAILED")
    assert failed["error"] == {"type": "ValueError", "message": "f failed"}     # no traceback without --debug
    assert "result" not in failed


def test_delete_cancels_a_queued_job_that_then_never_runs_and_a_finished_one_is_a_conflict(connected, orders,
                                                                                             http, log_key):
    name = orders.name
    hold = f"{log_key}:hold"
    blocker = submit(http, name, {"name": "blocker", "log": log_key, "hold": hold})
    victim = submit(http, name, {"name": "victim", "log": log_key})
    wait_for_state(http, blocker, "RUNNING")

    cancelled = http.delete(f"/-/jobs/{victim}")
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "CANCELLED"
    assert state_of(http, victim)["state"] == "CANCELLED"
    again = http.delete(f"/-/jobs/{victim}")
    assert again.status_code == 409 and again.json()["state"] == "CANCELLED"

    release(connected, hold)
    wait_for_state(http, blocker, "SUCCEEDED")
    after = submit(http, name, {"name": "after", "log": log_key})       # served after the victim's message
    wait_for_state(http, after, "SUCCEEDED")
    assert runs(connected, log_key) == ["blocker", "after"]
    assert state_of(http, victim)["state"] == "CANCELLED"

    finished = http.delete(f"/-/jobs/{blocker}")
    assert finished.status_code == 409
    assert finished.json()["error"] == "JobFinished" and finished.json()["state"] == "SUCCEEDED"


def test_delete_asks_a_running_job_to_stop(connected, orders, http, log_key):
    job_id = submit(http, orders.name, {"name": "long", "log": log_key, "hold": f"{log_key}:never"})
    wait_for_state(http, job_id, "RUNNING")
    asked = http.delete(f"/-/jobs/{job_id}")
    assert asked.status_code == 202 and asked.json()["state"] == "RUNNING" and asked.json()["cancel_requested"]
    wait_for_state(http, job_id, "CANCELLED")
    assert "long:noticed-cancel" in runs(connected, log_key)


def test_an_unknown_job_is_404(http):
    for path in ("/-/jobs/0123456789abcdef0123456789abcdef", "/-/jobs/no..such"):
        for method in ("GET", "DELETE"):
            answer = http.request(method, path)
            assert answer.status_code == 404, (method, path)
            assert answer.json() == {"error": "NotFound", "message": f"no job {path.rsplit('/', 1)[1]!r}: it does not "
                                     "exist, or it finished longer ago than its deployment's job_ttl_s (default a day)"}
    assert http.get("/-/jobs/..%2F..%2Fgoal").status_code == 404


def test_an_idempotency_key_returns_the_job_already_submitted(connected, orders, http, log_key):
    name = orders.name
    first = submit(http, name, {"name": "once", "log": log_key}, {"Idempotency-Key": "order-17"})
    again = submit(http, name, {"name": "twice", "log": log_key}, {"Idempotency-Key": "order-17"})
    other = submit(http, name, {"name": "other", "log": log_key}, {"Idempotency-Key": "order-18"})
    assert again == first and other != first
    wait_for_state(http, first, "SUCCEEDED")
    wait_for_state(http, other, "SUCCEEDED")
    assert sorted(runs(connected, log_key)) == ["once", "other"]
    too_long = http.post(f"/{name}", json={}, headers={**ASYNC, "Idempotency-Key": "k" * 257})
    assert too_long.status_code == 400 and "Idempotency-Key" in too_long.json()["message"]


def test_the_priority_header_orders_waiting_jobs_and_a_bad_one_is_refused(connected, orders, http, log_key):
    name = orders.name
    hold = f"{log_key}:hold"
    blocker = submit(http, name, {"name": "blocker", "log": log_key, "hold": hold})
    wait_for_state(http, blocker, "RUNNING")
    low = submit(http, name, {"name": "low", "log": log_key}, {"Priority": "1"})
    plain = submit(http, name, {"name": "plain", "log": log_key})
    high = submit(http, name, {"name": "high", "log": log_key}, {"Priority": "9"})
    assert [state_of(http, job)["priority"] for job in (low, plain, high)] == [1, 5, 9]
    release(connected, hold)
    for job in (low, plain, high):
        wait_for_state(http, job, "SUCCEEDED")
    assert runs(connected, log_key) == ["blocker", "high", "plain", "low"]
    bad = http.post(f"/{name}", json={}, headers={**ASYNC, "Priority": "10"})
    assert bad.status_code == 400 and bad.json()["message"].startswith("Priority: '10' is not a job priority")


def test_a_full_queue_refuses_a_job_with_retry_after(connected, unique_name, http, log_key):
    model = taskserve.deployment(Orders).options(name=unique_name, num_replicas=0, max_queued_requests=1)
    model.deploy(connected.url)
    wait_until(lambda: http.get("/-/routes").json().get(f"/{unique_name}") == unique_name, timeout=15)
    submit(http, unique_name, {"name": "one", "log": log_key})
    full = http.post(f"/{unique_name}", json={"name": "two", "log": log_key}, headers=ASYNC)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"] == "BackPressure"
    model.delete()


def test_a_python_job_reads_over_http_and_a_pickled_result_is_never_unpickled(connected, unique_name, http,
                                                                              log_key):
    plain = taskserve.deployment(Orders).options(name=unique_name, num_cpus=0.1)
    plain.deploy(connected.url)
    job = plain.get_handle().double.submit(21)
    assert job.result(timeout=30) == 42
    body = state_of(http, job.id)
    assert (body["state"], body["method"], body["result"]) == ("SUCCEEDED", "double", 42)

    pickled = taskserve.deployment(Orders).options(name=f"{unique_name}-p", num_cpus=0.1, serializer="pickle")
    pickled.deploy(connected.url)
    wait_until(lambda: http.get("/-/routes").json().get(f"/{unique_name}-p"), timeout=15)
    job = pickled.get_handle().double.submit(4)
    assert job.result(timeout=30) == 8
    body = state_of(http, job.id)
    assert body["state"] == "SUCCEEDED" and body["result"] is None and "never unpickles" in body["result_note"]
    over_http = submit(http, pickled.name, {"name": "h", "log": log_key})        # HTTP answers travel as JSON
    assert wait_for_state(http, over_http, "SUCCEEDED")["result"]["body"]["done"] == "h"
    pickled.delete()
    plain.delete()


def scrape(http: httpx.Client) -> dict[tuple, float]:
    answer = http.get("/-/metrics")
    assert answer.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def test_metrics_and_the_status_page_count_jobs_by_state_the_oldest_waiting_and_attempts(connected, orders, http,
                                                                                         log_key):
    name = orders.name
    hold = f"{log_key}:hold"

    def sample(metric: str, **labels: str) -> float | None:
        return scrape(http).get((metric, tuple(sorted({"deployment": name, **labels}.items()))))

    blocker = submit(http, name, {"name": "blocker", "log": log_key, "hold": hold})
    wait_for_state(http, blocker, "RUNNING")
    waiting = submit(http, name, {"name": "waiting", "log": log_key})
    wait_until(lambda: sample("taskserve_jobs", state="QUEUED") == 1 and sample("taskserve_jobs", state="RUNNING") == 1,
               timeout=10, message="a queued and a running job in the metrics")
    wait_until(lambda: (sample("taskserve_jobs_oldest_queued_age_seconds") or 0) > 0, timeout=10,
               message="the oldest waiting job's age in the metrics")
    deployment = next(d for d in http.get("/-/api/status").json()["deployments"] if d["name"] == name)
    assert deployment["jobs"]["QUEUED"] == 1 and deployment["jobs_oldest_queued_at"] <= time.time()

    release(connected, hold)
    wait_for_state(http, waiting, "SUCCEEDED")
    wait_until(lambda: sample("taskserve_jobs", state="SUCCEEDED") == 2 and sample("taskserve_jobs", state="QUEUED") == 0
               and sample("taskserve_jobs_oldest_queued_age_seconds") == 0
               and sample("taskserve_job_attempts_total") == 2,
               timeout=10, message="two jobs succeeded after two attempts in the metrics")
    assert sample("taskserve_jobs", state="DEAD") == 0
