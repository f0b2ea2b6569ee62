"""Autoscaling: how fast a backlog grows the pool, how fast a deployment wakes from zero,
and what autoscaling costs an idle controller.

What it measures
----------------
Everything runs on this machine: an embedded Redis (no persistence), a controller
with its default ``--resync`` (1 s) and one node agent offering 8 CPUs, all started by
the script. Deployments are of a class whose ``__call__(seconds)`` sleeps that long and
returns its pid (``num_cpus=0.5``).

* **backlog**: an autoscaled deployment (``min_replicas=1``, ``max_replicas=4``,
  ``target_ongoing_requests=1``, ``upscale_delay_s=0.5``) running one replica gets a
  backlog of ``--backlog`` (default 40) requests of ``--seconds`` (default 1) each,
  pushed at once through a handle. Timed from the push: when the controller decided
  the new target (its ``changed_at``), when ``max_replicas`` replicas were RUNNING, and
  when the last answer came back (the **drain**). The drain is set against one
  replica's: a fixed 1-replica deployment drains ``--baseline-backlog`` (default 8)
  requests pushed at once, and that time scaled to the backlog is what one replica
  would take (the computed ``backlog * seconds`` is printed beside it).
* **from zero**: an autoscaled deployment with ``min_replicas=0`` (``downscale_delay_s=1``)
  is left idle until it has no replica, then gets one request, ``--zero-trials`` times
  (default 3). Timed from the call: when the controller decided to wake it (its
  ``changed_at``) and when the answer came back.
* **idle controller**: the CPU time (user + system, psutil) of the controller process
  over ``--idle-s`` seconds (default 10) while nothing happens, with no deployment, with
  ``--idle-deployments`` (default 10) fixed 1-replica deployments, with the same
  deployments autoscaled at one replica each (``min_replicas=1``), and autoscaled at zero
  (``min_replicas=0``, no replica). The replicas stay the same processes from the fixed
  to the autoscaled setup: only the controller's work changes.

How to read it
--------------
``drain / one replica's`` (lower is better; target <= 0.35): 4 replicas at best drain
in a quarter of one replica's time; what they lose is the upscale delay, the controller's
sampling and the replicas' start. ``controller decided after`` shows the first two
(at best the 0.5 s delay, at worst a quarter of it more, since between passes the
controller looks at the queues every ``upscale_delay_s / 4``); ``max_replicas RUNNING
after`` all three. ``controller woke after`` is how long a request for a deployment at
zero waits before the controller starts a replica (it looks at the queues of deployments
at zero every 0.1 s between passes); the first answer adds a replica's cold start. The
idle CPU figures are milliseconds of CPU per second (1000 = one core): autoscaled
deployments should cost the controller about what fixed ones do; the looks at their
queues (one Redis command for all, 8 or 10 a second here) should not show.

Usage, from the repository root::

    python -m benchmarks.bench_autoscale [--backlog 40] [--seconds 1] [--baseline-backlog 8]
                                         [--zero-trials 3] [--idle-deployments 10] [--idle-s 10]

A smoke run (about a minute; the figures mean little)::

    python -m benchmarks.bench_autoscale --smoke

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path printed)
only when it fails. The cluster plumbing and the report helpers come from
:mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import taskserve
from benchmarks.common import (
    bench_main,
    cluster,
    command_line,
    cpu_seconds,
    deleted_on_exit,
    load_average,
    markdown_table,
    print_head,
    wait_until,
)
from taskserve.store import Store

BACKLOG_NAME = "bench_autoscale"
BASELINE_NAME = "bench_autoscale_one"
ZERO_NAME = "bench_autoscale_zero"
IDLE_PREFIX = "bench_idle_"
AGENT_NUM_CPUS = 8
NUM_CPUS = 0.5
MAX_REPLICAS = 4
UPSCALE_DELAY_S = 0.5
DRAIN_RATIO_TARGET = 0.35
DEPLOY_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 120.0
POLL_S = 0.02


class Sleeper:
    """Serves a request in ``seconds``; answers with its pid."""

    def __call__(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()


# --------------------------------------------------------------------------- reading the cluster


def running_count(store: Store, name: str) -> int:
    """Replicas of ``name`` that are RUNNING and told to run."""
    _, _, replicas = store.snapshot(name)
    return sum(1 for r in replicas if r.state.value == "RUNNING" and r.desired == "run")


def replica_count(store: Store, name: str) -> int:
    """Replica records of ``name``, whatever their state."""
    _, _, replicas = store.snapshot(name)
    return len(replicas)


def autoscale_config(min_replicas: int, max_replicas: int, downscale_delay_s: float) -> dict:
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": 1,
            "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": downscale_delay_s}


# --------------------------------------------------------------------------- backlog


@dataclass(frozen=True)
class Backlog:
    """What the backlog run measured (seconds from the push)."""

    sent: int
    answered: int
    decided_s: float
    all_running_s: Optional[float]      # None: the backlog drained first
    drain_s: float
    pids: int


def one_replica_drain(store: Store, requests: int, seconds: float) -> float:
    """Seconds a fixed 1-replica deployment takes to drain ``requests`` pushed at once."""
    model = taskserve.deployment(Sleeper).options(name=BASELINE_NAME, num_replicas=1, num_cpus=NUM_CPUS)
    model.deploy(timeout=DEPLOY_TIMEOUT_S)
    handle = model.get_handle()
    handle.remote(0.0).result(timeout=60)           # warm
    started = time.monotonic()
    responses = [handle.remote(seconds) for _ in range(requests)]
    for response in responses:
        response.result(timeout=60 + requests * seconds * 2)
    elapsed = time.monotonic() - started
    model.delete(timeout=DEPLOY_TIMEOUT_S)
    return elapsed


def run_backlog(store: Store, requests: int, seconds: float) -> Backlog:
    """Push the backlog on one replica; time the decision, the pool and the drain."""
    config = autoscale_config(1, MAX_REPLICAS, 60)
    model = taskserve.deployment(Sleeper).options(name=BACKLOG_NAME, num_cpus=NUM_CPUS, autoscaling_config=config)
    model.deploy(timeout=DEPLOY_TIMEOUT_S)
    handle = model.get_handle()
    handle.remote(0.0).result(timeout=60)
    if running_count(store, BACKLOG_NAME) != 1:
        raise RuntimeError("the backlog deployment does not run exactly 1 replica before the backlog")
    pushed_at_wall = time.time()
    started = time.monotonic()
    responses = [handle.remote(seconds) for _ in range(requests)]
    all_running_s = None
    while all_running_s is None and sum(store.deployment_loads([BACKLOG_NAME])[BACKLOG_NAME]) > 0:
        if running_count(store, BACKLOG_NAME) >= MAX_REPLICAS:
            all_running_s = time.monotonic() - started
        else:
            time.sleep(POLL_S)
    pids = {response.result(timeout=60 + requests * seconds * 2) for response in responses}
    drain_s = time.monotonic() - started
    state = store.autoscale_state(BACKLOG_NAME)
    history = [e for e in store.history(BACKLOG_NAME) if e["action"] == "autoscale" and e["at"] >= pushed_at_wall]
    decided_s = history[0]["at"] - pushed_at_wall if history else float("nan")
    if state is None or state.target != MAX_REPLICAS:
        raise RuntimeError(f"the backlog did not bring the target to {MAX_REPLICAS}: {state}")
    model.delete(timeout=DEPLOY_TIMEOUT_S)
    return Backlog(requests, len(responses), decided_s, all_running_s, drain_s, len(pids))


# --------------------------------------------------------------------------- from zero


@dataclass(frozen=True)
class Wake:
    woke_s: float       # the controller decided to start a replica
    answer_s: float     # the answer came back


def run_from_zero(store: Store, trials: int) -> list[Wake]:
    """``trials`` times: wait for no replica, send one request, time the wake and the answer."""
    config = autoscale_config(0, 1, 1)
    model = taskserve.deployment(Sleeper).options(name=ZERO_NAME, num_cpus=NUM_CPUS, autoscaling_config=config)
    model.deploy(timeout=DEPLOY_TIMEOUT_S)
    handle = model.get_handle()
    wakes = []
    for _ in range(trials):
        wait_until(lambda: replica_count(store, ZERO_NAME) == 0, SETTLE_TIMEOUT_S, "no replica of the idle deployment")
        time.sleep(0.5)             # a quiet moment: the controller is between passes
        sent_at_wall = time.time()
        started = time.monotonic()
        handle.remote(0.0).result(timeout=120)
        answer_s = time.monotonic() - started
        lines = [e for e in store.history(ZERO_NAME) if e["action"] == "autoscale" and e["at"] >= sent_at_wall]
        woke_s = lines[0]["at"] - sent_at_wall if lines else float("nan")
        wakes.append(Wake(woke_s, answer_s))
        print(f"  from zero: controller woke after {woke_s:.3f} s, answer after {answer_s:.3f} s", flush=True)
    model.delete(timeout=DEPLOY_TIMEOUT_S)
    return wakes


# --------------------------------------------------------------------------- idle controller


def idle_cpu(controller_pid: int, seconds: float) -> float:
    """The controller's CPU milliseconds per second over ``seconds`` of quiet."""
    before = cpu_seconds([controller_pid])
    time.sleep(seconds)
    return (cpu_seconds([controller_pid]) - before) * 1000 / seconds


