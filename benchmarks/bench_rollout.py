"""Rollouts: how long deploy() takes when nothing changes, when one replica starts,
and when 10 replicas roll to a new version under load — and whether a request fails.

What it measures
----------------
Everything runs on this machine: an embedded Redis (no persistence), a controller
(``--resync 0.5``) and one node agent offering ``--num-cpus`` (default 16) CPUs,
all started by the script. The deployment is a class whose ``__call__(i)`` sleeps
``--work-ms`` (default 20 ms, standing for a model's work) and returns
``[i, os.getpid()]``; every replica reserves ``num_cpus=0.1``.

a. **no-op deploy**: ``deploy()`` of ``version="v1"`` with 10 replicas (``--replicas``), then the
   same ``deploy()`` again ``--noops`` times (default 20), each timed. docs/reference.md, Updates
   says that returns at once and restarts nothing; the replica pids are compared
   before and after. Reported as p50 and max in milliseconds.
b. **one replica start**: ``deploy()`` of a fresh 1-replica deployment (from
   nothing: a new name each time, deleted afterwards), timed until ``deploy()``
   returns, i.e. until the replica is RUNNING and the controller reported the
   rollout done; p50 of ``--starts`` (default 3). Measured while the 10 idle
   replicas of (a) run, as during the rollouts. For reference it also times 2
   replicas starting together the same way (what one rollout batch starts),
   and 2 together while the request load of (d) runs against the 10 replicas.
c. **rollout of 10 replicas** to a new version, timed until ``deploy()`` returns:
   stop-first (the default ``max_surge=0``, ``max_unavailable=0.2``: batches of
   2) and with ``max_surge=2`` (2 new replicas start before 2 old ones stop),
   ``--rounds`` times each (default 2), alternating. Each time is also given as a
   multiple of the one-replica start time (b). Both strategies replace 2
   replicas at a time, so 5 batches: on a machine with cores to spare a batch
   costs about one replica start (multiple near 5); on 2 cores two processes
   starting together share them, so compare with 5 x the two-replica start.
   From the same 20 ms samples: ``start in rollout s``, the mean time a new
   replica took from PENDING/STARTING to RUNNING during the rollout (under the
   request load, next to replicas draining); ``gaps s``, the time no replica
   was starting before the last one started (time lost between batches, should
   be near 0); ``tail s``, from the last replica seen starting to ``deploy()``
   returning (the last start, then waiting for the last old replicas to exit).
d. **requests during each rollout**: ``--clients`` threads (default 3) send
   requests one after another through one handle from before the rollout
   starts until it is done; every request must be answered (``failed`` must be
   0). A sampler reads ``status()`` every 20 ms and counts RUNNING replicas:
   the minimum seen must be at least ``10 - floor(0.2 * 10) = 8`` stop-first
   (docs/reference.md, Updates), and should stay at 10 with ``max_surge=2`` while the node has
   room (the maximum is then up to 12).

How to read it
--------------
The no-op deploy is a client-side comparison (pickle the class, hash the spec,
one Redis transaction): a few milliseconds. The rollout multiples are the
figures to compare across machines; the absolute seconds depend on how fast
this machine starts a Python process that imports Celery. The request columns
show the cost of a rollout to callers: failures (must be 0), answered requests,
and the slowest round trip seen (a request waits in the queue while the
replicas that could take it are busy, starting or draining).

Usage, from the repository root::

    python -m benchmarks.bench_rollout [--num-cpus 16] [--noops 20] [--starts 3]
                                       [--rounds 2] [--clients 3] [--work-ms 20] [--replicas 10]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_rollout --noops 2 --starts 1 --rounds 1 --clients 1 --work-ms 5 --replicas 2

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path
printed) only when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import taskserve
from benchmarks.common import (
    bench_main,
    cluster,
    deleted_on_exit,
    load_average,
    markdown_table,
    print_head,
    wait_until,
)

NAME = "bench_rollout"
START_PREFIX = "bench_start"
REPLICAS = 10
NUM_CPUS = 0.1
RESULT_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 300.0
SAMPLE_INTERVAL_S = 0.02
WORK_S = 0.02  # set from --work-ms before anything is deployed


class Versioned:
    """The benchmark's model: a little work, then the request number and the pid."""

    def __init__(self, work_s: float) -> None:
        self.work_s = work_s

    def __call__(self, i: int) -> list:
        time.sleep(self.work_s)    # stands for the model's work; not synchronisation
        return [i, os.getpid()]


def model(name: str, replicas: int, version: str, max_surge: int = 0) -> taskserve.Deployment:
    return taskserve.deployment(Versioned).options(
        name=name, num_replicas=replicas, version=version, num_cpus=NUM_CPUS, max_surge=max_surge,
        init_kwargs={"work_s": WORK_S})


