"""HTTP through the gateway against the Python handle, on the same deployment and Redis.

What it measures
----------------
The script starts an embedded Redis (no persistence), a controller, a node agent
(``--num-cpus 8``) and a gateway (``serve(..., reuse_port=True)``, what
``taskserve gateway`` runs) on free ports, and deploys ``bench_http``, an echo
(``num_cpus=0.5``) that answers a handle call with its argument and an HTTP request with
its body, with ``--replicas`` replicas (default 1). For each ``--concurrency`` (default
1 and 32) it measures two paths:

* **http** — ``POST /bench_http`` with a small JSON body, from one asyncio event loop
  running ``--concurrency`` callers, each sending one request after the other. The
  client (``--client``) is ``httpx.AsyncClient`` with its default pool (100
  connections, 20 kept alive) by default: the shape of a typical Python caller;
  ``httpx-keepalive`` is the same with a pool that keeps one connection per caller
  (``max_keepalive_connections=concurrency``); ``raw`` is a few lines on
  ``asyncio.open_connection`` (one keep-alive connection per caller), whose own cost is
  small next to the gateway's;
* **handle** (the baseline) — ``handle.remote(body).result()`` from as many threads.

Each round sends ``--requests`` requests (default 3000) per path, after ``--warmup``
(default 300); the two paths take turns round by round (``--rounds``, default 3), so
background load hits both alike. Reported per path: the medians over the rounds of
requests per second, p50 and p99 of the round trips; the CPU time the gateway process
spent per request (for the handle rows: while handle calls ran, which should be its
idle background only, since handle results are never delivered to it), the client
process, the replicas and Redis (from /proc via psutil), and their sum, which move
much less with the machine's other load than the wall-clock figures. The HTTP client runs in a process of
its own (:class:`ClientProcess`), as a caller's would, and each http round's warm-up is
a block of its own before the measured one; the handle calls run in this process.

In each round the same client also runs against a **no-op server** (uvicorn with the
gateway's HTTP parser, echoing the body at once, nothing behind it; ``--no-floor`` skips
it): the most this client can get from any server on this machine, the client's own
floor. Its table sets the http path against it.

Then (``--overload-s``, default 10; 0 skips it) ``--overload-concurrency`` (default
256) httpx connections send requests for that long: every request must be answered
(200) or refused with 503 and ``Retry-After``, none may hang (30 s client timeout) or
be reset, and the gateway's resident memory is read idle before, at its peak, and
once the connections are closed. Last (``--gateways``, default 2; 1 skips it), the
http path at the highest concurrency against 1 gateway and against that many
gateways sharing the port through ``SO_REUSEPORT``, taking turns round by round.

How to read it
--------------
``ratio = http / handle`` for throughput (higher is better) and p50 (lower is
better). ``total CPU handle/http`` is the handle's total CPU per request over the
http path's: a path whose processes keep every core busy serves at most cores / its
CPU per request, so once both paths are held by CPU the throughput ratio cannot go
much above it, whatever the gateway's latency. Both paths enqueue the same Celery task on the same queue and get its result
through Redis pub/sub; HTTP adds a process hop (client -> gateway), the gateway's own
work and the HTTP client's. On a 2-core machine the client, the gateway, Redis and the
replicas share the cores, so a CPU microsecond saved anywhere is throughput, and the
"client CPU" column shows what the caller's own HTTP stack costs. Compare ratios across
machines, not absolute figures. The last table checks the targets of docs/performance.md.

Usage, from the repository root::

    python -m benchmarks.bench_http [--requests 3000] [--warmup 300] [--concurrency 1 32] [--rounds 3]
                                    [--replicas 1] [--client httpx|httpx-keepalive|raw] [--event-loop asyncio|uvloop|auto]
                                    [--overload-s 10]
                                    [--overload-concurrency 256] [--gateways 2]

A smoke run (about 25 s, most of it the overload and the second gateway; the figures
mean nothing)::

    python -m benchmarks.bench_http --requests 40 --warmup 4 --concurrency 2 --rounds 2 --replicas 1

Everything it starts is stopped on exit, Ctrl-C or error; logs go to a temporary
directory that is kept (and printed) only when something failed. The cluster
plumbing and the report helpers come from :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import httpx
import psutil
import starlette
import uvicorn

import taskserve
from benchmarks.common import (
    START_TIMEOUT_S,
    Child,
    bench_main,
    cluster,
    command_line,
    cpu_seconds,
    deleted_on_exit,
    markdown_table,
    percentile,
    print_head,
    split,
    wait_until,
)
from taskserve.gateway.app import event_loop_name
from taskserve.redis_server import free_port

NAME = "bench_http"
RESULT_TIMEOUT_S = 10.0
AGENT_NUM_CPUS = 8
BODY = b'{"x": 1}'
JSON_HEADERS = {"content-type": "application/json"}
CLIENT_TIMEOUT_S = 30.0
# Targets (docs/performance.md): at TARGET_CONCURRENCY, at least this many req/s, this
# share of the handle's throughput and this p99; one caller's p50; after the overload,
# the gateway's memory within this factor of its idle size.
TARGET_CONCURRENCY = 32
TARGET_PER_SECOND = 440.0
TARGET_RATIO = 0.9
TARGET_P99_MS = 150.0
TARGET_P50_ONE_MS = 2.0
TARGET_MEMORY_FACTOR = 1.10
MEMORY_SETTLE_S = 10.0


@taskserve.deployment(name=NAME, num_cpus=0.5)
class BenchEcho:
    def __call__(self, value: Any) -> Any:
        if isinstance(value, taskserve.http.Request):
            return value.body          # bytes go back as they are
        return value


async def noop_echo_app(scope: dict, receive: Callable[[], Awaitable[dict]],
                        send: Callable[[dict], Awaitable[None]]) -> None:
    """An ASGI app that answers every POST with its body at once: nothing behind it.

    Served by uvicorn (with the gateway's HTTP parser), it is the client's floor: what the
    same client gets from a server whose every answer costs next to nothing.
    """
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class NoOpServer:
    """:func:`noop_echo_app` under uvicorn in a process of its own, on a free port."""

    def __init__(self, env: dict[str, str], work_dir: Path) -> None:
        self.port = free_port()
        log_path = work_dir / "noop-server.log"
        code = ("import uvicorn; uvicorn.run('benchmarks.bench_http:noop_echo_app', host='127.0.0.1', "
                f"port={self.port}, log_level='info', access_log=False, server_header=False)")
        self.child = Child("no-op server", [sys.executable, "-c", code], log_path, env=env)

        def serving() -> bool:
            self.child.check_alive()
            return log_path.exists() and "Application startup complete" in log_path.read_text()

        wait_until(serving, START_TIMEOUT_S, "the no-op server to serve")

    def stop(self) -> None:
        self.child.stop()


# --------------------------------------------------------------------------- the clients


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads a Content-Length answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, port: int, path: str, body: bytes) -> "HTTPConnection":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return cls(reader, writer, head.encode() + body)

    async def post(self) -> bytes:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"the gateway answered {status.decode()}: {body[:200]!r}")
        return body

    def close(self) -> None:
        self.writer.close()


async def http_block(port: int, count: int, concurrency: int, client: str) -> tuple[list[float], float]:
    """``count`` requests from ``concurrency`` callers on one event loop: (latencies, seconds)."""
    latencies: list[float] = []
    if client == "raw":
        connections = [await HTTPConnection.open(port, f"/{NAME}", BODY) for _ in range(concurrency)]
        posts: list[Callable[[], Awaitable[bytes]]] = [connection.post for connection in connections]
    else:
        # "httpx-keepalive": a pool that keeps every caller's connection (httpx keeps 20 by
        # default and, with more open, closes a connection as soon as it is idle).
        pool = ({"limits": httpx.Limits(max_connections=max(100, concurrency), max_keepalive_connections=concurrency)}
                if client == "httpx-keepalive" else {})
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT_S, **pool)

        async def post() -> bytes:
            answer = await http.post(f"/{NAME}", content=BODY, headers=JSON_HEADERS)
            if answer.status_code != 200:
                raise RuntimeError(f"the gateway answered {answer.status_code}: {answer.text[:200]}")
            return answer.content

        posts = [post] * concurrency

    async def caller(post: Callable[[], Awaitable[bytes]], share: int) -> None:
        for _ in range(share):
            started = time.perf_counter()
            body = await post()
            latencies.append(time.perf_counter() - started)
            if body != BODY:
                raise RuntimeError(f"wrong answer {body!r}")

    started = time.perf_counter()
    try:
        await asyncio.gather(*(caller(post, share) for post, share in zip(posts, split(count, concurrency))))
    finally:
        if client == "raw":
            for connection in connections:
                connection.close()
        else:
            await http.aclose()
    return latencies, time.perf_counter() - started


def http_session(port: int, count: int, concurrency: int, client: str) -> tuple[list[float], float, float]:
    """:func:`http_block` with a client of its own: (latencies, seconds, client CPU seconds).

    Runs in the client process (:class:`ClientProcess`).
    """
    cpu_before = time.process_time()
    latencies, seconds = asyncio.run(http_block(port, count, concurrency, client))
    return latencies, seconds, time.process_time() - cpu_before


def _freeze_imports() -> None:
    gc.collect()
    gc.freeze()   # the modules imported so far are never garbage: keep them out of every collection


class ClientProcess:
    """The HTTP client's own process, as a caller would have it: one event loop that does
    nothing else, not this process's heap and handle threads (whose garbage collections
    would stall it, and whose CPU it would share through the GIL).

    Example::

        with ClientProcess() as client:
            client.session(port, 300, 32, "httpx")                           # warm-up
            latencies, seconds, cpu_s = client.session(port, 3000, 32, "httpx")
    """

    def __init__(self) -> None:
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_freeze_imports)

    def session(self, port: int, count: int, concurrency: int, client: str) -> tuple[list[float], float, float]:
        """:func:`http_session` in the client process."""
        return self.pool.submit(http_session, port, count, concurrency, client).result()

    def __enter__(self) -> "ClientProcess":
        return self

    def __exit__(self, *_: object) -> None:
        self.pool.shutdown(cancel_futures=True)


def handle_block(handle: taskserve.DeploymentHandle, count: int, concurrency: int) -> tuple[list[float], float]:
    """``count`` handle calls from ``concurrency`` threads: (latencies, seconds)."""
    latencies: list[float] = []
    failures: list[BaseException] = []
    expected = BODY.decode()

    def caller(share: int) -> None:
        try:
            for _ in range(share):
                started = time.perf_counter()
                value = handle.remote(expected).result(timeout=RESULT_TIMEOUT_S)
                latencies.append(time.perf_counter() - started)
                if value != expected:
                    raise RuntimeError(f"wrong answer {value!r}")
        except BaseException as error:   # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=caller, args=(share,)) for share in split(count, concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    return latencies, elapsed


# --------------------------------------------------------------------------- measuring


@dataclass
class Round:
    """One measured block of one path."""

    per_second: float
    p50_ms: float
    p99_ms: float
    gateway_cpu_us: float
    client_cpu_us: float
    replica_cpu_us: float = 0.0
    redis_cpu_us: float = 0.0

    @property
    def total_cpu_us(self) -> float:
        """The CPU one request cost in every process it touched: client, gateway, replicas, Redis."""
        return self.client_cpu_us + self.gateway_cpu_us + self.replica_cpu_us + self.redis_cpu_us


@dataclass
class Figures:
    """The rounds of one path at one replica count and concurrency, summed up by medians."""

    path: str
    replicas: int
    concurrency: int
    rounds: list[Round] = field(default_factory=list)

    def add(self, block: tuple[list[float], float], gateway_cpu_s: float, client_cpu_s: float,
            replica_cpu_s: float = 0.0, redis_cpu_s: float = 0.0) -> Round:
        """Count in one block (latencies, seconds) and the gateway, client, replica and Redis CPU it cost."""
        latencies, seconds = block
        ordered = sorted(latencies)
        count = len(latencies)
        measured = Round(count / seconds, 1000 * percentile(ordered, 0.5), 1000 * percentile(ordered, 0.99),
                         1e6 * gateway_cpu_s / count, 1e6 * client_cpu_s / count, 1e6 * replica_cpu_s / count,
                         1e6 * redis_cpu_s / count)
        self.rounds.append(measured)
        return measured

    def median(self, name: str) -> float:
        """The median over the rounds of one :class:`Round` figure (or property)."""
        return statistics.median(getattr(measured, name) for measured in self.rounds)


class Gateways:
    """The gateway processes serving one port with ``SO_REUSEPORT``; started and stopped here."""

    def __init__(self, url: str, env: dict[str, str], work_dir: Path, event_loop: str = "asyncio") -> None:
        self.url, self.env, self.work_dir, self.event_loop = url, env, work_dir, event_loop
        self.port = free_port()
        self.children: list[Child] = []

    def start(self) -> Child:
        """One more gateway on the port; returns once it serves."""
        index = len(self.children)
        log_path = self.work_dir / f"gateway-{index}.log"
        code = ("import logging; logging.basicConfig(level=logging.INFO); from taskserve.gateway.app import serve; "
                f"serve({self.url!r}, port={self.port}, reuse_port=True, event_loop={self.event_loop!r})")
        child = Child(f"gateway {index}", [sys.executable, "-c", code], log_path, env=self.env)
        self.children.append(child)

        def serving() -> bool:
            child.check_alive()
            return log_path.exists() and "Application startup complete" in log_path.read_text()

        wait_until(serving, START_TIMEOUT_S, f"gateway {index} to serve")
        return child

    def stop_last(self) -> None:
        self.children.pop().stop()

    def stop(self) -> None:
        while self.children:
            self.stop_last()

    @property
    def pids(self) -> list[int]:
        return [child.popen.pid for child in self.children]


def wait_for_route(port: int) -> None:
    """Until every gateway on ``port`` routes ``/bench_http`` (new connections land on any)."""
    def routed() -> bool:
        return all(httpx.get(f"http://127.0.0.1:{port}/-/routes").json().get(f"/{NAME}") == NAME for _ in range(8))

    wait_until(routed, START_TIMEOUT_S, "the gateways to route the deployment")


def measure(gateways: Gateways, client: ClientProcess, handle: taskserve.DeploymentHandle, replicas: int,
            concurrency: int, args: argparse.Namespace, redis_pids: list[int], noop: Optional[NoOpServer] = None
            ) -> tuple[Figures, Figures, Optional[Figures]]:
    """Measure both paths in alternating rounds (each http round after its own warm-up),
    and, with ``noop``, the client against the no-op server in each round too."""
    handle_block(handle, args.warmup, concurrency)
    replica_pids = [replica.pid for replica in BenchEcho.status().replicas if replica.pid]
    http, baseline = Figures("http", replicas, concurrency), Figures("handle", replicas, concurrency)
    floor = Figures("no-op server", replicas, concurrency) if noop is not None else None
    for round_index in range(args.rounds):
        order = [("http", http), ("handle", baseline)] + ([("no-op server", floor)] if floor is not None else [])
        for path, figures in order if round_index % 2 == 0 else order[::-1]:
            port = noop.port if path == "no-op server" and noop is not None else gateways.port
            if path != "handle":
                client.session(port, args.warmup, concurrency, args.client)
            gateway_before, replica_before = cpu_seconds(gateways.pids), cpu_seconds(replica_pids)
            redis_before = cpu_seconds(redis_pids)
            if path != "handle":
                latencies, seconds, client_cpu_s = client.session(port, args.requests, concurrency, args.client)
                block = (latencies, seconds)
            else:   # the gateway's CPU meanwhile too: handle results must not reach it
                client_before = time.process_time()
                block = handle_block(handle, args.requests, concurrency)
                client_cpu_s = time.process_time() - client_before
            measured = figures.add(block, cpu_seconds(gateways.pids) - gateway_before, client_cpu_s,
                                   cpu_seconds(replica_pids) - replica_before, cpu_seconds(redis_pids) - redis_before)
            print(f"  {replicas} replica(s), {concurrency:3d} callers, round {round_index + 1}, {path:6}: "
                  f"{measured.per_second:6.0f} req/s, p50 {measured.p50_ms:6.2f} ms, p99 {measured.p99_ms:7.2f} ms",
                  flush=True)
    return http, baseline, floor


def measure_gateways(gateways: Gateways, client: ClientProcess, count: int, replicas: int, concurrency: int,
                     args: argparse.Namespace) -> list[Figures]:
    """The http path against 1 gateway and against ``count`` sharing the port, in alternating rounds."""
    results = [Figures(f"http, {n} gateway{'s' if n > 1 else ''}", replicas, concurrency) for n in (1, count)]
    order = list(zip((1, count), results))
    for round_index in range(args.rounds):
        for n, figures in order if round_index % 2 == 0 else order[::-1]:
            while len(gateways.children) < n:
                gateways.start()
            while len(gateways.children) > n:
                gateways.stop_last()
            wait_for_route(gateways.port)
            client.session(gateways.port, args.warmup, concurrency, args.client)
            gateway_before = cpu_seconds(gateways.pids)
            latencies, seconds, client_cpu_s = client.session(gateways.port, args.requests, concurrency, args.client)
            measured = figures.add((latencies, seconds), cpu_seconds(gateways.pids) - gateway_before, client_cpu_s)
            print(f"  {n} gateway(s), {concurrency:3d} callers, round {round_index + 1}: "
                  f"{measured.per_second:6.0f} req/s, p50 {measured.p50_ms:6.2f} ms, p99 {measured.p99_ms:7.2f} ms",
                  flush=True)
    while len(gateways.children) > 1:
        gateways.stop_last()
    return results


@dataclass
class Overload:
    """What ``concurrency`` connections sending for ``seconds`` got, and the gateway's memory."""

    concurrency: int
    seconds: float
    answered: int = 0
    refused: int = 0                   # 503 with Retry-After
    other: dict[str, int] = field(default_factory=dict)   # anything else, by kind
    idle_mb: float = 0.0
    peak_mb: float = 0.0
    after_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.other and self.answered > 0

    @property
    def memory_factor(self) -> float:
        return self.after_mb / self.idle_mb


