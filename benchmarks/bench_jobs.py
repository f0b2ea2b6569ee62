"""Jobs: submit rate, drain rate, Redis memory per job and status reads, against bare Celery.

What it measures
----------------
Everything runs on this machine, against one embedded Redis that the script starts
(no persistence), a controller and a node agent (``--num-cpus 8``) as subprocesses,
and an echo deployment ``bench_jobs`` (``__call__(x) -> x``, ``num_cpus=0.5``) whose
jobs carry a payload of ``--payload-bytes`` (default 100) ASCII characters:

* **submit, in batches**: ``--jobs`` (default 100,000) jobs submitted from this process
  with ``handle.submit_many`` in batches of ``--batch`` (default 1,000), to the
  deployment with **no replica** (``num_replicas=0``), so that only submission is
  measured. The floor beside it: the same queue items pushed by a bare
  ``LPUSH`` pipeline of the same batches (what Redis alone takes to store the messages;
  no record, no script).
* **submit, one by one**: ``--single`` (default 20,000) jobs with ``handle.submit``,
  against the baseline in the same run, bare Celery one by one:
  ``app.send_task(...)`` (what ``apply_async`` does; with the Redis result backend each
  send also subscribes to its result, as it does for any ``AsyncResult`` caller) of the
  same payload onto a queue no worker reads. The two take turns over ``--rounds`` blocks.
* **Redis memory**: ``INFO memory`` ``used_memory`` before and after the batched submit,
  divided by the number of jobs, minus the payload: the bytes a **queued job** costs
  beyond its payload (its message, its record, its entry in the QUEUED set); the same
  after a drain, with no replica left, for a **finished job** (its record, its result,
  its entry in the SUCCEEDED set); and Celery's per queued message, from the
  one-by-one blocks. Target: at most 1 KB beyond the payload (so 1M queued jobs fit
  in about 1 GB).
* **drain**: for each of ``--replicas`` (default 1 and 2): ``--drain-jobs`` (default
  10,000) jobs submitted with no replica running, then the deployment scaled to that
  many replicas; the rate is the jobs over the time from the first job's
  ``started_at`` to the last one's ``finished_at`` (their records), all SUCCEEDED.
  Baseline in the same run, on the same replicas right after each drain: ``--calls``
  (default 5,000) plain calls ``handle.remote(payload)`` with at most 100 in flight
  (what ``bench_requests`` calls pipelined). Jobs and calls are split over
  ``--drain-rounds`` (default 2) drains, each followed by its calls. Target: drain rate
  >= the plain call rate.
* **status reads**: ``job.status()`` of ``--status-reads`` (default 2,000) queued and
  finished jobs, one after the other: p50 and p99 (target p50 <= 1 ms). Beside it,
  the floor of one ``HGETALL`` of the same record through redis-py, and Celery's
  ``AsyncResult(id).state`` (one ``GET``) of the tasks sent above.

CPU per job of this process (the client) and of Redis is read over each block (psutil):
it moves much less with the machine's other load than the wall clock.

Usage, from the repository root::

    python -m benchmarks.bench_jobs [--jobs 100000] [--batch 1000] [--single 20000] [--rounds 4]
                                    [--drain-jobs 10000] [--drain-rounds 2] [--calls 5000]
                                    [--replicas 1 2]
                                    [--status-reads 2000] [--payload-bytes 100]

A smoke run (seconds; the figures mean nothing)::

    python -m benchmarks.bench_jobs --jobs 2000 --batch 500 --single 200 --rounds 2 --drain-jobs 200 \\
        --drain-rounds 1 --calls 200 --replicas 1 --status-reads 100

Everything it starts is stopped on exit, Ctrl-C or error; logs go to a temporary
directory that is removed on success and kept (its path printed) on failure.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import celery.result
import redis

import taskserve
from benchmarks.bench_requests import RAW_QUEUE, RAW_TASK, write_raw_app
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
    wait_until,
)
from taskserve.connection import current_store
from taskserve.jobs import Job
from taskserve.store import queue_name
from taskserve.store.keys import job_key, jobs_key, queue_lists
from taskserve.wire import QUEUED, SUCCEEDED

DEPLOYMENT_NAME = "bench_jobs"
AGENT_NUM_CPUS = 8
IN_FLIGHT = 100                  # plain calls sent and not yet collected, as bench_requests' pipelined mode
RESULT_TIMEOUT_S = 30.0
BATCH_RATE_TARGET = 20_000       # jobs/s with submit_many
SINGLE_RATIO_TARGET = 1.0        # handle.submit one by one / Celery send_task one by one
DRAIN_RATIO_TARGET = 1.0         # drain jobs/s / plain calls/s at 100 in flight, same replicas
MEMORY_TARGET_BYTES = 1024       # beyond the payload, per queued job and per finished job
STATUS_P50_TARGET_MS = 1.0


@taskserve.deployment(name=DEPLOYMENT_NAME, num_replicas=0, num_cpus=0.5)
class BenchJobs:
    def __call__(self, x: Any) -> Any:
        return x


# --------------------------------------------------------------------------- measuring


@dataclass
class Block:
    """What one path took over some blocks: jobs, seconds, CPU of this process and of Redis."""

    jobs: int = 0
    seconds: float = 0.0
    client_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    memory_bytes: int = 0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else float("nan")

    @property
    def client_us(self) -> float:
        return self.client_cpu_s / self.jobs * 1e6 if self.jobs else float("nan")

    @property
    def redis_us(self) -> float:
        return self.redis_cpu_s / self.jobs * 1e6 if self.jobs else float("nan")

    def memory_per_job(self, payload_bytes: int) -> float:
        return self.memory_bytes / self.jobs - payload_bytes if self.jobs else float("nan")


@dataclass
class Drain:
    """One drain and the plain calls measured after it, at one replica count."""

    replicas: int
    jobs: int
    seconds: float
    wall_s: float
    calls: int
    calls_s: float
    memory_bytes: int
    replica_cpu_s: float
    calls_replica_cpu_s: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    @property
    def calls_rate(self) -> float:
        return self.calls / self.calls_s


@dataclass
class Reads:
    """Latencies of one kind of read, in seconds."""

    name: str
    latencies_s: list[float] = field(default_factory=list)

    def p(self, fraction: float) -> float:
        return percentile(sorted(self.latencies_s), fraction) * 1000


def used_memory(client: redis.Redis) -> int:
    """Redis's ``used_memory``, in bytes."""
    return int(client.info("memory")["used_memory"])


