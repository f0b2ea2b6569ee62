"""The HTTP gateway's app: each deployment is served at its route prefix (docs/reference.md, HTTP).

Run it with ``taskserve gateway`` (``taskserve up`` starts one on port 8000)::

    taskserve gateway --port 8000
    curl 'http://127.0.0.1:8000/echo?x=1'        # the echo deployment's __call__(request)
    curl http://127.0.0.1:8000/-/routes          # {"/echo": "echo"}

A request goes to the deployment with the longest route prefix that matches its path
(on ``/`` boundaries). It travels as the usual Celery task ``taskserve.call`` with the
arguments ``("__http__", [request data], {})`` on the deployment's queue; the replica
calls ``__call__(taskserve.http.Request)``. The gateway is one asyncio process: the
answers to all its requests arrive on one pub/sub pattern subscription, made once at
start (see :mod:`.messaging`), all through ``redis.asyncio``: no thread per request,
no subscription per request.
Its own endpoints live under ``/-/``: ``healthz``, ``routes``, ``metrics``
(Prometheus), ``api/status``, ``dashboard`` and ``jobs/<id>``. A request with
``Prefer: respond-async`` is submitted as a job instead (:mod:`.jobs`). A generator
``__call__`` is answered chunk by chunk as it yields, chunked or as server-sent events
(:mod:`.streaming`). A request whose client disconnects before its answer is taken back
off its queue if no replica has it yet, else its call is asked to stop (:class:`ClientWatch`).

Errors are JSON ``{"error": TYPE, "message": TEXT}``: 404 for a path no deployment
serves, 408 for a body that did not arrive within ``body_timeout_s``, 413 for a body
over the limit, 500 when the replica's code raised (with the traceback under
``--debug``), 503 when no answer came within the deployment's ``request_timeout_s``,
when the deployment has no replica that can serve (its rollout failed), when Redis
cannot be reached, and, with a ``Retry-After`` header, when the deployment's queue
holds its ``max_queued_requests``, the gateway has ``max_in_flight`` requests in hand, or
the bodies it holds would pass ``max_inflight_bytes`` (checked against ``Content-Length``
before a byte of the body is read, and chunk by chunk for a chunked body). A request
whose ``Host`` names none of the hosts the gateway serves (:func:`allowed_hosts`) gets a
421: a web page loaded from elsewhere cannot reach a local gateway by DNS rebinding.

On SIGTERM or SIGINT the gateway stops accepting connections and drains
(:meth:`Gateway.begin_shutdown`): requests in hand get ``shutdown_grace_s`` to be
answered; then each one no replica has taken yet is taken off its queue (``LREM`` of
the very item pushed, atomic against the replicas' ``BRPOP``) and answered 503
``ShuttingDown`` naming its request id: it never runs. One a replica has taken is
waited for until its own deadline. A request that arrives meanwhile gets that 503 too.

Many clients at once queue rather than fail: Redis commands share a bounded pool of
connections (a request waits up to ``REDIS_POOL_TIMEOUT_S`` for one). Slow clients
are cut off: a request head must arrive within ``header_timeout_s`` (or the
connection is closed after a 408), a body within ``body_timeout_s`` (408), and an
idle kept-alive connection is closed after ``KEEP_ALIVE_S``. HTTP is parsed by
httptools when it is installed, else by h11 (:func:`slow_client_protocol`); several
gateways can share a port (``serve(..., reuse_port=True)``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import logging
import random
import resource
import socket
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable, Optional

import h11
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from ..connection import async_connection_pool, cluster_secret, connect
from ..errors import BackPressureError, DeploymentUnavailable, RedisUnavailable, ReplicaError, SignatureError
from ..handle import unavailable_reason
from ..http import decode_response, encode_request
from ..signing import ClusterSecret, check_goal
from ..store import ClusterReader, Store
from ..store.jobs import CANCEL_FLAG_TTL_S
from ..store.keys import cancel_key, stream_key
from .jobs import JobEndpoints, prefers_async
from .messaging import (
    ClientLeft,
    Expired,
    Pending,
    RateLimitedLog,
    ResultJanitor,
    ResultWaiter,
    TaskSender,
    Withdrawn,
)
from .metrics import GatewayMetrics, StatusCache, StatusReader
from .routes import Route, RouteTable
from .server import QuietServer
from .streaming import (
    READ_SOCKET_TIMEOUT_S,
    CutOffFilter,
    StreamedAnswer,
    StreamReader,
    first_entries,
    stream_error,
    wants_events,
)

log = logging.getLogger("taskserve.gateway")

DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# The route table is re-read on every change notification (each write of a goal or
# a health publishes one, and a reconnected subscription counts as one), and at
# least this often in case a notification went missing.
ROUTE_POLL_S = 5.0
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# On a request: pins the version that serves it; on an answer: the version that did (SPEC §9).
VERSION_HEADER = "x-taskserve-version"

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
# Request bodies read and not answered yet, at most (the gateway's memory grows with them:
# each is copied a few times on its way into the message).
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 2**20
RETRY_AFTER_S = 1
# A failing accept() (out of file descriptors) is logged at most this often.
ACCEPT_ERROR_LOG_S = 10.0
# On SIGTERM: how long the requests in hand have to be answered before those no replica
# has taken are taken off their queues; and what a shutdown may take beyond the longest
# deadline of a request a replica has (answers to write, connections to close).
DEFAULT_SHUTDOWN_GRACE_S = 10.0
SHUTDOWN_MARGIN_S = 5.0


# --------------------------------------------------------------------------- the app


class BodyTooLarge(Exception):
    pass


class OverBudget(Exception):
    """The body would take the gateway past its bytes in flight."""


class ByteBudget:
    """The bytes of request bodies a gateway holds at once, and their limit.

    >>> budget = ByteBudget(100)
    >>> first, second = budget.hold(), budget.hold()
    >>> first.take(60), second.take(50), second.take(40), budget.used
    (True, False, True, 100)
    >>> first.release(); budget.used
    40
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def hold(self) -> "BudgetHold":
        """What one request holds; :meth:`BudgetHold.release` gives it back."""
        return BudgetHold(self)


