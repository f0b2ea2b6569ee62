"""The wire format docs/jobs.md gives non-Python Celery clients, checked as documented: the
message block of the page pushed as it is with a plain Redis client (no Celery, no
taskserve client code), its result read from the key and the channel the page names."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
import redis

import taskserve
from taskserve.store import queue_list, queue_name, result_key
from taskserve.wire import CONSUME_ORDER, priority_from_transport, priority_to_transport

from .helpers import REPO

PAGE = REPO / "docs" / "jobs.md"
DEPLOYMENT = "wordcount"           # the page's example deployment


def documented_message() -> str:
    """The JSON block right after the page's ``<!-- file: celery-message.json -->`` marker, as written."""
    found = re.search(r"<!-- file: celery-message\.json -->\s*```json\n(.*?)```", PAGE.read_text(), re.S)
    assert found, "docs/jobs.md has no celery-message.json block"
    return found.group(1)


class WordCount:
    def count(self, text: str) -> int:
        return len(text.split())


@pytest.fixture
def wordcount(connected):
    model = taskserve.deployment(WordCount).options(name=DEPLOYMENT, num_cpus=0.1)
    model.deploy()
    yield model
    model.delete()


def test_the_documented_message_body_is_the_documented_call():
    message = json.loads(documented_message())
    assert json.loads(base64.b64decode(message["body"])) == [
        ["count", ["to be or not to be"], {}], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert message["headers"]["task"] == "taskserve.call" and "taskserve" not in message["headers"]
    assert message["properties"]["delivery_info"]["routing_key"] == queue_name(DEPLOYMENT)
    assert (message["content-type"], message["properties"]["body_encoding"]) == ("application/json", "base64")


def test_the_documented_priority_table_is_how_lists_are_named_and_taken():
    text = PAGE.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| taskserve priority |"))
    kombu = next(line for line in text.splitlines() if line.startswith("| kombu priority"))
    priorities = [int(cell.replace("*", "").split()[0]) for cell in row.split("|")[2:-1]]
    transports = [int(cell.replace("*", "").split()[0]) for cell in kombu.split("|")[2:-1]]
    assert priorities == list(range(9, -1, -1))
    assert transports == list(CONSUME_ORDER)
    assert [priority_to_transport(p) for p in priorities] == transports
    assert [priority_from_transport(k) for k in transports] == priorities
    assert queue_list(queue_name(DEPLOYMENT), 3) == "taskserve.wordcount\x06\x163"


def test_a_raw_redis_client_submits_the_documented_message_and_reads_its_result_as_documented(connected, wordcount):
    message = documented_message()
    job_id = json.loads(message)["headers"]["id"]
    client = redis.Redis.from_url(connected.url)
    key = f"celery-task-meta-{job_id}"
    assert key == result_key(job_id)

    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(key)
    try:
        assert client.lpush("taskserve.wordcount", message) >= 1
        published, deadline = None, time.monotonic() + 30
        while published is None and time.monotonic() < deadline:
            published = listener.get_message(timeout=1)      # None for the subscription's own confirmation
        assert published is not None, "no result was published on the channel celery-task-meta-<id>"
        record = json.loads(published["data"])
    finally:
        listener.close()
    assert (record["status"], record["result"], record["task_id"]) == ("SUCCESS", 6, job_id)
    stored = json.loads(client.get(key))
    assert (stored["status"], stored["result"]) == ("SUCCESS", 6)
    assert client.ttl(key) > 3600                    # kept job_ttl_s (a day), not a call's result_ttl_s
    assert json.loads(client.get(key))["result"] == 6    # read again: still there
    assert taskserve.get_job(job_id).status().state == "SUCCEEDED"
