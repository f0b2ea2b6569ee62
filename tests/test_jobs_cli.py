"""The job commands of the CLI against a real cluster: submit, job (--wait, --json), jobs,
cancel, retry, purge, the job lines of `status NAME`, and their one-line errors."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import redis

import taskserve
from taskserve.store.keys import job_key
from taskserve.wire import CANCELLED, DEAD, FAILED, QUEUED, SUCCEEDED

from .helpers import wait_until
from .test_cli import run_cli


class Clerk:
    """Methods a job can run: one that doubles, one that fails its first attempts (counted
    in a Redis list), and one that always raises."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    def double(self, x: int) -> int:
        return 2 * x

    def flaky(self, log: str, failures: int) -> str:
        self.client.rpush(log, "run")
        if self.client.llen(log) <= failures:
            raise ValueError(f"attempt {self.client.llen(log)} failed")
        return "done"

    def boom(self) -> None:
        raise KeyError("no such page")


@pytest.fixture
def clerk(connected, unique_name):
    model = taskserve.deployment(Clerk).options(name=unique_name, num_cpus=0.1, version="1")
    model.deploy(connected.url)
    yield model
    model.delete()


@pytest.fixture
def idle(connected, unique_name):
    """A deployment with no replica: its jobs wait, QUEUED."""
    model = taskserve.deployment(Clerk).options(name=f"{unique_name}-idle", num_replicas=0)
    model.deploy(connected.url)
    yield model
    model.delete()


def one_line_error(result, words: str) -> None:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert words in result.stderr, result.stderr


def test_submit_prints_the_id_and_job_shows_and_waits_for_the_result(connected, clerk):
    job_id = run_cli(connected, "submit", clerk.name, "21", "--method", "double").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert run_cli(connected, "job", job_id, "--wait", "--timeout", "30").stdout.strip() == "42"
    shown = json.loads(run_cli(connected, "job", job_id, "--json").stdout)
    assert (shown["job_id"], shown["deployment"], shown["method"], shown["state"], shown["result"]) == (
        job_id, clerk.name, "double", SUCCEEDED, 42)
    text = run_cli(connected, "job", job_id).stdout
    assert f"job {job_id}  of {clerk.name}.double" in text and "SUCCEEDED  attempts 1" in text
    assert "result: 42" in text


def test_submit_takes_priority_retries_and_an_idempotency_key(connected, clerk):
    log = f"test-jobs-cli:{uuid.uuid4().hex}"
    args = ("submit", clerk.name, json.dumps(log), "2", "--method", "flaky", "--priority", "9",
            "--max-retries", "2", "--retry-delay", "0.1", "--idempotency-key", f"k-{log}")
    job_id = run_cli(connected, *args).stdout.strip()
    assert run_cli(connected, *args).stdout.strip() == job_id          # the same key: the same job
    assert run_cli(connected, "job", job_id, "--wait", "--timeout", "60").stdout.strip() == '"done"'
    status = taskserve.get_job(job_id).status()
    assert (status.priority, status.max_retries, status.attempts) == (9, 2, 3)


def test_job_wait_prints_the_error_and_exits_1_when_the_job_failed(connected, clerk):
    job_id = run_cli(connected, "submit", clerk.name, "--method", "boom").stdout.strip()
    result = run_cli(connected, "job", job_id, "--wait", "--timeout", "30", check=False)
    one_line_error(result, f"error: job {job_id} is FAILED: KeyError: 'no such page'")
    assert result.stdout == ""
    text = run_cli(connected, "job", job_id).stdout
    assert "FAILED" in text and "error: KeyError: 'no such page'" in text


def test_jobs_lists_counts_the_oldest_waiting_and_the_jobs_newest_first(connected, idle):
    first = idle.get_handle().double.submit(1)
    second = idle.get_handle().double.options(priority=2).submit(2)
    text = run_cli(connected, "jobs", idle.name).stdout
    assert "jobs: 2 queued, 0 running, 0 succeeded, 0 failed, 0 cancelled, 0 dead" in text
    assert "oldest waiting job: queued" in text
    assert text.index(second.id) < text.index(first.id)
    listed = json.loads(run_cli(connected, "jobs", idle.name, "--json").stdout)
    assert listed["counts"][QUEUED] == 2 and listed["oldest_queued_age_s"] >= 0
    assert [job["job_id"] for job in listed["jobs"]] == [second.id, first.id]
    assert [job["priority"] for job in listed["jobs"]] == [2, 5]
    only = json.loads(run_cli(connected, "jobs", idle.name, "--state", "cancelled", "--json").stdout)
    assert only["jobs"] == [] and only["counts"][QUEUED] == 2
    limited = json.loads(run_cli(connected, "jobs", idle.name, "--limit", "1", "--json").stdout)
    assert [job["job_id"] for job in limited["jobs"]] == [second.id]

    status = run_cli(connected, "status", idle.name).stdout
    assert "jobs: 2 queued, 0 running" in status and "oldest waiting job: queued" in status


def test_status_shows_no_job_lines_without_jobs(connected, idle):
    assert "jobs:" not in run_cli(connected, "status", idle.name).stdout


