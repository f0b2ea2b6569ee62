"""Streaming on a real cluster: chunks as they are yielded (sync and async generators,
``for`` and ``async for``), an error after the chunks before it, the caller leaving
stops the generator, a replica killed mid-stream ends the stream at once, and a
stream's key expires."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest
import redis

import taskserve
from taskserve.node.transport import IDLE_WAKE_S
from taskserve.store.keys import stream_key

from .helpers import replica_pids, wait_until


class Talker:
    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    def tokens(self, n: int, gate: str = "") -> object:
        for i in range(n):
            if gate and i == 1:           # the second waits until the caller saw the first
                deadline = time.monotonic() + 30
                while not self.client.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.01)
            yield f"t{i}"

    async def async_tokens(self, n: int) -> object:
        for i in range(n):
            await asyncio.sleep(0)
            yield {"i": i}

    def raw(self) -> object:
        yield b"\x00\xff"
        yield "text"

    def fails_after(self, n: int) -> object:
        yield from range(n)
        raise ValueError(f"broke after {n}")

    def forever(self, marker: str) -> object:
        try:
            i = 0
            while True:
                yield i
                i += 1
                time.sleep(0.005)
        finally:
            self.client.set(marker, "closed", ex=300)      # GeneratorExit: the caller left

    async def async_forever(self, marker: str) -> object:
        try:
            while True:
                await asyncio.sleep(3600)                  # waiting for a token: cancelled, not polled
                yield 1
        finally:
            self.client.set(marker, "cancelled", ex=300)

    def plain(self, x: int) -> int:
        return x + 1

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture
def talker(connected, unique_name):
    model = taskserve.deployment(Talker).options(name=unique_name, num_cpus=0.1, max_ongoing_requests=4)
    model.deploy(connected.url)
    yield model
    model.delete()


def test_chunks_arrive_as_they_are_yielded(connected, talker):
    handle = talker.get_handle().options(stream=True)
    gate = f"stream-gate:{uuid.uuid4().hex}"
    stream = iter(handle.tokens.remote(3, gate))
    assert next(stream) == "t0"                            # before the generator yields the second
    redis.Redis.from_url(connected.url).set(gate, "1", ex=60)
    assert list(stream) == ["t1", "t2"]


def test_async_generators_stream_and_async_for_reads(connected, talker):
    async def read() -> list:
        return [chunk async for chunk in talker.get_handle().options(stream=True).async_tokens.remote(4)]

    assert asyncio.run(read()) == [{"i": i} for i in range(4)]


def test_without_stream_a_generator_gives_the_list_of_its_chunks(connected, talker):
    handle = talker.get_handle()
    assert handle.tokens.remote(3).result(timeout=30) == ["t0", "t1", "t2"]
    assert handle.options(stream=True).raw.remote().result(timeout=30) == [b"\x00\xff", "text"]
    assert handle.options(stream=True).plain.remote(1).result(timeout=30) == [2]   # not a generator: one chunk


def test_an_exception_arrives_after_the_chunks_before_it(connected, talker):
    seen = []
    with pytest.raises(taskserve.ReplicaError) as caught:
        for chunk in talker.get_handle().options(stream=True).fails_after.remote(3):
            seen.append(chunk)
    assert seen == [0, 1, 2] and caught.value.type_name == "ValueError" and caught.value.message == "broke after 3"


@pytest.mark.parametrize("method, closed", [("forever", "closed"), ("async_forever", "cancelled")])
def test_a_caller_that_leaves_stops_the_generator(connected, talker, method, closed):
    marker = f"stream-marker:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(connected.url)
    stream = talker.get_handle().options(stream=True)
    if method == "forever":
        for chunk in getattr(stream, method).remote(marker):
            if chunk == 3:
                break
    else:
        getattr(stream, method).remote(marker).cancel()       # it awaits: its task is cancelled
    wait_until(lambda: client.get(marker) == closed.encode(), timeout=10,
               message="the generator to be stopped after its caller left")
    assert talker.get_handle().plain.remote(1).result(timeout=30) == 2       # its slot is free again


def test_a_replica_killed_mid_stream_ends_the_callers_iteration(connected, talker):
    handle = talker.get_handle()
    [pid] = replica_pids(talker.name)
    marker = f"stream-marker:{uuid.uuid4().hex}"
    stream = iter(handle.options(stream=True).forever.remote(marker))
    assert next(stream) == 0
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(taskserve.ReplicaError, match="stream interrupted"):
        for _ in stream:
            pass
    assert time.monotonic() - started < 30                 # ended, never a hang
    wait_until(lambda: handle.plain.remote(1).result(timeout=30) == 2, timeout=60)


def test_a_streams_key_expires(connected, talker):
    response = talker.get_handle().options(stream=True).tokens.remote(2)
    assert response.result(timeout=30) == ["t0", "t1"]
    ttl = redis.Redis.from_url(connected.url).ttl(stream_key(response.request_id))
    assert 0 < ttl <= 600


def test_a_replica_taking_one_request_at_a_time_takes_the_next_as_soon_as_a_stream_ends(connected, unique_name):
    # The stream's end is written by the stream writer's thread: it must wake the consumer,
    # whose one slot is free again. Noticed only at the consumer's next timer, each of
    # these streams would wait up to IDLE_WAKE_S for its message to be taken.
    model = taskserve.deployment(Talker).options(name=unique_name, num_cpus=0.1, max_ongoing_requests=1)
    model.deploy(connected.url)
    stream = model.get_handle().options(stream=True)
    assert stream.tokens.remote(2).result(timeout=30) == ["t0", "t1"]
    started = time.monotonic()
    for _ in range(5):
        assert stream.tokens.remote(2).result(timeout=30) == ["t0", "t1"]
    assert model.get_handle().plain.remote(1).result(timeout=30) == 2
    assert time.monotonic() - started < IDLE_WAKE_S / 2
    model.delete()
