"""The HTTP gateway's app: each deployment is served at its route prefix (docs/reference.md, HTTP).

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
serves, 408 for a body that did not arrive within ``body_timeout_s``, 413 for a body
over the limit, 500 when the replica's code raised (with the traceback under
``--debug``), 503 when no answer came within the deployment's ``request_timeout_s``,
when the deployment has no replica that can serve (its rollout failed), when Redis
cannot be reached, and, with a ``Retry-After`` header, when the deployment's queue
holds its ``max_queued_requests`` or the gateway has ``max_in_flight`` requests in hand.

Many clients at once queue rather than fail: Redis commands share a bounded pool of
connections (a request waits up to ``REDIS_POOL_TIMEOUT_S`` for one). Slow clients
are cut off: a request head must arrive within ``header_timeout_s`` (or the
connection is closed after a 408), a body within ``body_timeout_s`` (408), and an
idle kept-alive connection is closed after ``KEEP_ALIVE_S``.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import resource
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import h11
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from ..connection import connect
from ..errors import BackPressureError, DeploymentUnavailable, RedisUnavailable, ReplicaError
from ..handle import unavailable_reason
from ..http import decode_response, encode_request
from ..state import DeploymentHealth
from ..store import Store
from .messaging import Expired, RateLimitedLog, ResultJanitor, ResultWaiter, TaskSender, unwrap
from .metrics import GatewayMetrics, cluster_status
from .routes import Route, RouteTable

log = logging.getLogger("taskserve.gateway")

DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# The route table is re-read on every change notification and at least this often.
ROUTE_POLL_S = 0.5
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

# Slow clients: the time a request head, and then its body, may take to arrive; the
# time a kept-alive connection may sit idle; the largest request head.
DEFAULT_HEADER_TIMEOUT_S = 20.0
DEFAULT_BODY_TIMEOUT_S = 60.0
KEEP_ALIVE_S = 5.0
MAX_HEAD_BYTES = 32 * 1024
# Many clients: requests share this many Redis connections (one of them the pub/sub
# one) and wait up to REDIS_POOL_TIMEOUT_S for a free one; beyond max_in_flight
# requests in hand, new ones are turned away with a Retry-After.
MAX_REDIS_CONNECTIONS = 64
REDIS_POOL_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 5.0
DEFAULT_MAX_IN_FLIGHT = 10_000
RETRY_AFTER_S = 1
# A failing accept() (out of file descriptors) is logged at most this often.
ACCEPT_ERROR_LOG_S = 10.0


# --------------------------------------------------------------------------- the app


class BodyTooLarge(Exception):
    pass


def error_response(status: int, error: str, message: str, *, headers: Optional[dict[str, str]] = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status, headers=headers)


def read_routes(store: Store) -> RouteTable:
    """The route table as Redis has it: every goal, and the health of each (one ``MGET``;
    the replicas too of a deployment found UNHEALTHY)."""
    goals = store.list_goals()
    live = [goal for goal in goals if not goal.deleting]
    texts = store.redis.mget([store.health_key(goal.name) for goal in live]) if live else []
    unavailable = {}
    for goal, text in zip(live, texts):
        health = DeploymentHealth.from_json(text) if text else DeploymentHealth()
        reason = unavailable_reason(goal, health, lambda name=goal.name: store.replicas_of(name))
        if reason is not None:
            unavailable[goal.name] = reason
    return RouteTable.from_goals(goals, unavailable)


class Gateway:
    """The ASGI app (:attr:`app`) and what it holds: routes, Redis, metrics.

    Example::

        uvicorn.run(Gateway("redis://127.0.0.1:6379/0").app, port=8000)   # what serve() does
    """

    def __init__(self, address: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, debug: bool = False,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 max_redis_connections: int = MAX_REDIS_CONNECTIONS) -> None:
        self.address = address
        self.max_body_bytes = max_body_bytes
        self.debug = debug
        self.body_timeout_s = body_timeout_s
        self.max_in_flight = max_in_flight
        self.max_redis_connections = max_redis_connections
        self.in_flight = 0
        self.redis_error_log = RateLimitedLog(log)
        self.store = connect(address)
        self.routes = RouteTable()
        self.routes_changed = asyncio.Event()
        self.metrics = GatewayMetrics(lambda: cluster_status(self.store))
        self.dashboard_html = importlib.resources.files("taskserve.gateway").joinpath("dashboard.html").read_text()
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
        log_accept_errors_rarely(asyncio.get_running_loop())
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            self.address, max_connections=self.max_redis_connections, timeout=REDIS_POOL_TIMEOUT_S,
            socket_keepalive=True, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            # One immediate retry (on a fresh connection), then the error: a request
            # while Redis is away is answered at once.
            retry=Retry(NoBackoff(), 1))
        self.client = redis.asyncio.Redis.from_pool(pool)
        self.results = ResultWaiter(self.client, on_event=self.routes_changed.set)
        self.sender = TaskSender(self.address, self.client)
        self.janitor = ResultJanitor(self.client)
        await self.results.start()
        self.janitor.start()
        await self.refresh_routes()
        follower = asyncio.create_task(self.follow_routes(), name="routes")
        try:
            yield
        finally:
            follower.cancel()
            await self.janitor.close()
            await self.results.close()
            await self.client.aclose()

    # ------------------------------------------------------------------ routes

    async def refresh_routes(self) -> None:
        try:
            table = await asyncio.to_thread(read_routes, self.store)
        except Exception as error:   # Redis away, or a goal this gateway cannot read
            self.redis_error_log.warning("cannot read the deployments (%s); keeping the routes as they were", error)
            return
        if table.to_dict() != self.routes.to_dict():
            log.info("routes: %s", table.to_dict())
            for prefix, kept, ignored in table.conflicts:
                log.warning("deployments %r and %r both claim %s; %r gets it", kept, ignored, prefix, kept)
        before = {route.deployment: route.unavailable for route in self.routes.routes}
        for route in table.routes:
            if route.unavailable and before.get(route.deployment) != route.unavailable:
                log.warning("%s cannot serve, its requests fail at once: %s", route.deployment, route.unavailable)
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
        elif self.in_flight >= self.max_in_flight:
            response, error = error_response(
                503, "Overloaded", f"the gateway has {self.in_flight} requests in hand, its limit; retry later",
                headers={"retry-after": str(RETRY_AFTER_S)}), "overloaded"
        else:
            self.metrics.in_flight.labels(route.deployment).inc()
            self.in_flight += 1
            try:
                response, error = await self._call(request, route, path)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.labels(route.deployment).dec()
        self.metrics.observe(route.deployment if route else "", request.method, response.status_code,
                             time.perf_counter() - started, error)
        return response

    async def _call(self, request: HTTPRequest, route: Route, path: str) -> tuple[Response, str]:
        name = route.deployment
        if route.unavailable:
            return error_response(503, "Unavailable", str(DeploymentUnavailable(name, route.unavailable))), \
                "deployment_unavailable"
        try:
            body = await self._read_body_in_time(request)
        except BodyTooLarge:
            return error_response(
                413, "PayloadTooLarge", f"the request body is over the gateway's limit of {self.max_body_bytes} "
                "bytes; send less, or start the gateway with a larger --max-body-size"), "body_too_large"
        except asyncio.TimeoutError:
            return error_response(
                408, "RequestTimeout", f"the request body did not arrive within the gateway's {self.body_timeout_s:g}s",
                headers={"connection": "close"}), "request_timeout"
        payload = encode_request(
            request.method, path, request.scope.get("query_string", b"").decode("latin-1"),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]], body)
        task_id = str(uuid.uuid4())
        try:
            async with self.results.subscription(task_id) as queue:
                await self.sender.send(route, task_id, payload)
                meta = await self.results.wait(task_id, queue, route.timeout_s, route.serializer)
        except BackPressureError as error:
            return error_response(503, "BackPressure", str(error), headers={"retry-after": str(RETRY_AFTER_S)}), \
                "backpressure"
        except Expired:
            self.janitor.forget(task_id)
            return self._timeout_response(route), "timeout"
        except (TimeoutError, asyncio.TimeoutError):
            return self._timeout_response(route), "timeout"
        except (redis.RedisError, OSError) as error:
            if _pool_exhausted(error):
                return error_response(
                    503, "Overloaded", f"the gateway found no free connection to Redis within {REDIS_POOL_TIMEOUT_S:g}s; "
                    "retry later", headers={"retry-after": str(RETRY_AFTER_S)}), "overloaded"
            self.redis_error_log.warning("cannot send a request to %s: %s", name, error)
            return self._unreachable_response(error), "unavailable"
        self.janitor.forget(task_id)
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

    def _timeout_response(self, route: Route) -> Response:
        name = route.deployment
        return error_response(
            503, "Timeout", f"no answer from deployment {name!r} within its request_timeout_s of "
            f"{route.timeout_s:g}s; `taskserve status {name}` shows its replicas")

    def _unreachable_response(self, error: BaseException) -> Response:
        return error_response(503, "Unavailable", f"the gateway {RedisUnavailable(self.address, str(error))}")

    async def _read_body_in_time(self, request: HTTPRequest) -> bytes:
        """The body, or ``asyncio.TimeoutError`` if it took over ``body_timeout_s`` to arrive."""
        if sys.version_info >= (3, 11):   # a deadline on this task: wait_for would start another
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_body(request)
        return await asyncio.wait_for(self._read_body(request), self.body_timeout_s)

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
            return self._unreachable_response(error)
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
            return self._unreachable_response(error)

    async def dashboard(self, request: HTTPRequest) -> Response:
        return HTMLResponse(self.dashboard_html)


def _pool_exhausted(error: BaseException) -> bool:
    """True if ``error`` says every pooled Redis connection stayed busy (not that Redis is away)."""
    return isinstance(error, redis.ConnectionError) and isinstance(error.__cause__, asyncio.TimeoutError)


# --------------------------------------------------------------------------- slow and many clients


def _request_timeout_bytes(message: str) -> bytes:
    body = json.dumps({"error": "RequestTimeout", "message": message}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def slow_client_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived
    ``header_timeout_s`` after the connection opened or the previous answer went out.

    uvicorn times out only idle kept-alive connections, and stops even that once a
    byte arrives: a client sending its headers a byte at a time would hold its
    connection for ever.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    answer = _request_timeout_bytes(f"the request head did not arrive within the gateway's {header_timeout_s:g}s")

    class SlowClientProtocol(H11Protocol):
        head_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:   # type: ignore[override]
            super().connection_made(transport)   # type: ignore[arg-type]
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_head_timer()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            self.transport.write(answer)
            self.transport.close()

    return SlowClientProtocol


def log_accept_errors_rarely(loop: asyncio.AbstractEventLoop) -> None:
    """Log a failing ``accept()`` (no file descriptor left) at most once per ``ACCEPT_ERROR_LOG_S``.

    asyncio logs every failed attempt, with its traceback, and (Python 3.11) tries the
    whole listen backlog in a row: thousands of lines a second.
    """
    limited = RateLimitedLog(log, ACCEPT_ERROR_LOG_S)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limited.warning("cannot accept connections: %s; the gateway may hold %d open files (ulimit -n): "
                        "raise that, or spread clients over more gateways", context.get("exception"), limit)

    loop.set_exception_handler(handle)


def raise_open_file_limit() -> None:
    """Let this process hold as many open files as its hard limit allows: each client
    connection is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return
    log.info("open-file limit raised from %d to %d", soft, hard)


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
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, debug: bool = False,
          header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
          max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
    """Serve HTTP until SIGINT or SIGTERM (then finish the requests in hand).

    Example::

        serve("redis://127.0.0.1:6379/0", port=8080)
    """
    import uvicorn
    from prometheus_client import disable_created_metrics

    sock = listen(host, port)
    raise_open_file_limit()
    disable_created_metrics()   # no *_created series: they double the output and few use them
    gateway = Gateway(address, max_body_bytes=max_body_bytes, debug=debug, body_timeout_s=body_timeout_s,
                      max_in_flight=max_in_flight)
    config = uvicorn.Config(gateway.app, lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=30, timeout_keep_alive=KEEP_ALIVE_S,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES, http=slow_client_protocol(header_timeout_s))
    log.info("gateway serves http://%s:%d (dashboard: /-/dashboard, metrics: /-/metrics)", host, sock.getsockname()[1])
    uvicorn.Server(config).run(sockets=[sock])
