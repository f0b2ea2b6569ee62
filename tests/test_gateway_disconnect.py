"""A client that disconnects before its answer: the request is taken off its queue if no
replica has it yet (it never runs), and an async call being served is cancelled. The
replica's side of it, the stream writer asking for the cancel flags of the async calls in
flight, is tested on fakeredis first."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from typing import Iterator

import fakeredis
import httpx
import pytest
import redis

import taskserve
from taskserve.node.streams import StreamWriter
from taskserve.store import Store, queue_name
from taskserve.store.keys import cancel_key

from .helpers import Cluster, running_gateway, wait_until

# --------------------------------------------------------------------------- the replica's writer


def test_an_async_call_watched_is_stopped_once_its_cancel_flag_appears():
    store = Store(fakeredis.FakeRedis())
    writer = StreamWriter(store, ttl_s=60)
    writer.start()
    try:
        stopped = threading.Event()
        wrongly_stopped: list = []
        writer.watch("call-1", stopped.set)
        writer.watch("call-2", lambda: wrongly_stopped.append("call-2"))
        writer.unwatch("call-2")                             # it ended before its caller left
        store.redis.set(cancel_key("call-2"), "1")
        store.redis.set(cancel_key("call-1"), "1")           # both are read in the same ask
        assert stopped.wait(10), "the watched call was not stopped"
        assert wrongly_stopped == [] and writer.calls == {}  # stopped once, then no longer asked about
        assert not writer._asking()                          # nothing to ask about: the writer waits untimed
    finally:
        writer.stop()


# --------------------------------------------------------------------------- over HTTP


class Busy:
    """One request at a time: ``hold`` keeps the replica until a gate key appears,
    ``mark`` leaves a mark (the side effect that must never happen for a request whose
    client left before a replica took it)."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    def __call__(self, request):
        query = request.query_params
        if query["kind"] == "hold":
            self.client.set(query["started"], "1", ex=300)
            deadline = time.monotonic() + 60
            while not self.client.exists(query["gate"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            return "held"
        self.client.set(query["mark"], "1", ex=300)
        return "marked"


class Waiter:
    """An async ``__call__`` that awaits far longer than any test: cancelled, it says so."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    async def __call__(self, request):
        query = request.query_params
        if "quick" in query:
            return "quick"
        self.client.set(query["started"], "1", ex=300)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.client.set(query["marker"], "cancelled", ex=300)
            raise
        return "slept"


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with running_gateway(cluster) as client:
        yield client


def deployed(http: httpx.Client, cls: type, name: str, address: str, **options) -> object:
    model = taskserve.deployment(cls).options(name=name, num_cpus=0.1, request_timeout_s=120, **options)
    model.deploy(address)
    wait_until(lambda: http.get("/-/routes").json().get(f"/{name}") == name, timeout=30, message="the route")
    return model


def sent_and_left(http: httpx.Client, path: str, until: object) -> None:
    """GET ``path`` on a connection of its own, then close it once ``until()`` holds."""
    with socket.create_connection((http.base_url.host, http.base_url.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        wait_until(until, timeout=30, message="the request to be where the test wants it")


def counted(http: httpx.Client, status: str, deployment: str) -> float:
    for line in http.get("/-/metrics").text.splitlines():
        if line.startswith("taskserve_http_requests_total{") and f'deployment="{deployment}"' in line \
                and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_whose_client_left_before_a_replica_took_it_never_runs(connected, unique_name, http):
    model = deployed(http, Busy, unique_name, connected.url, max_ongoing_requests=1)
    client = redis.Redis.from_url(connected.url)
    started, gate, mark = (f"disconnect-{what}:{uuid.uuid4().hex}" for what in ("started", "gate", "mark"))
    held: dict = {}
    holder = threading.Thread(target=lambda: held.update(
        answer=http.get(f"/{unique_name}?kind=hold&started={started}&gate={gate}", timeout=90)))
    holder.start()
    try:
        wait_until(lambda: client.exists(started), timeout=30, message="the one replica to be busy")
        # Queued behind it, then its client leaves: the gateway takes it back off the queue.
        sent_and_left(http, f"/{unique_name}?kind=mark&mark={mark}",
                      until=lambda: client.llen(queue_name(unique_name)) == 1)
        wait_until(lambda: client.llen(queue_name(unique_name)) == 0, timeout=10,
                   message="the request whose client left to be taken off the queue")
    finally:
        client.set(gate, "1", ex=60)
        holder.join(timeout=90)
    assert held["answer"].text == '"held"'
    # The replica takes what is queued in order: once a later request ran, the one taken
    # back would have run before it.
    later = f"disconnect-later:{uuid.uuid4().hex}"
    assert http.get(f"/{unique_name}?kind=mark&mark={later}", timeout=60).text == '"marked"'
    assert client.exists(later) and not client.exists(mark)
    assert counted(http, "499", unique_name) == 1
    model.delete()


def test_an_async_call_being_served_is_cancelled_when_its_client_leaves(connected, unique_name, http):
    model = deployed(http, Waiter, unique_name, connected.url, max_ongoing_requests=1)
    client = redis.Redis.from_url(connected.url)
    started, marker = f"disconnect-started:{uuid.uuid4().hex}", f"disconnect-marker:{uuid.uuid4().hex}"
    sent_and_left(http, f"/{unique_name}?started={started}&marker={marker}", until=lambda: client.exists(started))
    wait_until(lambda: client.get(marker) == b"cancelled", timeout=10,
               message="the async call to be cancelled after its client left")
    assert http.get(f"/{unique_name}?quick=1", timeout=60).text == '"quick"'      # its one slot is free again
    model.delete()