def running_pids(deployment: taskserve.Deployment) -> set[int]:
    return {r.pid for r in deployment.status().replicas if r.state == "RUNNING" and r.pid}


# --------------------------------------------------------------------------- (a), (b)


@dataclass(frozen=True)
class NoopResult:
    times_s: list[float]
    pids_unchanged: bool


def measure_noop(deployment: taskserve.Deployment, count: int, replicas: int) -> NoopResult:
    """Time ``count`` repeated deploys of what already runs (``replicas`` replicas)."""
    before = running_pids(deployment)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        deployment.deploy(timeout=DEPLOY_TIMEOUT_S)
        times.append(time.perf_counter() - started)
    return NoopResult(times, running_pids(deployment) == before and len(before) == replicas)


def measure_start(name: str, replicas: int, load_clients: int = 0) -> float:
    """Deploy ``replicas`` replicas from nothing; seconds until deploy() returned.

    With ``load_clients``, that many threads call the deployment of (a)
    meanwhile, as during a rollout. The deployment is deleted afterwards (not timed).
    """
    deployment = model(name, replicas, "v1")
    with contextlib.ExitStack() as stack:
        if load_clients:
            load = stack.enter_context(Load(taskserve.get_deployment(NAME).get_handle(), load_clients))
            wait_until(lambda: all(r.answered or r.failed for r in load.results), 30, "every client to get an answer")
        started = time.perf_counter()
        deployment.deploy(timeout=DEPLOY_TIMEOUT_S)
        elapsed = time.perf_counter() - started
    if load_clients and load.total().failed:
        raise AssertionError(f"requests failed while {name} started: {load.total().errors[:3]}")
    answer = deployment.get_handle().remote(7).result(timeout=RESULT_TIMEOUT_S)
    if answer[0] != 7:
        raise AssertionError(f"deployment {name} answered {answer!r}")
    deployment.delete(timeout=DEPLOY_TIMEOUT_S)
    return elapsed


@dataclass(frozen=True)
class StartCase:
    label: str
    replicas: int
    loaded: bool


START_CASES = [StartCase("one replica", 1, False), StartCase("2 replicas together", 2, False),
               StartCase("2 replicas together, under load", 2, True)]


def measure_starts(count: int, clients: int) -> dict[StartCase, list[float]]:
    """``count`` timed starts of each :data:`START_CASES`, printed as they come."""
    starts = {}
    for n, case in enumerate(START_CASES):
        starts[case] = [measure_start(f"{START_PREFIX}{n}-{i}", case.replicas, clients if case.loaded else 0)
                        for i in range(count)]
        print(f"(b) {case.label} from nothing: {' / '.join(f'{t:.2f}' for t in starts[case])} s", flush=True)
    return starts


# --------------------------------------------------------------------------- (c), (d)


@dataclass
class LoadResult:
    answered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


class Load:
    """``clients`` threads calling the deployment one request after another."""

    def __init__(self, handle: taskserve.DeploymentHandle, clients: int) -> None:
        self.handle = handle
        self.stopping = threading.Event()
        self.results = [LoadResult() for _ in range(clients)]
        self.threads = [threading.Thread(target=self._client, args=(r,), daemon=True) for r in self.results]

    def _client(self, result: LoadResult) -> None:
        i = 0
        while not self.stopping.is_set():
            i += 1
            started = time.perf_counter()
            try:
                answer = self.handle.remote(i).result(timeout=RESULT_TIMEOUT_S)
                if answer[0] != i:
                    raise AssertionError(f"request {i} answered {answer!r}")
            except Exception as error:  # counted and reported, never swallowed
                result.failed += 1
                result.errors.append(f"{type(error).__name__}: {error}")
                continue
            result.latencies_s.append(time.perf_counter() - started)
            result.answered += 1
            result.pids.add(answer[1])

    def answered(self) -> int:
        return sum(r.answered for r in self.results)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(RESULT_TIMEOUT_S + 5)

    def total(self) -> LoadResult:
        total = LoadResult()
        for r in self.results:
            total.answered += r.answered
            total.failed += r.failed
            total.errors += r.errors
            total.latencies_s += r.latencies_s
            total.pids |= r.pids
        return total


