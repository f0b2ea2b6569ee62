"""Thread limits: throughput of a numpy deployment with 1 vs 2 BLAS threads per replica.

What it measures
----------------
Everything runs on this machine: an embedded Redis (no persistence), a controller
and one node agent, started by the script. The agent runs without any
``*_NUM_THREADS`` variable, so replicas get taskserve's default of 1 (docs/reference.md, Resources),
and it offers ``--num-cpus`` (default 8, more than the machine has) so that the
three deployments below fit side by side: this measures what happens when more
BLAS threads than cores run, which is what the reservations are meant to avoid.

The deployment multiplies two ``--size`` x ``--size`` float64 matrices (default
512) ``reps`` times per request and returns the wall and process CPU time it
spent. ``reps`` is calibrated at the start so that one request takes about
``--target-ms`` (default 100 ms) on one thread. Three deployments of it:

* ``omp1 x2``: 2 replicas, the default ``OMP_NUM_THREADS=1`` (and friends);
* ``omp2 x2``: 2 replicas with ``runtime_env={"env_vars": {"OMP_NUM_THREADS": "2",
  "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}``: 4 BLAS threads on the
  2 cores, oversubscribed;
* ``omp2 x1``: 1 replica with the same 2 threads, for reference (2 threads on 2
  cores, no oversubscription).

Inside each replica ``threadpoolctl.threadpool_info()`` reports the BLAS pool's
thread count; the script checks it against the configuration and prints it.

Throughput: ``--requests`` (default 40) requests are enqueued at once through a
handle and all results collected (so every replica always has work);
requests/s is the count over the time from the first enqueue to the last
result. The deployments take turns in ``--rounds`` (default 5) rounds, in a
rotated order each round, so a background load that comes and goes hits all of
them; figures pool all rounds.

How to read it
--------------
``omp1 x2 / omp2 x2`` is the throughput ratio of the default over the
oversubscribed setup, same replicas, same cores: above 1.0 means the default
limit of 1 thread per replica is faster when replicas share a machine — each
replica's threads otherwise compete for the cores the other replica uses. The
``compute ms/req`` column is the time a request spent in the matrix products
inside the replica, ``CPU ms/req`` the CPU all that replica's threads burned for
it: oversubscription shows as more CPU for the same work (threads spinning and
waiting for each other). ``omp2 x1`` shows what 2 threads give when they have
the cores to themselves. The machine may run other things: compare the ratios,
and the per-round figures for how noisy a run was.

Usage, from the repository root::

    python -m benchmarks.bench_threads [--num-cpus 8] [--size 512] [--target-ms 100] [--requests 40] [--rounds 5]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_threads --size 64 --target-ms 5 --requests 4 --rounds 1

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path
printed) only when it fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy

import taskserve
from benchmarks.common import bench_main, cluster, deleted_on_exit, load_average, markdown_table, print_head

RESULT_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 300.0
CONFIRM_TIMEOUT_S = 60.0
TWO_THREADS = {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


class MatMul:
    """The benchmark's model: products of two fixed random matrices."""

    def __init__(self, size: int) -> None:
        import numpy as np

        rng = np.random.default_rng(0)
        self.a = rng.random((size, size))
        self.b = rng.random((size, size))
        self.a @ self.b  # the BLAS pool starts here, not in the first request

    def __call__(self, reps: int) -> list:
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            self.a @ self.b
        return [time.perf_counter() - started, time.process_time() - cpu]

    def blas(self) -> dict:
        from threadpoolctl import threadpool_info

        pools = [{"api": p["internal_api"], "threads": p["num_threads"]} for p in threadpool_info()
                 if p.get("user_api") == "blas"]
        return {"pid": os.getpid(), "pools": pools, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}


@dataclass(frozen=True)
class Setup:
    name: str
    replicas: int
    threads: int

    @property
    def env_vars(self) -> Optional[dict[str, str]]:
        return TWO_THREADS if self.threads == 2 else None

    def deployment(self, size: int) -> taskserve.Deployment:
        runtime_env = {"env_vars": self.env_vars} if self.env_vars else None
        return taskserve.deployment(MatMul).options(
            name=self.name.replace(" ", "_"), num_replicas=self.replicas, num_cpus=1, version="1",
            runtime_env=runtime_env, init_kwargs={"size": size})


SETUPS = [Setup("omp1 x2", 2, 1), Setup("omp2 x2", 2, 2), Setup("omp2 x1", 1, 2)]


@dataclass
class Figures:
    """What the rounds of one setup added up to."""

    requests: int = 0
    seconds: float = 0.0
    compute_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    rounds_rps: list[float] = field(default_factory=list)
    blas: list[dict] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


# --------------------------------------------------------------------------- measuring


def blas_of_every_replica(deployment: taskserve.Deployment) -> list[dict]:
    """``blas()`` of each RUNNING replica: calls in bursts until every pid answered."""
    pids = {r.pid for r in deployment.status().replicas if r.state == "RUNNING"}
    handle = deployment.get_handle()
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + CONFIRM_TIMEOUT_S
    while not pids <= set(seen):
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas {sorted(pids - set(seen))} never answered blas()")
        for response in [handle.blas.remote() for _ in range(4 * len(pids))]:
            info = response.result(timeout=RESULT_TIMEOUT_S)
            seen[info["pid"]] = info
    return [seen[pid] for pid in sorted(pids)]


def check_threads(setup: Setup, infos: list[dict]) -> None:
    for info in infos:
        counts = {pool["threads"] for pool in info["pools"]}
        if counts != {setup.threads}:
            raise AssertionError(f"{setup.name}: replica {info['pid']} runs BLAS pools {info['pools']}, "
                                 f"expected {setup.threads} threads")


