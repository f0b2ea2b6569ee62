"""The control plane at scale, simulated: a controller pass, a rolling update's planning,
and the gateway's route table and status pages over 1,000 deployments.

What it measures
----------------
No replica or agent process runs: a real ``redis-server`` (no persistence, started by
the script) holds the records a cluster of that size would, written through the
:class:`~taskserve.store.Store` API: ``--deployments`` goals (default 1,000) of
``--replicas`` RUNNING replicas each (default 10), spread over ``--nodes`` live nodes
(default 100), each deployment HEALTHY as a first controller pass concluded.

* **controller pass**: :meth:`taskserve.controller.Controller.reconcile_once` over that
  state with nothing changed, ``--passes`` times (default 20; the first, which finds
  the state, and the next, which reads the healths it wrote, are not counted; the first
  pass of a new controller, which reads everything, is shown apart). Its Redis round trips are counted on the controller's own
  connection (a pipeline or a transaction is one). The same is measured with
  ``--small-replicas`` replicas per deployment (default 2): the round trips must be the
  same for both, whatever the number of replicas.
* **baseline**: the floor of reading that state, in the same run: one pipelined ``GET``
  of every goal and health and ``HGETALL`` of every replica record, decoded to ``str``
  and nothing more.
* **rolling update**: one deployment of 100 replicas among the others gets a new
  version; :func:`taskserve.planner.plan` (pure: no Redis) is timed on each batch until
  all 100 run the new version, the replicas it stops gone and those it starts RUNNING
  between batches (batches of 20: ``max_unavailable`` 0.2).
* **gateway**: :func:`taskserve.gateway.app.read_routes` (what the gateway re-reads on a
  change: its first read, and one with nothing changed), the status read
  (:class:`taskserve.gateway.metrics.StatusReader`: what the gateway reads in the
  background every 0.5 s while the status or metrics are asked for, with its round
  trips), and the ``/-/routes``, ``/-/api/status`` and ``/-/metrics`` handlers of
  :class:`taskserve.gateway.app.Gateway`, called in process (no HTTP server; the status
  and metrics answer from the snapshot, as they do between background reads).

How to read it
--------------
Times are medians (p50) and maxima of ``--passes`` runs, in milliseconds. The targets
(issue 12): a pass <= 50 ms, round trips not growing with the replicas, a batch planned
in <= 5 ms, each gateway figure <= 20 ms. ``pass / baseline`` says how much a pass costs
beyond reading the state once.

Usage, from the repository root::

    python -m benchmarks.bench_control_plane [--deployments 1000] [--replicas 10] [--nodes 100]
                                             [--small-replicas 2] [--passes 20] [--profile]

``--profile`` prints a pyinstrument profile of the controller passes too. A smoke run
(seconds; the figures mean little): ``--deployments 20 --nodes 4 --passes 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import redis

import taskserve
from benchmarks.common import bench_main, command_line, load_average, markdown_table, print_head
from taskserve.controller import Controller
from taskserve.gateway.app import Gateway, read_routes
from taskserve.gateway.metrics import StatusReader
from taskserve.planner import NodeCapacity, StartReplica, StopReplica, node_capacities, plan
from taskserve.redis_server import RedisServer
from taskserve.signing import SECRET_ENV, generate_secret, node_secret, sign_goal
from taskserve.state import DeploymentHealth, Goal, Node, Replica, ReplicaState, Resources
from taskserve.store import Store

# The controller and the gateway act only on goals signed with the cluster secret: one for
# this run (and the processes it starts), unless the environment has one.
os.environ.setdefault(SECRET_ENV, generate_secret())
SECRET = node_secret()

PASS_TARGET_MS = 50.0
BATCH_TARGET_MS = 5.0
GATEWAY_TARGET_MS = 20.0
STATUS_TRIPS_TARGET = 8
ROLLING_REPLICAS = 100
NODE_CPUS = 1000.0
NODE_TTL_S = 3600.0


# --------------------------------------------------------------------------- round trips


class CountingConnection(redis.Connection):
    """A Redis connection that counts what it sends: one count per command, pipeline
    or transaction (each is one ``send_packed_command``), so one per round trip."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        super().send_packed_command(command, check_health)


def counting_store(port: int) -> Store:
    """A store whose connections count their round trips in ``CountingConnection.sent``."""
    pool = redis.ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=port)
    return Store(redis.Redis(connection_pool=pool))


