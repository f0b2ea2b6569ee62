"""The HTTP gateway (SPEC.md §5): each deployment is served at its route prefix.

Run it with ``taskserve gateway`` (``taskserve up`` starts one on port 8000)::

    taskserve gateway --port 8000
    curl 'http://127.0.0.1:8000/echo?x=1'        # the echo deployment's __call__(request)
    curl http://127.0.0.1:8000/-/routes          # {"/echo": "echo"}

A request goes to the deployment with the longest route prefix that matches its path
(on ``/`` boundaries). It travels as the usual Celery task ``taskserve.call`` with the
arguments ``("__http__", [request data], {})`` on the deployment's queue; the replica
calls ``__call__(taskserve.http.Request)``. The gateway is one asyncio process: it
subscribes to the result's pub/sub channel *before* pushing the task onto the queue
and awaits the result there, all through ``redis.asyncio``: no thread per request.
Its own endpoints live under ``/-/``: ``healthz``, ``routes``, ``metrics``
(Prometheus), ``api/status`` and ``dashboard``.

Errors are JSON ``{"error": TYPE, "message": TEXT}``: 404 for a path no deployment
serves, 413 for a body over the limit, 500 when the replica's code raised (with the
traceback under ``--debug``), 503 when no answer came within the deployment's
``request_timeout_s`` or Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import logging
import pickle
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Optional

import kombu.serialization
import redis
import redis.asyncio
from celery import states
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from .celery_app import TASK_NAME, make_app
from .connection import connect
from .errors import ReplicaError
from .http import HTTP_METHOD, decode_response, encode_request
from .metrics import GatewayMetrics, cluster_status
from .spec import route_of
from .state import Goal
from .store import EVENTS_CHANNEL, queue_name, result_key

log = logging.getLogger("taskserve.gateway")

DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# The route table is re-read on every change notification and at least this often.
ROUTE_POLL_S = 0.5
# A request also reads its result key this often, in case its pub/sub message was
# lost (say while the connection to Redis was re-established).
RESULT_POLL_S = 1.0
SUBSCRIBE_TIMEOUT_S = 10.0
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """Where requests under ``prefix`` go, and how long to wait for an answer."""

    prefix: str
    deployment: str
    serializer: str = "json"
    timeout_s: float = 60.0


class RouteTable:
    """The deployments by route prefix; the longest matching prefix wins.

    Two deployments with the same prefix: the one whose name sorts first gets it.

    >>> table = RouteTable([Route("/a", "a"), Route("/a/b", "ab"), Route("/", "root")])
    >>> [table.match(p).deployment for p in ("/a", "/a/x", "/a/b/c", "/ab", "/")]
    ['a', 'a', 'ab', 'root', 'root']
    >>> RouteTable([Route("/a", "a")]).match("/ab") is None
    True
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        chosen: dict[str, Route] = {}
        self.conflicts: list[tuple[str, str, str]] = []    # (prefix, kept, ignored)
        for route in sorted(routes, key=lambda r: r.deployment):
            if route.prefix in chosen:
                self.conflicts.append((route.prefix, chosen[route.prefix].deployment, route.deployment))
                continue
            chosen[route.prefix] = route
        self.routes = sorted(chosen.values(), key=lambda r: len(r.prefix), reverse=True)

    @classmethod
    def from_goals(cls, goals: Iterable[Goal]) -> "RouteTable":
        """The routes of the deployments that exist and are served over HTTP."""
        routes = []
        for goal in goals:
            prefix = route_of(goal.name, goal.options)
            if goal.deleting or prefix is None:
                continue
            routes.append(Route(prefix, goal.name, goal.options.get("serializer") or "json",
                                float(goal.options.get("request_timeout_s") or 60)))
        return cls(routes)

    def match(self, path: str) -> Optional[Route]:
        """The route serving ``path``, or None."""
        for route in self.routes:
            prefix = route.prefix
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def to_dict(self) -> dict[str, str]:
        """``{prefix: deployment}``, what ``/-/routes`` shows."""
        return {route.prefix: route.deployment for route in sorted(self.routes, key=lambda r: r.prefix)}


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- the app


