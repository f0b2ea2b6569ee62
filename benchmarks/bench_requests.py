"""Request round trip: a taskserve deployment against bare Celery, on one Redis.

What it measures
----------------
Everything runs on this machine, against one embedded Redis that the script
starts (no persistence):

* **taskserve** — a controller and a node agent (``--num-cpus 8``) as
  subprocesses, and an echo deployment ``bench_echo`` (``__call__(x) -> x``,
  ``num_cpus=0.5``) deployed through the public API with 1 and then 2 replicas
  (no ``version``, so the second deploy rolls both replicas). Requests go
  through ``handle.remote(i).result(timeout=10)``.
* **Celery** (the baseline) — a bare Celery app on the same Redis (broker and
  result backend, JSON, ``task_acks_late=True``, ``worker_prefetch_multiplier=1``)
  with one ``echo`` task, served by 1 and then 2 ``celery worker --pool solo
  --concurrency 1 -Q bench_raw --without-mingle --without-gossip
  --without-heartbeat`` processes. Requests go through
  ``app.send_task(...).get(timeout=10)``; ``send_task`` is what the taskserve
  handle used to call (it now pushes the same message itself), so the
  difference is taskserve's own path.
* **taskserve .echo** — the same deployment through a method handle,
  ``handle.echo.remote(i)``: the method call against ``__call__``.

For each replica count, both paths are warmed up (``--warmup``, default 200
sequential requests each), then measured with ``--requests`` (default 5000)
requests per path in two ways:

* **sequential**: one call after the other; each call's round trip (enqueue,
  served, result read back) is timed. Reported as p50 and p99 in milliseconds,
  and as requests per second over the whole loop.
* **pipelined**: at most ``IN_FLIGHT`` (100) calls sent and not yet collected,
  the oldest collected first; reported as requests per second.

Over both modes it also reads the CPU time the serving processes (replicas or
Celery workers, from ``/proc`` via psutil) and this client process spent, per
request. Wall-clock figures move with whatever else the machine runs; CPU per
request moves much less, so it is the steadier measure of what each path costs.

The requests are split into ``--rounds`` (default 20) equal blocks and the two
paths take turns block by block (taskserve first in odd rounds, Celery first in
even ones), so a background load that comes and goes during the run hits both
paths alike. Latencies of all blocks are pooled; throughput is all requests over
all the time spent. ``--rounds 1`` measures each path in one go.

How to read the ratios
----------------------
``p50 ratio = taskserve p50 / Celery p50`` (lower is better; target <= 1.0)
and ``throughput ratio = taskserve req/s / Celery req/s`` (higher is better;
target >= 0.90), per replica count, for sequential and pipelined throughput.
The method ratio is ``handle.echo`` p50 over ``handle`` p50 (target <= 1.05).
Both paths share the same Redis, machine and client code, so a ratio near 1.0
means taskserve adds nothing measurable on top of Celery. Sequential figures
are dominated by the round trip through Redis; pipelined ones by the CPU the
workers spend per request. On a 2-core machine the client, Redis and the workers
compete for the cores, so 2 replicas need not be faster than 1: compare the
ratios, not absolute numbers across machines. The per-round lines show how
much the figures move between blocks; the worker CPU ratio (no target) says
how much more work a taskserve replica does per request than a Celery worker.

Usage, from the repository root::

    python -m benchmarks.bench_requests [--requests 5000] [--warmup 200] [--rounds 20]
                                        [--replicas 1 2] [--celery-loglevel INFO]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_requests --requests 20 --warmup 5 --rounds 2 --replicas 1

Everything it starts (deployment, workers, agent, controller, Redis) is stopped
on exit, Ctrl-C or error. Logs go to a temporary directory that is removed on
success and kept (its path printed) on failure. The cluster plumbing and the
report helpers come from :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import celery

import taskserve
from benchmarks.common import (
    START_TIMEOUT_S,
    Child,
    bench_main,
    cluster,
    cpu_seconds,
    deleted_on_exit,
    load_average,
    markdown_table,
    percentile,
    print_head,
    split,
    wait_until,
)

DEPLOYMENT_NAME = "bench_echo"
RAW_QUEUE = "bench_raw"
RAW_MODULE = "bench_raw_app"
RAW_TASK = "bench_raw.echo"
RESULT_TIMEOUT_S = 10.0
AGENT_NUM_CPUS = 8
P50_TARGET = 1.0
THROUGHPUT_TARGET = 0.90
METHOD_P50_TARGET = 1.05      # handle.echo.remote against handle.remote
IN_FLIGHT = 100               # the pipelined mode's most requests sent and not yet collected


@taskserve.deployment(name=DEPLOYMENT_NAME, num_replicas=1, num_cpus=0.5)
class BenchEcho:
    def __call__(self, x: Any) -> Any:
        return x

    def echo(self, x: Any) -> Any:
        return x


# --------------------------------------------------------------------------- measuring

# ``send(i)`` enqueues request ``i``; ``collect(pending)`` waits for its value.
Send = Callable[[int], Any]
Collect = Callable[[Any], Any]


@dataclass(frozen=True)
class Client:
    """One way of calling the echo: taskserve's handle or bare Celery."""

    path: str
    send: Send
    collect: Collect
    worker_pids: list[int]