def calibrate(deployment: taskserve.Deployment, target_s: float) -> tuple[int, float]:
    """Products per request for ``target_s`` on one thread; also the seconds per product."""
    handle = deployment.get_handle()
    probe = 8
    per_product = statistics.median(
        handle.remote(probe).result(timeout=RESULT_TIMEOUT_S)[0] / probe for _ in range(5))
    return max(1, round(target_s / per_product)), per_product


def run_round(deployment: taskserve.Deployment, requests: int, reps: int, figures: Figures) -> float:
    """Enqueue ``requests`` at once, collect them all; the round's requests/s."""
    handle = deployment.get_handle()
    started = time.perf_counter()
    responses = [handle.remote(reps) for _ in range(requests)]
    answers = [response.result(timeout=RESULT_TIMEOUT_S) for response in responses]
    elapsed = time.perf_counter() - started
    figures.requests += requests
    figures.seconds += elapsed
    figures.compute_s += [answer[0] for answer in answers]
    figures.cpu_s += [answer[1] for answer in answers]
    figures.rounds_rps.append(requests / elapsed)
    return requests / elapsed


def measure(deployments: dict[Setup, taskserve.Deployment], requests: int, rounds: int, reps: int,
            figures: dict[Setup, Figures]) -> None:
    setups = list(deployments)
    for setup in setups:   # warm-up: every replica has served a full request
        run_round(deployments[setup], 2 * setup.replicas, reps, Figures())
    for number in range(rounds):
        order = setups[number % len(setups):] + setups[:number % len(setups)]
        line = [f"{setup.name} {run_round(deployments[setup], requests, reps, figures[setup]):.2f}" for setup in order]
        print(f"  round {number + 1}/{rounds} (req/s): " + " | ".join(line), flush=True)


# --------------------------------------------------------------------------- report


def report(figures: dict[Setup, Figures], size: int, reps: int, per_product_s: float, requests: int,
           rounds: int) -> None:
    print(f"\n{size}x{size} float64, {reps} products per request ({per_product_s * 1000:.2f} ms each on one "
          f"thread), {requests} requests per round, {rounds} rounds; load {load_average()} (1/5/15 min) at the end\n")
    rows = []
    for setup, f in figures.items():
        blas = ", ".join(sorted({f"{p['api']}={p['threads']}" for info in f.blas for p in info["pools"]}))
        env = f.blas[0]["OMP_NUM_THREADS"] if f.blas else "?"
        rows.append([setup.name, str(setup.replicas), env, blas, f"{f.rps:.2f}",
                     f"{statistics.mean(f.compute_s) * 1000:.0f}", f"{statistics.mean(f.cpu_s) * 1000:.0f}",
                     " / ".join(f"{r:.2f}" for r in f.rounds_rps)])
    print(markdown_table(["setup", "replicas", "OMP_NUM_THREADS", "BLAS pool (threadpoolctl)", "req/s",
                          "compute ms/req", "CPU ms/req", "req/s per round"], rows))
    by_name = {setup.name: f for setup, f in figures.items()}
    print()
    print(markdown_table(["ratio", "value"], [
        ["throughput omp1 x2 / omp2 x2 (the default over oversubscribed)",
         f"{by_name['omp1 x2'].rps / by_name['omp2 x2'].rps:.3f}"],
        ["throughput omp1 x2 / omp2 x1", f"{by_name['omp1 x2'].rps / by_name['omp2 x1'].rps:.3f}"],
        ["CPU per request omp2 x2 / omp1 x2",
         f"{statistics.mean(by_name['omp2 x2'].cpu_s) / statistics.mean(by_name['omp1 x2'].cpu_s):.3f}"],
    ], left=1))
    for setup, f in figures.items():
        for info in f.blas:
            print(f"  {setup.name}: replica pid {info['pid']}: OMP_NUM_THREADS={info['OMP_NUM_THREADS']} "
                  f"OPENBLAS_NUM_THREADS={info['OPENBLAS_NUM_THREADS']}, threadpool_info: {info['pools']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-cpus", type=float, default=8, help="CPUs the agent offers (default: 8)")
    parser.add_argument("--size", type=int, default=512, help="matrix side (default: 512)")
    parser.add_argument("--target-ms", type=float, default=100, help="one request on one thread (default: 100)")
    parser.add_argument("--requests", type=int, default=40, help="requests per setup and round (default: 40)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default: 5)")
    args = parser.parse_args(argv)
    if min(args.size, args.requests, args.rounds) < 1 or args.target_ms <= 0:
        parser.error("--size, --target-ms, --requests and --rounds must be positive")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    names = [setup.name.replace(" ", "_") for setup in SETUPS]
    with cluster(work_dir, num_cpus=args.num_cpus) as local, deleted_on_exit(names):
        print_head(local.url, f"agent:    --num-cpus {args.num_cpus:g}, no *_NUM_THREADS in its environment; "
                   f"logs in {work_dir}", extra={"numpy": numpy.__version__})
        deployments = {setup: setup.deployment(args.size) for setup in SETUPS}
        figures = {setup: Figures() for setup in SETUPS}
        for setup, deployment in deployments.items():
            deployment.deploy(timeout=DEPLOY_TIMEOUT_S)
            figures[setup].blas = blas_of_every_replica(deployment)
            check_threads(setup, figures[setup].blas)
        reps, per_product = calibrate(deployments[SETUPS[0]], args.target_ms / 1000)
        print(f"calibrated: {reps} products of {args.size}x{args.size} per request "
              f"({per_product * 1000:.2f} ms each on one thread)", flush=True)
        measure(deployments, args.requests, args.rounds, reps, figures)
    report(figures, args.size, reps, per_product, args.requests, args.rounds)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return bench_main(lambda work_dir: run(args, work_dir), "bench_threads-")


if __name__ == "__main__":
    sys.exit(main())