class BodyTooLarge(Exception):
    pass


def error_response(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status)


class Gateway:
    """The ASGI app (:attr:`app`) and what it holds: routes, Redis, metrics.

    Example::

        uvicorn.run(Gateway("redis://127.0.0.1:6379/0").app, port=8000)   # what serve() does
    """

    def __init__(self, address: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, debug: bool = False) -> None:
        self.address = address
        self.max_body_bytes = max_body_bytes
        self.debug = debug
        self.store = connect(address)
        self.routes = RouteTable()
        self.routes_changed = asyncio.Event()
        self.metrics = GatewayMetrics(lambda: cluster_status(self.store))
        self.dashboard_html = importlib.resources.files("taskserve").joinpath("dashboard.html").read_text()
        self.app = Starlette(
            routes=[
                StarletteRoute("/-/healthz", self.healthz),
                StarletteRoute("/-/routes", self.list_routes),
                StarletteRoute("/-/metrics", self.prometheus),
                StarletteRoute("/-/api/status", self.status),
                StarletteRoute("/-/dashboard", self.dashboard),
                StarletteRoute("/{path:path}", self.forward, methods=HTTP_METHODS),
            ],
            lifespan=self.lifespan,
        )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.client = redis.asyncio.Redis.from_url(self.address, socket_keepalive=True)
        self.results = ResultWaiter(self.client, on_event=self.routes_changed.set)
        self.sender = TaskSender(self.address, self.client)
        await self.results.start()
        await self.refresh_routes()
        follower = asyncio.create_task(self.follow_routes(), name="routes")
        try:
            yield
        finally:
            follower.cancel()
            await self.results.close()
            await self.client.aclose()

    # ------------------------------------------------------------------ routes

    async def refresh_routes(self) -> None:
        try:
            goals = await asyncio.to_thread(self.store.list_goals)
        except Exception as error:   # Redis away, or a goal this gateway cannot read
            log.warning("cannot read the deployments (%s); keeping the routes as they were", error)
            return
        table = RouteTable.from_goals(goals)
        if table.to_dict() != self.routes.to_dict():
            log.info("routes: %s", table.to_dict())
            for prefix, kept, ignored in table.conflicts:
                log.warning("deployments %r and %r both claim %s; %r gets it", kept, ignored, prefix, kept)
        self.routes = table

    async def follow_routes(self) -> None:
        """Re-read the routes on each change notification, and every ``ROUTE_POLL_S`` anyway."""
        while True:
            try:
                await asyncio.wait_for(self.routes_changed.wait(), ROUTE_POLL_S)
            except asyncio.TimeoutError:
                pass
            self.routes_changed.clear()
            await self.refresh_routes()

    # ------------------------------------------------------------------ requests

    async def forward(self, request: HTTPRequest) -> Response:
        """Send the request to its deployment and answer with what ``__call__`` returned."""
        started = time.perf_counter()
        path = request.scope["path"]
        reserved = path == "/-" or path.startswith("/-/")
        route = None if reserved else self.routes.match(path)
        if route is None:
            response, error = error_response(
                404, "NotFound", f"no deployment serves {path}; GET /-/routes lists the routes"), "not_found"
        else:
            self.metrics.in_flight.labels(route.deployment).inc()
            try:
                response, error = await self._call(request, route, path)
            finally:
                self.metrics.in_flight.labels(route.deployment).dec()
        self.metrics.observe(route.deployment if route else "", request.method, response.status_code,
                             time.perf_counter() - started, error)
        return response

    async def _call(self, request: HTTPRequest, route: Route, path: str) -> tuple[Response, str]:
        name = route.deployment
        try:
            body = await self._read_body(request)
        except BodyTooLarge:
            return error_response(
                413, "PayloadTooLarge", f"the request body is over the gateway's limit of {self.max_body_bytes} "
                "bytes; send less, or start the gateway with a larger --max-body-size"), "body_too_large"
        payload = encode_request(
            request.method, path, request.scope.get("query_string", b"").decode("latin-1"),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]], body)
        task_id = str(uuid.uuid4())
        try:
            async with self.results.subscription(task_id) as queue:
                await self.sender.send(route, task_id, payload)
                meta = await self.results.wait(task_id, queue, route.timeout_s, route.serializer)
        except (TimeoutError, asyncio.TimeoutError, Expired):
            return error_response(
                503, "Timeout", f"no answer from deployment {name!r} within its request_timeout_s of "
                f"{route.timeout_s:g}s; `taskserve status {name}` shows its replicas"), "timeout"
        except (redis.RedisError, OSError) as error:
            log.warning("cannot send a request to %s: %s", name, error)
            return error_response(
                503, "Unavailable", f"the gateway cannot reach Redis ({error}); is the cluster up?"), "unavailable"
        try:
            status, headers, content = decode_response(unwrap(meta))
        except ReplicaError as error:
            extra = {"traceback": error.traceback_text} if self.debug else {}
            return error_response(500, error.type_name, error.message, **extra), "replica_error"
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            return error_response(
                500, "BadResponse", f"deployment {name!r} sent an answer the gateway cannot read ({error}); "
                "are its replicas older than the gateway?"), "bad_response"
        response = Response(content, status_code=status)
        response.raw_headers.extend(
            (key.encode("latin-1", "replace"), value.encode("latin-1", "replace")) for key, value in headers)
        return response, "" if status < 400 else "app"

    async def _read_body(self, request: HTTPRequest) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise BodyTooLarge()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ the gateway's own pages

    async def healthz(self, request: HTTPRequest) -> Response:
        """200 while the gateway can reach Redis: for load balancers."""
        try:
            await asyncio.wait_for(self.client.ping(), 2.0)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
            return error_response(503, "Unavailable", f"the gateway cannot reach Redis ({error})")
        return JSONResponse({"status": "ok", "routes": len(self.routes.routes)})

    async def list_routes(self, request: HTTPRequest) -> Response:
        return JSONResponse(self.routes.to_dict())

    async def prometheus(self, request: HTTPRequest) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(self.metrics.render), media_type=CONTENT_TYPE_LATEST)

    async def status(self, request: HTTPRequest) -> Response:
        try:
            return JSONResponse(await asyncio.to_thread(cluster_status, self.store))
        except redis.RedisError as error:
            return error_response(503, "Unavailable", f"the gateway cannot reach Redis ({error})")

    async def dashboard(self, request: HTTPRequest) -> Response:
        return HTMLResponse(self.dashboard_html)


# --------------------------------------------------------------------------- serving


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-sentence error saying what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off only on sockets that
    # say so, and with it on each answer waits for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock
    except OSError as error:
        sock.close()
        raise OSError(
            f"the gateway cannot listen on {host}:{port} ({error.strerror or error}); "
            "pick another port with --port (taskserve up: --http-port), or stop what uses it"
        ) from None


def serve(address: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, debug: bool = False) -> None:
    """Serve HTTP until SIGINT or SIGTERM (then finish the requests in hand).

    Example::

        serve("redis://127.0.0.1:6379/0", port=8080)
    """
    import uvicorn

    from prometheus_client import disable_created_metrics

    sock = listen(host, port)
    disable_created_metrics()   # no *_created series: they double the output and few use them
    gateway = Gateway(address, max_body_bytes=max_body_bytes, debug=debug)
    config = uvicorn.Config(gateway.app, lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=30)
    log.info("gateway serves http://%s:%d (dashboard: /-/dashboard, metrics: /-/metrics)", host, sock.getsockname()[1])
    uvicorn.Server(config).run(sockets=[sock])