def run_idle(store: Store, controller_pid: int, count: int, seconds: float) -> list[tuple[str, float]]:
    """Idle controller CPU with no deployment, ``count`` fixed ones, autoscaled ones, at zero."""
    results = [("no deployment", idle_cpu(controller_pid, seconds))]
    print(f"  idle: {results[-1][0]}: {results[-1][1]:.2f} ms/s", flush=True)
    names = [f"{IDLE_PREFIX}{i}" for i in range(count)]
    base = taskserve.deployment(Sleeper).options(num_cpus=NUM_CPUS, version="1")
    models = [base.options(name=name, num_replicas=1) for name in names]
    for model in models:
        model.deploy(timeout=DEPLOY_TIMEOUT_S)
    setups = [
        (f"{count} fixed, 1 replica each", None),
        (f"{count} autoscaled, 1 replica each", autoscale_config(1, 2, 1)),
        (f"{count} autoscaled, at zero", autoscale_config(0, 2, 1)),
    ]
    for label, config in setups:
        if config is not None:
            models = [model.options(autoscaling_config=config) for model in models]
            for model in models:
                model.deploy(timeout=DEPLOY_TIMEOUT_S)
        replicas = config["min_replicas"] if config else 1
        wait_until(lambda r=replicas: all(replica_count(store, n) == r and running_count(store, n) == r
                                          for n in names), SETTLE_TIMEOUT_S, f"{label}: settled")
        time.sleep(2)               # the last drains and health writes are over
        results.append((label, idle_cpu(controller_pid, seconds)))
        print(f"  idle: {label}: {results[-1][1]:.2f} ms/s", flush=True)
    for model in models:
        model.delete(timeout=DEPLOY_TIMEOUT_S)
    return results


