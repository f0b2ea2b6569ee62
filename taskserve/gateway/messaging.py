"""How the gateway sends requests and gets their answers, all on ``redis.asyncio``.

A request travels as the usual Celery task ``taskserve.call`` with the arguments
``("__http__", [request data], {})`` on the deployment's queue (:class:`TaskSender`
builds the message kombu's Redis transport would, and pushes the requests of one
event-loop step in one round trip). Its answer arrives through pub/sub
(:class:`ResultWaiter`): the gateway subscribes **once**, when it starts, to a pattern
that matches the result channel of every task id it hands out, so a request
subscribes to nothing of its own and no answer can be published unseen;
:func:`taskserve.wire.decode_answer` reads it, as a handle does. An answer read is deleted from Redis by :class:`ResultJanitor`, in
batches, off the request's path. A deployment with ``max_queued_requests`` gets its
request pushed only if its queue has room, checked in the same Lua script as the push.

Example::

    waiter = ResultWaiter(client, on_event=lambda: None)
    await waiter.start()                          # PSUBSCRIBE celery-task-meta-<gateway id>.*
    task_id = waiter.new_task_id()                # "<gateway id>.<n>"
    with waiter.expecting(task_id) as pending:
        await TaskSender(address, client).send(route, task_id, payload)
        answer = await waiter.wait(pending, route.timeout_s)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import redis
import redis.asyncio

from ..celery_app import make_app
from ..errors import BackPressureError
from ..http import HTTP_METHOD
from ..store import EVENTS_CHANNEL, queue_lists, queue_name, result_key, result_key_pattern
from ..store.lua import source as lua_source
from ..wire import READY_STATES, Answer, Call, CallEncoder, decode_answer
from .routes import Route

log = logging.getLogger("taskserve.gateway")

# Every RESULT_POLL_S, the result keys of the requests that have waited that long are
# read (one MGET for all of them), in case a pub/sub message was lost: say while the
# connection to Redis was re-established.
RESULT_POLL_S = 1.0
MGET_BATCH = 500
SUBSCRIBE_TIMEOUT_S = 10.0
# Between attempts to reach Redis again, once the pub/sub connection was lost.
RECONNECT_PAUSE_S = 0.5
# Answers read are deleted in batches of at most this many keys; when Redis is away,
# the deletions wait, up to MAX_PENDING_DELETES (beyond, answers expire on their own
# after the deployment's result_ttl_s).
DELETE_BATCH = 500
MAX_PENDING_DELETES = 100_000
DELETE_RETRY_S = 1.0
# At most one round of deletions this often: under load, one DEL serves many answers.
DELETE_INTERVAL_S = 0.05

# Pushes a request unless its queue holds max_queued requests already (the store's script).
PUSH_IF_ROOM = lua_source("push_if_room")


class RateLimitedLog:
    """Logs a repeated warning at most once per ``every_s`` seconds, with how many were
    left out since.

    >>> clock = iter([0.0, 0.5, 1.0, 12.0]).__next__
    >>> limited = RateLimitedLog(logging.getLogger("doctest"), every_s=10, clock=clock)
    >>> [limited.warning("accept failed: %s", "EMFILE") for _ in range(4)]
    [True, False, False, True]
    >>> limited.suppressed
    0
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self.last = float("-inf")
        self.suppressed = 0

    def warning(self, message: str, *args: Any) -> bool:
        """Log ``message % args`` unless one was logged less than ``every_s`` ago; True if logged."""
        now = self.clock()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += f" (and {self.suppressed} more like it in the last {now - self.last:.0f}s)"
        self.logger.warning(message, *args)
        self.last, self.suppressed = now, 0
        return True


class Expired(Exception):
    """The request expired in the queue: no replica took it in time."""


class Withdrawn(Exception):
    """The gateway took the request off its queue before any replica had it: it never runs."""


class ClientLeft(Exception):
    """The request's client closed its connection before the answer came."""