class RunningSampler:
    """Samples the deployment's replicas every 20 ms in a thread.

    Per sample it counts RUNNING replicas; across samples it adds up the time
    during which no replica was PENDING or STARTING (``idle_s``; the part before
    the last start is time lost between batches, the rest the wait for the last
    drained replicas), and when each replica was first seen starting and first
    seen RUNNING.
    """

    def __init__(self, deployment: taskserve.Deployment) -> None:
        self.deployment = deployment
        self.samples: list[int] = []
        self.errors: list[str] = []
        self.idle_s = 0.0
        self.idle_before_last_start_s = 0.0
        self.last_starting_at = 0.0
        self.first_starting: dict[str, float] = {}
        self.first_running: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        previous: Optional[tuple[float, bool]] = None
        while not self.stopping.is_set():
            try:
                replicas = self.deployment.status().replicas
            except Exception as error:  # reported with the results
                self.errors.append(f"{type(error).__name__}: {error}")
            else:
                previous = self._record(replicas, previous)
            self.stopping.wait(SAMPLE_INTERVAL_S)

    def _record(self, replicas: list[taskserve.ReplicaInfo],
                previous: Optional[tuple[float, bool]]) -> tuple[float, bool]:
        now = time.perf_counter()
        self.samples.append(sum(1 for r in replicas if r.state == "RUNNING"))
        starting = False
        for r in replicas:
            if r.state in ("PENDING", "STARTING"):
                starting = True
                self.first_starting.setdefault(r.replica_id, now)
            elif r.state == "RUNNING" and r.replica_id in self.first_starting:
                self.first_running.setdefault(r.replica_id, now)
        if previous is not None and not previous[1] and not starting:
            self.idle_s += now - previous[0]
        if starting:
            self.idle_before_last_start_s, self.last_starting_at = self.idle_s, now
        return now, starting

    def start_times(self) -> list[float]:
        """Seconds from first seen PENDING/STARTING to first seen RUNNING, per new replica."""
        return [self.first_running[rid] - at for rid, at in self.first_starting.items() if rid in self.first_running]

    def __enter__(self) -> "RunningSampler":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(10)


@dataclass(frozen=True)
class RolloutResult:
    strategy: str
    version: str
    seconds: float
    load: LoadResult
    min_running: int
    max_running: int
    samples: int
    gaps_s: float               # no replica starting, before the last start
    tail_s: float               # from the last start seen until deploy() returned
    start_times_s: list[float]  # each new replica, starting -> RUNNING
    sampler_errors: list[str]
    all_new: bool


def measure_rollout(version: str, max_surge: int, clients: int, replicas: int) -> RolloutResult:
    """Roll the ``replicas`` replicas to ``version`` under load; time, requests and RUNNING counts."""
    deployment = model(NAME, replicas, version, max_surge)
    old_pids = running_pids(deployment)
    with Load(deployment.get_handle(), clients) as load:
        # The load runs before the rollout starts: every client has been answered.
        wait_until(lambda: all(r.answered or r.failed for r in load.results), 30, "every client to get an answer")
        with RunningSampler(deployment) as sampler:
            started = time.perf_counter()
            deployment.deploy(timeout=DEPLOY_TIMEOUT_S)
            ended = time.perf_counter()
            elapsed = ended - started
        # A few more answers from the new replicas, then stop.
        answered_at_end = load.answered()
        wait_until(lambda: load.answered() >= answered_at_end + clients, 30, "answers after the rollout")
    status = deployment.status()
    new = [r for r in status.replicas if r.state == "RUNNING"]
    all_new = (len(new) == replicas and all(r.version == version for r in new)
               and not ({r.pid for r in new} & old_pids))
    return RolloutResult(
        strategy="stop-first" if max_surge == 0 else f"max_surge={max_surge}",
        version=version, seconds=elapsed, load=load.total(),
        min_running=min(sampler.samples, default=-1), max_running=max(sampler.samples, default=-1),
        samples=len(sampler.samples), gaps_s=sampler.idle_before_last_start_s,
        tail_s=ended - sampler.last_starting_at if sampler.last_starting_at else elapsed,
        start_times_s=sampler.start_times(), sampler_errors=sampler.errors, all_new=all_new)