# --------------------------------------------------------------------------- report


def verdict(ratio: float, ok: bool) -> str:
    return f"{ratio:.3f} {'ok' if ok else 'MISS'}"


def report(args: argparse.Namespace, backlog: Backlog, baseline_s: float, wakes: list[Wake],
           idle: list[tuple[str, float]]) -> None:
    one_replica_s = baseline_s / args.baseline_backlog * args.backlog
    ratio = backlog.drain_s / one_replica_s
    woke = statistics.median(w.woke_s for w in wakes)
    answered = statistics.median(w.answer_s for w in wakes)
    all_running = "not reached" if backlog.all_running_s is None else f"{backlog.all_running_s:.2f}"
    print(f"\nbacklog of {args.backlog} requests of {args.seconds:g} s on 1 replica, max_replicas={MAX_REPLICAS}, "
          f"upscale_delay_s={UPSCALE_DELAY_S}; {len(wakes)} wake(s) from zero; idle windows of {args.idle_s:g} s "
          f"(CPU time is counted in 10 ms ticks: +-{10 / args.idle_s:.1f} ms/s); "
          f"load {load_average()} (1/5/15 min) at the end\n")
    rows = [
        ["requests sent", str(backlog.sent)],
        ["requests answered", str(backlog.answered)],
        ["replica pids that answered", str(backlog.pids)],
        ["controller decided after, s", f"{backlog.decided_s:.2f}"],
        ["max_replicas RUNNING after, s", all_running],
        ["drain, s", f"{backlog.drain_s:.2f}"],
        ["one replica's drain (measured), s",
         f"{one_replica_s:.2f} ({args.baseline_backlog} requests in {baseline_s:.2f} s, scaled)"],
        ["one replica's drain (computed), s", f"{args.backlog * args.seconds:.2f}"],
        [f"drain / one replica's (target <= {DRAIN_RATIO_TARGET:.2f})", verdict(ratio, ratio <= DRAIN_RATIO_TARGET)],
        ["drain / computed one replica's", f"{backlog.drain_s / (args.backlog * args.seconds):.3f}"],
        ["controller woke after, s (p50)", f"{woke:.3f}"],
        ["first answer from zero, s (p50)", f"{answered:.2f}"],
    ]
    print(markdown_table(["measure", "value"], rows))
    print()
    print(markdown_table(["setup", "controller CPU ms/s", "controller CPU %"],
                         [[label, f"{ms:.2f}", f"{ms / 10:.3f}"] for label, ms in idle]))


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Autoscaling: backlog, wake from zero, idle controller CPU.")
    parser.add_argument("--backlog", type=int, default=40, help="requests pushed at once (default: 40)")
    parser.add_argument("--seconds", type=float, default=1.0, help="each request's duration (default: 1)")
    parser.add_argument("--baseline-backlog", type=int, default=8,
                        help="requests one fixed replica drains, to scale to the backlog (default: 8)")
    parser.add_argument("--zero-trials", type=int, default=3, help="wakes from zero (default: 3)")
    parser.add_argument("--idle-deployments", type=int, default=10, help="deployments for the idle CPU (default: 10)")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of each idle window (default: 10)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks that it runs, figures mean little")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backlog, args.seconds, args.baseline_backlog = 12, 0.5, 2
        args.zero_trials, args.idle_deployments, args.idle_s = 1, 2, 1.0
    if min(args.backlog, args.baseline_backlog, args.zero_trials, args.idle_deployments) < 1 or \
            args.seconds <= 0 or args.idle_s <= 0:
        parser.error("the counts and durations must be positive")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    names = [BACKLOG_NAME, BASELINE_NAME, ZERO_NAME] + [f"{IDLE_PREFIX}{i}" for i in range(args.idle_deployments)]
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None) as local, deleted_on_exit(names):
        print_head(local.url, command_line("bench_autoscale"))
        store = taskserve.connect(local.url)
        controller_pid = local.processes["controller"].pid
        baseline_s = one_replica_drain(store, args.baseline_backlog, args.seconds)
        print(f"  one replica: {args.baseline_backlog} requests in {baseline_s:.2f} s", flush=True)
        backlog = run_backlog(store, args.backlog, args.seconds)
        print(f"  backlog: drained in {backlog.drain_s:.2f} s", flush=True)
        wakes = run_from_zero(store, args.zero_trials)
        idle = run_idle(store, controller_pid, args.idle_deployments, args.idle_s)
        report(args, backlog, baseline_s, wakes, idle)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: run(args, work_dir), "bench_autoscale-")


if __name__ == "__main__":
    sys.exit(main())