def measured(block: Block, redis_pids: list[int], client: redis.Redis, count: int,
             action: Callable[[], Any]) -> Any:
    """Run ``action`` (``count`` jobs) and add its time, CPU and memory to ``block``."""
    memory, cpu, redis_cpu = used_memory(client), time.process_time(), cpu_seconds(redis_pids)
    started = time.perf_counter()
    value = action()
    block.seconds += time.perf_counter() - started
    block.client_cpu_s += time.process_time() - cpu
    block.redis_cpu_s += cpu_seconds(redis_pids) - redis_cpu
    block.memory_bytes += used_memory(client) - memory
    block.jobs += count
    return value


def submit_batches(handle: Any, payload: str, count: int, batch: int) -> list[str]:
    """``count`` jobs with ``submit_many``, ``batch`` at a time: their ids."""
    ids: list[str] = []
    for size in split(count, -(-count // batch)):
        ids += [job.id for job in handle.submit_many([((payload,), {})] * size)]
    return ids


def submit_one_by_one(handle: Any, payload: str, count: int) -> list[str]:
    return [handle.submit(payload).id for _ in range(count)]


def send_one_by_one(app: Any, payload: str, count: int) -> list[str]:
    return [app.send_task(RAW_TASK, args=(payload,), queue=RAW_QUEUE).id for _ in range(count)]


def push_floor(client: redis.Redis, items: list[bytes], batch: int, list_key: str) -> None:
    """``items`` pushed onto ``list_key`` by plain ``LPUSH`` pipelines of ``batch``."""
    for start in range(0, len(items), batch):
        with client.pipeline(transaction=False) as pipe:
            for item in items[start:start + batch]:
                pipe.lpush(list_key, item)
            pipe.execute()


def forget_queued(client: redis.Redis, name: str, job_ids: list[str]) -> None:
    """Delete queued jobs outright (their records, QUEUED set and queue): no replica runs them."""
    for start in range(0, len(job_ids), 10_000):
        client.delete(*(job_key(job_id) for job_id in job_ids[start:start + 10_000]))
    client.delete(jobs_key(name, QUEUED), *queue_lists(queue_name(name)))


def scale(replicas: int) -> list[int]:
    """Deploy ``bench_jobs`` with ``replicas`` replicas; the pids of those RUNNING."""
    BenchJobs.options(num_replicas=replicas).deploy(timeout=START_TIMEOUT_S)
    running = [r for r in BenchJobs.status().replicas if r.state == "RUNNING"]
    if len(running) != replicas:
        raise RuntimeError(f"expected {replicas} RUNNING replicas of {DEPLOYMENT_NAME}, got {running}")
    return [r.pid for r in running if r.pid]


def run_calls(handle: Any, payload: str, count: int) -> float:
    """``count`` plain calls with at most ``IN_FLIGHT`` sent and not yet collected: seconds."""
    pending: collections.deque = collections.deque()
    started = time.perf_counter()
    for _ in range(count):
        if len(pending) >= IN_FLIGHT:
            check_echo(pending.popleft().result(timeout=RESULT_TIMEOUT_S), payload)
        pending.append(handle.remote(payload))
    while pending:
        check_echo(pending.popleft().result(timeout=RESULT_TIMEOUT_S), payload)
    return time.perf_counter() - started


def check_echo(value: Any, payload: str) -> None:
    if value != payload:
        raise AssertionError(f"a call came back as {value!r:.80}")


def job_times(client: redis.Redis, job_ids: list[str]) -> tuple[float, float]:
    """(earliest started_at, latest finished_at) of ``job_ids``, all of which must have SUCCEEDED."""
    first, last = float("inf"), float("-inf")
    for start in range(0, len(job_ids), 1000):
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids[start:start + 1000]:
                pipe.hmget(job_key(job_id), "state", "started_at", "finished_at")
            for job_id, (state, started, finished) in zip(job_ids[start:], pipe.execute()):
                if state != SUCCEEDED.encode():
                    raise AssertionError(f"job {job_id} is {state!r} after the drain, not SUCCEEDED")
                first, last = min(first, float(started)), max(last, float(finished))
    return first, last


def drain(handle: Any, client: redis.Redis, payload: str, replicas: int, jobs: int, calls: int,
          rounds: int) -> tuple[Drain, list[str]]:
    """In each of ``rounds``: fill the queue with no replica, scale to ``replicas``, time the
    drain, then the plain calls on the same replicas. The finished jobs' memory is read with
    no replica left, once every round drained."""
    store = current_store()
    scale(0)
    memory = used_memory(client)
    job_ids: list[str] = []
    seconds = wall_s = replica_cpu_s = calls_s = calls_cpu_s = 0.0
    calls_done = 0
    for number, (size, calls_size) in enumerate(zip(split(jobs, rounds), split(calls, rounds)), start=1):
        scale(0)
        ids = submit_batches(handle, payload, size, 1000)
        started = time.perf_counter()
        pids = scale(replicas)
        cpu = cpu_seconds(pids)
        done = len(job_ids) + size
        wait_until(lambda done=done: store.count_jobs(DEPLOYMENT_NAME)[SUCCEEDED] >= done, 60 + size / 50,
                   f"{size} jobs to succeed with {replicas} replica(s)")
        wall_s += time.perf_counter() - started
        replica_cpu_s += cpu_seconds(pids) - cpu
        first, last = job_times(client, ids)
        seconds += last - first
        job_ids += ids
        cpu = cpu_seconds(pids)
        round_calls_s = run_calls(handle, payload, calls_size)
        calls_s += round_calls_s
        calls_done += calls_size
        calls_cpu_s += cpu_seconds(pids) - cpu
        print(f"  x{replicas} round {number}/{rounds}: drain {size / (last - first):.0f} jobs/s, "
              f"plain calls {calls_size / round_calls_s:.0f}/s", flush=True)
    scale(0)
    finished_memory = used_memory(client) - memory
    return Drain(replicas, len(job_ids), seconds, wall_s, calls_done, calls_s, finished_memory, replica_cpu_s,
                 calls_cpu_s), job_ids


def time_reads(reads: list[Reads], actions: list[Callable[[str], Any]], ids: list[list[str]], rounds: int) -> None:
    """Each of ``actions`` on its ``ids`` one after the other, taking turns in ``rounds`` blocks."""
    for number, size in enumerate(split(min(len(i) for i in ids), rounds)):
        order = list(range(len(actions))) if number % 2 == 0 else list(reversed(range(len(actions))))
        for index in order:
            action, sample, target = actions[index], ids[index], reads[index].latencies_s
            offset = number * size
            for job_id in sample[offset:offset + size]:
                t0 = time.perf_counter()
                action(job_id)
                target.append(time.perf_counter() - t0)


# --------------------------------------------------------------------------- report


def verdict(text: str, ok: bool) -> str:
    return f"{text} {'ok' if ok else 'MISS'}"


def report(args: argparse.Namespace, batch: Block, floor: Block, single: Block, celery_single: Block,
           drains: list[Drain], reads: list[Reads], queued_item_bytes: float, celery_item_bytes: float) -> None:
    payload = args.payload_bytes
    print(f"\n{args.jobs} jobs in batches of {args.batch}, {args.single} one by one per path in {args.rounds} "
          f"alternating rounds, drains of {args.drain_jobs} jobs, {args.calls} plain calls per replica count; "
          f"payload {payload} bytes; load {load_average()} (1/5/15 min) at the end\n")
    print(markdown_table(
        ["submit", "jobs", "jobs/s", "us/job", "client CPU us/job", "Redis CPU us/job", "Redis bytes/job - payload"],
        [[name, str(b.jobs), f"{b.rate:.0f}", f"{1e6 / b.rate:.1f}", f"{b.client_us:.1f}", f"{b.redis_us:.1f}",
          f"{b.memory_per_job(payload):.0f}"]
         for name, b in (("taskserve submit_many", batch), ("floor: LPUSH pipelines, same items", floor),
                         ("taskserve submit", single), ("celery send_task", celery_single))]))
    print()
    print(markdown_table(
        ["replicas", "drained jobs", "drain jobs/s", "drain wall s", "replica CPU us/job", "plain calls/s",
         "replica CPU us/call", "drain/plain"],
        [[str(d.replicas), str(d.jobs), f"{d.rate:.0f}", f"{d.wall_s:.2f}", f"{d.replica_cpu_s / d.jobs * 1e6:.0f}",
          f"{d.calls_rate:.0f}", f"{d.calls_replica_cpu_s / d.calls * 1e6:.0f}",
          f"{d.rate / d.calls_rate:.3f}"] for d in drains], left=0))
    print()
    print(markdown_table(["read", "n", "p50 ms", "p99 ms"],
                         [[r.name, str(len(r.latencies_s)), f"{r.p(0.5):.3f}", f"{r.p(0.99):.3f}"] for r in reads]))
    print()
    queued = batch.memory_per_job(payload)
    finished = max(d.memory_bytes / d.jobs - payload for d in drains)
    status_p50 = max(r.p(0.5) for r in reads if r.name.startswith("job.status()"))
    rows = [
        ["submit_many jobs/s (>= 20000)", verdict(f"{batch.rate:.0f}", batch.rate >= BATCH_RATE_TARGET)],
        ["submit one by one / celery send_task (>= 1.0)",
         verdict(f"{single.rate / celery_single.rate:.3f}", single.rate / celery_single.rate >= SINGLE_RATIO_TARGET)],
        *[[f"drain / plain calls, {d.replicas} replica(s) (>= 1.0)",
           verdict(f"{d.rate / d.calls_rate:.3f}", d.rate / d.calls_rate >= DRAIN_RATIO_TARGET)] for d in drains],
        ["Redis bytes per queued job beyond the payload (<= 1024)",
         verdict(f"{queued:.0f}", queued <= MEMORY_TARGET_BYTES)],
        ["Redis bytes per finished job beyond the payload (<= 1024)",
         verdict(f"{finished:.0f}", finished <= MEMORY_TARGET_BYTES)],
        ["job.status() p50 ms (<= 1)", verdict(f"{status_p50:.3f}", status_p50 <= STATUS_P50_TARGET_MS)],
        ["queue item bytes: taskserve job / celery message", f"{queued_item_bytes:.0f} / {celery_item_bytes:.0f}"],
        ["Redis bytes per queued message beyond the payload: celery (baseline)",
         f"{celery_single.memory_per_job(payload):.0f}"],
        ["submit_many / LPUSH floor (jobs/s)", f"{batch.rate / floor.rate:.3f}"],
    ]
    print(markdown_table(["measure", "value"], rows))


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Jobs: submit and drain rates, Redis memory per job, status "
                                                 "reads; bare Celery on the same Redis as the baseline.")
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs submitted with submit_many (default: 100000)")
    parser.add_argument("--batch", type=int, default=1000, help="jobs per submit_many (default: 1000)")
    parser.add_argument("--single", type=int, default=20_000, help="jobs submitted one by one per path "
                        "(default: 20000)")
    parser.add_argument("--rounds", type=int, default=4, help="blocks the one-by-one paths take turns in (default: 4)")
    parser.add_argument("--drain-jobs", type=int, default=10_000, help="jobs per drain (default: 10000)")
    parser.add_argument("--drain-rounds", type=int, default=2, help="drains (each followed by plain calls) per "
                        "replica count, the jobs and calls split among them (default: 2)")
    parser.add_argument("--calls", type=int, default=5000, help="plain calls per replica count (default: 5000)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts (default: 1 2)")
    parser.add_argument("--status-reads", type=int, default=2000, help="status reads per kind (default: 2000)")
    parser.add_argument("--payload-bytes", type=int, default=100, help="each job's argument, in bytes (default: 100)")
    args = parser.parse_args(argv)
    if min(args.jobs, args.batch, args.single, args.rounds, args.drain_jobs, args.drain_rounds, args.calls,
           args.status_reads, *args.replicas) < 1 or args.payload_bytes < 0:
        parser.error("every count must be positive (--payload-bytes may be 0)")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    with cluster(work_dir, num_cpus=AGENT_NUM_CPUS, resync_s=None, clear_thread_limits=False) as local, \
            deleted_on_exit([DEPLOYMENT_NAME]):
        address = local.url
        print_head(address, command_line("bench_jobs"),
                   f"redis:    {address} (embedded, no persistence); logs in {work_dir}")
        redis_pids = [local.redis.process.pid] if local.redis is not None and local.redis.process is not None else []
        client = redis.Redis.from_url(address)
        raw_app = write_raw_app(address, work_dir / "raw_app").app
        payload = "x" * args.payload_bytes
        scale(0)
        handle = BenchJobs.get_handle()
        warm = handle.submit(payload)         # warm: the handle's checks, the script loaded
        forget_queued(client, DEPLOYMENT_NAME, [warm.id])
        send_one_by_one(raw_app, payload, 10)
        client.delete(RAW_QUEUE)

        # Submit in batches, then the LPUSH floor with the same items.
        batch = Block()
        batch_ids = measured(batch, redis_pids, client, args.jobs,
                             lambda: submit_batches(handle, payload, args.jobs, args.batch))
        lists = {key: client.llen(key) for key in queue_lists(queue_name(DEPLOYMENT_NAME))}
        items = client.lrange(max(lists, key=lambda key: lists[key]), 0, -1)
        if sum(lists.values()) != args.jobs or len(items) != args.jobs:
            raise AssertionError(f"expected {args.jobs} queued messages on one list, found {lists}")
        queued_item_bytes = statistics.fmean(len(item) for item in items)
        print(f"  submit_many: {batch.rate:.0f} jobs/s, {batch.memory_per_job(args.payload_bytes):.0f} bytes "
              "per queued job beyond the payload", flush=True)

        # Status reads of queued jobs (and Celery's pending tasks below).
        store = current_store()
        sample = random.sample(batch_ids, min(args.status_reads, len(batch_ids)))
        reads = [Reads("job.status(), QUEUED job"), Reads("floor: HGETALL of its record")]
        time_reads(reads, [lambda job_id: Job(job_id, DEPLOYMENT_NAME, store).status(),
                           lambda job_id: client.hgetall(job_key(job_id))], [sample, sample], 4)
        forget_queued(client, DEPLOYMENT_NAME, batch_ids)
        floor = Block()
        measured(floor, redis_pids, client, len(items), lambda: push_floor(client, items, args.batch, "bench_floor"))
        client.delete("bench_floor")
        items = []      # free them

        # One by one: taskserve's submit against Celery's send_task, taking turns.
        single, celery_single = Block(), Block()
        single_ids: list[str] = []
        celery_ids: list[str] = []
        for number, size in enumerate(split(args.single, args.rounds), start=1):
            pair = [("taskserve", single), ("celery", celery_single)]
            for path, block in (pair if number % 2 else pair[::-1]):
                if path == "taskserve":
                    single_ids += measured(block, redis_pids, client, size,
                                           lambda size=size: submit_one_by_one(handle, payload, size))
                else:
                    celery_ids += measured(block, redis_pids, client, size,
                                           lambda size=size: send_one_by_one(raw_app, payload, size))
            print(f"  one by one, round {number}: taskserve {single.rate:.0f}, celery {celery_single.rate:.0f} "
                  "jobs/s so far", flush=True)
        celery_item_bytes = statistics.fmean(len(item) for item in client.lrange(RAW_QUEUE, 0, 999))
        celery_reads = Reads("celery AsyncResult(id).state, PENDING task")
        time_reads([celery_reads], [lambda task_id: celery.result.AsyncResult(task_id, app=raw_app).state],
                   [random.sample(celery_ids, min(args.status_reads, len(celery_ids)))], 1)
        reads.append(celery_reads)
        forget_queued(client, DEPLOYMENT_NAME, single_ids)
        client.delete(RAW_QUEUE)

        # Drains, each followed by plain calls on the same replicas.
        drains = []
        for replicas in args.replicas:
            result, drained_ids = drain(handle, client, payload, replicas, args.drain_jobs, args.calls,
                                         args.drain_rounds)
            drains.append(result)
            print(f"  drain with {replicas} replica(s): {result.rate:.0f} jobs/s; plain calls "
                  f"{result.calls_rate:.0f}/s", flush=True)
            if replicas == args.replicas[0]:
                finished = Reads("job.status(), SUCCEEDED job")
                floor_finished = Reads("floor: HGETALL of its record (SUCCEEDED)")
                sample = random.sample(drained_ids, min(args.status_reads, len(drained_ids)))
                time_reads([finished, floor_finished],
                           [lambda job_id: Job(job_id, DEPLOYMENT_NAME, store).status(),
                            lambda job_id: client.hgetall(job_key(job_id))], [sample, sample], 4)
                reads += [finished, floor_finished]
            taskserve.purge_jobs(DEPLOYMENT_NAME, SUCCEEDED)
        report(args, batch, floor, single, celery_single, drains, reads, queued_item_bytes, celery_item_bytes)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: run(args, work_dir), "bench_jobs-")


if __name__ == "__main__":
    sys.exit(main())