@dataclass
class Samples:
    """What the measured blocks of one path added up to."""

    latencies_s: list[float] = field(default_factory=list)
    sequential_requests: int = 0
    sequential_s: float = 0.0
    pipelined_requests: int = 0
    pipelined_s: float = 0.0
    worker_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


@dataclass(frozen=True)
class Measurement:
    """One path at one replica count."""

    path: str
    replicas: int
    p50_ms: float
    p99_ms: float
    sequential_rps: float
    pipelined_rps: float
    worker_cpu_us: float
    client_cpu_us: float

    @classmethod
    def from_samples(cls, path: str, replicas: int, samples: Samples) -> "Measurement":
        latencies = sorted(samples.latencies_s)
        requests = samples.sequential_requests + samples.pipelined_requests
        return cls(
            path=path,
            replicas=replicas,
            p50_ms=statistics.median(latencies) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            sequential_rps=samples.sequential_requests / samples.sequential_s,
            pipelined_rps=samples.pipelined_requests / samples.pipelined_s,
            worker_cpu_us=samples.worker_cpu_s / requests * 1e6,
            client_cpu_us=samples.client_cpu_s / requests * 1e6,
        )


def run_sequential(client: Client, count: int) -> tuple[list[float], float]:
    """``count`` round trips one after another: (latencies in seconds, total seconds)."""
    send, collect, clock = client.send, client.collect, time.perf_counter
    latencies: list[float] = []
    started = clock()
    for i in range(count):
        t0 = clock()
        value = collect(send(i))
        latencies.append(clock() - t0)
        if value != i:
            raise AssertionError(f"{client.path}: request {i} came back as {value!r}")
    return latencies, clock() - started


def run_pipelined(client: Client, count: int, in_flight: int = IN_FLIGHT) -> float:
    """``count`` requests with at most ``in_flight`` of them sent and not yet collected
    (collected in order, the oldest first): total seconds."""
    send, collect, clock = client.send, client.collect, time.perf_counter
    started = clock()
    pending: collections.deque = collections.deque()
    values = []
    for i in range(count):
        if len(pending) >= in_flight:
            values.append(collect(pending.popleft()))
        pending.append(send(i))
    values.extend(collect(p) for p in pending)
    elapsed = clock() - started
    if values != list(range(count)):
        wrong = next(i for i, v in enumerate(values) if v != i)
        raise AssertionError(f"{client.path}: pipelined request {wrong} came back as {values[wrong]!r}")
    return elapsed


def measure_block(client: Client, count: int, samples: Samples) -> str:
    """One sequential and one pipelined block of ``count`` requests; a one-line summary."""
    worker_cpu_s, client_cpu_s = cpu_seconds(client.worker_pids), time.process_time()
    latencies, sequential_s = run_sequential(client, count)
    pipelined_s = run_pipelined(client, count)
    samples.worker_cpu_s += cpu_seconds(client.worker_pids) - worker_cpu_s
    samples.client_cpu_s += time.process_time() - client_cpu_s
    samples.latencies_s.extend(latencies)
    samples.sequential_requests += count
    samples.sequential_s += sequential_s
    samples.pipelined_requests += count
    samples.pipelined_s += pipelined_s
    return (f"{client.path} p50 {statistics.median(latencies) * 1000:.3f} ms, "
            f"{count / sequential_s:.0f}/{count / pipelined_s:.0f} req/s")


