"""How the gateway sends requests and gets their answers, all on ``redis.asyncio``.

A request travels as the usual Celery task ``taskserve.call`` with the arguments
``("__http__", [request data], {})`` on the deployment's queue (:class:`TaskSender`
builds the message kombu's Redis transport would). Its answer is awaited on the
result's pub/sub channel (:class:`ResultWaiter`), subscribed *before* the task is
pushed, so no answer can be published unseen; :func:`unwrap` reads it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import pickle
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
from ..errors import ReplicaError
from ..http import HTTP_METHOD
from ..store import EVENTS_CHANNEL, queue_name, result_key
from .routes import Route

log = logging.getLogger("taskserve.gateway")

# A request also reads its result key this often, in case its pub/sub message was
# lost (say while the connection to Redis was re-established).
RESULT_POLL_S = 1.0
SUBSCRIBE_TIMEOUT_S = 10.0


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
                log.warning("lost the pub/sub connection to Redis (%s); reconnecting", error)
                await asyncio.sleep(0.5)   # a pause between attempts, not a synchronisation
                continue
            except Exception:   # never let the one reader die: every request would time out
                log.exception("cannot read a pub/sub message; going on")
                continue
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

    @asynccontextmanager
    async def subscription(self, task_id: str) -> AsyncIterator[asyncio.Queue]:
        """Subscribe to ``task_id``'s result channel until the block ends."""
        channel = result_key(task_id)
        queue: asyncio.Queue = asyncio.Queue()
        confirmed = asyncio.get_running_loop().create_future()
        self.queues[channel] = queue
        self.confirmations[channel] = confirmed
        try:
            async with self.lock:
                await self.pubsub.subscribe(channel)
            await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S)
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
        """The finished result record of ``task_id``; ``TimeoutError`` after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(task_id)
            try:
                data = await asyncio.wait_for(queue.get(), min(remaining, RESULT_POLL_S))
            except asyncio.TimeoutError:
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

    def __init__(self, address: str, client: redis.asyncio.Redis) -> None:
        self.client = client
        # The apps only build messages; they never connect.
        self.apps = {serializer: make_app(address, serializer) for serializer in ("json", "pickle")}

    async def send(self, route: Route, task_id: str, payload: dict) -> None:
        await self.client.lpush(queue_name(route.deployment), self.message(route, task_id, payload))

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
