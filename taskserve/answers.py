"""The answers to this process's calls, all received on one pub/sub connection.

A replica stores each answer under its result key and publishes it on the channel
of the same name (Celery's Redis backend does the same). :class:`AnswerListener`
subscribes **once**, to the pattern ``celery-task-meta-<listener id>.*``, and every
call of this process gets a task id under that prefix (:meth:`~AnswerListener.new_task_id`):
a call subscribes to nothing of its own, so it costs no ``SUBSCRIBE``/``UNSUBSCRIBE``
round trips and no answer can be published before its caller listens. A thread of its
own reads the connection and hands each answer to its :class:`Waiter`.

The listener never promises that an answer is heard: one published while the
connection was being re-established is only in its key, which the waiting caller
reads (``taskserve.handle.Response``). When the connection is lost, every waiter is
woken to do just that.

Example::

    listener = AnswerListener(redis.Redis.from_url("redis://127.0.0.1:6379/0"))
    task_id = listener.new_task_id()          # "<listener id>.<n>"
    waiter = listener.expect(task_id)         # before the call is pushed
    ...                                       # push the call
    waiter.event.wait(10); waiter.data        # the stored result record, as bytes
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
import weakref
from typing import Callable, Optional

import redis

from .store import result_key, result_key_pattern

log = logging.getLogger("taskserve.answers")

# How long a first call waits for Redis to confirm the subscription.
SUBSCRIBE_TIMEOUT_S = 5.0
# The reader thread wakes at least this often (to notice a connection that went away).
LISTEN_TIMEOUT_S = 1.0
# Between attempts to subscribe again, once the connection was lost.
RECONNECT_PAUSE_S = 0.2
NOT_SUBSCRIBED = "not subscribed yet"


class Waiter:
    """One call waiting for its answer: :attr:`event` is set when :attr:`data` (the
    stored result record) arrives, or when the caller should read its key instead.

    >>> waiter = Waiter(b"celery-task-meta-c0ffee.1")
    >>> waiter.deliver(b'{"status": "SUCCESS"}')
    >>> waiter.event.is_set(), waiter.data
    (True, b'{"status": "SUCCESS"}')
    """

    __slots__ = ("key", "event", "data", "wakeup", "__weakref__")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.event = threading.Event()
        self.data: Optional[bytes] = None
        self.wakeup: Optional[Callable[[], None]] = None     # also told, for a caller awaiting in asyncio

    def deliver(self, data: bytes) -> None:
        self.data = data
        self.wake()

    def wake(self) -> None:
        """The caller should look: at :attr:`data`, or at its key."""
        self.event.set()
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()


class AnswerListener:
    """Receives the answers to the calls of this process on one pub/sub connection.

    Waiters are held weakly: a call whose response was dropped unread leaves nothing
    behind here (its answer expires in Redis after the deployment's ``result_ttl_s``).

    >>> listener = AnswerListener(redis.Redis(), listener_id="c0ffee")
    >>> listener.new_task_id(), listener.pattern
    ('c0ffee.1', 'celery-task-meta-c0ffee.*')
    """

    def __init__(self, client: redis.Redis, listener_id: Optional[str] = None) -> None:
        self.client = client
        # Hex only: no character that means something in a Redis glob pattern.
        self.listener_id = listener_id or secrets.token_hex(8)
        self.pattern = result_key_pattern(f"{self.listener_id}.")
        self.counter = itertools.count(1)
        self.waiting: weakref.WeakValueDictionary[bytes, Waiter] = weakref.WeakValueDictionary()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self.first_outcome = threading.Event()   # subscribed, or failed to, the first time
        self.lost: Optional[str] = NOT_SUBSCRIBED

    def new_task_id(self) -> str:
        """A task id whose answer this listener receives: ``"<listener id>.<n>"``."""
        return f"{self.listener_id}.{next(self.counter)}"

    def expect(self, task_id: str) -> Waiter:
        """Register a waiter for ``task_id``'s answer (``task_id`` from :meth:`new_task_id`).

        A call that finds no reader running starts one and waits until Redis confirmed
        the subscription; ``redis.ConnectionError`` if it did not (Redis away).
        """
        waiter = Waiter(result_key(task_id).encode())
        with self.lock:
            self.waiting[waiter.key] = waiter
            if self.thread is None:
                self.lost = NOT_SUBSCRIBED
                self.first_outcome.clear()
                self.thread = threading.Thread(target=self._run, name="taskserve-answers", daemon=True)
                self.thread.start()
        if self.lost == NOT_SUBSCRIBED:
            if not self.first_outcome.wait(SUBSCRIBE_TIMEOUT_S):
                raise redis.TimeoutError(f"Redis did not confirm a subscription within {SUBSCRIBE_TIMEOUT_S:g}s")
            if self.lost is not None:
                raise redis.ConnectionError(self.lost)
        return waiter

    def _run(self) -> None:
        while True:
            try:
                self._listen()
            except (redis.RedisError, OSError) as error:
                self._lose(error)
            except Exception as error:     # never let the reader die: every call would wait its timeout out
                log.exception("the answer listener failed; subscribing again")
                self._lose(error)
            with self.lock:
                if not self.waiting:    # nobody waits: stop retrying; the next call starts a reader
                    self.thread = None
                    return
            time.sleep(RECONNECT_PAUSE_S)   # a pause between attempts, not a synchronisation

    def _listen(self) -> None:
        pubsub = self.client.pubsub()
        try:
            pubsub.psubscribe(self.pattern)
            while True:
                message = pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "pmessage":
                    waiter = self.waiting.get(message["channel"])
                    if waiter is not None:
                        waiter.deliver(message["data"])
                elif kind == "psubscribe":
                    self._subscribed()
        finally:
            try:
                pubsub.close()
            except Exception:   # the connection is gone already
                pass

    def _subscribed(self) -> None:
        """Subscribed (again): answers published while the connection was away are only
        in their keys, so every waiter reads its own."""
        was_lost = self.lost
        self.lost = None
        self.first_outcome.set()
        if was_lost is not None and was_lost != NOT_SUBSCRIBED:
            log.warning("the pub/sub connection to Redis is back")
            self._wake_all()

    def _lose(self, error: BaseException) -> None:
        if self.lost is None:
            log.warning("lost the pub/sub connection to Redis (%s); reconnecting", error)
        self.lost = str(error).strip() or type(error).__name__
        self.first_outcome.set()
        self._wake_all()

    def _wake_all(self) -> None:
        with self.lock:
            waiters = list(self.waiting.values())
        for waiter in waiters:
            waiter.wake()