async def overload_block(port: int, concurrency: int, seconds: float, result: Overload,
                         gateway: psutil.Process) -> None:
    """``concurrency`` callers on one httpx client, each sending until ``seconds`` are up."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    deadline = time.monotonic() + seconds
    stop = asyncio.Event()

    async def sample_memory() -> None:
        while not stop.is_set():
            result.peak_mb = max(result.peak_mb, gateway.memory_info().rss / 2**20)
            await asyncio.sleep(0.2)

    async def caller(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                answer = await http.post(f"/{NAME}", content=BODY, headers=JSON_HEADERS)
            except httpx.HTTPError as error:      # a reset, a hang (timeout), a refused connection
                kind = type(error).__name__
                result.other[kind] = result.other.get(kind, 0) + 1
                continue
            if answer.status_code == 200 and answer.content == BODY:
                result.answered += 1
            elif answer.status_code == 503 and "retry-after" in answer.headers:
                result.refused += 1
            else:
                kind = f"HTTP {answer.status_code}"
                result.other[kind] = result.other.get(kind, 0) + 1

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT_S,
                                 limits=limits) as http:
        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(caller(http) for _ in range(concurrency)))
        stop.set()
        await sampler


def measure_overload(gateways: Gateways, args: argparse.Namespace) -> Overload:
    """``--overload-concurrency`` connections for ``--overload-s``; the gateway's memory before and after."""
    gateway = psutil.Process(gateways.pids[0])
    result = Overload(args.overload_concurrency, args.overload_s)
    result.idle_mb = gateway.memory_info().rss / 2**20
    asyncio.run(overload_block(gateways.port, args.overload_concurrency, args.overload_s, result, gateway))
    # The connections are closed; give the gateway a moment to drop what they held.
    deadline = time.monotonic() + MEMORY_SETTLE_S
    while True:
        result.after_mb = gateway.memory_info().rss / 2**20
        if result.memory_factor <= TARGET_MEMORY_FACTOR or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"  overload: {result.concurrency} connections for {result.seconds:g}s: {result.answered} answered, "
          f"{result.refused} refused (503 + Retry-After), other {result.other or 'none'}; gateway RSS "
          f"{result.idle_mb:.1f} MB idle, {result.peak_mb:.1f} MB peak, {result.after_mb:.1f} MB after", flush=True)
    return result


