"""How the gateway sends requests and gets their answers, all on ``redis.asyncio``.

A request travels as the usual Celery task ``taskserve.call`` with the arguments
``("__http__", [request data], {})`` on the deployment's queue (:class:`TaskSender`
builds the message kombu's Redis transport would). Its answer is awaited on the
result's pub/sub channel (:class:`ResultWaiter`), subscribed *before* the task is
pushed, so no answer can be published unseen; :func:`unwrap` reads it. An answer
read is deleted from Redis by :class:`ResultJanitor`, in batches, off the request's path.
A deployment with ``max_queued_requests`` gets its request pushed only if its queue has
room, checked in the same Lua script as the push.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import pickle
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional

import kombu.serialization
import redis
import redis.asyncio
from celery import states
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from ..celery_app import TASK_NAME, make_app
from ..errors import BackPressureError, ReplicaError
from ..http import HTTP_METHOD
from ..store import EVENTS_CHANNEL, queue_name, result_key
from .routes import Route

log = logging.getLogger("taskserve.gateway")

# A request also reads its result key this often, in case its pub/sub message was
# lost (say while the connection to Redis was re-established).
RESULT_POLL_S = 1.0
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

# Pushes a request unless the queue holds ARGV[2] requests already. Returns the queue's
# new length, or minus its length when it was full (a full queue is never empty).
PUSH_IF_ROOM = """
local queued = redis.call('LLEN', KEYS[1])
if queued >= tonumber(ARGV[2]) then
  return -queued
end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""


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


def unwrap(meta: dict) -> Any:
    """The value in a finished request's Celery result, decoded as
    :meth:`taskserve.handle.Response.result` does; raises :class:`ReplicaError`.

    >>> unwrap({"status": "SUCCESS", "result": {"ok": True, "value": 42}})
    42
    >>> unwrap({"status": "SUCCESS", "result": {"ok": False, "type": "ValueError", "message": "bad"}})
    Traceback (most recent call last):
    ...
    taskserve.errors.ReplicaError: ValueError: bad
    """
    if meta.get("status") == states.FAILURE:   # Celery itself failed to run the task
        error = meta.get("result")
        if isinstance(error, BaseException):
            raise ReplicaError(type(error).__name__, str(error), meta.get("traceback") or "")
        error = error if isinstance(error, dict) else {}
        args = error.get("exc_message")
        message = str(args[0]) if isinstance(args, (list, tuple)) and len(args) == 1 else str(args or "")
        raise ReplicaError(error.get("exc_type") or "Exception", message, meta.get("traceback") or "")
    envelope = meta["result"]
    if envelope.get("ok"):
        return envelope["value"]
    raise ReplicaError(envelope["type"], envelope["message"], envelope.get("traceback", ""))


def decode_meta(data: bytes, serializer: str) -> dict:
    """A Celery result record as the replica wrote it (JSON, or pickle for pickle deployments)."""
    return pickle.loads(data) if serializer == "pickle" else json_loads(data)


class Expired(Exception):
    """The request expired in the queue: no replica took it in time."""


