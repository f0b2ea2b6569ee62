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

Usage::

    python scripts/bench_http.py [--requests 2000] [--concurrency 4] [--rounds 3] [--replicas 1 2]

Everything it starts is stopped on exit, Ctrl-C or error; logs go to a temporary
directory that is kept (and printed) only when something failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import celery
import psutil
import redis
import starlette
import uvicorn

import taskserve
from taskserve.connection import current_store
from taskserve.processes import die_with_parent
from taskserve.redis_server import RedisServer, free_port

NAME = "bench_http"
RESULT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
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


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------------- measuring


@dataclass
class Figures:
    path: str
    replicas: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0

    def add(self, block: tuple[list[float], float], gateway_cpu_s: float) -> None:
        self.latencies += block[0]
        self.seconds += block[1]
        self.gateway_cpu_s += gateway_cpu_s

    @property
    def gateway_cpu_us(self) -> float:
        return 1e6 * self.gateway_cpu_s / len(self.latencies)

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(port: int, gateway: psutil.Process, replicas: int, args: argparse.Namespace) -> tuple[Figures, Figures]:
    BenchEcho.options(num_replicas=replicas).deploy(timeout=START_TIMEOUT_S)
    handle = BenchEcho.get_handle()
    asyncio.run(http_block(port, args.warmup, args.concurrency))
    handle_block(handle, args.warmup, args.concurrency)
    http, baseline = Figures("http", replicas), Figures("handle", replicas)
    for round_index, share in enumerate(split(args.requests, args.rounds)):
        order = [("http", http), ("handle", baseline)]
        for path, figures in order if round_index % 2 == 0 else order[::-1]:
            cpu_before = cpu_seconds(gateway)
            block = (asyncio.run(http_block(port, share, args.concurrency)) if path == "http"
                     else handle_block(handle, share, args.concurrency))
            figures.add(block, cpu_seconds(gateway) - cpu_before)
            print(f"  {replicas} replica(s), round {round_index + 1}, {path:6}: "
                  f"{len(block[0]) / block[1]:7.0f} req/s", flush=True)
    return http, baseline


# --------------------------------------------------------------------------- processes


class Child:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "taskserve", *args], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=die_with_parent)

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; see {self.log}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def cluster(log_dir: Path) -> Iterator[tuple[int, psutil.Process]]:
    """Redis, controller, agent and gateway; yields the gateway's port and process."""
    server = RedisServer().start()
    children: list[Child] = []
    try:
        port = free_port()
        address = ["--address", server.url]
        children.append(Child("controller", ["controller", *address], log_dir))
        children.append(Child("agent", ["agent", "--num-cpus", "8", "--data-dir", str(log_dir / "agent"),
                                        *address], log_dir))
        children.append(Child("gateway", ["gateway", "--port", str(port), *address], log_dir))
        store = taskserve.connect(server.url)

        def ready() -> bool:
            for child in children:
                child.check()
            return any(node.alive for node in store.list_nodes()) and port_open(port)

        wait_until(ready, "the agent registering and the gateway listening")
        yield port, psutil.Process(children[-1].popen.pid)
    finally:
        with contextlib.suppress(Exception):
            taskserve.delete_deployment(NAME, timeout=30)
        for child in reversed(children):
            child.stop()
        server.stop()


# --------------------------------------------------------------------------- report


def machine_lines(redis_version: str) -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return [
        f"machine:  {os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}",
        f"python:   {platform.python_version()}",
        f"versions: taskserve {taskserve.__version__}, celery {celery.__version__}, redis-py {redis.__version__}, "
        f"redis-server {redis_version}, starlette {starlette.__version__}, uvicorn {uvicorn.__version__}",
        f"load:     {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1/5/15 min) at the start",
    ]


def report(results: list[tuple[Figures, Figures]]) -> str:
    lines = ["| replicas | path | req/s | p50 ms | p99 ms | gateway CPU us/req |", "|---:|---|---:|---:|---:|---:|"]
    for http, baseline in results:
        for figures in (http, baseline):
            gateway = f"{figures.gateway_cpu_us:.0f}" if figures.path == "http" else "-"
            lines.append(f"| {figures.replicas} | {figures.path} | {figures.per_second:.0f} | "
                         f"{figures.percentile_ms(0.5):.2f} | {figures.percentile_ms(0.99):.2f} | {gateway} |")
    lines += ["", "| replicas | throughput http/handle | p50 http/handle |", "|---:|---:|---:|"]
    for http, baseline in results:
        lines.append(f"| {http.replicas} | {http.per_second / baseline.per_second:.2f} | "
                     f"{http.percentile_ms(0.5) / baseline.percentile_ms(0.5):.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per path and replica count")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4, help="connections (http) and threads (handle)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_http-"))
    try:
        with cluster(log_dir) as (port, gateway):
            print("\n".join(machine_lines(current_store().redis.info("server")["redis_version"])))
            print(f"command:  python scripts/bench_http.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
            results = [measure(port, gateway, replicas, args) for replicas in args.replicas]
    except BaseException:
        print(f"failed; logs kept in {log_dir}", file=sys.stderr)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
