"""One run per request: a push whose reply was lost is checked, never sent again blindly;
a request id a replica took already (not after a crash) is answered from its first run;
a caller that cannot know whether its call was queued is told so, with the call's id."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

import taskserve
from taskserve.celery_app import make_app
from taskserve.store import queue_name
from taskserve.wire import Call, CallEncoder

from ..helpers import start_cluster, wait_until
from .harness import Recorder, deploy_recorder
from .proxy import RedisProxy

pytestmark = pytest.mark.integration


def served(url: str, key: str) -> list[str]:
    return [item.decode() for item in redis.Redis.from_url(url).lrange(key, 0, -1)]


def test_a_request_pushed_twice_runs_once(connected, unique_name):
    model, key = deploy_recorder(connected.url, unique_name)
    handle = model.get_handle()
    assert handle.remote("warm").result(timeout=30) == "warm"
    # The same call (one id) pushed twice, as a retried write whose reply was lost would.
    task_id = f"twice-{uuid.uuid4().hex}"
    item = CallEncoder(make_app(connected.url)).encode(Call(task_id, "__call__", ["twice"], {},
                                                            queue=queue_name(unique_name)))
    client = redis.Redis.from_url(connected.url)
    client.lpush(queue_name(unique_name), item)
    wait_until(lambda: "twice" in served(connected.url, key), timeout=30)
    again = json.loads(item)
    again["properties"]["delivery_tag"] = uuid.uuid4().hex
    client.lpush(queue_name(unique_name), json.dumps(again))
    assert handle.remote("after").result(timeout=30) == "after"      # taken after the second copy
    assert served(connected.url, key).count("twice") == 1
    assert client.llen(queue_name(unique_name)) == 0
    model.delete()


@pytest.fixture
def proxied(tmp_path):
    cluster = start_cluster(tmp_path, ("node-a",), 4)
    port = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
    try:
        with RedisProxy(port) as proxy:
            yield cluster, proxy, cluster.url.replace(f":{port}/", f":{proxy.port}/")
    finally:
        cluster.stop_all()


class Holding(Recorder):
    def hold(self, key: str) -> str:
        deadline = time.monotonic() + 60
        while not self.client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "held"


def test_a_push_whose_reply_was_lost_is_not_sent_again(proxied):
    cluster, proxy, through_proxy = proxied
    model, key = deploy_recorder(cluster.url, "lost_reply", version="1", target=Holding)
    taskserve.connect(through_proxy)
    handle = model.get_handle()
    assert handle.remote("warm").result(timeout=30) == "warm"
    gate = f"lost-reply-gate:{uuid.uuid4().hex}"
    holding = handle.hold.remote(gate)       # the one replica is busy: what is pushed stays queued
    wait_until(lambda: redis.Redis.from_url(cluster.url).llen(queue_name("lost_reply")) == 0, timeout=30)
    proxy.watch(b"LPUSH")
    proxy.cut_next(b"LPUSH", lose="reply")
    once = handle.remote("once")
    assert proxy.forwarded(b"LPUSH") == 1                  # found in the queue (LPOS), not sent again
    redis.Redis.from_url(cluster.url).set(gate, "1", ex=60)
    assert holding.result(timeout=30) == "held" and once.result(timeout=30) == "once"
    assert served(cluster.url, key).count("once") == 1
    # A push lost before it reached Redis is sent again: that one did not land.
    proxy.cut_next(b"LPUSH", lose="command")
    assert handle.remote("resent").result(timeout=30) == "resent"
    assert proxy.forwarded(b"LPUSH") == 2 and served(cluster.url, key).count("resent") == 1


def test_a_caller_that_cannot_know_is_told_so_with_the_id_and_still_gets_its_answer(proxied):
    cluster, proxy, through_proxy = proxied
    model, key = deploy_recorder(cluster.url, "unknown_outcome", version="1")
    taskserve.connect(through_proxy)
    handle = model.get_handle()
    assert handle.remote("warm").result(timeout=30) == "warm"
    proxy.cut_next(b"LPUSH", lose="reply", then_refuse=True)    # and nothing can ask whether it landed
    started = time.monotonic()
    with pytest.raises(taskserve.CallOutcomeUnknown) as caught:
        handle.remote("maybe")
    assert time.monotonic() - started < 30
    error = caught.value
    assert error.request_id and error.request_id in str(error) and "may still run" in str(error)
    proxy.refusing.clear()
    assert error.response.result(timeout=30) == "maybe"      # it had landed, and ran once
    assert served(cluster.url, key).count("maybe") == 1