def measure_pair(clients: list[Client], replicas: int, requests: int, warmup: int, rounds: int) -> list[Measurement]:
    """Warm up every client, then measure them in alternating blocks."""
    for client in clients:
        run_sequential(client, warmup)
    samples = {client.path: Samples() for client in clients}
    blocks = split(requests, rounds)
    for number, size in enumerate(blocks, start=1):
        order = clients if number % 2 else clients[::-1]
        lines = [measure_block(client, size, samples[client.path]) for client in order]
        print(f"  x{replicas} round {number}/{len(blocks)} ({size} requests; p50, sequential/pipelined): "
              + " | ".join(lines), flush=True)
    return [Measurement.from_samples(client.path, replicas, samples[client.path]) for client in clients]


# --------------------------------------------------------------------------- taskserve path


def deploy_taskserve(replicas: int) -> Client:
    """Deploy the echo with ``replicas`` replicas; a client that calls it through a handle."""
    BenchEcho.options(num_replicas=replicas).deploy(timeout=START_TIMEOUT_S)
    running_replicas = [r for r in BenchEcho.status().replicas if r.state == "RUNNING"]
    if len(running_replicas) != replicas:
        raise RuntimeError(f"expected {replicas} RUNNING replicas after deploy, got {running_replicas}")
    handle = BenchEcho.get_handle()
    return Client("taskserve", handle.remote, lambda response: response.result(timeout=RESULT_TIMEOUT_S),
                  [r.pid for r in running_replicas if r.pid])


def method_client(client: Client) -> Client:
    """The same deployment called through a method handle: ``handle.echo.remote``."""
    return Client("taskserve .echo", BenchEcho.get_handle().echo.remote, client.collect, client.worker_pids)


# --------------------------------------------------------------------------- Celery path


RAW_APP_SOURCE = '''\
"""The bare Celery baseline that benchmarks/bench_requests.py writes and runs."""

from celery import Celery

app = Celery("bench_raw", broker={address!r}, backend={address!r})
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue={queue!r},
    broker_connection_retry_on_startup=True,
)


@app.task(name={task!r})
def echo(x):
    return x
'''


def write_raw_app(address: str, directory: Path) -> ModuleType:
    """Write the baseline app's module into ``directory`` and import it here too."""
    directory.mkdir(parents=True, exist_ok=True)
    source = RAW_APP_SOURCE.format(address=address, queue=RAW_QUEUE, task=RAW_TASK)
    (directory / f"{RAW_MODULE}.py").write_text(source)
    sys.path.insert(0, str(directory))
    return importlib.import_module(RAW_MODULE)


def raw_worker_argv(index: int, loglevel: Optional[str]) -> list[str]:
    """The command line of baseline worker ``index``."""
    argv = [sys.executable, "-m", "celery", "-A", RAW_MODULE, "worker", "--pool", "solo", "--concurrency", "1",
            "-Q", RAW_QUEUE, "--without-mingle", "--without-gossip", "--without-heartbeat",
            "-n", f"bench_raw{index}@%h"]
    return argv + ["--loglevel", loglevel] if loglevel else argv


@contextlib.contextmanager
def raw_workers(app: celery.Celery, count: int, app_dir: Path, log_dir: Path,
                loglevel: Optional[str] = None) -> Iterator[Client]:
    """``count`` Celery workers on ``RAW_QUEUE``, all answering a ping; stopped on exit."""
    pythonpath = os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    hostnames = {f"bench_raw{i}@{socket.gethostname()}" for i in range(count)}
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(Child(f"celery worker {i}", raw_worker_argv(i, loglevel),
                                             log_dir / f"celery-x{count}-{i}.log", env))
                   for i in range(count)]

        def all_ready() -> bool:
            for worker in workers:
                worker.check_alive()
            replies = app.control.ping(destination=sorted(hostnames), timeout=0.5)
            return hostnames <= {name for reply in replies for name in reply}

        wait_until(all_ready, START_TIMEOUT_S, f"{count} Celery workers to answer a ping")

        def send(i: int) -> celery.result.AsyncResult:
            return app.send_task(RAW_TASK, args=(i,), queue=RAW_QUEUE)

        yield Client("celery", send, lambda result: result.get(timeout=RESULT_TIMEOUT_S),
                     [worker.popen.pid for worker in workers])


# --------------------------------------------------------------------------- report