# --------------------------------------------------------------------------- report


def report(results: list[tuple[Figures, Figures]], overload: Optional[Overload],
           gateway_results: list[Figures], floors: Optional[list[Figures]] = None) -> str:
    """The figures of both paths, the ratios, the client's floor, the overload, the gateways
    and the targets, as Markdown tables."""
    figures_rows = []
    for http, baseline in results:
        for figures in (http, baseline):
            gateway = f"{figures.median('gateway_cpu_us'):.0f}"
            figures_rows.append([str(figures.replicas), str(figures.concurrency), figures.path,
                                 f"{figures.median('per_second'):.0f}", f"{figures.median('p50_ms'):.2f}",
                                 f"{figures.median('p99_ms'):.2f}", gateway,
                                 f"{figures.median('client_cpu_us'):.0f}", f"{figures.median('replica_cpu_us'):.0f}",
                                 f"{figures.median('redis_cpu_us'):.0f}", f"{figures.median('total_cpu_us'):.0f}"])
    ratio_rows = [[str(http.replicas), str(http.concurrency),
                   f"{http.median('per_second') / baseline.median('per_second'):.2f}",
                   f"{http.median('p50_ms') / baseline.median('p50_ms'):.2f}",
                   f"{http.median('p99_ms') / baseline.median('p99_ms'):.2f}",
                   f"{baseline.median('total_cpu_us') / http.median('total_cpu_us'):.2f}"] for http, baseline in results]
    tables = [
        markdown_table(["replicas", "concurrency", "path", "req/s", "p50 ms", "p99 ms", "gateway CPU us/req",
                        "client CPU us/req", "replica CPU us/req", "Redis CPU us/req", "total CPU us/req"],
                       figures_rows, align="rrlrrrrrrrr"),
        markdown_table(["replicas", "concurrency", "throughput http/handle", "p50 http/handle", "p99 http/handle",
                        "total CPU handle/http"], ratio_rows, left=0),
    ]
    if floors:
        paths = {(http.replicas, http.concurrency): (http, baseline) for http, baseline in results}
        floor_rows = []
        for floor in floors:
            http, baseline = paths[(floor.replicas, floor.concurrency)]
            floor_rows.append([str(floor.concurrency), f"{floor.median('per_second'):.0f}",
                               f"{floor.median('p50_ms'):.2f}", f"{floor.median('p99_ms'):.2f}",
                               f"{floor.median('client_cpu_us'):.0f}",
                               f"{floor.median('per_second') / baseline.median('per_second'):.2f}",
                               f"{http.median('per_second') / floor.median('per_second'):.2f}",
                               f"{http.median('p99_ms') / floor.median('p99_ms'):.2f}"])
        tables.append(markdown_table(
            ["concurrency", "no-op server req/s", "p50 ms", "p99 ms", "client CPU us/req",
             "no-op server/handle req/s", "http/no-op server req/s", "http/no-op server p99"], floor_rows, left=0))
    if overload is not None:
        tables.append(markdown_table(
            ["connections", "seconds", "answered", "refused 503", "other", "RSS idle MB", "RSS peak MB",
             "RSS after MB"],
            [[str(overload.concurrency), f"{overload.seconds:g}", str(overload.answered), str(overload.refused),
              ", ".join(f"{kind}: {n}" for kind, n in overload.other.items()) or "0",
              f"{overload.idle_mb:.1f}", f"{overload.peak_mb:.1f}", f"{overload.after_mb:.1f}"]], left=0))
    if gateway_results:
        tables.append(markdown_table(
            ["gateways", "concurrency", "req/s", "p50 ms", "p99 ms", "gateway CPU us/req"],
            [[figures.path.split()[1], str(figures.concurrency), f"{figures.median('per_second'):.0f}",
              f"{figures.median('p50_ms'):.2f}", f"{figures.median('p99_ms'):.2f}",
              f"{figures.median('gateway_cpu_us'):.0f}"] for figures in gateway_results], left=0))
    checks = target_checks(results, overload)
    if checks:
        tables.append(markdown_table(["target", "value"], checks))
    return "\n\n".join(tables)