def test_cancel_a_queued_job_then_cancelling_again_is_an_error(connected, idle):
    job = idle.get_handle().double.submit(1)
    assert "CANCELLED (it never runs)" in run_cli(connected, "cancel", job.id).stdout
    assert job.status().state == CANCELLED
    one_line_error(run_cli(connected, "cancel", job.id, check=False),
                   f"job {job.id} has finished (CANCELLED): there is nothing to cancel")


def test_retry_and_purge_the_dead_letters(connected, clerk):
    log = f"test-jobs-cli:{uuid.uuid4().hex}"
    handle = clerk.get_handle()
    failed = handle.flaky.submit(log, 1)                 # its one attempt fails: FAILED
    dead = handle.no_such_method.submit()                # cannot run at all: DEAD
    wait_until(lambda: failed.status().state == FAILED and dead.status().state == DEAD, timeout=30)

    one_line_error(run_cli(connected, "retry", clerk.name, check=False), "name the jobs to retry")
    one_line_error(run_cli(connected, "retry", clerk.name, failed.id, "nosuchjob", check=False), "no job 'nosuchjob'")
    assert failed.status().state == FAILED               # nothing queued when one id is wrong

    text = run_cli(connected, "retry", clerk.name, failed.id).stdout
    assert f"{clerk.name}: 1 job(s) queued again" in text and failed.id in text
    assert failed.result(timeout=30) == "done" and failed.status().attempts == 2
    assert "left alone (not FAILED or DEAD): " + failed.id in run_cli(connected, "retry", clerk.name,
                                                                       failed.id).stdout

    assert dead.id in run_cli(connected, "retry", clerk.name, "--all-dead").stdout
    wait_until(lambda: dead.status().state == DEAD and dead.status().attempts == 0, timeout=30)
    assert "0 job(s) queued again" in run_cli(connected, "retry", clerk.name, "--all-failed").stdout

    one_line_error(run_cli(connected, "purge", clerk.name, "--state", "RUNNING", check=False),
                   "purge finished jobs only")
    assert f"{clerk.name}: 1 DEAD job(s) purged" in run_cli(connected, "purge", clerk.name, "--state", "dead").stdout
    with pytest.raises(taskserve.JobNotFound):
        dead.status()


@pytest.mark.parametrize("args, words", [
    (("job", "0123456789abcdef0123456789abcdef"), "no job '0123456789abcdef0123456789abcdef'"),
    (("cancel", "nosuchjob"), "no job 'nosuchjob'"),
    (("jobs", "no-such-deployment"), "deployment 'no-such-deployment' does not exist"),
    (("retry", "no-such-deployment", "--all-dead"), "deployment 'no-such-deployment' does not exist"),
    (("submit", "no-such-deployment", "1"), "deployment 'no-such-deployment' does not exist"),
    (("submit", "echo", "{not json"), "PAYLOAD is not valid JSON"),
    (("submit", "echo", "1", "--method", "_private"), "cannot be called"),
])
def test_job_command_errors_are_one_line_and_exit_1(connected, args, words):
    one_line_error(run_cli(connected, *args, check=False), words)


def test_bad_job_options_are_one_line_errors(connected, idle):
    one_line_error(run_cli(connected, "submit", idle.name, "1", "--priority", "12", check=False),
                   "priority=12 is out of range")
    one_line_error(run_cli(connected, "submit", idle.name, "1", "--max-retries", "-1", check=False), "max_retries=-1")
    one_line_error(run_cli(connected, "jobs", idle.name, "--state", "bogus", check=False),
                   "state='BOGUS' is not a job state")
    one_line_error(run_cli(connected, "jobs", idle.name, "--limit", "0", check=False), "limit=0")


def test_retry_of_all_failed_skips_a_job_whose_record_expired(connected, clerk):
    """The FAILED set keeps a job's entry until the controller trims it; its record may be gone already."""
    log = f"test-jobs-cli:{uuid.uuid4().hex}"
    handle = clerk.get_handle()
    expired, kept = handle.flaky.submit(log, 99), handle.flaky.submit(log, 99)
    wait_until(lambda: expired.status().state == FAILED and kept.status().state == FAILED, timeout=30)
    redis.Redis.from_url(connected.url).delete(job_key(expired.id))        # as its job_ttl_s would
    assert taskserve.retry_jobs(clerk.name, state=FAILED) == [kept.id]
    wait_until(lambda: kept.status().state == FAILED and kept.status().attempts == 2, timeout=30)


def test_retry_jobs_queues_none_when_one_id_is_unknown(connected, clerk):
    log = f"test-jobs-cli:{uuid.uuid4().hex}"
    failed = clerk.get_handle().flaky.submit(log, 99)
    wait_until(lambda: failed.status().state == FAILED, timeout=30)
    with pytest.raises(taskserve.JobNotFound):
        taskserve.retry_jobs(clerk.name, [failed.id, "0123456789abcdef0123456789abcdef"])
    assert failed.status().state == FAILED
    with pytest.raises(taskserve.DeploymentNotFound):
        taskserve.retry_jobs(f"{clerk.name}-none", state=FAILED)