# --------------------------------------------------------------------------- the records


def goal_of(name: str, num_replicas: int, version: str = "1") -> Goal:
    """A goal as a client writes it: signed with the cluster secret, so the controller plans it."""
    return sign_goal(Goal(name=name, generation=0, version=version, spec_hash=f"spec-{version}",
                          num_replicas=num_replicas, options={"num_cpus": 0.1, "version": version,
                                                              "max_unavailable": 0.2},
                          code_sha="code", init_sha="init", user_version=version), SECRET)


def replica_of(goal: Goal, index: int, node_id: str, created_at: float) -> Replica:
    return Replica(replica_id=f"{goal.name}-{index:04d}", deployment=goal.name, spec_hash=goal.replica_spec,
                   version=goal.version, node_id=node_id, state=ReplicaState.RUNNING, pid=10_000 + index,
                   created_at=created_at, num_cpus=0.1, code_sha=goal.code_sha, config_hash=goal.user_config_hash,
                   applied_config_hash=goal.user_config_hash)


def populate(store: Store, deployments: int, replicas: int, nodes: int) -> list[str]:
    """Write the nodes, goals and RUNNING replicas through the store; the deployment names."""
    node_ids = [f"node-{i:03d}" for i in range(nodes)]
    for node_id in node_ids:
        store.register_node(Node(node_id, Resources(num_cpus=NODE_CPUS, memory=2**40)), ttl_s=NODE_TTL_S)
    names = [f"model-{i:04d}" for i in range(deployments)]
    slot = 0
    for name in names:
        goal = store.update_goal(name, lambda _previous, n=name: goal_of(n, replicas), "deploy", missing_ok=True)
        assert goal is not None
        for index in range(replicas):
            store.create_replica(replica_of(goal, index, node_ids[slot % nodes], 1.0 + index))
            slot += 1
    return names


def clear(store: Store) -> None:
    store.redis.flushdb()


# --------------------------------------------------------------------------- measurements


@dataclass
class Timing:
    p50_ms: float
    max_ms: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        return cls(statistics.median(seconds) * 1000, max(seconds) * 1000, len(seconds))


def timed(fn: Callable[[], Any], repeats: int) -> Timing:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Timing.of(seconds)


@dataclass
class PassFigures:
    replicas: int
    timing: Timing
    round_trips: int           # of one pass (the same for each: the most seen)
    baseline: Timing
    first_ms: float            # the first pass of a new controller: it reads everything


