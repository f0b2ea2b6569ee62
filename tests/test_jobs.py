"""Jobs on a real cluster: every state change and failure path of SPEC §12, priorities,
cancel in both states, idempotent submits, dead letters and their retry, plain Celery
producers, and Celery canvas through ``taskserve.signature``."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from celery import Celery, chain

import taskserve
from taskserve.store import queue_name
from taskserve.store.keys import job_key
from taskserve.wire import CANCELLED, DEAD, FAILED, QUEUED, RUNNING, SUCCEEDED

from .helpers import wait_until


class Jobber:
    """Records each run in a Redis list; can wait for a key, fail its first attempts,
    report progress, and stop when cancelled."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    def work(self, log: str, name: str, hold: str = "", fail_first: int = 0) -> str:
        context = taskserve.job_context()
        attempt = context.attempt if context else 0
        self.client.rpush(log, f"{name}:{attempt}")
        if context is not None:
            context.report(progress=0.5, message=f"{name} half way")
        deadline = time.monotonic() + 60
        while hold and not self.client.exists(hold) and time.monotonic() < deadline:
            if context is not None and context.cancelled:
                self.client.rpush(log, f"{name}:noticed-cancel")
                return "stopped early"
            time.sleep(0.02)
        if fail_first and attempt <= fail_first:
            raise ValueError(f"{name} failed attempt {attempt}")
        return f"done {name}"

    def plain(self, x: int) -> int:
        return 2 * x

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def boom(self) -> None:
        raise KeyError("no such page")


@pytest.fixture
def jobber(connected, unique_name):
    model = taskserve.deployment(Jobber).options(name=unique_name, num_cpus=0.1, version="1")
    model.deploy(connected.url)
    yield model
    model.delete()


@pytest.fixture
def log_key() -> str:
    return f"test-jobs:log:{uuid.uuid4().hex}"


def runs(connected, key: str) -> list[str]:
    return [item.decode() for item in redis.Redis.from_url(connected.url).lrange(key, 0, -1)]


def release(connected, key: str) -> None:
    redis.Redis.from_url(connected.url).set(key, "1", ex=300)


def test_a_job_moves_from_queued_to_running_to_succeeded_and_its_result_reads_many_times(connected, jobber, log_key):
    handle = jobber.get_handle()
    hold = f"{log_key}:hold"
    blocker = handle.work.submit(log_key, "blocker", hold)
    job = handle.work.submit(log_key, "second")
    assert len(job.id) == 32 and job.id != blocker.id
    wait_until(lambda: blocker.status().state == RUNNING, timeout=30)
    status = job.status()
    assert (status.state, status.attempts, status.deployment, status.method) == (QUEUED, 0, jobber.name, "work")
    assert blocker.status().progress == 0.5 and blocker.status().message == "blocker half way"
    release(connected, hold)
    assert job.result(timeout=30) == "done second"
    assert job.result() == "done second" and taskserve.get_job(job.id).result() == "done second"
    done = job.status()
    assert (done.state, done.attempts, done.progress) == (SUCCEEDED, 1, 1.0)
    assert done.created_at <= done.started_at <= done.finished_at
    assert blocker.result(timeout=30) == "done blocker"
    with pytest.raises(taskserve.JobNotFound):
        taskserve.get_job("no-such-job")


def test_a_failing_job_is_retried_with_backoff_then_succeeds(connected, jobber, log_key):
    job = jobber.get_handle().work.options(max_retries=2, retry_delay_s=0.2).submit(log_key, "flaky", "", 2)
    assert job.result(timeout=60) == "done flaky"
    assert runs(connected, log_key) == ["flaky:1", "flaky:2", "flaky:3"]
    assert job.status().attempts == 3 and job.status().state == SUCCEEDED


def test_a_job_that_keeps_failing_is_failed_with_its_last_error(connected, jobber, log_key):
    job = jobber.get_handle().work.options(max_retries=1, retry_delay_s=0.1).submit(log_key, "bad", "", 99)
    with pytest.raises(taskserve.ReplicaError) as caught:
        job.result(timeout=60)
    assert caught.value.type_name == "ValueError" and caught.value.message == "bad failed attempt 2"
    status = job.status()
    assert (status.state, status.attempts, status.error.type) == (FAILED, 2, "ValueError")
    assert "Traceback" in status.error.traceback
    assert [s.job_id for s in taskserve.list_jobs(jobber.name, state=FAILED)] == [job.id]