class ResultWaiter:
    """Delivers each request's result to the coroutine waiting for it.

    One pub/sub connection serves every request: a request subscribes to its
    result's channel, is told once Redis confirmed the subscription, and only then
    is its task sent, so the result cannot be published unseen. The same connection
    follows the store's events channel (``on_event`` is called for each notification).

    While that connection is lost (:attr:`lost` says why), requests fail at once with
    ``redis.ConnectionError``, those waiting too, rather than wait out their timeout.

    Example::

        async with waiter.subscription(task_id) as queue:
            await sender.send(route, task_id, payload)
            meta = await waiter.wait(task_id, queue, route.timeout_s, route.serializer)
    """

    def __init__(self, client: redis.asyncio.Redis, on_event: Callable[[], None]) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.on_event = on_event
        self.queues: dict[str, asyncio.Queue] = {}
        self.confirmations: dict[str, asyncio.Future] = {}
        self.lock = asyncio.Lock()
        self.reader: Optional[asyncio.Task] = None
        self.lost: Optional[str] = None
        self.lost_log = RateLimitedLog(log)

    async def start(self) -> None:
        await self.pubsub.subscribe(EVENTS_CHANNEL)
        self.reader = asyncio.create_task(self._read(), name="results")

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.pubsub.aclose()

    async def _read(self) -> None:
        while True:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
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
            channel = message["channel"].decode()
            if message["type"] == "subscribe":
                confirmed = self.confirmations.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message["type"] == "message":
                if channel == EVENTS_CHANNEL:
                    self.on_event()
                elif channel in self.queues:
                    self.queues[channel].put_nowait(message["data"])

    def _lose(self, error: BaseException) -> None:
        """The pub/sub connection failed: fail the requests that wait on it."""
        if self.lost is None:
            self.lost_log.last = float("-inf")   # the first failure of an outage is always logged
        self.lost = str(error) or type(error).__name__
        self.lost_log.warning("lost the pub/sub connection to Redis (%s); reconnecting", error)
        for confirmed in self.confirmations.values():
            if not confirmed.done():
                confirmed.set_exception(redis.ConnectionError(self.lost))
        for queue in self.queues.values():
            queue.put_nowait(None)   # wakes its request, which reads its result or fails

    def check_connected(self) -> None:
        """Raise ``redis.ConnectionError`` while the pub/sub connection is lost."""
        if self.lost is not None:
            raise redis.ConnectionError(self.lost)

    @asynccontextmanager
    async def subscription(self, task_id: str) -> AsyncIterator[asyncio.Queue]:
        """Subscribe to ``task_id``'s result channel until the block ends; ``redis.RedisError``
        if Redis cannot be reached or does not confirm the subscription."""
        self.check_connected()
        channel = result_key(task_id)
        queue: asyncio.Queue = asyncio.Queue()
        confirmed = asyncio.get_running_loop().create_future()
        self.queues[channel] = queue
        self.confirmations[channel] = confirmed
        try:
            async with self.lock:
                await self.pubsub.subscribe(channel)
            try:
                await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise redis.TimeoutError(f"Redis did not confirm a subscription within {SUBSCRIBE_TIMEOUT_S:g}s") \
                    from None
            yield queue
        finally:
            self.queues.pop(channel, None)
            self.confirmations.pop(channel, None)
            try:
                async with self.lock:
                    await self.pubsub.unsubscribe(channel)
            except (redis.RedisError, OSError):
                pass   # the connection is gone, and the subscription with it

    async def wait(self, task_id: str, queue: asyncio.Queue, timeout_s: float, serializer: str) -> dict:
        """The finished result record of ``task_id``; ``TimeoutError`` after ``timeout_s``.

        If the pub/sub connection is lost meanwhile, the result key is read at once: a
        Redis that is away raises ``redis.ConnectionError`` then.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(task_id)
            try:
                data = await asyncio.wait_for(queue.get(), min(remaining, RESULT_POLL_S))
            except asyncio.TimeoutError:
                data = None
            if data is None:   # nothing published, or the connection was lost: read the key
                data = await self.client.get(result_key(task_id))
                if data is None:
                    continue
            meta = decode_meta(data, serializer)
            if meta.get("status") == states.REVOKED:
                raise Expired(task_id)
            if meta.get("status") in states.READY_STATES:
                return meta


class TaskSender:
    """Enqueues requests without leaving the event loop.

    Celery builds the task message (its protocol 2: headers, properties, body), and it
    is pushed onto the deployment's queue list in the envelope kombu's Redis transport
    gives a message published to the queue (``Channel.prepare_message`` and
    ``basic_publish`` on the default exchange): what ``app.send_task(..., queue=...)``
    pushes, but through ``redis.asyncio`` rather than kombu's blocking client, so no
    thread is needed. ``tests/test_gateway.py`` checks the two messages match.

    Example::

        await TaskSender(address, client).send(Route("/echo", "echo"), str(uuid.uuid4()), payload)
    """

    def __init__(self, address: str, client: Optional[redis.asyncio.Redis]) -> None:
        self.client = client
        # The apps only build messages; they never connect.
        self.apps = {serializer: make_app(address, serializer) for serializer in ("json", "pickle")}
        self.push_if_room = client.register_script(PUSH_IF_ROOM) if client is not None else None

    async def send(self, route: Route, task_id: str, payload: dict) -> None:
        """Push the request; :class:`BackPressureError` if its queue holds ``route.max_queued``."""
        assert self.client is not None and self.push_if_room is not None
        queue = queue_name(route.deployment)
        message = self.message(route, task_id, payload)
        if route.max_queued is None:
            await self.client.lpush(queue, message)
            return
        pushed = await self.push_if_room(keys=[queue], args=[message, route.max_queued])
        if pushed < 0:
            raise BackPressureError(route.deployment, -pushed, route.max_queued)

    def message(self, route: Route, task_id: str, payload: dict) -> str:
        """The message of one request, as it sits in the queue list."""
        headers, properties, body, _ = self.apps[route.serializer].amqp.create_task_message(
            task_id, TASK_NAME, (HTTP_METHOD, [payload], {}), {},
            expires=route.timeout_s,    # a replica skips a request its caller gave up on
            # What `celery inspect` shows; Celery's own repr of the base64 body costs more
            # than the rest of the message.
            argsrepr=f"('{HTTP_METHOD}', '{payload['method']} {payload['path']}')", kwargsrepr="{}")
        content_type, encoding, data = kombu.serialization.dumps(body, route.serializer)
        raw = data.encode(encoding) if isinstance(data, str) else data
        queue = queue_name(route.deployment)
        return json_dumps({
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,                   # persistent, Celery's default
                "priority": 0,                        # priority 0 lives in the queue's own list
                "expiration": str(int(route.timeout_s * 1000)),
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        })


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
        if len(self.pending) >= MAX_PENDING_DELETES:
            del self.pending[:DELETE_BATCH]   # the oldest expire on their own
        self.pending.append(result_key(task_id))
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
