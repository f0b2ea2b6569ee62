"""An idle gateway sleeps: no timer of its own wakes it more than once a second.

uvicorn's server loop, the status cache and the result sweeper each used to wake on
a short timer whether or not there was work; these tests pin down that they now wait
for the event that gives them work (a signal, a request for the status, a request
waiting for its answer) and still do their work when it comes.
"""

from __future__ import annotations

import asyncio
import signal
import time
import types
from email.utils import formatdate
from typing import Callable

import redis.asyncio
import uvicorn

from taskserve.gateway import messaging, server
from taskserve.gateway.messaging import ResultWaiter
from taskserve.gateway.metrics import StatusCache


async def _no_app(scope: dict, receive: object, send: object) -> None:
    pass


def quiet_server() -> server.QuietServer:
    """A QuietServer whose main loop can run without serving (its config loaded, its state made)."""
    quiet = server.QuietServer(uvicorn.Config(_no_app, lifespan="off", log_config=None))
    quiet.config.load()
    quiet.server_state = uvicorn.server.ServerState()
    return quiet


def test_the_quiet_server_stops_at_a_signal_without_waiting_for_its_tick(monkeypatch):
    monkeypatch.setattr(server, "TICK_S", 3600.0)   # only the signal's wake-up can end the loop in time

    async def run() -> None:
        quiet = quiet_server()
        asyncio.get_running_loop().call_later(0.05, quiet.handle_exit, signal.SIGTERM, None)
        await asyncio.wait_for(quiet.main_loop(), 30)
        assert quiet.should_exit

    asyncio.run(run())


def test_the_quiet_server_keeps_the_date_header_fresh(monkeypatch):
    """Every tick refreshes the Date header (uvicorn's own loop does it every tenth)."""
    monkeypatch.setattr(server, "TICK_S", 0.001)
    now = [1_700_000_000.0]
    monkeypatch.setattr(uvicorn.server, "time", types.SimpleNamespace(time=lambda: now[0]))  # the header's clock
    seen: list[tuple[float, bytes]] = []

    async def run() -> None:
        quiet = quiet_server()
        tick = quiet.on_tick

        async def recorded(counter: int) -> bool:
            now[0] += 1                              # a new second at every tick
            done = await tick(counter)
            seen.append((now[0], dict(quiet.server_state.default_headers)[b"date"]))
            if len(seen) == 5:
                quiet.handle_exit(signal.SIGTERM, None)
            return done

        quiet.on_tick = recorded                     # type: ignore[method-assign]
        await asyncio.wait_for(quiet.main_loop(), 30)

    asyncio.run(run())
    assert len(seen) >= 5
    assert [date for _, date in seen] == [formatdate(at, usegmt=True).encode() for at, _ in seen]


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (letting the loop run) until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.005)


def test_an_unasked_status_cache_waits_for_a_request_instead_of_polling():
    reads: list[int] = []
    now = [0.0]           # the cache's clock: moved by the test only, so "idle" is the test's say
    looks = [0]

    def clock() -> float:
        looks[0] += 1
        return now[0]

    async def run() -> None:
        cache = StatusCache(lambda: reads.append(1) or {"deployments": {}}, refresh_s=0.01, idle_s=0.05, clock=clock)
        follower = asyncio.create_task(cache.follow())
        try:
            await asyncio.sleep(0.3)
            # Polling every 10 ms would have looked at the clock about 30 times by now.
            assert looks[0] <= 2 and reads == []
            await cache.current()                    # a request: read at once, and followed again
            await until(lambda: len(reads) >= 3, "the follower to read after the request")
            now[0] += 1.0                            # unasked for longer than idle_s
            await until(lambda: not cache.asked.is_set(), "the follower to go back to its wait")
            settled = len(reads)
            await asyncio.sleep(0.3)
            assert len(reads) == settled             # and reads nothing more
        finally:
            follower.cancel()

    asyncio.run(run())


def test_the_result_sweeper_sleeps_while_no_request_waits(cluster, monkeypatch):
    monkeypatch.setattr(messaging, "RESULT_POLL_S", 0.02)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(cluster.url)
        waiter = ResultWaiter(client, on_event=lambda: None)
        sweeps: list[float] = []
        sweep = waiter.sweep

        async def counted(min_age_s: float) -> int:
            sweeps.append(min_age_s)
            return await sweep(min_age_s)

        waiter.sweep = counted                       # type: ignore[method-assign]
        await waiter.start()
        try:
            await asyncio.sleep(0.3)
            assert sweeps == []                      # polling would have swept about 15 times
            with waiter.expecting(waiter.new_task_id()):
                await asyncio.sleep(0.3)             # a request waits: the sweep runs again
            assert len(sweeps) >= 2
        finally:
            await waiter.close()
            await client.aclose()

    asyncio.run(run())

