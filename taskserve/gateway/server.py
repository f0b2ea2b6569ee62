"""uvicorn's server, made quiet when idle.

uvicorn's ``Server.main_loop`` wakes ten times a second to look for a shutdown
request and, every tenth time, to refresh the ``Date`` header. An idle gateway
spent most of its CPU there. :class:`QuietServer` wakes once a second (the
``Date`` header's resolution) and at once when a signal asks it to stop.
"""

from __future__ import annotations

import asyncio
from types import FrameType
from typing import Optional

import uvicorn

# How often the idle server looks at its clock: the Date header's resolution.
TICK_S = 1.0


class QuietServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose main loop ticks every ``TICK_S`` instead of every 0.1 s.

    Example::

        QuietServer(uvicorn.Config(app, port=8000)).run()
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._exit_asked: Optional[asyncio.Event] = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit_asked = asyncio.Event()
        # on_tick(0): uvicorn refreshes the Date header on counts that are multiples of 10.
        while not await self.on_tick(0):
            try:
                await asyncio.wait_for(self._exit_asked.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        super().handle_exit(sig, frame)
        # The signal interrupts the loop's wait only to resume it: wake the loop itself.
        if self._loop is not None and self._exit_asked is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._exit_asked.set)
