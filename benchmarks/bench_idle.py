"""An idle cluster: the CPU every process of ``taskserve up`` uses while nothing happens.

What it measures
----------------
Everything runs on this machine, started as ``taskserve up`` starts it: an embedded Redis
(no persistence), a controller and one node agent with their default timings, and an HTTP
gateway. Two windows, in the same run:

* **empty** (the baseline): the cluster with no deployment, for ``--baseline-seconds``
  (default 10): what Redis, the controller, the agent and the gateway cost by themselves;
* **N replicas**: a trivial deployment (``__call__`` returns its argument) with
  ``--replicas`` (default 10) replicas, each answering one request first; once all are
  ``RUNNING`` and ``--settle`` seconds (default 3) have passed, for ``--seconds``
  (default 30).

For each process the user plus system CPU time over the window (psutil), as a percentage
of one core, and its wake-ups per second: voluntary context switches of all its threads
(``/proc/PID/task/*/status``; "-" where there is no /proc), which is what each timer of a
loop adds even when it finds nothing to do. The agent's fork server is reported on its
own line; the replicas together and as a mean per replica.

How to read it
--------------
The target is the whole cluster with 10 replicas and its gateway under 1% of a core
(``total < 1%``). ``per replica`` (the N-replica window less the empty one, divided by N)
is what each further replica adds. CPU time comes in clock ticks (10 ms), so a process
using 0.05% of a core over 30 s shows 15 ms; use windows of 30 s or more for figures.

Usage, from the repository root::

    python -m benchmarks.bench_idle [--replicas 10] [--seconds 30] [--baseline-seconds 10]

A smoke run (about 15 s; the figures mean little)::

    python -m benchmarks.bench_idle --replicas 2 --seconds 2 --baseline-seconds 1 --settle 1

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path printed)
only when it fails. The cluster plumbing and the report helpers come from
:mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

import taskserve
from benchmarks.common import (
    LocalCluster,
    bench_main,
    cluster,
    command_line,
    deleted_on_exit,
    load_average,
    markdown_table,
    print_head,
    wait_until,
)
from taskserve.redis_server import free_port

NAME = "bench_idle"
TARGET_PERCENT = 1.0
NUM_CPUS = 0.1            # each replica's reservation: 10 fit the agent's 16 CPUs with room
AGENT_NUM_CPUS = 16.0
START_TIMEOUT_S = 120.0


class Echo:
    def __call__(self, value: object) -> object:
        return value


@dataclass(frozen=True)
class Usage:
    """What one process used over a window."""

    cpu_s: float
    wakeups: Optional[int]      # voluntary context switches; None without /proc


def wakeups(pid: int) -> Optional[int]:
    """Voluntary context switches of every thread of ``pid`` so far (None without /proc).

    >>> import os
    >>> value = wakeups(os.getpid())
    >>> value is None or value >= 0
    True
    """
    total = 0
    try:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    except OSError:
        return None
    return total if Path(f"/proc/{pid}").exists() else None


def reading(pid: int) -> Usage:
    return Usage(sum(psutil.Process(pid).cpu_times()[:2]), wakeups(pid))


def measure(pids: dict[str, int], seconds: float) -> dict[str, Usage]:
    """What each of the processes ``pids`` (by label) used over ``seconds``."""
    before = {label: reading(pid) for label, pid in pids.items()}
    time.sleep(seconds)
    after = {label: reading(pid) for label, pid in pids.items()}
    return {label: Usage(after[label].cpu_s - before[label].cpu_s,
                         None if after[label].wakeups is None or before[label].wakeups is None
                         else after[label].wakeups - before[label].wakeups)
            for label in pids}


def cluster_pids(local: LocalCluster, replica_pids: list[int]) -> dict[str, int]:
    """The processes of the cluster by label: its parts, the agent's other children, the replicas."""
    assert local.redis is not None and local.redis.process is not None
    pids = {"redis": local.redis.process.pid, "controller": local.processes["controller"].pid,
            "agent": local.processes["agent"].pid, "gateway": local.processes["gateway"].pid}
    helpers = [child.pid for child in psutil.Process(pids["agent"]).children(recursive=True)
               if child.pid not in replica_pids]
    for index, pid in enumerate(sorted(helpers)):
        pids["agent: fork server" if index == 0 else f"agent: helper {index}"] = pid
    for index, pid in enumerate(sorted(replica_pids)):
        pids[f"replica {index}"] = pid
    return pids


def running_pids(replicas: int) -> Optional[list[int]]:
    """The pids of the deployment's replicas once ``replicas`` of them are RUNNING."""
    status = taskserve.get_deployment(NAME).status()
    pids = [r.pid for r in status.replicas if r.state == "RUNNING" and r.pid]
    return pids if len(pids) == replicas else None


# --------------------------------------------------------------------------- report


