"""Batching: throughput and latency of a batched model against the same model unbatched.

What it measures
----------------
Everything runs on this machine: an embedded Redis (no persistence), a controller
and one node agent, started by the script. The model costs a fixed ``--fixed-ms``
(default 20 ms) per call plus ``--per-item-ms`` (default 0.5 ms) per item, spent
in ``time.sleep`` (as an accelerator would: the replica's CPU is free meanwhile).
Three deployments of it, one replica each, run side by side:

* ``unbatched`` (the baseline): ``__call__(x)``, one item per call, so each
  request costs 20.5 ms;
* ``adaptive``: ``@batch(max_batch_size=--max-batch-size, batch_wait_timeout_s=
  --wait-ms)`` (defaults 32 and 10 ms), with the adaptive window (the default);
* ``fixed``: the same with ``adaptive=False``: every batch waits for
  ``max_batch_size`` items or the whole timeout.

Two measurements, each path in turn, in ``--rounds`` (default 2) rounds:

* **throughput**: one client thread keeps ``--in-flight`` (default 64) requests in
  flight through a handle (as each answer comes back, in order, it sends the next)
  for ``--seconds`` (default 4) per path and round, after a short warm-up;
  requests/s is the answers over that time. Each answer carries the size of the
  batch it ran in, so the mean batch size is reported too.
* **latency**: ``--latency-requests`` (default 200) requests one at a time
  (each sent once the previous is answered); p50, mean and p99 in ms.

How to read it
--------------
``throughput batched/unbatched`` is the ratio of requests/s, target >= 8.0 for
the adaptive window (the model's arithmetic allows about 18x at a batch of 32:
32 items per 36 ms against one per 20.5 ms). ``latency batched − unbatched``
is the difference of p50s at one request at a time, in ms: target <= 1 ms for the
adaptive window (a lone request runs at once) and <= ``--wait-ms`` for the fixed
one (it waits out the window). Both paths share the machine, Redis and client,
so compare the ratios and differences, not the absolute figures.

Usage, from the repository root::

    python -m benchmarks.bench_batching [--seconds 4] [--in-flight 64] [--latency-requests 200] [--rounds 2]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_batching --smoke

Everything it starts is stopped on exit, Ctrl-C or error; logs are kept (path
printed) only when it fails.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import taskserve
from benchmarks.common import (
    START_TIMEOUT_S,
    bench_main,
    cluster,
    deleted_on_exit,
    load_average,
    markdown_table,
    percentile,
    print_head,
)
from taskserve.batching import batch

RESULT_TIMEOUT_S = 60.0
AGENT_NUM_CPUS = 8
THROUGHPUT_TARGET = 8.0
ADAPTIVE_LATENCY_TARGET_MS = 1.0
PATHS = ("unbatched", "adaptive", "fixed")


# --------------------------------------------------------------------------- the model


class Unbatched:
    """The model, one item per call: ``[item, 1]``."""

    def __init__(self, fixed_s: float, per_item_s: float) -> None:
        self.fixed_s = fixed_s
        self.per_item_s = per_item_s

    def __call__(self, item: Any) -> list:
        time.sleep(self.fixed_s + self.per_item_s)
        return [item, 1]


def make_batched(max_batch_size: int, wait_s: float, adaptive: bool) -> type:
    """The model served in batches: each item's answer is ``[item, batch size]``."""

    class Batched:
        def __init__(self, fixed_s: float, per_item_s: float) -> None:
            self.fixed_s = fixed_s
            self.per_item_s = per_item_s

        @batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s, adaptive=adaptive)
        def __call__(self, items: list) -> list:
            time.sleep(self.fixed_s + self.per_item_s * len(items))
            return [[item, len(items)] for item in items]

    Batched.__name__ = Batched.__qualname__ = "Adaptive" if adaptive else "Fixed"
    return Batched


# --------------------------------------------------------------------------- measuring


@dataclass
class Samples:
    """What one path added up to over all rounds."""

    answers: int = 0
    seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)


def check(value: Any, expected: int, path: str) -> int:
    """The batch size in ``value`` after checking it answers request ``expected``."""
    if not (isinstance(value, list) and len(value) == 2 and value[0] == expected):
        raise AssertionError(f"{path}: request {expected} came back as {value!r}")
    return int(value[1])


def run_throughput(handle: Any, path: str, in_flight: int, seconds: float, samples: Optional[Samples]) -> str:
    """Keep ``in_flight`` requests in flight for ``seconds``; a one-line summary."""
    sent = 0
    pending: collections.deque = collections.deque()
    for _ in range(in_flight):
        pending.append((sent, handle.remote(sent)))
        sent += 1
    answers, sizes = 0, []
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        number, response = pending.popleft()
        sizes.append(check(response.result(timeout=RESULT_TIMEOUT_S), number, path))
        answers += 1
        now = time.perf_counter()
        if now >= deadline:
            break
        pending.append((sent, handle.remote(sent)))
        sent += 1
    elapsed = now - started
    for number, response in pending:          # answered, not counted
        check(response.result(timeout=RESULT_TIMEOUT_S), number, path)
    if samples is not None:
        samples.answers += answers
        samples.seconds += elapsed
        samples.batch_sizes.extend(sizes)
    return f"{path} {answers / elapsed:.0f} req/s (batch {statistics.mean(sizes):.1f})"


def run_latency(handle: Any, path: str, count: int, samples: Samples) -> str:
    """``count`` requests one at a time; a one-line summary."""
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        check(handle.remote(i).result(timeout=RESULT_TIMEOUT_S), i, path)
        latencies.append(time.perf_counter() - started)
    samples.latencies_s.extend(latencies)
    return f"{path} p50 {statistics.median(latencies) * 1000:.2f} ms"


