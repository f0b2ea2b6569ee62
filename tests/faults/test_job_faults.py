"""Jobs through faults: a replica killed mid-job, a node (agent and replicas) lost
mid-job, a rolling update while jobs run longer than graceful_shutdown_timeout_s, Redis
restarted from its append-only file with jobs queued and running, and 2,000 jobs through
replica kills and a Redis restart.

What must hold: every job ends SUCCEEDED, none is lost, and one runs more than once only
if a replica died (or was killed) under it; such a rerun is not counted as a failure.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter

import pytest
import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

import taskserve
from taskserve.wire import SUCCEEDED

from ..helpers import replica_pids, start_cluster, wait_until
from .harness import RECORD_RETRY_S, RECORD_RETRY_STEP_S, RESULTS, FaultResult

pytestmark = pytest.mark.integration


class Runner:
    """Records each run of a job (its name and attempt) in a Redis list; a job may wait
    until a key exists, or take a while."""

    def __init__(self, address: str, log: str) -> None:
        retry = Retry(ConstantBackoff(RECORD_RETRY_STEP_S), int(RECORD_RETRY_S / RECORD_RETRY_STEP_S))
        self.client = redis.Redis.from_url(address, retry=retry,
                                           retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.log = log

    def run(self, name: str, seconds: float = 0.0, hold: str = "") -> str:
        context = taskserve.job_context()
        self.client.rpush(self.log, f"{name}:{context.attempt if context else 0}:{os.getpid()}")
        deadline = time.monotonic() + 120
        while hold and not self.client.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.02)
        if seconds:
            time.sleep(seconds)
        return name


def deploy_runner(address: str, name: str, **options) -> tuple[object, str]:
    log = f"job-faults:{name}:{uuid.uuid4().hex[:6]}"
    model = taskserve.deployment(Runner).options(name=name, **{"num_cpus": 0.1, **options})
    model.deploy(address, log)
    return model, log


def runs(address: str, log: str) -> list[tuple[str, int, int]]:
    out = []
    for item in redis.Redis.from_url(address).lrange(log, 0, -1):
        name, attempt, pid = item.decode().rsplit(":", 2)
        out.append((name, int(attempt), int(pid)))
    return out


def record(fault: str, jobs: int, succeeded: int, ran: Counter, recovery_s: float, notes: str) -> FaultResult:
    """One row of the fault table, for jobs: sent = submitted, answered = SUCCEEDED,
    duplicated = jobs that ran more than once (each only after a replica died under it)."""
    result = FaultResult(fault, jobs, succeeded, jobs - succeeded, sum(1 for n in ran.values() if n > 1), 0,
                         recovery_s, notes)
    RESULTS.append(result)
    return result


def test_a_job_whose_replica_is_killed_runs_again_without_using_a_retry(connected, unique_name):
    model, log = deploy_runner(connected.url, unique_name, version="1")
    hold = f"{log}:hold"
    job = model.get_handle().run.options(max_retries=0).submit("victim", 0, hold)
    wait_until(lambda: runs(connected.url, log), timeout=30, message="the job to start")
    [(_, attempt, pid)] = runs(connected.url, log)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(runs(connected.url, log)) == 2, timeout=60, message="the job to run again")
    redis.Redis.from_url(connected.url).set(hold, "1", ex=300)
    assert job.result(timeout=60) == "victim"
    status = job.status()
    assert (status.state, status.attempts, status.error) == (SUCCEEDED, 2, None)
    assert [(name, attempt) for name, attempt, _ in runs(connected.url, log)] == [("victim", 1), ("victim", 2)]
    model.delete()


def test_a_job_on_a_node_that_dies_is_put_back_by_the_controller(tmp_path):
    """The agent and its replica SIGKILLed together, never restarted: the controller,
    once the node counts as dead, puts back what the replica held."""
    cluster = start_cluster(tmp_path, ("node-a",), 1)
    try:
        model, log = deploy_runner(cluster.url, "node_dies", version="1", num_cpus=1)
        hold = f"{log}:hold"
        job = model.get_handle().run.submit("orphan", 0, hold)
        wait_until(lambda: runs(cluster.url, log), timeout=30, message="the job to start")
        [(_, _, pid)] = runs(cluster.url, log)
        cluster.start_agent("node-b", 1)      # room for the replacement, on another node
        fault_at = time.monotonic()
        cluster.stop("agent-node-a", sig=signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        redis.Redis.from_url(cluster.url).set(hold, "1", ex=300)
        assert job.result(timeout=120) == "orphan"
        recovery = time.monotonic() - fault_at
        assert job.status().attempts == 2
        record("node lost (agent and replica SIGKILLed) mid-job", 1, 1, Counter(name for name, _, _ in
                                                                                  runs(cluster.url, log)),
               recovery, "the controller puts back what the dead node's replica held once the node counts as dead")
    finally:
        cluster.stop_all()


def test_a_rolling_update_hands_back_jobs_longer_than_the_graceful_timeout(connected, unique_name):
    model, log = deploy_runner(connected.url, unique_name, version="1", num_replicas=2,
                               graceful_shutdown_timeout_s=1, max_deliveries=1)
    handle = model.get_handle()
    hold = f"{log}:hold"
    jobs = [handle.run.submit(f"long-{i}", 0, hold) for i in range(2)]
    wait_until(lambda: len(runs(connected.url, log)) == 2, timeout=30, message="both jobs to start")
    started_on = {pid for _, _, pid in runs(connected.url, log)}
    model.options(version="2").deploy(connected.url, log)      # drains the old replicas: too slow, killed
    wait_until(lambda: len(runs(connected.url, log)) >= 4, timeout=120, message="the jobs to run again")
    redis.Redis.from_url(connected.url).set(hold, "1", ex=300)
    assert [job.result(timeout=120) for job in jobs] == ["long-0", "long-1"]
    reran_on = {pid for _, attempt, pid in runs(connected.url, log) if attempt == 2}
    assert reran_on and reran_on.isdisjoint(started_on)        # on the new version's replicas
    # Handed back, not counted as crashes: with max_deliveries=1 a counted one would be refused.
    assert [(job.status().state, job.status().attempts) for job in jobs] == [(SUCCEEDED, 2)] * 2, \
        runs(connected.url, log)
    model.delete()


def test_jobs_queued_and_running_survive_a_redis_restart_from_its_aof(tmp_path):
    cluster = start_cluster(tmp_path / "cluster", ("node-a",), 4, redis_data_dir=tmp_path / "redis")
    try:
        model, log = deploy_runner(cluster.url, "aof_jobs", version="1")
        handle = model.get_handle()
        jobs = [handle.run.submit(f"j{i}", 0.2) for i in range(20)]
        wait_until(lambda: runs(cluster.url, log), timeout=30, message="the first job to start")
        fault_at = time.monotonic()
        cluster.restart_redis()
        assert [job.result(timeout=120) for job in jobs] == [f"j{i}" for i in range(20)]
        ran = Counter(name for name, _, _ in runs(cluster.url, log))
        assert set(ran) == {f"j{i}" for i in range(20)} and max(ran.values()) == 1      # none lost, none twice
        record("Redis restarted from its AOF with 20 jobs queued and running", 20, 20, ran,
               time.monotonic() - fault_at, "the job running finishes and is recorded once Redis is back")
    finally:
        cluster.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_2000_jobs_through_replica_kills_and_a_redis_restart(tmp_path):
    """The fault table's jobs row: every job ends SUCCEEDED; a job runs twice only if a
    replica was killed under it (each kill can cost the jobs it was running)."""
    cluster = start_cluster(tmp_path / "cluster", ("node-a",), 4, redis_data_dir=tmp_path / "redis")
    try:
        model, log = deploy_runner(cluster.url, "many_jobs", version="1", num_replicas=2, max_concurrent_queries=2,
                                   max_deliveries=10)
        handle = model.get_handle()
        jobs: list = []

        def submit() -> None:
            for start in range(0, 2000, 100):
                jobs.extend(handle.run.submit_many(([f"m{i}", 0.002], {}) for i in range(start, start + 100)))

        submitter = threading.Thread(target=submit)
        fault_at = time.monotonic()
        submitter.start()
        kills = 0
        for _ in range(3):
            wait_until(lambda: len(replica_pids("many_jobs")) == 2, timeout=90, message="two replicas")
            time.sleep(0.5)                                       # let them work a little (a fault, not a sync)
            os.kill(sorted(replica_pids("many_jobs"))[0], signal.SIGKILL)
            kills += 1
        submitter.join(timeout=120)
        cluster.restart_redis()
        deadline = time.monotonic() + 240
        for job in jobs:
            job.result(timeout=max(1.0, deadline - time.monotonic()))
        ran = Counter(name for name, _, _ in runs(cluster.url, log))
        assert len(jobs) == 2000 and set(ran) == {f"m{i}" for i in range(2000)}
        duplicated = sum(1 for count in ran.values() if count > 1)
        assert duplicated <= kills * 2          # each killed replica was running at most 2 jobs
        statuses = [job.status() for job in jobs]
        assert all(status.state == SUCCEEDED for status in statuses)
        assert sum(status.attempts > 1 for status in statuses) >= duplicated
        record(f"2,000 jobs, {kills} replica SIGKILLs and a Redis restart", 2000, 2000, ran,
               time.monotonic() - fault_at, f"{duplicated} ran again after their replica was killed; "
                                            "none failed, none lost")
    finally:
        cluster.stop_all()
