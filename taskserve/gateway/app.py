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
serves, 413 for a body over the limit, 500 when the replica's code raised (with the
traceback under ``--debug``), 503 when no answer came within the deployment's
``request_timeout_s`` or Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import socket
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from ..connection import connect
from ..errors import ReplicaError
from ..http import decode_response, encode_request
from .messaging import Expired, ResultWaiter, TaskSender, unwrap
from .metrics import GatewayMetrics, cluster_status
from .routes import Route, RouteTable

log = logging.getLogger("taskserve.gateway")

DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# The route table is re-read on every change notification and at least this often.
ROUTE_POLL_S = 0.5
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


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