class BudgetHold:
    """The part of a :class:`ByteBudget` one request holds."""

    __slots__ = ("budget", "count")

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.count = 0

    def take(self, count: int) -> bool:
        """Hold ``count`` more bytes, unless the budget would pass its limit (then False)."""
        if self.budget.used + count > self.budget.limit:
            return False
        self.budget.used += count
        self.count += count
        return True

    def release(self) -> None:
        self.budget.used -= self.count
        self.count = 0


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def host_name(value: str) -> str:
    """The host a ``Host`` header names, without its port, lowercase.

    >>> host_name("127.0.0.1:8000"), host_name("[::1]:8000"), host_name("API.Example.com."), host_name("::1")
    ('127.0.0.1', '::1', 'api.example.com', '::1')
    """
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(listen_host: str, extra: Iterable[str] = ()) -> Optional[frozenset[str]]:
    """The hosts a request's ``Host`` header may name for a gateway listening on
    ``listen_host``; None: any.

    A loopback listener serves 127.0.0.1, localhost and ::1; any listener its own
    address; and every name in ``extra`` (``--allowed-host``). A wildcard listener
    (0.0.0.0, ::) without ``extra`` serves any host: it cannot know its names.

    >>> sorted(allowed_hosts("127.0.0.1"))
    ['127.0.0.1', '::1', 'localhost']
    >>> sorted(allowed_hosts("10.0.0.5", ["api.internal"]))
    ['10.0.0.5', 'api.internal']
    >>> allowed_hosts("0.0.0.0") is None, sorted(allowed_hosts("0.0.0.0", ["api.internal"]))
    (True, ['127.0.0.1', '::1', 'api.internal', 'localhost'])
    """
    from ..redis_server import is_loopback

    names = {host_name(name) for name in extra if name.strip()}
    if listen_host in WILDCARD_HOSTS:
        return frozenset(names | LOOPBACK_HOSTS) if names else None
    names.add(host_name(listen_host))
    if is_loopback(listen_host.strip("[]")):
        names |= LOOPBACK_HOSTS
    return frozenset(names)


def error_response(status: int, error: str, message: str, *, headers: Optional[dict[str, str]] = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status, headers=headers)


def read_routes(store: Store, secret: ClusterSecret, reader: Optional[ClusterReader] = None) -> RouteTable:
    """The route table as Redis has it: every goal signed with ``secret``, and the health
    of each (the replicas too of a deployment found UNHEALTHY). A goal that is not signed
    (someone without the secret wrote it) gets no route, and is logged once.

    ``reader`` (one that reads no replicas) keeps what it read: then only the goals and
    healths that changed since its last read are read and parsed again.
    """
    reader = reader or ClusterReader(store, with_replicas=False)
    records, _ = reader.read()
    goals = []
    for name, record in records.items():
        if record.goal is None:
            if record.error:
                store.report_unreadable(f"the goal of deployment {name}", record.error)
            continue
        try:
            goals.append(check_goal(record.goal, secret))
        except SignatureError as error:
            store.report_unreadable(f"the goal of deployment {name}", f"{error}; it gets no route")
    unavailable = {}
    for goal in goals:
        if goal.deleting:
            continue
        health = records[goal.name].health
        reason = unavailable_reason(goal, health, lambda name=goal.name: store.replicas_of(name, unreadable={}))
        if reason is not None:
            unavailable[goal.name] = reason
    return RouteTable.from_goals(goals, unavailable)


class ClientWatch:
    """Watches a request's connection, once its body is read, for its client leaving:
    ``on_leave`` is called then (at most once, and never after :meth:`stop`).

    With the body read, the next ``receive()`` returns only when the client disconnects
    (or once the answer is complete: stop watching before the answer's last message).

    Example::

        watch = ClientWatch(request.receive)
        watch.on_leave = pending.leave
        ...
        watch.stop()
    """

    __slots__ = ("task", "on_leave", "left")

    def __init__(self, receive: Any) -> None:
        self.on_leave: Callable[[], None] = _nothing
        self.left = False
        self.task: Optional[asyncio.Task] = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.left = True
                self.task = None
                self.on_leave()
                return

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


def _nothing() -> None:
    pass


class GatewayApp:
    """The gateway's ASGI app: a request for a deployment goes straight to
    :meth:`Gateway.forward`, the rest (the gateway's own pages under ``/-/``, the
    lifespan, a method no route takes) to :attr:`Gateway.site`, a Starlette app whose
    router and middleware would cost a forwarded request about 25 us more.

    Example::

        uvicorn.run(GatewayApp(gateway), port=8000)     # what Gateway(address).app is
    """

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and not self.gateway.host_allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})   # policy violation
            else:
                await self.gateway.misdirected(scope)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] in HTTP_METHODS and not scope["path"].startswith("/-"):
            response = await self.gateway.forward(HTTPRequest(scope, receive))
            await response(scope, receive, send)
        else:
            await self.gateway.site(scope, receive, send)