def target_checks(results: list[tuple[Figures, Figures]], overload: Optional[Overload]) -> list[list[str]]:
    """The targets of docs/performance.md that this run measured, each with its value and ok/MISS."""
    def verdict(good: bool) -> str:
        return "ok" if good else "MISS"

    rows = []
    for http, baseline in results:
        if http.replicas != 1:
            continue
        if http.concurrency == TARGET_CONCURRENCY:
            per_second, ratio = http.median("per_second"), http.median("per_second") / baseline.median("per_second")
            p99 = http.median("p99_ms")
            rows += [[f"C={http.concurrency} req/s (>= {TARGET_PER_SECOND:g})",
                      f"{per_second:.0f} {verdict(per_second >= TARGET_PER_SECOND)}"],
                     [f"C={http.concurrency} throughput http/handle (>= {TARGET_RATIO:g})",
                      f"{ratio:.2f} {verdict(ratio >= TARGET_RATIO)}"],
                     [f"C={http.concurrency} p99 ms (<= {TARGET_P99_MS:g})", f"{p99:.1f} {verdict(p99 <= TARGET_P99_MS)}"]]
        if http.concurrency == 1:
            p50 = http.median("p50_ms")
            rows.append([f"C=1 p50 ms (<= {TARGET_P50_ONE_MS:g})", f"{p50:.2f} {verdict(p50 <= TARGET_P50_ONE_MS)}"])
    if overload is not None:
        rows += [[f"C={overload.concurrency}: every request answered or 503 + Retry-After",
                  "yes" if overload.ok else "NO"],
                 [f"C={overload.concurrency}: RSS after / idle (<= {TARGET_MEMORY_FACTOR:g})",
                  f"{overload.memory_factor:.3f} {verdict(overload.memory_factor <= TARGET_MEMORY_FACTOR)}"]]
    return rows


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per path and round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, TARGET_CONCURRENCY],
                        help="callers (http) and threads (handle)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1])
    parser.add_argument("--client", choices=["httpx", "httpx-keepalive", "raw"], default="httpx")
    parser.add_argument("--event-loop", choices=["asyncio", "uvloop", "auto"], default="asyncio",
                        help="the gateway's (auto: uvloop when installed)")
    parser.add_argument("--overload-s", type=float, default=10.0, help="0: no overload phase")
    parser.add_argument("--overload-concurrency", type=int, default=256)
    parser.add_argument("--gateways", type=int, default=2, help="gateways sharing the port in the last phase; 1: none")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the client against the no-op server (the client's own floor)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str], work_dir: Path
        ) -> tuple[list[tuple[Figures, Figures]], list[Figures], Optional[Overload], list[Figures]]:
    """The cluster and a gateway on a free port; the measurements of every phase."""
    # The controller's own --resync, and the agent keeps this shell's *_NUM_THREADS (an echo uses no BLAS).
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None,
                                            clear_thread_limits=False))
        gateways = Gateways(local.url, local.env(), work_dir, args.event_loop)
        noop = NoOpServer(local.env(), work_dir) if args.floor else None
        redis_pids = [local.redis.process.pid] if local.redis is not None and local.redis.process is not None else []
        try:
            gateways.start()
            client = stack.enter_context(ClientProcess())
            with deleted_on_exit([NAME]):
                print_head(local.url, command_line("bench_http", argv),
                           extra={"starlette": starlette.__version__, "uvicorn": uvicorn.__version__,
                                  "httpx": httpx.__version__, "http parser": http_parser(),
                                  "event loop": event_loop_name(args.event_loop)})
                results: list[tuple[Figures, Figures]] = []
                floors: list[Figures] = []
                overload, gateway_results = None, []
                for replicas in args.replicas:
                    BenchEcho.options(num_replicas=replicas).deploy(timeout=START_TIMEOUT_S)
                    wait_for_route(gateways.port)
                    handle = BenchEcho.get_handle()
                    for concurrency in args.concurrency:
                        http, baseline, floor = measure(gateways, client, handle, replicas, concurrency, args,
                                                        redis_pids, noop if replicas == args.replicas[0] else None)
                        results.append((http, baseline))
                        floors += [floor] if floor is not None else []
                if args.overload_s > 0:
                    overload = measure_overload(gateways, args)
                if args.gateways > 1:
                    gateway_results = measure_gateways(gateways, client, args.gateways, args.replicas[-1],
                                                       max(args.concurrency), args)
                return results, floors, overload, gateway_results
        finally:
            gateways.stop()
            if noop is not None:
                noop.stop()


def http_parser() -> str:
    """The HTTP parser the gateway uses here: httptools when installed, else h11."""
    try:
        import httptools
    except ImportError:
        return "h11"
    return f"httptools {httptools.__version__}"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    command_args = sys.argv[1:] if argv is None else argv
    args = parse_args(command_args)

    def body(work_dir: Path) -> None:
        results, floors, overload, gateway_results = run(args, command_args, work_dir)
        print()
        print(report(results, overload, gateway_results, floors))

    return bench_main(body, "bench_http-")


if __name__ == "__main__":
    sys.exit(main())
