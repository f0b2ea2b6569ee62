"""The replica's one event loop: every coroutine of the user's object runs on it.

``async def`` methods, ``async def __init__``, ``reconfigure``, ``check_health`` and
batched methods all run on the same loop, in a thread of its own, for the whole life of
the replica; so an object bound to a loop (an ``httpx.AsyncClient``, an
``asyncio.Lock``, a database pool) made in ``__init__`` or in one call works in every
later one. Sync methods never run on it: they run in the server's threads, and a
coroutine they produce (a sync method returning an awaitable) is handed to the loop.

Example::

    loop = ReplicaLoop()
    loop.run(some_coroutine()).result()      # from any other thread: wait for it
    loop.stop()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from concurrent import futures
from typing import Any, Awaitable, Optional

log = logging.getLogger("taskserve.node.loop")


class ReplicaLoop:
    """An asyncio event loop running in a daemon thread until :meth:`stop`.

    >>> async def double(x):
    ...     await asyncio.sleep(0)
    ...     return 2 * x
    >>> loop = ReplicaLoop()
    >>> loop.call(double(21))
    42
    >>> loop.call(double(1)) == 2 and loop.thread.is_alive()
    True
    >>> loop.stop(); loop.thread.is_alive()
    False
    """

    def __init__(self, name: str = "replica-loop") -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        try:
            self.loop.run_forever()
        finally:
            self._close()

    def _close(self) -> None:
        pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def in_loop(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.current_thread() is self.thread

    def run(self, awaitable: Awaitable[Any]) -> "futures.Future[Any]":
        """Schedule ``awaitable`` on the loop (from any thread); its future."""
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop)

    def call(self, awaitable: Awaitable[Any], timeout: Optional[float] = None) -> Any:
        """Run ``awaitable`` on the loop and wait for its value (never from the loop's own thread)."""
        if self.in_loop():
            raise RuntimeError("ReplicaLoop.call from the loop's own thread would wait forever; await it instead")
        return self.run(awaitable).result(timeout)

    def resolve(self, value: Any, timeout: Optional[float] = None) -> Any:
        """``value``, or what it gives once awaited on the loop if it is awaitable: what a
        sync caller does with whatever a user's method returned."""
        if inspect.isawaitable(value):
            return self.call(value, timeout)
        return value

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (its tasks are cancelled) and wait for its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