# --------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(noop: NoopResult, starts: dict[StartCase, list[float]], first_deploy_s: float,
           rollouts: list[RolloutResult], clients: int, replicas: int) -> None:
    start_p50 = statistics.median(starts[START_CASES[0]])
    batch = max(1, math.floor(0.2 * replicas))
    floor = replicas - batch
    batches = math.ceil(replicas / batch)
    print(f"\nload {load_average()} (1/5/15 min) at the end\n")
    rows = [
        [f"first deploy of {replicas} replicas, s", f"{first_deploy_s:.2f}"],
        [f"no-op deploy p50, ms (n={len(noop.times_s)})", ms(statistics.median(noop.times_s))],
        ["no-op deploy max, ms", ms(max(noop.times_s))],
        ["no-op deploys kept every replica pid", "yes" if noop.pids_unchanged else "NO"],
    ]
    for case, times in starts.items():
        rows.append([f"{case.label}: start p50, s (n={len(times)})", f"{statistics.median(times):.2f}"])
        rows.append([f"{case.label}: each start, s", " / ".join(f"{t:.2f}" for t in times)])
    print(markdown_table(["measure", "value"], rows))
    print()
    rows = []
    for r in rollouts:
        bound = floor if r.strategy == "stop-first" else replicas
        latencies = sorted(r.load.latencies_s)
        rows.append([
            r.strategy, r.version, f"{r.seconds:.2f}", f"{r.seconds / start_p50:.1f}x",
            f"{statistics.mean(r.start_times_s):.2f}" if r.start_times_s else "-",
            f"{r.gaps_s:.2f}", f"{r.tail_s:.2f}", str(r.load.answered),
            str(r.load.failed) + ("" if r.load.failed == 0 else " FAIL"),
            ms(latencies[-1]) if latencies else "-",
            f"{r.min_running}" + ("" if r.min_running >= bound else f" < {bound}!"),
            str(r.max_running), str(r.samples), "yes" if r.all_new else "NO",
        ])
    print(markdown_table(["strategy", "to", "rollout s", "x one start", "start in rollout s", "gaps s", "tail s",
                          "answered", "failed",
                          "slowest ms", "min RUNNING", "max RUNNING", "samples", f"{replicas} new RUNNING"], rows))
    for strategy in dict.fromkeys(r.strategy for r in rollouts):
        times = [r.seconds for r in rollouts if r.strategy == strategy]
        median = statistics.median(times)
        print(f"  {strategy}: median {median:.2f} s = {median / start_p50:.1f}x one replica start; "
              + "; ".join(f"{median / statistics.median(times):.1f}x {case.label}"
                          for case, times in list(starts.items())[1:])
              + f" ({batches} batches of {batch})")
    print(f"  {clients} client threads; min RUNNING bound stop-first: {floor}; with surge: {replicas}")
    for r in rollouts:
        for error in sorted(set(r.load.errors))[:5]:
            print(f"  {r.strategy} -> {r.version}: failed request: {error}")
        for error in sorted(set(r.sampler_errors))[:3]:
            print(f"  {r.strategy} -> {r.version}: status() failed: {error}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-cpus", type=float, default=16, help="CPUs the agent offers (default: 16)")
    parser.add_argument("--noops", type=int, default=20, help="no-op deploys timed (default: 20)")
    parser.add_argument("--starts", type=int, default=3, help="starts timed per case (default: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rollouts per strategy (default: 2)")
    parser.add_argument("--clients", type=int, default=3, help="client threads during rollouts (default: 3)")
    parser.add_argument("--work-ms", type=float, default=20.0, help="work per request in ms (default: 20)")
    parser.add_argument("--replicas", type=int, default=REPLICAS,
                        help=f"replicas rolled (default: {REPLICAS}; fewer for a quick smoke run)")
    args = parser.parse_args(argv)
    if min(args.noops, args.starts, args.rounds, args.clients, args.replicas) < 1 or args.work_ms < 0:
        parser.error("--noops, --starts, --rounds, --clients and --replicas must be positive, --work-ms not negative")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    global WORK_S
    WORK_S = args.work_ms / 1000
    names = [NAME] + [f"{START_PREFIX}{n}-{i}" for n in range(len(START_CASES)) for i in range(args.starts)]
    with cluster(work_dir, num_cpus=args.num_cpus) as local, deleted_on_exit(names):
        print_head(local.url, f"agent:    --num-cpus {args.num_cpus:g}; logs in {work_dir}")
        started = time.perf_counter()
        first = model(NAME, args.replicas, "v1")
        first.deploy(timeout=DEPLOY_TIMEOUT_S)
        first_deploy_s = time.perf_counter() - started
        noop = measure_noop(first, args.noops, args.replicas)
        print(f"(a) no-op deploy p50 {ms(statistics.median(noop.times_s))} ms", flush=True)
        starts = measure_starts(args.starts, args.clients)
        rollouts = []
        versions = iter(range(2, 2 + 2 * args.rounds))
        for _ in range(args.rounds):
            for surge in (0, 2):
                result = measure_rollout(f"v{next(versions)}", surge, args.clients, args.replicas)
                print(f"(c) {result.strategy} -> {result.version}: {result.seconds:.2f} s, "
                      f"{result.load.answered} answered, {result.load.failed} failed, "
                      f"RUNNING min {result.min_running} max {result.max_running}", flush=True)
                rollouts.append(result)
    report(noop, starts, first_deploy_s, rollouts, args.clients, args.replicas)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return bench_main(lambda work_dir: run(args, work_dir), "bench_rollout-")


if __name__ == "__main__":
    sys.exit(main())
