"""The job lines of the gateway's status and metrics, read from the state sets and the
replicas' stats counter (fakeredis: no processes)."""

from __future__ import annotations

import fakeredis
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_control_plane import populate
from taskserve.gateway.metrics import GatewayMetrics, StatusReader
from taskserve.store import Store, queue_name
from taskserve.store.keys import jobs_key
from taskserve.store.stats import JOB_ATTEMPTS_FIELD
from taskserve.wire import DEFAULT_RETRY_DELAY_S, JOB_STATES, QUEUED, job_fields


def submit(store: Store, name: str, job_id: str, created_at: float) -> None:
    fields = job_fields(name, "__call__", None, 0, DEFAULT_RETRY_DELAY_S, created_at)
    assert store.submit_job(name, job_id, b"message", queue_name(name), fields).outcome == "submitted"


def test_the_status_counts_each_deployments_jobs_by_state_and_when_the_oldest_waiting_was_queued():
    store = Store(fakeredis.FakeRedis())
    busy, quiet = populate(store, 2, 1, 1)
    for job_id in ("j1", "j2", "j3"):
        submit(store, busy, job_id, 0.0)
    store.start_job(busy, "j1", "replica-1")
    queued_at = dict(store.redis.zrange(jobs_key(busy, QUEUED), 0, -1, withscores=True))
    status = {d["name"]: d for d in StatusReader(store).read()["deployments"]}
    assert status[busy]["jobs"] == {"QUEUED": 2, "RUNNING": 1, "SUCCEEDED": 0, "FAILED": 0, "CANCELLED": 0, "DEAD": 0}
    assert status[busy]["jobs_oldest_queued_at"] == min(queued_at.values())
    assert status[quiet]["jobs"] == dict.fromkeys(JOB_STATES, 0) and status[quiet]["jobs_oldest_queued_at"] is None
    assert status[busy]["job_attempts"] == 0


def test_the_metrics_export_jobs_by_state_the_oldest_waiting_age_and_the_attempts_started():
    store = Store(fakeredis.FakeRedis())
    busy, quiet = populate(store, 2, 1, 1)
    submit(store, busy, "j1", 0.0)
    store.add_stats(busy, {JOB_ATTEMPTS_FIELD: 3, "requests:1": 5})     # as replicas add their counts
    reader = StatusReader(store)
    status = reader.read()
    status["time"] = store.oldest_queued([busy])[busy] + 42.0            # read 42 s after the job was queued
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(GatewayMetrics(lambda: status).render().decode())
               for s in family.samples}
    assert samples[("taskserve_jobs", (("deployment", busy), ("state", "QUEUED")))] == 1
    assert samples[("taskserve_jobs", (("deployment", busy), ("state", "DEAD")))] == 0
    assert samples[("taskserve_jobs_oldest_queued_age_seconds", (("deployment", busy),))] == 42.0
    assert samples[("taskserve_jobs_oldest_queued_age_seconds", (("deployment", quiet),))] == 0
    assert samples[("taskserve_job_attempts_total", (("deployment", busy),))] == 3
    assert samples[("taskserve_job_attempts_total", (("deployment", quiet),))] == 0
