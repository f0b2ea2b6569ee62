"""Async model code on a real cluster: one event loop per replica, as many coroutines at
once as ``max_ongoing_requests``, and sync methods that never block the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

import taskserve

from .helpers import wait_until


class LoopBound:
    """Holds objects bound to the loop its ``__init__`` ran on."""

    async def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.lock = asyncio.Lock()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.config_loop = None

    async def same_loop(self) -> bool:
        async with self.lock:
            return asyncio.get_running_loop() is self.loop

    async def put(self, item: str) -> int:
        await self.queue.put(item)
        return self.queue.qsize()

    async def get(self) -> str:
        return await asyncio.wait_for(self.queue.get(), 5)

    async def reconfigure(self, config: dict) -> None:
        self.config_loop = asyncio.get_running_loop()

    async def reconfigured_on_the_loop(self) -> bool:
        return self.config_loop is self.loop

    def sync_thread(self) -> str:
        return threading.current_thread().name


def test_async_code_keeps_one_event_loop_for_the_replicas_life(connected, unique_name):
    model = taskserve.deployment(LoopBound).options(name=unique_name, num_cpus=0.1, user_config={"k": 1})
    model.deploy()
    handle = model.get_handle()
    assert [handle.same_loop.remote().result(timeout=30) for _ in range(5)] == [True] * 5
    assert handle.put.remote("made in one call").result(timeout=30) == 1
    assert handle.get.remote().result(timeout=30) == "made in one call"      # the queue of an earlier call
    assert handle.reconfigured_on_the_loop.remote().result(timeout=30) is True
    assert handle.sync_thread.remote().result(timeout=30) != "replica-loop"   # sync code stays off the loop
    model.delete()


class Sleeper:
    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.threads: set[str] = set()
        self.all_in = asyncio.Event()
        self.release = threading.Event()
        self.blocking = False

    async def nap(self, together: int) -> int:
        """Wait until ``together`` calls wait at once (at most a minute)."""
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.threads.add(threading.current_thread().name)
        if self.in_flight >= together:
            self.all_in.set()
        try:
            await asyncio.wait_for(self.all_in.wait(), 60)
        finally:
            self.in_flight -= 1
        return self.most

    def most_at_once(self) -> tuple[int, list]:
        return self.most, sorted(self.threads)

    def block(self) -> str:
        self.blocking = True
        self.release.wait(30)
        return "released"

    async def is_blocking(self) -> bool:
        return self.blocking

    def unblock(self) -> str:
        self.release.set()
        return "set"

    async def ping(self) -> str:
        return "pong"


def test_200_async_calls_run_at_once_on_one_replica(connected, unique_name):
    model = taskserve.deployment(Sleeper).options(name=unique_name, num_cpus=0.1, max_ongoing_requests=200)
    model.deploy()
    handle = model.get_handle()
    responses = [handle.nap.remote(200) for _ in range(200)]
    for response in responses:
        response.result(timeout=60)
    # Every call was awaiting at the same moment, all as coroutines of the one loop (no thread each).
    assert handle.most_at_once.remote().result(timeout=30) == [200, ["replica-loop"]]
    model.delete()


def test_a_sync_method_never_blocks_the_loop(connected, unique_name):
    model = taskserve.deployment(Sleeper).options(name=unique_name, num_cpus=0.1, max_ongoing_requests=3)
    model.deploy()
    handle = model.get_handle()
    blocked = handle.block.remote()
    # The loop answers while the sync call holds its thread.
    wait_until(lambda: handle.is_blocking.remote().result(timeout=10), timeout=30)
    assert handle.ping.remote().result(timeout=10) == "pong"
    assert handle.unblock.remote().result(timeout=10) == "set"  # and another sync call gets a thread
    assert blocked.result(timeout=30) == "released"
    model.delete()


@pytest.mark.parametrize("name", ["max_ongoing_requests", "max_concurrent_queries"])
def test_max_ongoing_requests_is_ray_serves_name_for_the_same_option(name):
    model = taskserve.deployment(Sleeper).options(**{name: 7})
    assert model.config.max_concurrent_queries == 7
    with pytest.raises(ValueError, match="name the same option"):
        taskserve.deployment(Sleeper).options(max_ongoing_requests=2, max_concurrent_queries=3)


class Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


class Composer:
    def __init__(self, other: str) -> None:
        self.other = other

    async def fan_out(self, n: int) -> tuple[list, list]:
        handle = taskserve.get_deployment(self.other).get_handle()
        before = threading.active_count()
        values = await asyncio.gather(*(handle.remote(i) for i in range(n)))
        return values, [threading.current_thread().name, threading.active_count() - before]


def test_an_async_method_awaits_other_deployments_without_a_thread_each(connected, unique_name):
    doubler = taskserve.deployment(Doubler).options(name=f"{unique_name}-d", num_cpus=0.1, max_ongoing_requests=8)
    doubler.deploy()
    composer = taskserve.deployment(Composer).options(name=unique_name, num_cpus=0.1)
    composer.deploy(doubler.name)
    values, (thread, new_threads) = composer.get_handle().fan_out.remote(20).result(timeout=60)
    assert values == [2 * i for i in range(20)]
    assert thread == "replica-loop" and new_threads <= 2      # the listener's thread at most, not one per call
    composer.delete()
    doubler.delete()