def figures_table(results: list[Measurement]) -> str:
    """Every path and replica count with its figures."""
    header = ["path", "replicas", "p50 ms", "p99 ms", "sequential req/s", "pipelined req/s",
              "worker CPU us/req", "client CPU us/req"]
    rows = [[r.path, str(r.replicas), f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.sequential_rps:.0f}",
             f"{r.pipelined_rps:.0f}", f"{r.worker_cpu_us:.0f}", f"{r.client_cpu_us:.0f}"] for r in results]
    return markdown_table(header, rows)


def ratios_table(results: list[Measurement]) -> str:
    """taskserve over Celery per replica count, each ratio checked against its target."""
    by_key = {(r.path, r.replicas): r for r in results}
    header = ["replicas", f"p50 taskserve/Celery (target <= {P50_TARGET:.2f})",
              f"sequential req/s taskserve/Celery (target >= {THROUGHPUT_TARGET:.2f})",
              f"pipelined req/s taskserve/Celery (target >= {THROUGHPUT_TARGET:.2f})",
              "worker CPU/req taskserve/Celery",
              f"p50 handle.echo/handle (target <= {METHOD_P50_TARGET:.2f})"]
    rows = []
    for replicas in sorted({r.replicas for r in results}):
        ts, raw = by_key[("taskserve", replicas)], by_key[("celery", replicas)]
        p50 = ts.p50_ms / raw.p50_ms
        sequential = ts.sequential_rps / raw.sequential_rps
        pipelined = ts.pipelined_rps / raw.pipelined_rps
        method = by_key.get(("taskserve .echo", replicas))
        method_p50 = method.p50_ms / ts.p50_ms if method else float("nan")
        rows.append([str(replicas), verdict(p50, p50 <= P50_TARGET),
                     verdict(sequential, sequential >= THROUGHPUT_TARGET),
                     verdict(pipelined, pipelined >= THROUGHPUT_TARGET),
                     f"{ts.worker_cpu_us / raw.worker_cpu_us:.3f}",
                     verdict(method_p50, method_p50 <= METHOD_P50_TARGET)])
    return markdown_table(header, rows, left=0)


def verdict(ratio: float, ok: bool) -> str:
    """``ratio`` with "ok" or "MISS"."""
    return f"{ratio:.3f} {'ok' if ok else 'MISS'}"


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None), checked."""
    parser = argparse.ArgumentParser(description="Request round trip: taskserve against bare Celery on one Redis.")
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per path, replica count "
                        "and mode (default: 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per path and replica count "
                        "(default: 200)")
    parser.add_argument("--rounds", type=int, default=20, help="blocks the paths take turns in (default: 20)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts (default: 1 2)")
    parser.add_argument("--celery-loglevel", default=None, help="--loglevel of the baseline workers (default: "
                        "Celery's own, WARNING; INFO logs a line per task received and done, as replicas do)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.warmup < 0 or min(args.replicas) < 1:
        parser.error("--requests, --rounds and --replicas must be positive, --warmup not negative")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> list[Measurement]:
    """Both paths at every replica count, on one cluster; everything stopped on return."""
    results: list[Measurement] = []
    # The controller's own --resync, and the agent keeps this shell's *_NUM_THREADS (an echo uses no BLAS).
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None, clear_thread_limits=False) as local, \
            deleted_on_exit([DEPLOYMENT_NAME]):
        address = local.url
        print_head(address, f"redis:    {address} (embedded, no persistence); logs in {work_dir}")
        raw_app = write_raw_app(address, work_dir / "raw_app").app
        for replicas in args.replicas:
            taskserve_client = deploy_taskserve(replicas)
            with raw_workers(raw_app, replicas, work_dir / "raw_app", work_dir,
                             args.celery_loglevel) as celery_client:
                results += measure_pair([taskserve_client, celery_client, method_client(taskserve_client)],
                                        replicas, args.requests, args.warmup, args.rounds)
    return results


def report(args: argparse.Namespace, results: list[Measurement]) -> None:
    """Print the figures and the ratios."""
    print(f"\n{args.requests} measured requests per path, replica count and mode, in {args.rounds} alternating "
          f"rounds, after {args.warmup} warm-up requests; load {load_average()} (1/5/15 min) at the end\n")
    print(figures_table(results))
    print()
    print(ratios_table(results))


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: report(args, run(args, work_dir)), "bench_requests-")


if __name__ == "__main__":
    sys.exit(main())
