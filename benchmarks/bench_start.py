"""Replica start: from the agent starting a replica's process to the replica RUNNING.

What it measures
----------------
Everything runs on this machine: an embedded Redis (no persistence), a controller
(``--resync 0.5``) and one node agent, all started by the script, twice: once with the
agent's fork server (the default) and once with ``TASKSERVE_FORKSERVER=0`` (every
replica a new ``python -m taskserve.node.replica``). The deployment is a trivial class
(``__call__`` returns its argument).

* **replica start**: the deployment runs one replica; it is scaled to two, and the new
  replica's record is watched (read every 2 ms): from when the agent records it
  ``STARTING`` (right after it started the process) to ``RUNNING`` (its Celery worker
  consumes the queue). Then it is scaled back to one and the replica drained; the next
  start begins once it is gone. ``--starts`` (default 10) of them per setup, after one
  warm-up start that is reported alone (the fork server itself started with the
  deployment's first replica, before any of them).
* **bare Celery worker** (the baseline, in the same run): a script that creates a Celery
  app on the same Redis and starts a ``solo`` worker on a queue of its own
  (``without_mingle/gossip/heartbeat``, as replicas do), from ``Popen`` to its
  ``worker_ready`` signal (which writes a Redis key, read every 2 ms), ``--starts`` times.

How to read it
--------------
``p50 ms`` is the median start. The target of the fork server is 150 ms and half a bare
Celery worker's start (``fork server / bare Celery`` <= 0.5): a forked replica skips
the interpreter's start and the imports, which are most of both of the others. A bare
Celery worker does less than a plain replica (no record, no user code, no health
check), so the plain spawn is slower than it.

Usage, from the repository root::

    python -m benchmarks.bench_start [--starts 10]

A smoke run (about 20 s; the figures mean little)::

    python -m benchmarks.bench_start --starts 2

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path printed)
only when it fails. The cluster plumbing and the report helpers come from
:mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import redis

import taskserve
from benchmarks.common import (
    Child,
    LocalCluster,
    bench_main,
    cluster_environment,
    command_line,
    deleted_on_exit,
    load_average,
    markdown_table,
    print_head,
    wait_until,
)
from taskserve.node.forkserver import FORKSERVER_ENV
from taskserve.store import Store

NAME = "bench_start"
POLL_S = 0.002
TIMEOUT_S = 60.0
TARGET_S = 0.15
TARGET_RATIO = 0.5

BARE_WORKER = """
import sys, time
import redis
from celery import Celery, signals

url, key = sys.argv[1], sys.argv[2]
app = Celery("bare", broker=url, backend=url, set_as_current=False)
app.conf.update(worker_hijack_root_logger=False, worker_redirect_stdouts=False,
                broker_connection_retry_on_startup=True)

@signals.worker_ready.connect(weak=False)
def ready(**_):
    redis.Redis.from_url(url).set(key, "1")

app.Worker(queues=[key], pool="solo", concurrency=1, without_mingle=True, without_gossip=True,
           without_heartbeat=True, quiet=True, loglevel="WARNING").start()
"""


class Echo:
    def __call__(self, value: object) -> object:
        return value


@contextlib.contextmanager
def start_cluster(work_dir: Path, forkserver: bool) -> Iterator[LocalCluster]:
    """Redis, a controller and an agent (with or without its fork server); connected."""
    env = {**cluster_environment(True), FORKSERVER_ENV: "1" if forkserver else "0"}
    with LocalCluster(work_dir, env=env) as local:
        local.start_redis()
        local.start_controller("--resync", "0.5")
        local.start_agent(None, 4, data_dir=work_dir / "agent")
        taskserve.connect(local.url)
        yield local


class Watcher:
    """Reads the deployment's replica records every :data:`POLL_S` in a thread, noting
    when each replica id was first seen STARTING and first seen RUNNING."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.starting: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(POLL_S):
            now = time.perf_counter()
            _, _, replicas = self.store.snapshot(self.name)
            for replica in replicas:
                if replica.state.value == "STARTING":
                    self.starting.setdefault(replica.replica_id, now)
                elif replica.state.value == "RUNNING":
                    self.running.setdefault(replica.replica_id, now)

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def replica_starts(store: Store, count: int) -> list[float]:
    """Seconds from STARTING to RUNNING of ``count`` + 1 replica starts (the warm-up first)."""
    model = taskserve.deployment(Echo).options(name=NAME, num_replicas=1, num_cpus=1, version="1")
    model.deploy()
    starts = []
    with Watcher(store, NAME) as watcher:
        for _ in range(count + 1):
            known = {replica.replica_id for replica in store.snapshot(NAME)[2]} | set(watcher.running)
            model.options(num_replicas=2).deploy()
            new = wait_until(lambda known=known: [r for r in watcher.running if r not in known], TIMEOUT_S,
                             "the new replica to run")[0]
            if new not in watcher.starting:
                raise RuntimeError(f"replica {new} was never seen STARTING; is the machine overloaded?")
            starts.append(watcher.running[new] - watcher.starting[new])
            model.options(num_replicas=1).deploy()
            wait_until(lambda: len(store.snapshot(NAME)[2]) == 1, TIMEOUT_S, "the second replica to be gone")
    return starts


