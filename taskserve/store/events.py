"""Change notifications: wake-ups on one channel, never the change itself.

The controller and the agents resync on a timer anyway, so a missed notification
costs latency, never correctness.

>>> import fakeredis
>>> events = Events(fakeredis.FakeRedis())
>>> pubsub = events.subscribe()
>>> wait_for_events(pubsub, 0.01)          # nothing notified yet
False
>>> events.notify("goal:echo")
>>> wait_for_events(pubsub, 1.0)
True
"""

from __future__ import annotations

import select
from typing import Sequence

import redis

from .base import StoreBase
from .keys import EVENTS_CHANNEL


class Events(StoreBase):
    """The notifications part of :class:`taskserve.store.Store`."""

    def notify(self, what: str) -> None:
        """Wake the controller and agents; they resync on a timer anyway."""
        self.redis.publish(EVENTS_CHANNEL, what)

    def subscribe(self) -> redis.client.PubSub:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(EVENTS_CHANNEL)
        return pubsub


def wait_for_events(pubsub: redis.client.PubSub, timeout_s: float, also: Sequence[int] = ()) -> bool:
    """Wait until a notification arrives (then swallow the backlog), one of the
    descriptors ``also`` turns readable, or the timeout.

    Returns True if something was notified.
    """
    if also:
        connection = pubsub.connection
        sock = getattr(connection, "_sock", None)
        try:
            if sock is not None and not connection.can_read(timeout=0):
                select.select([sock, *also], [], [], timeout_s)
            timeout_s = 0.0
        except (OSError, ValueError, redis.RedisError):
            pass   # a broken connection: get_message below reconnects, waiting as before
    message = pubsub.get_message(timeout=timeout_s)
    seen = message is not None
    while message is not None:
        message = pubsub.get_message(timeout=0)
    return seen