def percent(cpu_s: float, seconds: float) -> float:
    """CPU seconds over a window as a percentage of one core.

    >>> percent(0.3, 30.0)
    1.0
    """
    return 100.0 * cpu_s / seconds


def rate(count: Optional[int], seconds: float) -> str:
    return "-" if count is None else f"{count / seconds:.1f}"


def report(args: argparse.Namespace, empty: dict[str, Usage], full: dict[str, Usage]) -> None:
    replicas = [label for label in full if label.startswith("replica ")]
    rows = []
    for label, usage in full.items():
        if label in replicas:
            continue
        base = empty.get(label)
        rows.append([label, f"{percent(base.cpu_s, args.baseline_seconds):.3f}" if base else "-",
                     rate(base.wakeups, args.baseline_seconds) if base else "-",
                     f"{percent(usage.cpu_s, args.seconds):.3f}", rate(usage.wakeups, args.seconds)])
    replica_cpu = sum(full[label].cpu_s for label in replicas)
    replica_wakeups = [full[label].wakeups for label in replicas]
    replica_wakeup_sum = None if None in replica_wakeups else sum(w for w in replica_wakeups if w is not None)
    rows.append([f"{len(replicas)} replicas", "-", "-", f"{percent(replica_cpu, args.seconds):.3f}",
                 rate(replica_wakeup_sum, args.seconds)])
    rows.append(["each replica (mean)", "-", "-", f"{percent(replica_cpu / len(replicas), args.seconds):.3f}",
                 rate(None if replica_wakeup_sum is None else replica_wakeup_sum // len(replicas), args.seconds)])
    empty_total = percent(sum(u.cpu_s for u in empty.values()), args.baseline_seconds)
    full_total = percent(sum(u.cpu_s for u in full.values()), args.seconds)
    rows.append(["total", f"{empty_total:.3f}", "-", f"{full_total:.3f}", "-"])
    print()
    print(markdown_table(["process", "empty: % of a core", "empty: wake-ups/s",
                          f"{len(replicas)} replicas: % of a core", f"{len(replicas)} replicas: wake-ups/s"], rows))
    print()
    verdict = "ok" if full_total < TARGET_PERCENT else "MISS"
    print(markdown_table(["measure", "value"], [
        [f"total with {len(replicas)} replicas and the gateway, % of a core (target < {TARGET_PERCENT:g})",
         f"{full_total:.3f} {verdict}"],
        ["per replica, % of a core ((total - empty) / replicas)",
         f"{(full_total - empty_total) / len(replicas):.3f}"],
        ["empty cluster, % of a core (baseline)", f"{empty_total:.3f}"],
    ]))
    print(f"\nload:     {load_average()} (1/5/15 min) at the end")


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The CPU of an idle cluster with N replicas and a gateway.")
    parser.add_argument("--replicas", type=int, default=10, help="replicas of the idle deployment (default: 10)")
    parser.add_argument("--seconds", type=float, default=30.0, help="the window with replicas (default: 30)")
    parser.add_argument("--baseline-seconds", type=float, default=10.0,
                        help="the window of the empty cluster (default: 10)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between the last replica RUNNING and the window (default: 3)")
    args = parser.parse_args(argv)
    if args.replicas < 1 or min(args.seconds, args.baseline_seconds) <= 0 or args.settle < 0:
        parser.error(f"--replicas must be at least 1 and the windows positive (got --replicas {args.replicas}, "
                     f"--seconds {args.seconds:g}, --baseline-seconds {args.baseline_seconds:g}, "
                     f"--settle {args.settle:g})")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    # The controller's and the agent's own default timings, as `taskserve up` starts them.
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None) as local, deleted_on_exit([NAME]):
        print_head(local.url, command_line(NAME))
        local.start_gateway(free_port())
        time.sleep(args.settle)
        empty = measure(cluster_pids(local, []), args.baseline_seconds)
        print(f"  empty cluster measured for {args.baseline_seconds:g} s", flush=True)

        deployment = taskserve.deployment(Echo).options(name=NAME, num_replicas=args.replicas, num_cpus=NUM_CPUS)
        deployment.deploy()
        pids = wait_until(lambda: running_pids(args.replicas), START_TIMEOUT_S, f"{args.replicas} replicas RUNNING")
        handle = taskserve.get_deployment(NAME).get_handle()
        for index in range(args.replicas):
            assert handle.remote(index).result(timeout=30) == index
        time.sleep(args.settle)
        full = measure(cluster_pids(local, pids), args.seconds)
        if sorted(running_pids(args.replicas) or []) != sorted(pids):
            raise RuntimeError("a replica was replaced during the window; its figures would mix two processes")
        report(args, empty, full)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: run(args, work_dir), f"{NAME}-")


if __name__ == "__main__":
    sys.exit(main())
