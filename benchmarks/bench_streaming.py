"""Streaming and async replicas: first chunk, chunk rates, 1,000 concurrent sleeps.

What it measures
----------------
Everything runs on this machine, against one embedded Redis that the script starts
(no persistence), a controller and a node agent (``--num-cpus 8``) as subprocesses,
and three deployments of one class (``num_cpus=0.5``, one replica each):

* ``bench_stream`` (``max_ongoing_requests=1``): ``__call__(x) -> x`` and a sync
  generator ``tokens(n)`` yielding ``0 .. n-1`` as fast as it can;
* ``bench_stream_async`` (``max_ongoing_requests=100``): an async generator
  ``atokens(n)`` yielding ``0 .. n-1``, awaiting ``asyncio.sleep(0)`` after each chunk
  so that the streams of the replica take turns on its event loop;
* ``bench_sleep`` (``max_ongoing_requests=1000``): ``async nap(s)``, which awaits
  ``asyncio.sleep(s)``.

In one run:

* **time to first chunk**: ``handle.options(stream=True).tokens.remote(1)``, from the
  call to the first chunk in the caller's hands (the rest of the stream read after the
  clock stopped), against the baseline on the same replica: a plain call's round trip
  ``handle.remote(i).result()``. ``--requests`` (default 2,000) of each, one after the
  other, taking turns over ``--rounds`` blocks. Target: p50 at most the plain call's
  p50 + 1 ms.
* **chunks/s, one stream**: ``tokens(--chunks)`` (default 200,000), all read with
  ``for``, ``--stream-rounds`` times (default 3): chunks over the time from the call to
  the end of the stream. Target: >= 20,000 chunks/s.
* **chunks/s, 100 streams**: ``--streams`` (default 100) calls of
  ``atokens(--stream-chunks)`` (default 2,000) at once on the async replica, each read
  with ``async for`` by a task of one event loop in this process: all chunks over the
  time from the first call to the end of the last stream. Target: >= 20,000 chunks/s
  in total.
* **1,000 sleeps**: ``--sleepers`` (default 1,000) calls of ``nap(1.0)`` sent at once
  to the one ``bench_sleep`` replica, then every answer collected: from the first send
  to the last answer, ``--sleep-rounds`` times (default 3). Target: <= 1.5 s. Baseline, in
  the same rounds: as many naps of 0 s (the same calls with nothing to wait for), which
  show what taking, running and answering 1,000 calls costs on this machine.
* **the floor** of a chunk's write: one ``XADD`` round trip from a redis-py client
  (p50 of 2,000, one entry each), a ``MULTI XADD EXPIRE EXEC`` round trip (what the
  replica's stream writer sends for one stream's batch), and ``XADD`` entries/s with
  1,000 in a pipeline: a stream writing one chunk per round trip could not go faster
  than one over the first figure.

CPU per chunk of the replica and of this process (psutil) is reported beside the rates:
it moves much less with the machine's other load than the wall clock.

Usage, from the repository root::

    python -m benchmarks.bench_streaming [--requests 2000] [--rounds 10] [--chunks 200000]
        [--stream-rounds 3] [--streams 100] [--stream-chunks 2000] [--sleepers 1000] [--sleep-rounds 3]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_streaming --requests 20 --rounds 2 --chunks 2000 --stream-rounds 1 \\
        --streams 10 --stream-chunks 100 --sleepers 50 --sleep-rounds 1

Everything it starts is stopped on exit, Ctrl-C or error; logs go to a temporary
directory that is removed on success and kept (its path printed) on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import redis

import taskserve
from benchmarks.common import (
    START_TIMEOUT_S,
    bench_main,
    cluster,
    command_line,
    cpu_seconds,
    deleted_on_exit,
    load_average,
    markdown_table,
    percentile,
    print_head,
    split,
)

STREAM_NAME = "bench_stream"
ASYNC_NAME = "bench_stream_async"
SLEEP_NAME = "bench_sleep"
AGENT_NUM_CPUS = 8
RESULT_TIMEOUT_S = 60.0
SLEEP_S = 1.0
FIRST_CHUNK_TARGET_MS = 1.0        # over the plain call's p50
CHUNK_RATE_TARGET = 20_000         # chunks/s, one stream and 100 streams in total
SLEEPERS_TARGET_S = 1.5
FLOOR_SAMPLES = 2000


class BenchStream:
    def __call__(self, x: Any) -> Any:
        return x

    def tokens(self, n: int) -> Any:
        for i in range(n):
            yield i

    async def atokens(self, n: int) -> Any:
        for i in range(n):
            yield i
            await asyncio.sleep(0)      # the replica's other streams take their turn

    async def nap(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


# --------------------------------------------------------------------------- measuring


@dataclass
class Rate:
    """Chunks (or calls) over seconds, with the CPU the replica and this process spent."""

    name: str
    count: int
    seconds: float
    replica_cpu_s: float
    client_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.count / self.seconds

    @property
    def replica_us(self) -> float:
        return self.replica_cpu_s / self.count * 1e6

    @property
    def client_us(self) -> float:
        return self.client_cpu_s / self.count * 1e6


def deploy(name: str, max_ongoing: int) -> tuple[Any, list[int]]:
    """``BenchStream`` as ``name``, one replica; (its handle, its pid)."""
    model = taskserve.deployment(BenchStream).options(name=name, num_replicas=1, num_cpus=0.5,
                                                        max_ongoing_requests=max_ongoing)
    model.deploy(timeout=START_TIMEOUT_S)
    pids = [r.pid for r in model.status().replicas if r.state == "RUNNING" and r.pid]
    if len(pids) != 1:
        raise RuntimeError(f"expected one RUNNING replica of {name}, got {model.status().replicas}")
    return model.get_handle(), pids


def first_chunk_s(stream: Any) -> float:
    """One ``tokens(1)`` stream: seconds from the call to its first chunk (the rest read after)."""
    started = time.perf_counter()
    chunks = iter(stream.tokens.remote(1))
    first = next(chunks)
    elapsed = time.perf_counter() - started
    rest = list(chunks)
    if first != 0 or rest:
        raise AssertionError(f"tokens(1) streamed {[first, *rest]!r}")
    return elapsed


def plain_call_s(handle: Any, i: int) -> float:
    started = time.perf_counter()
    value = handle.remote(i).result(timeout=RESULT_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if value != i:
        raise AssertionError(f"call {i} came back as {value!r}")
    return elapsed


def measure_first_chunk(handle: Any, requests: int, rounds: int) -> tuple[list[float], list[float]]:
    """(first-chunk latencies, plain call latencies), taking turns block by block."""
    stream = handle.options(stream=True)
    for i in range(20):     # warm-up
        first_chunk_s(stream)
        plain_call_s(handle, i)
    firsts: list[float] = []
    plains: list[float] = []
    for number, size in enumerate(split(requests, rounds)):
        for kind in (("first", "plain") if number % 2 == 0 else ("plain", "first")):
            if kind == "first":
                firsts += [first_chunk_s(stream) for _ in range(size)]
            else:
                plains += [plain_call_s(handle, i) for i in range(size)]
    return firsts, plains


def one_stream(handle: Any, pids: list[int], chunks: int) -> Rate:
    cpu, replica_cpu = time.process_time(), cpu_seconds(pids)
    started = time.perf_counter()
    count = expected = 0
    for chunk in handle.options(stream=True).tokens.remote(chunks):
        if chunk != expected:
            raise AssertionError(f"chunk {expected} came as {chunk!r}")
        expected += 1
        count += 1
    elapsed = time.perf_counter() - started
    if count != chunks:
        raise AssertionError(f"one stream gave {count} chunks, not {chunks}")
    return Rate("one stream (sync generator)", count, elapsed, cpu_seconds(pids) - replica_cpu,
                time.process_time() - cpu)


def many_streams(handle: Any, pids: list[int], streams: int, chunks: int) -> Rate:
    async def read(response: Any) -> int:
        count = 0
        async for chunk in response:
            if chunk != count:
                raise AssertionError(f"chunk {count} came as {chunk!r}")
            count += 1
        return count

    async def run() -> list[int]:
        stream = handle.options(stream=True)
        responses = [stream.atokens.remote(chunks) for _ in range(streams)]
        return await asyncio.gather(*(read(response) for response in responses))

    cpu, replica_cpu = time.process_time(), cpu_seconds(pids)
    started = time.perf_counter()
    counts = asyncio.run(run())
    elapsed = time.perf_counter() - started
    if counts != [chunks] * streams:
        raise AssertionError(f"{streams} streams gave {sorted(set(counts))} chunks each, not {chunks}")
    return Rate(f"{streams} streams (async generators)", sum(counts), elapsed, cpu_seconds(pids) - replica_cpu,
                time.process_time() - cpu)


@dataclass
class Sleepers:
    sleep_s: float
    sent_s: float
    first_s: float
    last_s: float
    replica_cpu_s: float
    client_cpu_s: float


def sleepers(handle: Any, pids: list[int], count: int, sleep_s: float = SLEEP_S) -> Sleepers:
    """``count`` naps of ``sleep_s`` sent at once, every answer collected (in the order sent)."""
    cpu, replica_cpu = time.process_time(), cpu_seconds(pids)
    started = time.perf_counter()
    responses = [handle.nap.remote(sleep_s) for _ in range(count)]
    sent = time.perf_counter() - started
    first = None
    for response in responses:
        if response.result(timeout=RESULT_TIMEOUT_S) != sleep_s:
            raise AssertionError(f"a nap answered {response.result()!r}")
        first = first or time.perf_counter() - started
    last = time.perf_counter() - started
    return Sleepers(sleep_s, sent, first or last, last, cpu_seconds(pids) - replica_cpu, time.process_time() - cpu)


def xadd_floor(address: str) -> tuple[float, float, float]:
    """(one XADD round trip p50 us, one MULTI XADD EXPIRE EXEC round trip p50 us, XADD entries/s pipelined)."""
    client = redis.Redis.from_url(address)
    key = "bench_streaming:floor"
    entry = {b"c": b"[0]"}
    single, transaction = [], []
    for _ in range(FLOOR_SAMPLES):
        t0 = time.perf_counter()
        client.xadd(key, entry)
        single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with client.pipeline(transaction=True) as pipe:
            pipe.xadd(key, entry)
            pipe.expire(key, 600)
            pipe.execute()
        transaction.append(time.perf_counter() - t0)
    started = time.perf_counter()
    for _ in range(10):
        with client.pipeline(transaction=False) as pipe:
            for _ in range(1000):
                pipe.xadd(key, entry)
            pipe.execute()
    pipelined = 10_000 / (time.perf_counter() - started)
    client.delete(key)
    client.close()
    return statistics.median(single) * 1e6, statistics.median(transaction) * 1e6, pipelined


# --------------------------------------------------------------------------- report


def verdict(text: str, ok: bool) -> str:
    return f"{text} {'ok' if ok else 'MISS'}"


def report(args: argparse.Namespace, firsts: list[float], plains: list[float], one: list[Rate], many: Rate,
           naps: list[Sleepers], floor: tuple[float, float, float]) -> None:
    print(f"\n{args.requests} first chunks and plain calls in {args.rounds} alternating rounds; "
          f"{args.stream_rounds} x 1 stream of {args.chunks} chunks; {args.streams} streams of {args.stream_chunks} "
          f"chunks; {args.sleep_rounds} x {args.sleepers} naps of {SLEEP_S:g} s; "
          f"load {load_average()} (1/5/15 min) at the end\n")
    firsts, plains = sorted(firsts), sorted(plains)
    first_p50, plain_p50 = statistics.median(firsts) * 1000, statistics.median(plains) * 1000
    print(markdown_table(["call (bench_stream, 1 replica)", "n", "p50 ms", "p90 ms", "p99 ms"], [
        [name, str(len(values)), f"{statistics.median(values) * 1000:.3f}", f"{percentile(values, 0.9) * 1000:.3f}",
         f"{percentile(values, 0.99) * 1000:.3f}"]
        for name, values in (("stream: first chunk", firsts), ("plain call: answer", plains))]))
    print()
    print(markdown_table(["stream", "chunks", "seconds", "chunks/s", "replica CPU us/chunk", "client CPU us/chunk"], [
        [r.name, str(r.count), f"{r.seconds:.3f}", f"{r.per_s:.0f}", f"{r.replica_us:.1f}", f"{r.client_us:.1f}"]
        for r in [*one, many]]))
    print()
    print(markdown_table(["naps at once", "nap s", "sent after s", "first answer s", "last answer s", "replica CPU ms",
                          "client CPU ms"], [
        [str(args.sleepers), f"{n.sleep_s:g}", f"{n.sent_s:.3f}", f"{n.first_s:.3f}", f"{n.last_s:.3f}",
         f"{n.replica_cpu_s * 1000:.0f}", f"{n.client_cpu_s * 1000:.0f}"] for n in naps]))
    print()
    one_rate = statistics.median(r.per_s for r in one)
    last = statistics.median(n.last_s for n in naps if n.sleep_s == SLEEP_S)
    last_0 = statistics.median(n.last_s for n in naps if n.sleep_s == 0)
    print(markdown_table(["measure", "value"], [
        ["first chunk p50 - plain call p50, ms (<= 1)",
         verdict(f"{first_p50 - plain_p50:.3f}", first_p50 - plain_p50 <= FIRST_CHUNK_TARGET_MS)],
        ["first chunk p50 / plain call p50", f"{first_p50 / plain_p50:.3f}"],
        ["chunks/s, one stream, median (>= 20000)", verdict(f"{one_rate:.0f}", one_rate >= CHUNK_RATE_TARGET)],
        [f"chunks/s, {args.streams} streams in total (>= 20000)",
         verdict(f"{many.per_s:.0f}", many.per_s >= CHUNK_RATE_TARGET)],
        [f"{args.sleepers} naps of 1 s: first send to last answer, median s (<= 1.5)",
         verdict(f"{last:.3f}", last <= SLEEPERS_TARGET_S)],
        [f"baseline: {args.sleepers} naps of 0 s, first send to last answer, median s", f"{last_0:.3f}"],
        ["floor: one XADD round trip p50, us", f"{floor[0]:.0f}"],
        ["floor: MULTI XADD EXPIRE EXEC round trip p50, us", f"{floor[1]:.0f}"],
        ["floor: XADD entries/s, 1000 per pipeline", f"{floor[2]:.0f}"],
        ["floor: chunks/s at one chunk per XADD round trip", f"{1e6 / floor[0]:.0f}"],
    ]))


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Streaming and async replicas: time to first chunk, chunk rates, "
                                                 "1,000 concurrent sleeps; plain calls and XADD as baselines.")
    parser.add_argument("--requests", type=int, default=2000, help="first chunks and plain calls each (default: 2000)")
    parser.add_argument("--rounds", type=int, default=10, help="blocks they take turns in (default: 10)")
    parser.add_argument("--chunks", type=int, default=200_000, help="chunks of the one stream (default: 200000)")
    parser.add_argument("--stream-rounds", type=int, default=3, help="times the one stream runs (default: 3)")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams (default: 100)")
    parser.add_argument("--stream-chunks", type=int, default=2000, help="chunks of each concurrent stream "
                        "(default: 2000)")
    parser.add_argument("--sleepers", type=int, default=1000, help="naps sent at once (default: 1000; at most 1000, "
                        "the replica's max_ongoing_requests)")
    parser.add_argument("--sleep-rounds", type=int, default=3, help="times the naps run (default: 3)")
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.chunks, args.stream_rounds, args.streams, args.stream_chunks,
           args.sleepers, args.sleep_rounds) < 1 or args.sleepers > 1000 or args.streams > 1000:
        parser.error("every count must be positive; --sleepers and --streams at most 1000")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None, clear_thread_limits=False) as local, \
            deleted_on_exit([STREAM_NAME, ASYNC_NAME, SLEEP_NAME]):
        print_head(local.url, command_line("bench_streaming"),
                   f"redis:    {local.url} (embedded, no persistence); logs in {work_dir}")
        handle, pids = deploy(STREAM_NAME, 1)
        async_handle, async_pids = deploy(ASYNC_NAME, min(1000, max(100, args.streams)))
        sleep_handle, sleep_pids = deploy(SLEEP_NAME, 1000)
        floor = xadd_floor(local.url)
        print(f"  XADD round trip p50 {floor[0]:.0f} us", flush=True)
        firsts, plains = measure_first_chunk(handle, args.requests, args.rounds)
        print(f"  first chunk p50 {statistics.median(firsts) * 1000:.3f} ms, plain call p50 "
              f"{statistics.median(plains) * 1000:.3f} ms", flush=True)
        one_stream(handle, pids, min(args.chunks, 10_000))         # warm-up
        one = []
        for _ in range(args.stream_rounds):
            one.append(one_stream(handle, pids, args.chunks))
            print(f"  one stream: {one[-1].per_s:.0f} chunks/s", flush=True)
        many_streams(async_handle, async_pids, min(args.streams, 10), min(args.stream_chunks, 100))   # warm-up
        many = many_streams(async_handle, async_pids, args.streams, args.stream_chunks)
        print(f"  {args.streams} streams: {many.per_s:.0f} chunks/s", flush=True)
        sleepers(sleep_handle, sleep_pids, min(args.sleepers, 10))      # warm-up
        naps = []
        for _ in range(args.sleep_rounds):
            for sleep_s in (0.0, SLEEP_S):
                naps.append(sleepers(sleep_handle, sleep_pids, args.sleepers, sleep_s))
                print(f"  {args.sleepers} naps of {sleep_s:g} s: last answer after {naps[-1].last_s:.3f} s", flush=True)
        report(args, firsts, plains, one, many, naps, floor)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: run(args, work_dir), "bench_streaming-")


if __name__ == "__main__":
    sys.exit(main())