def test_jobs_that_cannot_run_are_dead_and_can_be_retried_or_purged(connected, jobber, log_key):
    handle = jobber.get_handle()
    unknown = handle.no_such_method.submit()
    with pytest.raises(taskserve.ReplicaError, match="has no method 'no_such_method'"):
        unknown.result(timeout=30)
    assert unknown.status().state == DEAD
    dead_letters = taskserve.list_jobs(jobber.name, state=DEAD)
    assert [s.job_id for s in dead_letters] == [unknown.id]
    assert dead_letters[0].error.message.startswith("Jobber has no method 'no_such_method'")
    # A failed job (its retries used up) is queued again by retry: same id, a new attempt.
    failed = handle.work.submit(log_key, "once", "", 1)
    with pytest.raises(taskserve.ReplicaError):
        failed.result(timeout=30)
    assert taskserve.retry_jobs(jobber.name, [failed.id]) == [failed.id]
    assert failed.result(timeout=30) == "done once"
    assert runs(connected, log_key) == ["once:1", "once:2"] and failed.status().attempts == 2
    assert taskserve.retry_jobs(jobber.name, state=DEAD) == [unknown.id]      # dies again: no such method
    wait_until(lambda: unknown.status().state == DEAD and unknown.status().attempts >= 0, timeout=30)
    assert taskserve.purge_jobs(jobber.name, DEAD) == 1
    with pytest.raises(taskserve.JobNotFound):
        unknown.status()


def test_an_undecodable_job_message_is_dead(connected, jobber):
    job = jobber.get_handle().plain.submit(21)
    assert job.result(timeout=30) == 42
    # The same job's message, its body garbled, submitted again under a new id.
    client = redis.Redis.from_url(connected.url)
    job_id = uuid.uuid4().hex
    message = {"body": "bm90IGpzb24=", "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"task": "taskserve.call", "id": job_id, "taskserve": {"job": 1}},
               "properties": {"body_encoding": "base64", "delivery_tag": uuid.uuid4().hex, "priority": 0,
                              "delivery_info": {"exchange": "", "routing_key": queue_name(jobber.name)}}}
    client.hset(job_key(job_id), mapping={"deployment": jobber.name, "method": "plain", "state": QUEUED})
    client.lpush(queue_name(jobber.name), json.dumps(message))
    wait_until(lambda: client.hget(job_key(job_id), "state") == DEAD.encode(), timeout=30)
    with pytest.raises(taskserve.ReplicaError, match="its message cannot be run"):
        taskserve.get_job(job_id).result(timeout=5)


def test_a_queued_job_cancelled_never_runs(connected, jobber, log_key):
    handle = jobber.get_handle()
    hold = f"{log_key}:hold"
    blocker = handle.work.submit(log_key, "blocker", hold)
    victim = handle.work.submit(log_key, "victim")
    wait_until(lambda: blocker.status().state == RUNNING, timeout=30)
    assert victim.cancel() == CANCELLED
    with pytest.raises(taskserve.JobCancelled):
        victim.result(timeout=5)
    release(connected, hold)
    blocker.result(timeout=30)
    after = handle.plain.submit(1)          # served after the cancelled one's message
    assert after.result(timeout=30) == 2
    assert [run for run in runs(connected, log_key) if run.startswith("victim")] == []
    assert victim.status().state == CANCELLED


def test_a_running_job_cancelled_sees_it_and_ends_cancelled(connected, jobber, log_key):
    job = jobber.get_handle().work.submit(log_key, "long", f"{log_key}:never")
    wait_until(lambda: job.status().state == RUNNING, timeout=30)
    assert job.cancel() == RUNNING             # asked: cooperative
    wait_until(lambda: job.status().state == CANCELLED, timeout=30)
    assert "long:noticed-cancel" in runs(connected, log_key)
    with pytest.raises(taskserve.JobCancelled):
        job.result()
    assert job.cancel() == CANCELLED           # finished: nothing changes


def test_a_higher_priority_is_taken_first(connected, jobber, log_key):
    handle = jobber.get_handle()
    hold = f"{log_key}:hold"
    blocker = handle.work.submit(log_key, "blocker", hold)
    wait_until(lambda: blocker.status().state == RUNNING, timeout=30)
    order = [("low", 1), ("default", None), ("high", 9), ("mid", 7), ("lowest", 0)]
    jobs = [handle.work.options(priority=p).submit(log_key, name) if p is not None
            else handle.work.submit(log_key, name) for name, p in order]
    call = handle.work.options(priority=8).remote(log_key, "call-8")       # calls share the order
    release(connected, hold)
    for job in jobs:
        job.result(timeout=30)
    call.result(timeout=30)
    assert [run.split(":")[0] for run in runs(connected, log_key)] == [
        "blocker", "high", "call-8", "mid", "default", "low", "lowest"]
    with pytest.raises(ValueError, match="priority=12 is out of range"):
        handle.options(priority=12)