def measure_passes(port: int, deployments: int, replicas: int, nodes: int, passes: int,
                   profile: bool) -> PassFigures:
    """Populate, settle with one pass, then time ``passes`` passes with nothing changed."""
    store = counting_store(port)
    clear(store)
    names = populate(store, deployments, replicas, nodes)
    controller = Controller(store)
    controller.lease = store.acquire_lease(controller.controller_id, 600)
    controller.reconcile_once()                       # concludes HEALTHY for each (writes the healths)
    controller.reconcile_once()                       # reads those healths: settled
    fresh = Controller(store)                         # what a new leader's first pass costs
    fresh.lease = controller.lease
    start = time.perf_counter()
    fresh.reconcile_once()
    first_ms = (time.perf_counter() - start) * 1000
    trips = []
    seconds = []
    profiler = None
    if profile:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.0005)
        profiler.start()
    for _ in range(passes):
        before = CountingConnection.sent
        start = time.perf_counter()
        controller.reconcile_once()
        seconds.append(time.perf_counter() - start)
        trips.append(CountingConnection.sent - before)
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False), flush=True)
    baseline = timed(lambda: read_floor(store.redis, names), max(3, passes // 2))
    store.release_lease(controller.controller_id)
    return PassFigures(replicas, Timing.of(seconds), max(trips), baseline, first_ms)


def read_floor(client: redis.Redis, names: list[str]) -> int:
    """The floor of reading the state: every goal, health, replica set and replica
    record in two pipelines, decoded to ``str``; the number of replica records."""
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(Store.goal_key(name))
            pipe.get(Store.health_key(name))
            pipe.smembers(Store.replicas_key(name))
        rows = pipe.execute()
    ids = [i.decode() for members in rows[2::3] for i in members]
    with client.pipeline(transaction=False) as pipe:
        for replica_id in ids:
            pipe.hgetall(Store.replica_key(replica_id))
        records = pipe.execute()
    decoded = [{k.decode(): v.decode() for k, v in record.items()} for record in records]
    return len(decoded)


def measure_rolling_update(store: Store, deployments: int, nodes: int) -> list[tuple[int, float, int, int]]:
    """Plan a rolling update of one 100-replica deployment among ``deployments`` others,
    batch by batch: ``(batch, ms, stopped, started)`` for each."""
    node_list = store.list_nodes()
    others = store.all_replicas()
    old = goal_of("rolling", ROLLING_REPLICAS)
    replicas = [replica_of(old, i, node_list[i % nodes].node_id, 1.0 + i) for i in range(ROLLING_REPLICAS)]
    new = replace(goal_of("rolling", ROLLING_REPLICAS, version="2"), generation=2)
    health = DeploymentHealth(observed_generation=2)
    counter = iter(range(10**6))
    batches: list[tuple[int, float, int, int]] = []
    for batch in range(1, 4 * ROLLING_REPLICAS):
        capacities: list[NodeCapacity] = node_capacities(node_list, others + replicas)
        start = time.perf_counter()
        result = plan(new, replicas, capacities, health, now=100.0 + batch,
                      new_id=lambda: f"rolling-new-{next(counter):04d}", dead_nodes=frozenset())
        elapsed = time.perf_counter() - start
        stopped = {a.replica_id for a in result.actions if isinstance(a, StopReplica)}
        started = [a.replica for a in result.actions if isinstance(a, StartReplica)]
        if not result.actions:
            break
        batches.append((batch, elapsed * 1000, len(stopped), len(started)))
        # Between batches: the drained replicas are gone, the new ones RUNNING.
        replicas = [r for r in replicas if r.replica_id not in stopped] + \
                   [replace(r, state=ReplicaState.RUNNING) for r in started]
    if any(r.version != "2" for r in replicas) or len(replicas) != ROLLING_REPLICAS:
        raise RuntimeError(f"the rolling update did not end with {ROLLING_REPLICAS} replicas of version 2")
    return batches


def measure_gateway(port: int, repeats: int) -> tuple[dict[str, Timing], int]:
    """``read_routes``, the status read, and the ``/-/routes``, ``/-/api/status`` and
    ``/-/metrics`` handlers; and the round trips of a status read with nothing changed."""
    address = f"redis://127.0.0.1:{port}/0"
    taskserve.connect(address)
    gateway = Gateway(address)
    cold = timed(lambda: read_routes(gateway.store, gateway.secret), 1)      # what a gateway's first read costs
    gateway.routes = read_routes(gateway.store, gateway.secret, gateway.route_reader)

    async def call(handler: Callable[..., Any]) -> int:
        response = await handler(None)
        if response.status_code != 200:
            raise RuntimeError(f"{handler.__name__} answered {response.status_code}: {response.body[:200]!r}")
        return len(response.body)

    asyncio.run(call(gateway.status))          # the gateway's first status read: timed below on its own
    status_store = counting_store(port)
    reader = StatusReader(status_store)
    status_cold = timed(reader.read, 1)
    before = CountingConnection.sent
    status_read = timed(reader.read, repeats)
    status_trips = (CountingConnection.sent - before) // repeats
    return {
        "read_routes, first read": cold,
        "read_routes, nothing changed": timed(lambda: read_routes(gateway.store, gateway.secret, gateway.route_reader),
                                              repeats),
        "GET /-/routes": timed(lambda: asyncio.run(call(gateway.list_routes)), repeats),
        "status read, first read": status_cold,
        "status read (background), nothing changed": status_read,
        "GET /-/api/status": timed(lambda: asyncio.run(call(gateway.status)), repeats),
        "GET /-/metrics": timed(lambda: asyncio.run(call(gateway.prometheus)), repeats),
    }, status_trips


# --------------------------------------------------------------------------- report


def verdict(value: float, target: float) -> str:
    return f"{value:.2f} {'ok' if value <= target else 'MISS'}"


def ms(value: float) -> str:
    return f"{value:.2f}"


def report(args: argparse.Namespace, big: PassFigures, small: PassFigures,
           batches: list[tuple[int, float, int, int]], gateway: dict[str, Timing], status_trips: int) -> None:
    print(f"\n{args.deployments} deployments on {args.nodes} nodes; load {load_average()} (1/5/15 min) at the end\n")
    rows = []
    for figures in (big, small):
        rows.append([f"controller pass, {figures.replicas} replicas each", str(figures.timing.n),
                     ms(figures.timing.p50_ms), ms(figures.timing.max_ms), str(figures.round_trips),
                     f"{figures.timing.p50_ms / figures.baseline.p50_ms:.2f}"])
        rows.append([f"first pass of a new controller, {figures.replicas} replicas each", "1",
                     ms(figures.first_ms), ms(figures.first_ms), "", f"{figures.first_ms / figures.baseline.p50_ms:.2f}"])
        rows.append([f"baseline: pipelined read, {figures.replicas} replicas each", str(figures.baseline.n),
                     ms(figures.baseline.p50_ms), ms(figures.baseline.max_ms), "2", "1.00"])
    print(markdown_table(["what", "n", "p50 ms", "max ms", "round trips", "pass / baseline"], rows))
    print()
    print(markdown_table(["rolling update batch", "plan ms", "stopped", "started"],
                         [[str(b), f"{t:.3f}", str(s), str(n)] for b, t, s, n in batches]))
    print()
    print(markdown_table(["gateway", "n", "p50 ms", "max ms"],
                         [[name, str(t.n), ms(t.p50_ms), ms(t.max_ms)] for name, t in gateway.items()]))
    print()
    worst_batch = max(t for _, t, _, _ in batches)
    targets = [
        [f"controller pass p50, {big.replicas} replicas each, ms (target <= {PASS_TARGET_MS:g})",
         verdict(big.timing.p50_ms, PASS_TARGET_MS)],
        [f"round trips of a pass, {big.replicas} vs {small.replicas} replicas each (target: equal)",
         f"{big.round_trips} vs {small.round_trips} {'ok' if big.round_trips == small.round_trips else 'MISS'}"],
        [f"slowest rolling update batch, ms (target <= {BATCH_TARGET_MS:g})", verdict(worst_batch, BATCH_TARGET_MS)],
        *[[f"{name} p50, ms (target <= {GATEWAY_TARGET_MS:g})", verdict(t.p50_ms, GATEWAY_TARGET_MS)]
          for name, t in gateway.items() if "first read" not in name and "background" not in name],
        ["status read, its round trips with nothing changed (target: a few, whatever the size)",
         f"{status_trips} {'ok' if status_trips <= STATUS_TRIPS_TARGET else 'MISS'}"],
    ]
    print(markdown_table(["check", "value"], targets))


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The control plane at scale, simulated in a real Redis.")
    parser.add_argument("--deployments", type=int, default=1000, help="deployments (default: 1000)")
    parser.add_argument("--replicas", type=int, default=10, help="replicas of each (default: 10)")
    parser.add_argument("--small-replicas", type=int, default=2,
                        help="replicas of each in the second setup, for the round trips (default: 2)")
    parser.add_argument("--nodes", type=int, default=100, help="nodes (default: 100)")
    parser.add_argument("--passes", type=int, default=20, help="timed passes and gateway calls (default: 20)")
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile of the passes")
    args = parser.parse_args(argv)
    if min(args.deployments, args.replicas, args.small_replicas, args.nodes, args.passes) < 1:
        parser.error("the counts must be positive")
    if args.nodes * NODE_CPUS < 0.1 * (args.deployments * args.replicas + 2 * ROLLING_REPLICAS):
        parser.error("the nodes cannot hold that many replicas; give more --nodes")
    return args


def run(args: argparse.Namespace, work_dir: Path) -> None:
    server = RedisServer().start()
    try:
        print_head(server.url, command_line("bench_control_plane"))
        small = measure_passes(server.port, args.deployments, args.small_replicas, args.nodes, args.passes,
                               profile=False)
        print(f"  {args.small_replicas} replicas each: pass p50 {small.timing.p50_ms:.2f} ms", flush=True)
        big = measure_passes(server.port, args.deployments, args.replicas, args.nodes, args.passes, args.profile)
        print(f"  {args.replicas} replicas each: pass p50 {big.timing.p50_ms:.2f} ms", flush=True)
        store = Store(redis.Redis(port=server.port))
        batches = measure_rolling_update(store, args.deployments, args.nodes)
        gateway, status_trips = measure_gateway(server.port, args.passes)
        report(args, big, small, batches, gateway, status_trips)
    finally:
        server.stop()


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its report; the exit code."""
    args = parse_args(argv)
    return bench_main(lambda work_dir: run(args, work_dir), "bench_control_plane-")


if __name__ == "__main__":
    sys.exit(main())