def bare_celery_starts(url: str, work_dir: Path, count: int) -> list[float]:
    """Seconds from ``Popen`` to ``worker_ready`` of ``count`` bare Celery workers."""
    script = work_dir / "bare_worker.py"
    script.write_text(BARE_WORKER)
    client = redis.Redis.from_url(url)
    starts = []
    for index in range(count):
        key = f"bench_start.bare.{index}"
        started = time.perf_counter()
        with Child(f"bare celery worker {index}", [sys.executable, str(script), url, key],
                   work_dir / f"bare-{index}.log") as worker:
            while not client.exists(key):
                worker.check_alive()
                if time.perf_counter() - started > TIMEOUT_S:
                    raise RuntimeError(f"the bare Celery worker did not start within {TIMEOUT_S:.0f}s")
                time.sleep(POLL_S)
            starts.append(time.perf_counter() - started)
    return starts


def row(label: str, values: list[float]) -> list[str]:
    ordered = sorted(values)
    return [label, str(len(values)), f"{statistics.median(ordered) * 1000:.0f}",
            f"{ordered[0] * 1000:.0f}", f"{ordered[-1] * 1000:.0f}"]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def run(args: argparse.Namespace, work_dir: Path) -> None:
    results: dict[str, list[float]] = {}
    warmups: dict[str, float] = {}
    for label, forkserver in (("fork server", True), ("plain spawn", False)):
        setup_dir = work_dir / label.replace(" ", "-")
        setup_dir.mkdir()
        with start_cluster(setup_dir, forkserver) as local, deleted_on_exit([NAME]):
            if forkserver:
                print_head(local.url, command_line("bench_start"))
            store = taskserve.connect(local.url)
            starts = replica_starts(store, args.starts)
            warmups[label], results[label] = starts[0], starts[1:]
            print(f"  {label}: warm-up {starts[0] * 1000:.0f} ms, then "
                  + ", ".join(f"{s * 1000:.0f}" for s in starts[1:]) + " ms", flush=True)
            if forkserver:
                results["bare Celery worker"] = bare_celery_starts(local.url, setup_dir, args.starts)
                print("  bare Celery worker: " + ", ".join(f"{s * 1000:.0f}" for s in results["bare Celery worker"])
                      + " ms", flush=True)
    print(f"\nspawn -> RUNNING of a trivial replica, {args.starts} starts each (after one warm-up)\n")
    print(markdown_table(["start", "n", "p50 ms", "min ms", "max ms"],
                         [row(label, values) for label, values in results.items()]))
    fork = statistics.median(results["fork server"])
    plain = statistics.median(results["plain spawn"])
    bare = statistics.median(results["bare Celery worker"])
    print()
    print(markdown_table(["measure", "value"], [
        ["warm-up start, fork server, ms", f"{warmups['fork server'] * 1000:.0f}"],
        ["warm-up start, plain spawn, ms", f"{warmups['plain spawn'] * 1000:.0f}"],
        [f"fork server p50 <= {TARGET_S * 1000:.0f} ms", f"{fork * 1000:.0f} {verdict(fork <= TARGET_S)}"],
        [f"fork server / bare Celery (p50, target <= {TARGET_RATIO})",
         f"{fork / bare:.2f} {verdict(fork / bare <= TARGET_RATIO)}"],
        ["fork server / plain spawn (p50)", f"{fork / plain:.2f}"],
        ["plain spawn / bare Celery (p50)", f"{plain / bare:.2f}"],
    ]))
    print(f"\nload:     {load_average()} (1/5/15 min) at the end")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Replica start: fork server, plain spawn, bare Celery worker.")
    parser.add_argument("--starts", type=int, default=10, help="timed starts of each kind (default: 10)")
    args = parser.parse_args(argv)
    if args.starts < 1:
        parser.error(f"--starts must be at least 1, not {args.starts}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: run(args, work_dir), "bench_start-")


if __name__ == "__main__":
    sys.exit(main())