class Pending:
    """One request waiting for its answer (see :meth:`ResultWaiter.expecting`).

    :attr:`data` holds the result record once it arrived; :attr:`future` is resolved
    whenever the waiting request should look: an answer came, its deadline passed, or
    the pub/sub connection was lost (then it reads its result key).

    >>> loop = asyncio.new_event_loop()
    >>> pending = Pending("9f3ab2c4d5e6f708.7", loop)
    >>> pending.key
    b'celery-task-meta-9f3ab2c4d5e6f708.7'
    >>> pending.deliver(b'{"status": "SUCCESS"}')
    >>> pending.future.done(), pending.data
    (True, b'{"status": "SUCCESS"}')
    >>> loop.close()
    """

    __slots__ = ("task_id", "key", "future", "data", "since", "withdrawn", "left")

    def __init__(self, task_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.task_id = task_id
        self.key = result_key(task_id).encode()     # also its channel: Celery publishes on the key's name
        self.future: asyncio.Future = loop.create_future()
        self.data: Optional[bytes] = None
        self.since = loop.time()
        self.withdrawn = False
        self.left = False

    def deliver(self, data: bytes) -> None:
        """The result record arrived."""
        self.data = data
        self.wake()

    def wake(self) -> None:
        """Make the waiting request look (at :attr:`data`, its deadline, or its result key)."""
        if not self.future.done():
            self.future.set_result(None)

    def withdraw(self) -> None:
        """The request was taken off its queue: its wait ends with :class:`Withdrawn`."""
        self.withdrawn = True
        self.wake()

    def leave(self) -> None:
        """The request's client left: its wait ends with :class:`ClientLeft`."""
        self.left = True
        self.wake()


class ResultWaiter:
    """Delivers each request's result to the coroutine waiting for it.

    One pub/sub connection serves every request. When the gateway starts, it
    subscribes to the pattern ``celery-task-meta-<gateway id>.*`` and waits for Redis to
    confirm it; every request gets a task id under that prefix (:meth:`new_task_id`), and
    Celery publishes a result on the channel named like its key, so each answer reaches
    this gateway (and no other) without a subscription per request: a request costs no
    ``SUBSCRIBE``/``UNSUBSCRIBE`` and waits for no confirmation. The same connection
    follows the store's events channel (``on_event`` is called for each notification).

    A result key that an answer was stored under but whose message never came (the
    connection was lost meanwhile) is read by a sweep: every ``RESULT_POLL_S``, one
    ``MGET`` reads the keys of all requests that have waited that long, and once the
    connection is back, all of them at once.

    While that connection is lost (:attr:`lost` says why), requests fail at once with
    ``redis.ConnectionError``, those waiting too, rather than wait out their timeout.

    Example::

        task_id = waiter.new_task_id()
        with waiter.expecting(task_id) as pending:
            await sender.send(route, task_id, payload)
            answer = await waiter.wait(pending, route.timeout_s)
    """

    def __init__(self, client: redis.asyncio.Redis, on_event: Callable[[], None],
                 gateway_id: Optional[str] = None) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.on_event = on_event
        # Hex only: no character that means something in a Redis glob pattern.
        self.gateway_id = gateway_id or secrets.token_hex(8)
        self.pattern = result_key_pattern(f"{self.gateway_id}.")
        self.counter = itertools.count(1)
        self.pending: dict[bytes, Pending] = {}
        self.reader: Optional[asyncio.Task] = None
        self.sweeper: Optional[asyncio.Task] = None
        self.sweep_all = asyncio.Event()
        self.first_request = asyncio.Event()   # wakes the sweeper, asleep while no request waits
        self.lost: Optional[str] = None
        self.lost_log = RateLimitedLog(log)
        self.sweep_log = RateLimitedLog(log)

    def new_task_id(self) -> str:
        """A task id whose result this gateway receives: ``"<gateway id>.<n>"``, unique since
        the gateway id is random."""
        return f"{self.gateway_id}.{next(self.counter)}"

    async def start(self) -> None:
        """Subscribe, and return once Redis confirmed the pattern: from then on no answer is missed."""
        await self.pubsub.subscribe(EVENTS_CHANNEL)
        await self.pubsub.psubscribe(self.pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBSCRIBE_TIMEOUT_S
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise redis.TimeoutError(f"Redis did not confirm a subscription within {SUBSCRIBE_TIMEOUT_S:g}s")
            message = await self.pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "psubscribe":
                break
        self.reader = asyncio.create_task(self._read(), name="results")
        self.sweeper = asyncio.create_task(self._sweep_forever(), name="result-sweep")

    async def close(self) -> None:
        for task in (self.reader, self.sweeper):
            if task is not None:
                task.cancel()
        await self.pubsub.aclose()

    async def _read(self) -> None:
        while True:
            try:
                message = await self.pubsub.get_message(timeout=None)   # a lost connection raises
            except (redis.RedisError, OSError) as error:
                self._lose(error)
                await asyncio.sleep(RECONNECT_PAUSE_S)   # a pause between attempts, not a synchronisation
                continue
            except Exception:   # never let the one reader die: every request would time out
                log.exception("cannot read a pub/sub message; going on")
                continue
            if self.lost is not None:   # read without an error: connected (and subscribed) again
                log.warning("the pub/sub connection to Redis is back")
                self.lost = None
            if message is None:
                continue
            kind = message["type"]
            if kind == "pmessage":
                pending = self.pending.get(message["channel"])
                if pending is not None:
                    pending.deliver(message["data"])
            elif kind == "message":
                self.on_event()
            elif kind == "psubscribe":
                # Subscribed again after a reconnection: answers published in between
                # are only in their keys.
                self.sweep_all.set()
                self.first_request.set()

    def _lose(self, error: BaseException) -> None:
        """The pub/sub connection failed: wake the requests that wait on it."""
        if self.lost is None:
            self.lost_log.last = float("-inf")   # the first failure of an outage is always logged
        self.lost = str(error) or type(error).__name__
        self.lost_log.warning("lost the pub/sub connection to Redis (%s); reconnecting", error)
        for pending in self.pending.values():
            pending.wake()   # it reads its result, or fails

    def check_connected(self) -> None:
        """Raise ``redis.ConnectionError`` while the pub/sub connection is lost."""
        if self.lost is not None:
            raise redis.ConnectionError(self.lost)

    @contextmanager
    def expecting(self, task_id: str) -> Iterator[Pending]:
        """Expect ``task_id``'s answer until the block ends (``task_id`` from :meth:`new_task_id`);
        ``redis.ConnectionError`` while the pub/sub connection is lost."""
        self.check_connected()
        pending = Pending(task_id, asyncio.get_running_loop())
        if not self.pending:
            self.first_request.set()
        self.pending[pending.key] = pending
        try:
            yield pending
        finally:
            del self.pending[pending.key]

    async def wait(self, pending: Pending, timeout_s: float) -> Answer:
        """The finished answer of ``pending``'s task; ``TimeoutError`` after ``timeout_s``,
        :class:`Expired` if no replica took it in time, :class:`Withdrawn` or
        :class:`ClientLeft` once :meth:`Pending.withdraw` or :meth:`Pending.leave` was called.

        If the pub/sub connection is lost meanwhile, the result key is read at once: a
        Redis that is away raises ``redis.ConnectionError`` then.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        timer = loop.call_at(deadline, pending.wake)
        try:
            while True:
                await pending.future
                pending.future = loop.create_future()
                if pending.withdrawn:
                    raise Withdrawn(pending.task_id)
                if pending.left:
                    raise ClientLeft(pending.task_id)
                data, pending.data = pending.data, None
                if data is None:
                    if loop.time() >= deadline:
                        raise TimeoutError(pending.task_id)
                    data = await self.client.get(pending.key)   # woken by a lost connection
                    if data is None:
                        continue
                answer = decode_answer(data)
                if answer.expired:
                    raise Expired(pending.task_id)
                if answer.state in READY_STATES:
                    return answer
        finally:
            timer.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            if not self.pending and not self.sweep_all.is_set():
                self.first_request.clear()
                await self.first_request.wait()   # idle: no timer wakes the gateway
            try:
                await asyncio.wait_for(self.sweep_all.wait(), RESULT_POLL_S)
            except asyncio.TimeoutError:
                pass
            everything = self.sweep_all.is_set()
            self.sweep_all.clear()
            try:
                await self.sweep(0.0 if everything else RESULT_POLL_S)
            except (redis.RedisError, OSError) as error:
                self.sweep_log.warning("cannot read the results of waiting requests (%s); trying again", error)

    async def sweep(self, min_age_s: float) -> int:
        """Read the result keys of the requests waiting at least ``min_age_s`` and deliver
        what is there; how many were delivered."""
        now = asyncio.get_running_loop().time()
        due = [pending for pending in self.pending.values() if now - pending.since >= min_age_s]
        delivered = 0
        for start in range(0, len(due), MGET_BATCH):
            chunk = due[start:start + MGET_BATCH]
            values = await self.client.mget([pending.key for pending in chunk])
            for pending, value in zip(chunk, values):
                if value is not None:
                    pending.deliver(value)
                    delivered += 1
        return delivered


class TaskSender:
    """Enqueues requests without leaving the event loop.

    The task message is the one Celery builds (its protocol 2: headers, properties,
    body), pushed onto the deployment's queue list in the envelope kombu's Redis
    transport gives a message published to the queue (``Channel.prepare_message`` and
    ``basic_publish`` on the default exchange): what ``app.send_task(..., queue=...)``
    pushes, but through ``redis.asyncio`` rather than kombu's blocking client, so no
    thread is needed. Celery builds one message per serializer up front; each request
    fills in its own id, expiry and arguments (``tests/test_gateway.py`` checks the
    result matches ``send_task``'s).

    Pushes are grouped: while one round trip to Redis is under way, the requests sent
    meanwhile gather, and go together (one pipeline) once it is back. Under load a push
    then costs a fraction of a round trip and of a ``send()``; alone, a request is
    pushed at once.

    Example::

        await TaskSender(address, client).send(Route("/echo", "echo"), task_id, payload)
    """

    def __init__(self, address: str, client: Optional[redis.asyncio.Redis]) -> None:
        self.client = client
        self.encoder = CallEncoder(make_app(address))     # the app only builds messages; it never connects
        self.batch: list[tuple[str, bytes, Optional[int], asyncio.Future]] = []
        self.pushing: Optional[asyncio.Task] = None

    async def send(self, route: Route, task_id: str, payload: dict, queue: Optional[str] = None) -> tuple[str, bytes]:
        """Push the request onto ``queue`` (the deployment's by default; its canary's for
        a request the canary serves); :class:`BackPressureError` if it holds ``route.max_queued``.
        Returns the queue and the item pushed (what ``LREM`` takes back)."""
        assert self.client is not None
        queue = queue or queue_name(route.deployment)
        message = self.message(route, task_id, payload, queue)
        future = asyncio.get_running_loop().create_future()
        self.batch.append((queue, message, route.max_queued, future))
        if self.pushing is None:
            self._start_push()
        pushed = await future
        if pushed < 0:
            raise BackPressureError(route.deployment, -pushed, route.max_queued)
        return queue, message

    def _start_push(self) -> None:
        self.pushing = asyncio.ensure_future(self._push_gathered())
        self.pushing.add_done_callback(self._pushed)

    async def _push_gathered(self) -> None:
        # Runs a step after the first send(): the others of that step have joined the batch.
        batch, self.batch = self.batch, []
        await self._push(batch)

    def _pushed(self, _: asyncio.Task) -> None:
        self.pushing = None
        if self.batch:
            self._start_push()

    async def _push(self, batch: list[tuple[str, bytes, Optional[int], asyncio.Future]]) -> None:
        """Push ``batch`` in one round trip; each request's future gets its queue's new length
        (negative: refused, the queue was full) or the error."""
        assert self.client is not None
        try:
            if len(batch) == 1:
                queue, message, max_queued, _ = batch[0]
                results: list[Any] = [await (self.client.lpush(queue, message) if max_queued is None else
                                             self.client.eval(PUSH_IF_ROOM, *_room_keys(queue), message,
                                                              max_queued))]
            else:
                async with self.client.pipeline(transaction=False) as pipe:
                    for queue, message, max_queued, _ in batch:
                        if max_queued is None:
                            pipe.lpush(queue, message)
                        else:
                            pipe.eval(PUSH_IF_ROOM, *_room_keys(queue), message, max_queued)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as error:   # the requests see it; nothing else waits for this task
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def message(self, route: Route, task_id: str, payload: dict, queue: Optional[str] = None) -> bytes:
        """The message of one request, as it sits in ``queue`` (the deployment's by default).

        An HTTP request travels as JSON whatever the deployment's serializer: it is
        plain data, and the gateway never unpickles. It expires when the gateway stops
        waiting for it: a replica does not run a request its caller gave up on.
        """
        call = Call(task_id, HTTP_METHOD, [payload], {}, queue=queue or queue_name(route.deployment),
                    expires_at=time.time() + route.timeout_s)
        # What `celery inspect` shows; Celery's own repr of the base64 body costs more
        # than the rest of the message.
        return self.encoder.encode(call, argsrepr=f"('{HTTP_METHOD}', '{payload['method']} {payload['path']}')")


def _room_keys(queue: str) -> list[Any]:
    """``EVAL`` key arguments of :data:`PUSH_IF_ROOM` for a push onto ``queue``'s default list."""
    lists = queue_lists(queue)
    return [1 + len(lists), queue, *lists]


class ResultJanitor:
    """Deletes the answers the gateway has read, off the requests' path.

    :meth:`forget` only notes the key; a background task deletes what was noted in
    batches (one ``DEL`` of up to ``DELETE_BATCH`` keys, at most one round per
    ``DELETE_INTERVAL_S``), so under load a deletion costs a fraction of a round trip. Deletions that fail (Redis away) are tried again;
    :meth:`close` makes a last attempt. An answer whose deletion never succeeds
    expires after its deployment's ``result_ttl_s``.

    Example::

        janitor = ResultJanitor(client)
        janitor.start()
        janitor.forget(task_id)      # after the answer was read
        await janitor.close()        # at shutdown
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.pending: list[str] = []
        self.wake = asyncio.Event()
        self.task: Optional[asyncio.Task] = None
        self.failure_log = RateLimitedLog(log)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="result-janitor")

    def forget(self, task_id: str) -> None:
        """Delete ``task_id``'s answer soon."""
        self.forget_key(result_key(task_id))

    def forget_key(self, key: str) -> None:
        """Delete ``key`` soon (a stream read to its end, say)."""
        if len(self.pending) >= MAX_PENDING_DELETES:
            del self.pending[:DELETE_BATCH]   # the oldest expire on their own
        self.pending.append(key)
        self.wake.set()

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if await self.flush():
                await asyncio.sleep(DELETE_INTERVAL_S)   # let the next answers gather into one DEL
            else:
                await asyncio.sleep(DELETE_RETRY_S)      # Redis is away: try again in a while
                self.wake.set()

    async def flush(self) -> bool:
        """Delete every noted answer; False if Redis failed (they stay noted)."""
        while self.pending:
            batch = self.pending[:DELETE_BATCH]
            try:
                await self.client.delete(*batch)
            except (redis.RedisError, OSError) as error:
                self.failure_log.warning("cannot delete %d answers read (%s); trying again", len(self.pending), error)
                return False
            del self.pending[:len(batch)]
        return True

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop, after a last attempt (of at most ``timeout_s``) to delete what is noted."""
        if self.task is not None:
            self.task.cancel()
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except asyncio.TimeoutError:
            pass
        if self.pending:
            log.warning("%d answers read were not deleted; they expire after their result_ttl_s", len(self.pending))