class Gateway:
    """The ASGI app (:attr:`app`) and what it holds: routes, Redis, metrics.

    Example::

        uvicorn.run(Gateway("redis://127.0.0.1:6379/0").app, port=8000)   # what serve() does
    """

    def __init__(self, address: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, debug: bool = False,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 max_redis_connections: int = MAX_REDIS_CONNECTIONS,
                 max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
                 hosts: Optional[frozenset[str]] = LOOPBACK_HOSTS,
                 shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> None:
        if max_inflight_bytes < max_body_bytes:
            raise ValueError(f"--max-inflight-bytes {max_inflight_bytes} is below --max-body-size {max_body_bytes}: "
                             "the largest body allowed could never be taken; raise the one or lower the other")
        self.address = address
        self.max_body_bytes = max_body_bytes
        self.debug = debug
        self.body_timeout_s = body_timeout_s
        self.max_in_flight = max_in_flight
        self.max_redis_connections = max_redis_connections
        self.in_flight = 0
        self.budget = ByteBudget(max_inflight_bytes)
        self.hosts = hosts
        self.host_verdicts: dict[bytes, bool] = {}
        self.shutdown_grace_s = shutdown_grace_s
        self.draining = False       # SIGTERM came: new requests are refused
        self.withdrawing = False    # the grace is over: what no replica took is taken off its queue
        self.withdrawal: Optional[asyncio.Task] = None
        # Requests pushed and not answered: their queue and the very item pushed (to withdraw it).
        self.queued: dict[str, tuple[str, bytes, Pending]] = {}
        self.redis_error_log = RateLimitedLog(log)
        self.store = connect(address)
        self.secret = cluster_secret(address)     # routes only goals signed with it
        self.routes = RouteTable()
        self.route_reader = ClusterReader(self.store, with_replicas=False)
        self.routes_changed = asyncio.Event()
        self.status_cache = StatusCache(StatusReader(self.store).read)
        self.metrics = GatewayMetrics(self.status_cache.latest)
        self.dashboard_html = importlib.resources.files("taskserve.gateway").joinpath("dashboard.html").read_text()
        # The gateway's own pages, the lifespan, and any method a route does not take.
        self.site = Starlette(
            routes=[
                StarletteRoute("/-/healthz", self.healthz),
                StarletteRoute("/-/routes", self.list_routes),
                StarletteRoute("/-/metrics", self.prometheus),
                StarletteRoute("/-/api/status", self.status),
                StarletteRoute("/-/dashboard", self.dashboard),
                StarletteRoute("/-/jobs/{job_id}", self.job, methods=["GET", "DELETE"]),
                StarletteRoute("/{path:path}", self.forward, methods=HTTP_METHODS),
            ],
            lifespan=self.lifespan,
        )
        self.app = GatewayApp(self)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        log_accept_errors_rarely(asyncio.get_running_loop())
        pool = async_connection_pool(
            self.address, max_connections=self.max_redis_connections, timeout=REDIS_POOL_TIMEOUT_S,
            socket_keepalive=True, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            # One immediate retry (on a fresh connection), then the error: a request
            # while Redis is away is answered at once.
            retry=Retry(NoBackoff(), 1))
        self.client = redis.asyncio.Redis.from_pool(pool)
        # Blocking stream reads wait as long as a stream is quiet: on a connection of their
        # own, never one of the requests' pool (one connection reads every stream).
        self.blocking_client = redis.asyncio.Redis.from_pool(async_connection_pool(
            self.address, max_connections=1, timeout=REDIS_POOL_TIMEOUT_S, socket_keepalive=True,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=READ_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1)))
        self.results = ResultWaiter(self.client, on_event=self.routes_changed.set)
        self.streams = StreamReader(self.client, self.blocking_client,
                                    stream_key(f"{self.results.gateway_id}.wake"))
        self.sender = TaskSender(self.address, self.client)
        self.janitor = ResultJanitor(self.client)
        self.jobs = JobEndpoints(self.address, self.client, self.sender.encoder, self.debug)
        await self.results.start()
        self.janitor.start()
        await self.refresh_routes()
        follower = asyncio.create_task(self.follow_routes(), name="routes")
        status_follower = asyncio.create_task(self.status_cache.follow(), name="status")
        try:
            yield
        finally:
            follower.cancel()
            status_follower.cancel()
            if self.withdrawal is not None:
                self.withdrawal.cancel()
            await self.streams.stop()
            await self.janitor.close()
            await self.jobs.close()
            await self.results.close()
            await self.blocking_client.aclose()
            await self.client.aclose()

    # ------------------------------------------------------------------ routes

    async def refresh_routes(self) -> None:
        try:
            table = await asyncio.to_thread(read_routes, self.store, self.secret, self.route_reader)
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

    async def forward(self, request: HTTPRequest) -> Response | StreamedAnswer:
        """Send the request to its deployment and answer with what ``__call__`` returned."""
        started = time.perf_counter()
        path = request.scope["path"]
        reserved = path == "/-" or path.startswith("/-/")
        route = None if reserved else self.routes.match(path)
        if route is None:
            response, error = error_response(
                404, "NotFound", f"no deployment serves {path}; GET /-/routes lists the routes"), "not_found"
        elif self.draining:
            response, error = error_response(
                503, "ShuttingDown", "the gateway is shutting down; the request was not sent: send it again "
                "(to another gateway, or to this one once it is back)",
                headers={"retry-after": str(RETRY_AFTER_S), "connection": "close"}), "shutting_down"
        elif self.in_flight >= self.max_in_flight:
            response, error = error_response(
                503, "Overloaded", f"the gateway has {self.in_flight} requests in hand, its limit; retry later",
                headers={"retry-after": str(RETRY_AFTER_S)}), "overloaded"
        else:
            in_flight = self.metrics.in_flight.labels(route.deployment)
            in_flight.inc()
            self.in_flight += 1
            streamed = False
            try:
                response, error = await self._call(request, route, path)
                if isinstance(response, StreamedAnswer):    # in flight until its stream ends
                    streamed = True
                    response.ended = functools.partial(self._stream_ended, route.deployment, request.method,
                                                       started, in_flight, response.stream.task_id)
                    return response
            finally:
                if not streamed:
                    self.in_flight -= 1
                    in_flight.dec()
        self.metrics.observe(route.deployment if route else "", request.method, response.status_code,
                             time.perf_counter() - started, error)
        return response

    async def _call(self, request: HTTPRequest, route: Route, path: str) -> tuple[Response | StreamedAnswer, str]:
        name = route.deployment
        if route.unavailable:
            return error_response(503, "Unavailable", str(DeploymentUnavailable(name, route.unavailable))), \
                "deployment_unavailable"
        held = self.budget.hold()
        try:
            return await self._send_and_wait(request, route, path, held)
        finally:
            held.release()

    async def _send_and_wait(self, request: HTTPRequest, route: Route, path: str,
                             held: BudgetHold) -> tuple[Response | StreamedAnswer, str]:
        name = route.deployment
        try:
            body = await self._read_body_in_time(request, held)
        except OverBudget:
            return error_response(
                503, "Overloaded", f"the gateway holds {self.budget.used} bytes of request bodies; this one would "
                f"pass its limit of {self.budget.limit} (--max-inflight-bytes); retry later",
                headers={"retry-after": str(RETRY_AFTER_S)}), "overloaded"
        except BodyTooLarge:
            return error_response(
                413, "PayloadTooLarge", f"the request body is over the gateway's limit of {self.max_body_bytes} "
                "bytes; send less, or start the gateway with a larger --max-body-size"), "body_too_large"
        except asyncio.TimeoutError:
            return error_response(
                408, "RequestTimeout", f"the request body did not arrive within the gateway's {self.body_timeout_s:g}s",
                headers={"connection": "close"}), "request_timeout"
        except ClientDisconnect:
            return self._client_left(), "client_left"
        payload = encode_request(
            request.method, path, request.scope.get("query_string", b"").decode("latin-1"),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]], body)
        del body    # held no longer than needed: the budget counts it until the answer, memory need not
        try:
            queue, version = route.queue_for(request.headers.get(VERSION_HEADER), random.random() * 100)
        except ValueError as error:
            return error_response(400, "UnknownVersion", str(error)), "unknown_version"
        if prefers_async(request.headers):     # Prefer: respond-async: a job, answered 202 at once
            return await self.jobs.submit(route, queue, payload, request.headers)
        task_id = self.results.new_task_id()
        watch = ClientWatch(request.receive)     # the body is read: the client leaving is what comes next
        streaming = False
        try:
            with self.results.expecting(task_id) as pending:
                watch.on_leave = pending.leave
                pushed_to, item = await self.sender.send(route, task_id, payload, queue)
                del payload
                self.queued[task_id] = (pushed_to, item, pending)
                try:
                    if self.withdrawing:     # pushed after the grace: taken back at once
                        await self._withdraw_for_shutdown([task_id])
                    answer = await self.results.wait(pending, route.timeout_s)
                except ClientLeft:
                    await self._abandon(task_id)
                    raise
                finally:
                    del self.queued[task_id]
            if not (isinstance(answer.value, dict) and answer.value.get("stream") is True):
                watch.stop()       # answered: the connection's end is no client leaving
            else:
                streaming = True   # watched until the stream ends
        except ClientLeft:
            return self._client_left(), "client_left"
        except Withdrawn:
            return error_response(
                503, "ShuttingDown", f"the gateway is shutting down and no replica had taken request {task_id}: it "
                "was taken off the queue and will never run; send it again (to another gateway, or to this one "
                "once it is back)", headers={"retry-after": str(RETRY_AFTER_S)}, request_id=task_id), "shutting_down"
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
        finally:
            if not streaming:
                watch.stop()
        self.janitor.forget(task_id)
        answered_by = answer.version or version
        try:
            value = answer.result()
        except ReplicaError as error:
            return self._replica_error_response(error, answered_by), "replica_error"
        if isinstance(value, dict) and value.get("stream") is True:   # a generator's head: its chunks follow
            return await self._stream(request, route, task_id, answered_by, watch)
        try:
            status, headers, content = decode_response(value)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            return error_response(
                500, "BadResponse", f"deployment {name!r} sent an answer the gateway cannot read ({error}); "
                "are its replicas older than the gateway?"), "bad_response"
        response = Response(content, status_code=status)
        response.raw_headers.extend(
            (key.encode("latin-1", "replace"), value.encode("latin-1", "replace")) for key, value in headers)
        response.raw_headers.append((VERSION_HEADER.encode(), answered_by.encode("latin-1", "replace")))
        return response, "" if status < 400 else "app"

    def _replica_error_response(self, error: ReplicaError, answered_by: str) -> Response:
        extra = {"traceback": error.traceback_text} if self.debug else {}
        return error_response(500, error.type_name, error.message, headers={VERSION_HEADER: answered_by}, **extra)

    # ------------------------------------------------------------------ streams

    async def _stream(self, request: HTTPRequest, route: Route, task_id: str, answered_by: str,
                      watch: "ClientWatch") -> tuple[Response | StreamedAnswer, str]:
        """The answer of a generator ``__call__`` (:mod:`.streaming`): its chunks as they
        come, once the first is there; an ordinary error if it failed before yielding one.
        ``watch`` (the client leaving) is stopped here, or by the streamed answer."""
        stream = None
        try:
            stream = await self.streams.open(task_id)
            watch.on_leave = stream.leave
            first = await first_entries(stream, route.timeout_s)
        except (redis.RedisError, OSError) as error:
            self.redis_error_log.warning("cannot read the stream of a request to %s: %s", route.deployment, error)
            first, response, outcome = None, self._unreachable_response(error), "unavailable"
        except TimeoutError:
            first, response, outcome = None, self._timeout_response(route), "timeout"
        else:
            response, outcome = self._client_left(), "client_left"
        if first is not None:
            failed = stream_error(first)
            if failed is None:
                assert stream is not None
                return StreamedAnswer(
                    self.streams, stream, first, wants_events(request.headers.get("accept", "")),
                    [(VERSION_HEADER.encode(), answered_by.encode("latin-1", "replace"))], route.timeout_s,
                    cancel=lambda: self._cancel(task_id), ended=lambda outcome: None,
                    stop_watching=watch.stop), ""
            response, outcome = self._replica_error_response(failed, answered_by), "replica_error"
        else:
            await self._cancel(task_id)    # its caller is gone: the generator stops
        watch.stop()
        if stream is not None:
            self.streams.close(stream)
        self.janitor.forget_key(stream_key(task_id))
        return response, outcome

    def _client_left(self) -> Response:
        """The answer to a request whose client left (nobody reads it; it is counted)."""
        return error_response(499, "ClientLeft", "the client closed its connection before the answer")

    async def _abandon(self, task_id: str) -> None:
        """``task_id``'s client left before its answer: take the request off its queue if no
        replica took it yet (it never runs), else ask the replica to stop it (an async call
        is cancelled; a sync one runs to its end, its answer expires)."""
        if not await self.withdraw([task_id]):
            await self._cancel(task_id)

    async def _cancel(self, task_id: str) -> None:
        """Ask the replica running ``task_id`` to stop it (its caller left)."""
        try:
            await self.client.set(cancel_key(task_id), b"1", ex=CANCEL_FLAG_TTL_S)
        except (redis.RedisError, OSError) as error:
            self.redis_error_log.warning("cannot ask for request %s to be stopped (%s); it runs to its end",
                                         task_id, error)

    def _stream_ended(self, deployment: str, method: str, started: float, gauge: Any, task_id: str,
                      outcome: str) -> None:
        """A streamed answer is over: the request is counted as answered."""
        self.in_flight -= 1
        gauge.dec()
        self.janitor.forget_key(stream_key(task_id))
        self.metrics.observe(deployment, method, 200, time.perf_counter() - started, outcome)

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> float:
        """Refuse new requests, and take the unanswered ones no replica has yet off their
        queues once ``shutdown_grace_s`` is over. Returns how long the shutdown may take:
        the grace, then the longest deadline of a request a replica may hold."""
        self.draining = True
        self.withdrawal = asyncio.get_running_loop().create_task(self._withdraw_after_grace(), name="withdrawal")
        longest = max((route.timeout_s for route in self.routes.routes), default=0.0)
        log.info("shutting down: %d requests in hand get %gs to be answered", self.in_flight, self.shutdown_grace_s)
        return self.shutdown_grace_s + self.body_timeout_s + longest + SHUTDOWN_MARGIN_S

    async def _withdraw_after_grace(self) -> None:
        await asyncio.sleep(self.shutdown_grace_s)    # the grace period itself, not a synchronisation
        self.withdrawing = True
        if self.queued:
            await self._withdraw_for_shutdown(list(self.queued))

    async def _withdraw_for_shutdown(self, task_ids: list[str]) -> None:
        taken_off = await self.withdraw(task_ids)
        log.info("took %d requests no replica had yet off their queues (answered 503, never run); %d are "
                 "with replicas and waited for", len(taken_off), len(task_ids) - len(taken_off))

    async def withdraw(self, task_ids: list[str]) -> list[str]:
        """Take the requests ``task_ids`` off their queues where no replica has taken them
        yet; each one taken off ends its wait with :class:`Withdrawn` (503, never run).
        Returns those taken off. At shutdown, and for a request whose client left.

        ``LREM`` of the exact item pushed (its delivery tag makes it unique) is one Redis
        command, atomic against the ``BRPOP`` replicas take requests with: the item is
        either still queued, and then no replica can ever take it, or a replica has it
        (``LREM`` removes nothing) and its answer is waited for. Marking it expired would
        leave the replica to decide, after it took the request.
        """
        entries = [(task_id, self.queued[task_id]) for task_id in task_ids if task_id in self.queued]
        if not entries:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for _, (queue, item, _) in entries:
                    pipe.lrem(queue, 1, item)
                removed = await pipe.execute()
        except (redis.RedisError, OSError) as error:
            self.redis_error_log.warning(
                "cannot take %d unanswered requests off their queues (%s); a replica that takes one after its "
                "deadline drops it unrun", len(entries), error)
            return []
        taken: list[str] = []
        for (task_id, (_, _, pending)), taken_off in zip(entries, removed):
            if taken_off:
                pending.withdraw()
                taken.append(task_id)
        return taken

    def _timeout_response(self, route: Route) -> Response:
        name = route.deployment
        return error_response(
            503, "Timeout", f"no answer from deployment {name!r} within its request_timeout_s of "
            f"{route.timeout_s:g}s; `taskserve status {name}` shows its replicas")

    def _unreachable_response(self, error: BaseException) -> Response:
        return error_response(503, "Unavailable", f"the gateway {RedisUnavailable(self.address, str(error))}")

    async def _read_body_in_time(self, request: HTTPRequest, held: BudgetHold) -> bytes:
        """The body, or ``asyncio.TimeoutError`` if it took over ``body_timeout_s`` to arrive."""
        if sys.version_info >= (3, 11):   # a deadline on this task: wait_for would start another
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_body(request, held)
        return await asyncio.wait_for(self._read_body(request, held), self.body_timeout_s)

    async def _read_body(self, request: HTTPRequest, held: BudgetHold) -> bytes:
        """The body, held in ``held``: :class:`OverBudget` before a byte is read when its
        ``Content-Length`` does not fit, else as soon as a chunk would not."""
        length = request.headers.get("content-length", "")
        announced = length.isdigit()
        if announced and int(length) > self.max_body_bytes:
            raise BodyTooLarge()
        if announced and not held.take(int(length)):
            raise OverBudget()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge()
            if not announced and not held.take(len(chunk)):
                raise OverBudget()
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ hosts

    def host_allowed(self, scope: dict[str, Any]) -> bool:
        """Whether the request's ``Host`` names a host this gateway serves (one without
        a ``Host``, HTTP/1.0, is served: browsers always send one)."""
        if self.hosts is None:
            return True
        for key, value in scope.get("headers") or ():
            if key == b"host":
                verdict = self.host_verdicts.get(value)
                if verdict is None:
                    if len(self.host_verdicts) > 1024:
                        self.host_verdicts.clear()
                    verdict = self.host_verdicts[value] = host_name(value.decode("latin-1")) in self.hosts
                return verdict
        return True

    def misdirected(self, scope: dict[str, Any]) -> Response:
        """The answer to a request for a host this gateway does not serve."""
        host = next((value.decode("latin-1") for key, value in scope.get("headers") or () if key == b"host"), "")
        self.metrics.observe("", scope.get("method", ""), 421, 0.0, "misdirected")
        return error_response(
            421, "MisdirectedRequest", f"the gateway does not serve the host {host!r}; it answers to "
            f"{', '.join(sorted(self.hosts or ()))}: start it with --allowed-host NAME to serve another name")

    # ------------------------------------------------------------------ the gateway's own pages

    async def healthz(self, request: HTTPRequest) -> Response:
        """200 while the gateway can reach Redis and is not shutting down: for load balancers."""
        if self.draining:
            return error_response(503, "ShuttingDown", "the gateway is shutting down")
        try:
            await asyncio.wait_for(self.client.ping(), 2.0)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
            return self._unreachable_response(error)
        return JSONResponse({"status": "ok", "routes": len(self.routes.routes)})

    async def list_routes(self, request: HTTPRequest) -> Response:
        return JSONResponse(self.routes.to_dict())

    async def prometheus(self, request: HTTPRequest) -> Response:
        """The gateway's metrics, and the cluster's from the status snapshot (see :meth:`status`)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            await self.status_cache.current()
        except Exception:   # Redis away: the collector leaves the cluster out and logs why
            pass
        return Response(await asyncio.to_thread(self.metrics.render), media_type=CONTENT_TYPE_LATEST)

    async def status(self, request: HTTPRequest) -> Response:
        """The cluster's status as last read: at most ``STATUS_REFRESH_S`` plus one read
        old while it is asked for (:class:`.metrics.StatusCache`)."""
        try:
            snapshot = await self.status_cache.current()
        except (redis.RedisError, OSError) as error:
            return self._unreachable_response(error)
        return Response(snapshot.body, media_type="application/json")

    async def dashboard(self, request: HTTPRequest) -> Response:
        return HTMLResponse(self.dashboard_html)

    async def job(self, request: HTTPRequest) -> Response:
        """``GET`` (status, result) or ``DELETE`` (cancel) ``/-/jobs/<id>``: see :mod:`.jobs`."""
        return await (self.jobs.cancel if request.method == "DELETE" else self.jobs.get)(request)


def _pool_exhausted(error: BaseException) -> bool:
    """True if ``error`` says every pooled Redis connection stayed busy (not that Redis is away)."""
    return isinstance(error, redis.ConnectionError) and isinstance(error.__cause__, asyncio.TimeoutError)


# --------------------------------------------------------------------------- slow and many clients


class CoalescingTransport:
    """A connection's transport that sends an answer in one ``send()``.

    uvicorn writes an answer's head and its body separately: two system calls, and two
    TCP segments, each of which an HTTP client such as httpx may read (and switch
    tasks for) on its own. Here writes are gathered until the protocol calls
    :meth:`flush` (when the answer is complete), ``close()``, or the end of the event-loop
    step, whichever comes first. Waiting for the end of the step alone would hold every
    answer back for the rest of a busy step. Everything else is the transport's own.

    >>> class Wire:
    ...     def __init__(self): self.sent = []
    ...     def write(self, data): self.sent.append(data)
    ...     def is_closing(self): return False
    ...     def close(self): self.sent.append("closed")
    >>> loop, wire = asyncio.new_event_loop(), Wire()
    >>> transport = CoalescingTransport(wire, loop)
    >>> transport.write(b"HTTP/1.1 200 OK\\r\\n\\r\\n"); transport.write(b"body")
    >>> transport.flush(); wire.sent
    [b'HTTP/1.1 200 OK\\r\\n\\r\\nbody']
    >>> transport.write(b"more"); loop.run_until_complete(asyncio.sleep(0)); wire.sent[1:]
    [b'more']
    >>> transport.write(b"bye"); transport.close(); wire.sent[2:]
    [b'bye', 'closed']
    >>> loop.close()
    """

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what was written so far."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _http_error_bytes(status: int, reason: str, error: str, message: str) -> bytes:
    """A whole JSON error answer that closes the connection, for the protocol to write itself."""
    body = json.dumps({"error": error, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def slow_client_protocol(header_timeout_s: float, max_head_bytes: int = MAX_HEAD_BYTES,
                         parser: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose request head has not arrived
    ``header_timeout_s`` after the connection opened or the previous answer went out
    (with a 408), and writing each answer in one ``send()`` (:class:`CoalescingTransport`).

    uvicorn times out only idle kept-alive connections, and stops even that once a
    byte arrives: a client sending its headers a byte at a time would hold its
    connection for ever.

    ``parser``: "httptools" (C, about 100 us less CPU per request than h11 here; it
    needs the ``httptools`` package), "h11" (pure Python), or "auto": httptools when it
    is installed. With either, a request head over ``max_head_bytes`` is refused
    (httptools: 431; h11: uvicorn's 400) and the connection closed.

    Example::

        uvicorn.Config(app, http=slow_client_protocol(20.0))
    """
    if parser == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            parser = "h11"
        else:
            parser = "httptools"
    if parser == "httptools":
        return _httptools_protocol(header_timeout_s, max_head_bytes)
    if parser == "h11":
        return _h11_protocol(header_timeout_s)
    raise ValueError(f"unknown HTTP parser {parser!r}: use 'httptools', 'h11' or 'auto'")


