"""HTTP through the gateway against the Python handle, on the same deployment and Redis.

What it measures
----------------
The script starts an embedded Redis (no persistence), a controller, a node agent
(``--num-cpus 8``) and ``taskserve gateway`` on free ports, and deploys ``bench_http``,
an echo (``num_cpus=0.5``) that answers a handle call with its argument and an HTTP
request with its body. With 1 and then 2 replicas it measures two paths:

* **http** — ``POST /bench_http`` with an 8-byte body over keep-alive HTTP/1.1
  connections, from a minimal asyncio client (a few lines on ``asyncio.open_connection``,
  so that the client's own cost stays small next to the gateway's);
* **handle** (the baseline) — ``handle.remote(body).result()`` from as many threads.

Each path runs ``--concurrency`` (default 4) callers that send one request after
the other for ``--requests`` requests in all (default 2000 per path and replica
count), after ``--warmup`` requests. The blocks alternate between the two paths for
``--rounds`` rounds (default 3), so background load hits both alike. Reported:
requests per second over all blocks, p50/p99 of each request's round trip, and the
CPU time the gateway process spent per HTTP request (from /proc via psutil), which
moves much less with the machine's other load than the wall-clock figures.

How to read it
--------------
``ratio = http / handle`` for throughput (higher is better) and p50 (lower is
better). Both paths enqueue the same Celery task on the same queue and wait for its
result through Redis pub/sub; HTTP adds a process hop (client -> gateway) and the
gateway's own work (HTTP parsing, routing, base64 of the body). On a 2-core machine
the client, the gateway, Redis and the replicas share the cores, so compare ratios
across machines, not absolute figures.

Usage, from the repository root::

    python -m benchmarks.bench_http [--requests 2000] [--warmup 200] [--concurrency 4] [--rounds 3]
                                    [--replicas 1 2]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_http --requests 40 --warmup 4 --concurrency 2 --rounds 2 --replicas 1

Everything it starts is stopped on exit, Ctrl-C or error; logs go to a temporary
directory that is kept (and printed) only when something failed. The cluster
plumbing and the report helpers come from :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import starlette
import uvicorn

import taskserve
from benchmarks.common import (
    START_TIMEOUT_S,
    bench_main,
    cluster,
    cpu_seconds,
    deleted_on_exit,
    machine_lines,
    markdown_table,
    percentile,
    split,
)
from taskserve.redis_server import free_port

NAME = "bench_http"
RESULT_TIMEOUT_S = 10.0
AGENT_NUM_CPUS = 8
BODY = b"12345678"


@taskserve.deployment(name=NAME, num_cpus=0.5)
class BenchEcho:
    def __call__(self, value: Any) -> Any:
        if isinstance(value, taskserve.http.Request):
            return value.body          # bytes go back as they are
        return value


# --------------------------------------------------------------------------- the two clients


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads a Content-Length answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, port: int, path: str, body: bytes) -> "HTTPConnection":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n"
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


async def http_block(port: int, count: int, concurrency: int) -> tuple[list[float], float]:
    """``count`` requests from ``concurrency`` connections: (latencies, seconds)."""
    connections = [await HTTPConnection.open(port, f"/{NAME}", BODY) for _ in range(concurrency)]
    latencies: list[float] = []

    async def caller(connection: HTTPConnection, share: int) -> None:
        for _ in range(share):
            started = time.perf_counter()
            body = await connection.post()
            latencies.append(time.perf_counter() - started)
            if body != BODY:
                raise RuntimeError(f"wrong answer {body!r}")

    started = time.perf_counter()
    await asyncio.gather(*(caller(c, share) for c, share in zip(connections, split(count, concurrency))))
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return latencies, elapsed


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
class Figures:
    """What the measured blocks of one path at one replica count added up to."""

    path: str
    replicas: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0

    def add(self, block: tuple[list[float], float], gateway_cpu_s: float) -> None:
        """Count in one block (latencies, seconds) and the gateway CPU it cost."""
        self.latencies += block[0]
        self.seconds += block[1]
        self.gateway_cpu_s += gateway_cpu_s

    @property
    def gateway_cpu_us(self) -> float:
        """Gateway CPU time per request, in microseconds."""
        return 1e6 * self.gateway_cpu_s / len(self.latencies)

    @property
    def per_second(self) -> float:
        """Requests per second over all blocks."""
        return len(self.latencies) / self.seconds

    def percentile_ms(self, fraction: float) -> float:
        """The nearest-rank percentile of the round trips, in milliseconds."""
        return 1000 * percentile(sorted(self.latencies), fraction)


def measure(port: int, gateway_pid: int, replicas: int, args: argparse.Namespace) -> tuple[Figures, Figures]:
    """Deploy ``replicas`` replicas, warm both paths up, then measure them in alternating blocks."""
    BenchEcho.options(num_replicas=replicas).deploy(timeout=START_TIMEOUT_S)
    handle = BenchEcho.get_handle()
    asyncio.run(http_block(port, args.warmup, args.concurrency))
    handle_block(handle, args.warmup, args.concurrency)
    http, baseline = Figures("http", replicas), Figures("handle", replicas)
    for round_index, share in enumerate(split(args.requests, args.rounds)):
        order = [("http", http), ("handle", baseline)]
        for path, figures in order if round_index % 2 == 0 else order[::-1]:
            cpu_before = cpu_seconds([gateway_pid])
            block = (asyncio.run(http_block(port, share, args.concurrency)) if path == "http"
                     else handle_block(handle, share, args.concurrency))
            figures.add(block, cpu_seconds([gateway_pid]) - cpu_before)
            print(f"  {replicas} replica(s), round {round_index + 1}, {path:6}: "
                  f"{len(block[0]) / block[1]:7.0f} req/s", flush=True)
    return http, baseline


# --------------------------------------------------------------------------- report


def report(results: list[tuple[Figures, Figures]]) -> str:
    """The figures of both paths, then the ratios, as two Markdown tables."""
    figures_rows = []
    for http, baseline in results:
        for figures in (http, baseline):
            gateway = f"{figures.gateway_cpu_us:.0f}" if figures.path == "http" else "-"
            figures_rows.append([str(figures.replicas), figures.path, f"{figures.per_second:.0f}",
                                 f"{figures.percentile_ms(0.5):.2f}", f"{figures.percentile_ms(0.99):.2f}", gateway])
    ratio_rows = [[str(http.replicas), f"{http.per_second / baseline.per_second:.2f}",
                   f"{http.percentile_ms(0.5) / baseline.percentile_ms(0.5):.2f}"] for http, baseline in results]
    return "\n\n".join([
        markdown_table(["replicas", "path", "req/s", "p50 ms", "p99 ms", "gateway CPU us/req"], figures_rows,
                       align="rlrrrr"),
        markdown_table(["replicas", "throughput http/handle", "p50 http/handle"], ratio_rows, left=0),
    ])


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per path and replica count")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4, help="connections (http) and threads (handle)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str], work_dir: Path) -> list[tuple[Figures, Figures]]:
    """The cluster and a gateway on a free port; both paths at every replica count."""
    # The controller's own --resync, and the agent keeps this shell's *_NUM_THREADS (an echo uses no BLAS).
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None, clear_thread_limits=False) as local:
        port = free_port()
        gateway = local.start_gateway(port)   # waits until it listens; stopped with the cluster
        with deleted_on_exit([NAME]):
            print("\n".join(machine_lines(local.url, {"starlette": starlette.__version__,
                                                      "uvicorn": uvicorn.__version__})))
            print(f"command:  python -m benchmarks.bench_http {' '.join(argv)}".rstrip())
            return [measure(port, gateway.pid, replicas, args) for replicas in args.replicas]


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    command_args = sys.argv[1:] if argv is None else argv
    args = parse_args(command_args)

    def body(work_dir: Path) -> None:
        results = run(args, command_args, work_dir)
        print()
        print(report(results))

    return bench_main(body, "bench_http-")


if __name__ == "__main__":
    sys.exit(main())
