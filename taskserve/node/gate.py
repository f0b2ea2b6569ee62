"""The gate between a replica's requests and its object's ``reconfigure``.

Requests (and ``check_health``) enter shared; ``reconfigure`` enters alone, after
the requests in hand finished and before new ones start.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional


class RequestGate:
    """Keeps ``reconfigure`` apart from requests.

    Requests enter shared (several at once when ``max_concurrent_queries > 1``, and
    ``check_health`` alongside them); ``reconfigure`` enters alone, after the
    requests in hand finished, and holds new ones back while it waits and runs.

    >>> gate = RequestGate()
    >>> with gate.request():
    ...     gate.try_exclusive(timeout=0.01)
    False
    >>> gate.try_exclusive(timeout=0.01)
    True
    >>> gate.try_enter(timeout=0.01)       # a request waits for reconfigure
    False
    >>> gate.release_exclusive()
    >>> gate.try_enter(timeout=0.01)
    True
    >>> gate.leave()
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._serving = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def request(self) -> Iterator[None]:
        self.try_enter()
        try:
            yield
        finally:
            self.leave()

    def try_enter(self, timeout: Optional[float] = None) -> bool:
        """Enter shared, waiting at most ``timeout`` seconds; False if it could not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._exclusive or self._waiting_exclusive:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
            self._serving += 1
            return True

    def leave(self) -> None:
        """Leave after :meth:`try_enter` returned True."""
        with self._condition:
            self._serving -= 1
            self._condition.notify_all()

    def try_exclusive(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            self._waiting_exclusive += 1
            try:
                while self._exclusive or self._serving:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._condition.wait(remaining)
                self._exclusive = True
                return True
            finally:
                self._waiting_exclusive -= 1
                self._condition.notify_all()

    def release_exclusive(self) -> None:
        with self._condition:
            self._exclusive = False
            self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.try_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()
