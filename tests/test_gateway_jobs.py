"""The gateway's job submits when Redis fails under them (fakeredis: no processes): a
submit whose reply was lost is found queued, never queued twice; one that never ran is
sent again once; one that cannot be checked says so, with the job's id."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
import redis

from taskserve.celery_app import make_app
from taskserve.gateway.jobs import JobEndpoints, SubmitUnsure
from taskserve.gateway.routes import Route
from taskserve.http import encode_request
from taskserve.store import Jobs, queue_name
from taskserve.store.keys import job_key, jobs_key
from taskserve.store.lua import source as lua_source
from taskserve.wire import QUEUED, CallEncoder, job_fields

NAME = "ocr"


class FlakyWriter:
    """A client whose submit script fails as told: ``lost`` runs it and then loses the
    reply, ``unsent`` fails before it runs; then it runs as it should."""

    def __init__(self, server: fakeredis.FakeServer, failures: list[str]) -> None:
        self.real = fakeredis.FakeAsyncRedis(server=server)
        self.failures = list(failures)
        self.sent = 0

    def register_script(self, text: str) -> Any:
        script = self.real.register_script(text)

        async def run(keys: list, args: list) -> Any:
            self.sent += 1
            failure = self.failures.pop(0) if self.failures else ""
            if failure == "unsent":
                raise redis.ConnectionError("Connection reset by peer")
            reply = await script(keys=keys, args=args)
            if failure == "lost":
                raise redis.TimeoutError("Timeout reading from socket")
            return reply

        return run

    async def aclose(self) -> None:
        await self.real.aclose()


class BrokenClient:
    """A client whose every command fails: Redis went away."""

    async def exists(self, *keys: str) -> int:
        raise redis.ConnectionError("Connection refused")

    def register_script(self, text: str) -> Any:
        return None


def endpoints(server: fakeredis.FakeServer, failures: list[str], client: Any = None) -> tuple[JobEndpoints, FlakyWriter]:
    writer = FlakyWriter(server, failures)
    encoder = CallEncoder(make_app("redis://127.0.0.1:6379/0"))
    return JobEndpoints("redis://127.0.0.1:6379/0", client or fakeredis.FakeAsyncRedis(server=server), encoder,
                        writer=writer), writer  # type: ignore[arg-type]


def submit(jobs: JobEndpoints) -> Any:
    payload = encode_request("POST", f"/{NAME}", "", [], b"{}")
    return asyncio.run(jobs.submit(Route(f"/{NAME}", NAME), queue_name(NAME), payload, {"prefer": "respond-async"}))


@pytest.mark.parametrize("failures, sends", [([], 1), (["lost"], 1), (["unsent"], 2), (["lost", "lost"], 1)])
def test_a_job_is_queued_once_whatever_the_connection_lost(failures, sends):
    server = fakeredis.FakeServer()
    jobs, writer = endpoints(server, failures)
    response, error = submit(jobs)
    assert (response.status_code, error, writer.sent) == (202, "", sends)
    client = fakeredis.FakeRedis(server=server)
    assert client.llen(queue_name(NAME)) == 1
    assert client.zcard(jobs_key(NAME, QUEUED)) == 1


def test_a_submit_that_never_ran_twice_is_an_error_and_nothing_is_queued():
    server = fakeredis.FakeServer()
    jobs, writer = endpoints(server, ["unsent", "unsent"])
    response, error = submit(jobs)
    assert (response.status_code, error, writer.sent) == (503, "unavailable", 2)
    assert fakeredis.FakeRedis(server=server).llen(queue_name(NAME)) == 0


def test_a_submit_that_cannot_be_checked_says_so_with_the_jobs_id():
    server = fakeredis.FakeServer()
    jobs, _ = endpoints(server, ["lost"], client=BrokenClient())
    response, _ = submit(jobs)
    assert response.status_code == 503
    body = response.body.decode()
    queued = fakeredis.FakeRedis(server=server).lrange(queue_name(NAME), 0, -1)
    assert len(queued) == 1 and "cannot be told now" in body and "404 means it was not queued" in body


def test_submit_once_checks_the_record_of_its_own_job():
    """An idempotent submit whose reply was lost is sent again: it names the job already there."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    keys, args = Jobs.submit_job_arguments(NAME, "first", b"m1", queue_name(NAME),
                                           job_fields(NAME, "__call__", None, 0, 1.0, 0.0, "k"), "k")
    client.register_script(lua_source("submit_job"))(keys=keys, args=args)
    jobs, writer = endpoints(server, ["lost"])
    keys, args = Jobs.submit_job_arguments(NAME, "second", b"m2", queue_name(NAME),
                                           job_fields(NAME, "__call__", None, 0, 1.0, 0.0, "k"), "k")
    reply = asyncio.run(jobs.submit_once("second", keys, args))
    assert Jobs.submitted(reply).job_id == "first" and writer.sent == 2
    assert not client.exists(job_key("second")) and client.llen(queue_name(NAME)) == 1
    with pytest.raises(SubmitUnsure):
        asyncio.run(endpoints(server, ["unsent"], client=BrokenClient())[0].submit_once("third", keys, args))