def deploy(args: argparse.Namespace) -> dict[str, Any]:
    """The three deployments, each with one RUNNING replica; their handles by path."""
    fixed_s, per_item_s = args.fixed_ms / 1000, args.per_item_ms / 1000
    targets = {
        "unbatched": Unbatched,
        "adaptive": make_batched(args.max_batch_size, args.wait_ms / 1000, adaptive=True),
        "fixed": make_batched(args.max_batch_size, args.wait_ms / 1000, adaptive=False),
    }
    handles = {}
    for path, target in targets.items():
        deployment = taskserve.deployment(target).options(name=f"bench_batching_{path}", num_cpus=0.5)
        deployment.deploy(fixed_s, per_item_s, timeout=START_TIMEOUT_S)
        handles[path] = deployment.get_handle()
    return handles


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Samples]:
    """Every path, in alternating rounds, on one cluster; everything stopped on return."""
    names = [f"bench_batching_{path}" for path in PATHS]
    samples = {path: Samples() for path in PATHS}
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS) as local, deleted_on_exit(names):
        print_head(local.url, f"redis:    {local.url} (embedded, no persistence); logs in {work_dir}")
        handles = deploy(args)
        for path in PATHS:                 # warm-up: every process and connection in use once
            run_throughput(handles[path], path, args.in_flight, args.warmup_seconds, None)
            run_latency(handles[path], path, 3, Samples())
        for number in range(1, args.rounds + 1):
            order = PATHS if number % 2 else PATHS[::-1]
            lines = [run_throughput(handles[path], path, args.in_flight, args.seconds, samples[path])
                     for path in order]
            lines += [run_latency(handles[path], path, args.latency_requests, samples[path]) for path in order]
            print(f"  round {number}/{args.rounds}: " + " | ".join(lines), flush=True)
    return samples


# --------------------------------------------------------------------------- report


def figures_table(samples: dict[str, Samples], in_flight: int) -> str:
    """Every path with its figures, all rounds pooled."""
    header = ["path", f"req/s ({in_flight} in flight)", "mean batch", "largest batch",
              "p50 ms (1 at a time)", "mean ms", "p99 ms"]
    rows = []
    for path in PATHS:
        s = samples[path]
        latencies = sorted(s.latencies_s)
        rows.append([path, f"{s.answers / s.seconds:.0f}", f"{statistics.mean(s.batch_sizes):.1f}",
                     str(max(s.batch_sizes)), f"{statistics.median(latencies) * 1000:.2f}",
                     f"{statistics.mean(latencies) * 1000:.2f}", f"{percentile(latencies, 0.99) * 1000:.2f}"])
    return markdown_table(header, rows)


def ratios_table(samples: dict[str, Samples], wait_ms: float) -> str:
    """Each batched path against the unbatched one, checked against its targets."""
    base = samples["unbatched"]
    base_rps = base.answers / base.seconds
    base_p50 = statistics.median(base.latencies_s) * 1000
    header = ["path", f"throughput batched/unbatched (target >= {THROUGHPUT_TARGET:g})",
              "latency p50 batched − unbatched, ms (target)"]
    rows = []
    for path, latency_target in (("adaptive", ADAPTIVE_LATENCY_TARGET_MS), ("fixed", wait_ms)):
        s = samples[path]
        ratio = (s.answers / s.seconds) / base_rps
        extra = statistics.median(s.latencies_s) * 1000 - base_p50
        throughput = f"{ratio:.2f} {'ok' if ratio >= THROUGHPUT_TARGET else 'MISS'}"
        if path == "fixed":
            throughput = f"{ratio:.2f} (no target)"
        rows.append([path, throughput,
                     f"{extra:+.2f} (<= {latency_target:g}) {'ok' if extra <= latency_target else 'MISS'}"])
    return markdown_table(header, rows)


def report(args: argparse.Namespace, samples: dict[str, Samples]) -> None:
    print(f"\nmodel: {args.fixed_ms:g} ms + {args.per_item_ms:g} ms per item; max_batch_size {args.max_batch_size}, "
          f"batch_wait_timeout_s {args.wait_ms / 1000:g}; {args.rounds} rounds of {args.seconds:g} s with "
          f"{args.in_flight} in flight and {args.latency_requests} requests one at a time per path; "
          f"load {load_average()} (1/5/15 min) at the end\n")
    print(figures_table(samples, args.in_flight))
    print()
    print(ratios_table(samples, args.wait_ms))


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batching: a batched model against the same model unbatched.")
    parser.add_argument("--seconds", type=float, default=4.0, help="throughput time per path and round (default 4)")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="throughput warm-up per path (default 1)")
    parser.add_argument("--in-flight", type=int, default=64, help="requests kept in flight (default 64)")
    parser.add_argument("--latency-requests", type=int, default=200,
                        help="requests one at a time per path and round (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds the paths take turns in (default 2)")
    parser.add_argument("--fixed-ms", type=float, default=20.0, help="the model's cost per call (default 20)")
    parser.add_argument("--per-item-ms", type=float, default=0.5, help="the model's cost per item (default 0.5)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="max_batch_size (default 32)")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="batch_wait_timeout_s in ms (default 10)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: runs in seconds, the figures mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup_seconds, args.latency_requests, args.rounds = 0.5, 0.2, 5, 1
    if min(args.seconds, args.in_flight, args.latency_requests, args.rounds, args.max_batch_size) <= 0 \
            or args.wait_ms < 0 or args.warmup_seconds < 0:
        parser.error("counts and durations must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: report(args, run(args, work_dir)), "bench_batching-")


if __name__ == "__main__":
    sys.exit(main())