def test_an_idempotent_submit_returns_the_job_already_submitted(connected, jobber):
    handle = jobber.get_handle().plain.options(idempotency_key="order-17")
    first = handle.submit(5)
    again = handle.submit(6)
    assert again.id == first.id and first.result(timeout=30) == 10
    assert jobber.get_handle().plain.options(idempotency_key="order-18").submit(6).id != first.id


def test_submit_many_queues_them_in_one_go(connected, jobber):
    jobs = jobber.get_handle().plain.submit_many(([i], {}) for i in range(50))
    assert len({job.id for job in jobs}) == 50
    assert [job.result(timeout=60) for job in jobs] == [2 * i for i in range(50)]
    assert len(taskserve.list_jobs(jobber.name, state=SUCCEEDED, limit=1000)) >= 50


def test_submit_many_records_them_in_chunks_taken_in_the_order_given(connected, jobber, log_key, monkeypatch):
    monkeypatch.setattr(taskserve.handle, "SUBMIT_CHUNK", 7)          # 20 jobs: 3 script calls
    handle = jobber.get_handle()
    hold = f"{log_key}:hold"
    blocker = handle.work.submit(log_key, "blocker", hold)
    wait_until(lambda: blocker.status().state == RUNNING, timeout=30)
    jobs = handle.work.submit_many(([log_key, f"j{i}"], {}) for i in range(20))
    assert len({job.id for job in jobs}) == 20
    assert {job.status().state for job in jobs} == {QUEUED}
    assert taskserve.list_jobs(jobber.name, state=QUEUED, limit=100)[0].created_at == jobs[0].status().created_at
    release(connected, hold)
    assert [job.result(timeout=60) for job in jobs] == [f"done j{i}" for i in range(20)]
    assert runs(connected, log_key) == ["blocker:1", *(f"j{i}:1" for i in range(20))]


def test_a_batch_that_would_overfill_the_queue_is_refused_whole(connected, unique_name, log_key):
    model = taskserve.deployment(Jobber).options(name=unique_name, num_cpus=0.1, max_queued_requests=3)
    model.deploy(connected.url)
    handle = model.get_handle()
    hold = f"{log_key}:hold"
    blocker = handle.work.submit(log_key, "blocker", hold)
    wait_until(lambda: blocker.status().state == RUNNING, timeout=30)
    handle.plain.submit(1)
    with pytest.raises(taskserve.BackPressureError) as caught:
        handle.plain.submit_many(([i], {}) for i in range(3))         # 1 + 3 > 3: none of them
    assert caught.value.queued == 1
    assert [s.state for s in taskserve.list_jobs(model.name, state=QUEUED)] == [QUEUED]
    assert len(handle.plain.submit_many(([i], {}) for i in range(2))) == 2    # 1 + 2 fits
    release(connected, hold)
    model.delete()


def test_a_full_queue_refuses_a_submit(connected, unique_name, log_key):
    model = taskserve.deployment(Jobber).options(name=unique_name, num_cpus=0.1, max_queued_requests=2)
    model.deploy(connected.url)
    handle = model.get_handle()
    hold = f"{log_key}:hold"
    blocker = handle.work.submit(log_key, "blocker", hold)
    wait_until(lambda: blocker.status().state == RUNNING, timeout=30)
    handle.plain.submit(1)
    handle.plain.submit(2)
    with pytest.raises(taskserve.BackPressureError):
        handle.plain.submit(3)
    release(connected, hold)
    model.delete()


def test_a_plain_celery_producer_gets_celerys_own_semantics(connected, jobber):
    app = Celery("producer", broker=connected.url, backend=connected.url)     # no taskserve import needed
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    result = app.send_task("taskserve.call", args=["add", [2], {"b": 4}], queue=f"taskserve.{jobber.name}")
    assert result.get(timeout=30) == 6
    assert result.state == "SUCCESS" and result.get() == 6                   # readable again
    assert taskserve.get_job(result.id).status().state == SUCCEEDED          # and a job like any other
    failing = app.send_task("taskserve.call", args=["boom", [], {}], queue=f"taskserve.{jobber.name}")
    with pytest.raises(Exception, match="no such page") as caught:
        failing.get(timeout=30)
    assert type(caught.value).__name__ == "KeyError" and failing.state == "FAILURE"
    later = app.send_task("taskserve.call", args=["plain", [4], {}], queue=f"taskserve.{jobber.name}",
                          countdown=1)
    assert later.get(timeout=30) == 8


def test_a_chain_of_two_deployments_through_signatures(connected, jobber, unique_name):
    second = taskserve.deployment(Jobber).options(name=f"{unique_name}-b", num_cpus=0.1)
    second.deploy(connected.url)
    flow = chain(taskserve.signature(jobber.name, 3, method="plain"),           # 6
                 taskserve.signature(second.name, 10, method="add"))            # add(6, 10)
    assert flow.apply_async().get(timeout=60) == 16
    second.delete()