class _HeadTimeout:
    """What the protocols of both parsers share: each answer written in one ``send()``
    (:class:`CoalescingTransport`), and a connection whose next request head is late
    refused (``late_answer``) and closed. A subclass says when it waits for a head."""

    header_timeout_s: float
    late_answer: bytes
    head_timer: Optional[asyncio.TimerHandle] = None
    loop: asyncio.AbstractEventLoop
    transport: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(CoalescingTransport(transport, self.loop))   # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)   # type: ignore[misc]

    def _waiting_for_head(self) -> bool:
        raise NotImplementedError

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing() and self._waiting_for_head():
            self._refuse(self.late_answer)

    def _refuse(self, answer: bytes) -> None:
        self._cancel_head_timer()
        self.transport.write(answer)
        self.transport.close()


def _late_head_answer(header_timeout_s: float) -> bytes:
    return _http_error_bytes(408, "Request Timeout", "RequestTimeout",
                             f"the request head did not arrive within the gateway's {header_timeout_s:g}s")


def _h11_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The h11 flavour of :func:`slow_client_protocol` (the head size limit is uvicorn's
    ``h11_max_incomplete_event_size``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientProtocol(_HeadTimeout, H11Protocol):
        late_answer = _late_head_answer(header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            self.transport.flush()
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_head_timer()

        def _waiting_for_head(self) -> bool:
            return self.conn.their_state is h11.IDLE

    SlowClientProtocol.header_timeout_s = header_timeout_s
    return SlowClientProtocol


def _httptools_protocol(header_timeout_s: float, max_head_bytes: int) -> type[asyncio.Protocol]:
    """The httptools flavour of :func:`slow_client_protocol`.

    httptools reports a head only once it is complete, and keeps what it has of an
    unfinished one, so the protocol counts the bytes of an unfinished head itself.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    too_large = _http_error_bytes(431, "Request Header Fields Too Large", "HeadersTooLarge",
                                  f"the request head is over the gateway's limit of {max_head_bytes} bytes")

    class SlowClientProtocol(_HeadTimeout, HttpToolsProtocol):
        late_answer = _late_head_answer(header_timeout_s)
        heads = 0                       # request heads received on this connection
        answered = 0                    # answers sent
        head_bytes: Optional[int] = 0   # bytes of the unfinished head; None from a head's end to its message's
        message_ended = False           # a message ended in the data being parsed

        def data_received(self, data: bytes) -> None:
            self.message_ended = False
            super().data_received(data)
            # Data that ended a message may hold a next head's start: left uncounted.
            if self.head_bytes is None or self.message_ended or self.transport.is_closing():
                return
            self.head_bytes += len(data)
            if self.head_bytes > max_head_bytes:
                self._refuse(too_large)

        def on_headers_complete(self) -> None:
            self.heads += 1
            self.head_bytes = None
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.head_bytes = 0
            self.message_ended = True

        def on_response_complete(self) -> None:
            self.transport.flush()
            self.answered += 1
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_head():   # no next head yet
                self._arm_head_timer()

        def _waiting_for_head(self) -> bool:
            return self.heads == self.answered

    SlowClientProtocol.header_timeout_s = header_timeout_s
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


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket on ``host:port``, or a one-sentence error saying what to change.

    With ``reuse_port`` (``SO_REUSEPORT``, Linux and the BSDs), several gateways can
    listen on the same port, each with its own socket: the kernel spreads new
    connections over them. Every one of them must ask for it; a port held without it
    stays in use.

    Example::

        first, second = listen("127.0.0.1", 8000, reuse_port=True), listen("127.0.0.1", 8000, reuse_port=True)
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off only on sockets that
    # say so, and with it on each answer waits for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise OSError("this system has no SO_REUSEPORT")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock
    except OSError as error:
        sock.close()
        raise OSError(
            f"the gateway cannot listen on {host}:{port} ({error.strerror or error}); "
            "pick another port with --port (taskserve up: --http-port), or stop what uses it"
        ) from None


def event_loop_name(choice: str) -> str:
    """The event loop the gateway runs on: "asyncio" (the standard library's, the
    default), "uvloop" (libuv; it needs the ``uvloop`` package), or "auto": uvloop when
    it is installed. At 32 connections uvloop saved no measurable CPU here (498 against
    545 us per request, within the round-to-round spread; docs/performance.md): the
    gateway's time goes to uvicorn's and redis-py's Python, not to the loop.

    >>> event_loop_name("asyncio")
    'asyncio'
    >>> event_loop_name("tokio")
    Traceback (most recent call last):
    ...
    ValueError: unknown event loop 'tokio': use 'uvloop', 'asyncio' or 'auto'
    """
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"unknown event loop {choice!r}: use 'uvloop', 'asyncio' or 'auto'")
    if choice != "asyncio":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if choice == "uvloop":
                raise ValueError("the event loop 'uvloop' needs the uvloop package: pip install uvloop, "
                                 "or use 'asyncio'") from None
            return "asyncio"
        return "uvloop"
    return "asyncio"


class GatewayServer(QuietServer):
    """The gateway's uvicorn server: on SIGTERM or SIGINT the gateway drains first
    (:meth:`Gateway.begin_shutdown`), then uvicorn waits for the requests in hand, at
    most as long as the drain may take."""

    def __init__(self, config: Any, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self.config.timeout_graceful_shutdown = self.gateway.begin_shutdown()
        await super().shutdown(sockets)


def serve(address: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, debug: bool = False,
          header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
          max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, reuse_port: bool = False, http_parser: str = "auto",
          event_loop: str = "asyncio", max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
          extra_hosts: Iterable[str] = (), shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> None:
    """Serve HTTP until SIGINT or SIGTERM (then finish the requests in hand).

    ``reuse_port``: share ``port`` with other gateways started with it (see :func:`listen`).
    ``http_parser``: "httptools", "h11" or "auto" (see :func:`slow_client_protocol`).
    ``event_loop``: "uvloop", "asyncio" or "auto" (see :func:`event_loop_name`).
    ``max_inflight_bytes``: the request bodies held at once (:class:`ByteBudget`).
    ``extra_hosts``: ``Host`` names served besides the listener's own (:func:`allowed_hosts`).
    ``shutdown_grace_s``: on SIGTERM, how long requests in hand have before those no
    replica has taken are withdrawn (:meth:`Gateway.begin_shutdown`).

    Example::

        serve("redis://127.0.0.1:6379/0", port=8080)
        serve("redis://127.0.0.1:6379/0", port=8080, reuse_port=True)   # in each of several processes
    """
    import uvicorn
    from prometheus_client import disable_created_metrics

    loop = event_loop_name(event_loop)
    sock = listen(host, port, reuse_port=reuse_port)
    raise_open_file_limit()
    disable_created_metrics()   # no *_created series: they double the output and few use them
    logging.getLogger("uvicorn.error").addFilter(CutOffFilter())   # a stream cut off on purpose is logged as such
    hosts = allowed_hosts(host, extra_hosts)
    if hosts is None:
        log.warning("the gateway listens on %s and answers any Host: a web page loaded from elsewhere can reach it "
                    "by DNS rebinding; name the hosts it serves with --allowed-host", host)
    gateway = Gateway(address, max_body_bytes=max_body_bytes, debug=debug, body_timeout_s=body_timeout_s,
                      max_in_flight=max_in_flight, max_inflight_bytes=max_inflight_bytes, hosts=hosts,
                      shutdown_grace_s=shutdown_grace_s)
    # proxy_headers off: the gateway never uses the client's address, and uvicorn's
    # middleware for it would read every request's headers.
    config = uvicorn.Config(gateway.app, lifespan="on", log_config=None, access_log=False, server_header=False,
                            proxy_headers=False, timeout_graceful_shutdown=30, timeout_keep_alive=KEEP_ALIVE_S,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                            http=slow_client_protocol(header_timeout_s, parser=http_parser),
                            loop=loop)
    log.info("gateway serves http://%s:%d (dashboard: /-/dashboard, metrics: /-/metrics)", host, sock.getsockname()[1])
    GatewayServer(config, gateway).run(sockets=[sock])
