"""What the gateway reports: the cluster's status as JSON, and Prometheus metrics.

:func:`cluster_status` is one read of every deployment (status, versions, replicas by
node and state, queue depth, recent rollout events) in a few round trips
(:class:`StatusReader`); the dashboard shows it and the metrics export parts of it. The
gateway serves it from a :class:`StatusCache`, read again in the background every
``STATUS_REFRESH_S`` while asked for. :class:`GatewayMetrics` counts the gateway's own
requests in its own ``CollectorRegistry`` and adds the cluster gauges at each scrape.

Example::

    metrics = GatewayMetrics(lambda: cluster_status(store))
    metrics.observe("echo", "GET", 200, 0.004)
    print(metrics.render().decode())
    # taskserve_http_requests_total{deployment="echo",method="GET",status="200"} 1.0
    # taskserve_queue_depth{deployment="echo"} 0.0 ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..batching import BATCH_SIZES_FIELD
from ..spec import route_of
from ..state import Replica
from ..status import status_of
from ..store import AutoscaleState, ClusterReader, Store, queue_lists, queue_name
from ..store.keys import CONSUME_ORDER

log = logging.getLogger("taskserve.gateway.metrics")

# Rollout events the dashboard shows per deployment, newest first.
HISTORY_SHOWN = 8

# While /-/api/status or /-/metrics is asked for (in the last STATUS_IDLE_S), the
# gateway reads the status again every STATUS_REFRESH_S; a request finding a snapshot
# older than STATUS_MAX_AGE_S waits for a fresh read.
STATUS_REFRESH_S = 0.5
STATUS_MAX_AGE_S = 5.0
STATUS_IDLE_S = 60.0

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def cluster_status(store: Store, reader: Optional["StatusReader"] = None) -> dict[str, Any]:
    """Every deployment with its replicas, queue depth and recent rollout events, and the nodes.

    ``reader`` (a :class:`StatusReader`) keeps what it read, so that the next read
    re-reads and rebuilds only the deployments that changed.

    Example::

        reader = StatusReader(store)
        cluster_status(store, reader)["deployments"][0]["queue_depth"]     # 0
    """
    return (reader or StatusReader(store)).read()


class StatusReader:
    """:func:`cluster_status` in a constant number of Redis round trips, however many
    deployments and replicas there are: goals, healths and replicas through a
    :class:`~taskserve.store.ClusterReader` (only the deployments whose revision moved
    are read again), then one pipeline for the queue depths, the recent history, the
    jobs of every deployment (how many in each state, when the oldest waiting one was
    queued, the attempts started: the sizes of the state sets and one counter, in one
    command, never a job's record), the autoscaling states and canary stats, and the batch sizes of the replicas of changed
    deployments, then the nodes. A deployment's status is built again only when its
    revision, autoscaling state or stats moved; a history entry is parsed once.

    Not thread-safe: one read at a time.

    Example::

        reader = StatusReader(store)
        first = reader.read()        # reads everything
        second = reader.read()       # re-reads what moves without a revision: queues, history, ...
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reader = ClusterReader(store)
        # name -> (what it was built from, the status dict without the parts read each time)
        self.statuses: dict[str, tuple[tuple, dict[str, Any]]] = {}
        # name -> (revision, {replica id: batch sizes})
        self.batch_sizes: dict[str, tuple[int, dict[str, Any]]] = {}
        # a history entry as Redis holds it -> the fields shown
        self.events: dict[bytes, dict[str, Any]] = {}

    def read(self) -> dict[str, Any]:
        store = self.store
        records, changed = self.reader.read()
        goals = [record.goal for record in records.values() if record.goal is not None and not record.goal.deleting]
        stale_batches = {goal.name for goal in goals if goal.name in changed or goal.name not in self.batch_sizes
                         or self.batch_sizes[goal.name][0] != records[goal.name].revision}
        names = [goal.name for goal in goals]
        with store.redis.pipeline(transaction=False) as pipe:
            if names:
                store.job_summaries(names, pipe=pipe)
            for goal in goals:
                for key in queue_lists(queue_name(goal.name)):
                    pipe.llen(key)
                pipe.lrange(store.history_key(goal.name), -HISTORY_SHOWN, -1)
                if goal.options.get("autoscaling_config"):
                    pipe.get(store.scale_key(goal.name))
                if goal.canary is not None:
                    pipe.hgetall(store.stats_key(goal.name))
                if goal.name in stale_batches:
                    for replica in records[goal.name].replicas:
                        pipe.hget(store.replica_key(replica.replica_id), BATCH_SIZES_FIELD)
            rows = iter(pipe.execute())
        jobs = store.job_summaries_of(names, next(rows)) if names else {}
        deployments, statuses, events = [], {}, {}
        # One line for each record left out because it cannot be read: the rest is shown.
        skipped = [f"deployment {name}: {record.error}" for name, record in sorted(records.items())
                   if record.goal is None and record.error]
        for goal in goals:
            depth = sum(int(next(rows)) for _ in CONSUME_ORDER)
            history = next(rows)
            scale_text = next(rows) if goal.options.get("autoscaling_config") else None
            stats = {_text(k): int(v) for k, v in next(rows).items()} if goal.canary is not None else {}
            record = records[goal.name]
            built_from = (record.revision, scale_text, tuple(sorted(stats.items())))
            cached = self.statuses.get(goal.name)
            if cached is None or cached[0] != built_from or record.error:
                scale = self._autoscale_state(goal.name, scale_text)
                try:
                    cached = (built_from, status_of(goal, record.health, list(record.replicas), scale, stats,
                                                    record.unreadable_replicas).to_dict())
                except (TypeError, ValueError) as error:      # a goal written by hand: its options are not options
                    skipped.append(f"deployment {goal.name}: its goal cannot be read: {_first_line(error)}")
                    for _ in (record.replicas if goal.name in stale_batches else ()):
                        next(rows)                            # its batch sizes, read in the pipeline
                    continue
            statuses[goal.name] = cached
            skipped.extend(cached[1]["skipped"])
            for raw in history:
                if raw not in events:
                    events[raw] = self.events[raw] if raw in self.events else _event(raw)
            deployments.append({
                **cached[1],
                "batch_sizes": self._batch_sizes_of(goal.name, record.revision, record.replicas, rows,
                                                    goal.name in stale_batches),
                "route_prefix": route_of(goal.name, goal.options),
                "queue_depth": depth,
                "jobs": jobs[goal.name].counts,
                "jobs_oldest_queued_at": jobs[goal.name].oldest_queued_at,
                "job_attempts": jobs[goal.name].attempts,
                "history": [events[raw] for raw in reversed(history) if events[raw] is not None],
            })
        self.statuses, self.events = statuses, events
        self.batch_sizes = {name: self.batch_sizes[name] for name in statuses if name in self.batch_sizes}
        nodes = [
            {"node_id": node.node_id, "alive": node.alive, "hostname": node.hostname,
             "num_cpus": node.total.num_cpus, "num_gpus": node.total.num_gpus}
            for node in store.list_nodes()
        ]
        return {
            "time": time.time(),
            "deployments": deployments,
            "nodes": nodes,
            "rollouts_in_progress": sum(1 for d in deployments if d["status"] == "UPDATING"),
            "skipped": skipped,
        }

    def _batch_sizes_of(self, name: str, revision: int, replicas: tuple[Replica, ...], rows: Iterator[Any],
                        stale: bool) -> dict[str, Any]:
        """The batch sizes of ``name``'s replicas: read again in this read's pipeline
        (``rows``) if ``stale``, else as last read (they move the revision when written)."""
        if not stale:
            return self.batch_sizes[name][1]
        sizes = {}
        for replica in replicas:
            text = next(rows)
            if text is None:
                continue
            try:
                sizes[replica.replica_id] = json.loads(text)
            except ValueError:
                log.warning("replica %s has unreadable batch sizes; left out of the metrics", replica.replica_id)
        self.batch_sizes[name] = (revision, sizes)
        return sizes

    def _autoscale_state(self, name: str, text: Optional[bytes]) -> Optional[AutoscaleState]:
        if text is None:
            return None
        try:
            return AutoscaleState.from_json(text)
        except (ValueError, TypeError) as error:
            self.store.report_unreadable(f"the autoscaling state of deployment {name}", str(error))
            return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _event(raw: bytes) -> Optional[dict[str, Any]]:
    """The fields the dashboard shows of one history entry (None if it cannot be read).

    >>> _event(b'{"generation": 2, "action": "scale", "goal": {"name": "echo"}}')["action"]
    'scale'
    """
    try:
        entry = json.loads(raw)
    except ValueError:
        log.warning("a history entry cannot be read; left out of the status: %r", raw[:60])
        return None
    return {key: entry.get(key) for key in ("generation", "action", "version", "by", "at", "outcome",
                                             "outcome_message", "from", "to", "reason")}


def _text(value: Union[str, bytes]) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class StatusSnapshot:
    """The cluster's status as read at ``read_at`` (``time.monotonic()``), and as JSON."""

    status: dict[str, Any]
    body: bytes
    read_at: float


class StatusCache:
    """The cluster's status as the gateway last read it, read again in the background
    every ``refresh_s`` while it is asked for, so that a request never waits on Redis.

    :meth:`current` answers from the snapshot unless there is none, it is older than
    ``max_age_s`` (nobody asked for ``idle_s``, so :meth:`follow` stopped reading), or
    the last read failed: then it waits for a read (one at a time, shared by all who
    wait). While followed, a snapshot is at most ``refresh_s`` plus one read old.

    Example::

        cache = StatusCache(StatusReader(store).read)
        asyncio.create_task(cache.follow())
        snapshot = await cache.current()      # snapshot.body: the JSON of /-/api/status
    """

    def __init__(self, read: Callable[[], dict[str, Any]], refresh_s: float = STATUS_REFRESH_S,
                 max_age_s: float = STATUS_MAX_AGE_S, idle_s: float = STATUS_IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read = read
        self.refresh_s = refresh_s
        self.max_age_s = max_age_s
        self.idle_s = idle_s
        self.clock = clock
        self.snapshot: Optional[StatusSnapshot] = None
        self.error: Optional[BaseException] = None
        self.asked_at = -float("inf")
        self.asked = asyncio.Event()   # set on each request: wakes an idle follow()
        self._reading: Optional[asyncio.Future] = None

    async def current(self) -> StatusSnapshot:
        """The latest snapshot, or a fresh one if it is missing, too old or failed;
        raises what the read raised."""
        self.asked_at = self.clock()
        self.asked.set()
        snapshot = self.snapshot
        if snapshot is None or self.error is not None or self.asked_at - snapshot.read_at > self.max_age_s:
            await self.refresh()
        if self.error is not None:
            raise self.error
        assert self.snapshot is not None
        return self.snapshot

    def latest(self) -> dict[str, Any]:
        """The latest status without waiting (for the metrics); raises what the last read raised."""
        if self.error is not None:
            raise self.error
        if self.snapshot is None:
            raise LookupError("the cluster's status has not been read yet")
        return self.snapshot.status

    async def refresh(self) -> None:
        """Read the status again in a thread (or wait for the read under way)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(asyncio.to_thread(self._read))
            self._reading.add_done_callback(self._read_done)
        await asyncio.shield(self._reading)

    def _read(self) -> StatusSnapshot:
        status = self.read()
        body = json.dumps(status, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        return StatusSnapshot(status, body, self.clock())

    def _read_done(self, reading: asyncio.Future) -> None:
        self._reading = None
        if reading.cancelled():
            return
        error = reading.exception()
        if error is None:
            self.snapshot, self.error = reading.result(), None
        else:
            self.error = error

    async def follow(self) -> None:
        """Read the status every ``refresh_s`` while it was asked for in the last ``idle_s``;
        asleep (no timer) from then until the next request asks for it."""
        while True:
            await asyncio.sleep(self.refresh_s)
            if self.clock() - self.asked_at > self.idle_s:
                self.asked.clear()
                await self.asked.wait()
                continue
            try:
                await self.refresh()
            except Exception as error:   # kept in self.error: the next request reads again
                log.debug("cannot read the cluster's status: %s", error)


class ClusterCollector:
    """Prometheus gauges read from the cluster at each scrape."""

    def __init__(self, read_status: Callable[[], dict[str, Any]]) -> None:
        self.read_status = read_status

    def collect(self) -> Iterator[Metric]:
        try:
            status = self.read_status()
        except Exception as error:   # Redis away: still export the gateway's own metrics
            log.warning("cannot read the cluster's status for the metrics: %s", error)
            return
        depth = GaugeMetricFamily("taskserve_queue_depth", "Requests waiting in a deployment's queue.",
                                  labels=["deployment"])
        replicas = GaugeMetricFamily("taskserve_replicas", "Replicas of a deployment by state and version.",
                                     labels=["deployment", "state", "version"])
        target = GaugeMetricFamily("taskserve_target_replicas", "The replica count a deployment should have.",
                                   labels=["deployment"])
        load = GaugeMetricFamily("taskserve_autoscale_load", "An autoscaled deployment's load: requests "
                                 "waiting in its queue and being served.", labels=["deployment", "kind"])
        for deployment in status["deployments"]:
            name = deployment["name"]
            depth.add_metric([name], deployment["queue_depth"])
            target.add_metric([name], deployment["num_replicas"])
            scaling = deployment.get("autoscaling")
            if scaling:
                load.add_metric([name, "waiting"], scaling["waiting"])
                load.add_metric([name, "serving"], scaling["serving"])
            counts: dict[tuple[str, str], int] = {}
            for replica in deployment["replicas"]:
                key = (replica["state"], replica["version"])
                counts[key] = counts.get(key, 0) + 1
            for (state, version), count in sorted(counts.items()):
                replicas.add_metric([name, state, version], count)
        yield depth
        yield replicas
        yield target
        yield load
        yield from _job_metrics(status["deployments"], status["time"])
        yield from _canary_metrics(status["deployments"])
        yield from _batch_size_histograms(status["deployments"])
        yield GaugeMetricFamily("taskserve_rollouts_in_progress", "Deployments whose rollout is not done yet.",
                                value=status["rollouts_in_progress"])


def _job_metrics(deployments: list[dict[str, Any]], read_at: float) -> Iterator[Metric]:
    """Jobs by deployment and state, the age of the oldest waiting one (0 when none
    waits; as of the status read at ``read_at``), and the attempts started."""
    states = GaugeMetricFamily("taskserve_jobs", "Jobs of a deployment by state (finished ones until they expire).",
                               labels=["deployment", "state"])
    oldest = GaugeMetricFamily("taskserve_jobs_oldest_queued_age_seconds", "How long the oldest QUEUED job of a "
                               "deployment has waited (0 when none waits).", labels=["deployment"])
    attempts = CounterMetricFamily("taskserve_job_attempts", "Job attempts the replicas of a deployment started "
                                   "(retries and redeliveries included).", labels=["deployment"])
    for deployment in deployments:
        name = deployment["name"]
        for state, count in deployment["jobs"].items():
            states.add_metric([name, state], count)
        since = deployment["jobs_oldest_queued_at"]
        oldest.add_metric([name], max(0.0, read_at - since) if since is not None else 0.0)
        attempts.add_metric([name], deployment["job_attempts"])
    yield states
    yield oldest
    yield attempts


def _canary_metrics(deployments: list[dict[str, Any]]) -> Iterator[Metric]:
    """A running canary's split, and the requests and errors of it and of the stable
    version since it started, labelled by version (and ``role``: canary or stable)."""
    percent = GaugeMetricFamily("taskserve_canary_traffic_percent", "The share of the requests a canary gets.",
                                labels=["deployment", "version"])
    requests = GaugeMetricFamily("taskserve_canary_requests", "Requests served since the canary started, "
                                 "by version.", labels=["deployment", "version", "role"])
    errors = GaugeMetricFamily("taskserve_canary_errors", "Requests whose code raised since the canary "
                               "started, by version.", labels=["deployment", "version", "role"])
    for deployment in deployments:
        canary = deployment.get("canary")
        if not canary:
            continue
        name, stable = deployment["name"], canary["stable"]
        percent.add_metric([name, canary["version"]], canary["percent"])
        for role, counts in (("canary", canary), ("stable", stable)):
            requests.add_metric([name, counts["version"], role], counts["requests"])
            errors.add_metric([name, counts["version"], role], counts["errors"])
    yield percent
    yield requests
    yield errors


def _batch_size_histograms(deployments: list[dict[str, Any]]) -> Iterator[Metric]:
    """``taskserve_batch_size``: the batch sizes each batched replica served, per method,
    as the replica counts them (its record holds ``{method: histogram}``)."""
    family = HistogramMetricFamily("taskserve_batch_size", "Requests per model call of batched replicas.",
                                   labels=["deployment", "replica", "method"])
    for deployment in deployments:
        for replica_id, methods in sorted((deployment.get("batch_sizes") or {}).items()):
            for method, sizes in sorted(methods.items() if isinstance(methods, dict) else ()):
                try:
                    buckets = sorted((float(bound), int(count)) for bound, count in sizes["buckets"].items())
                    family.add_metric([deployment["name"], replica_id, method],
                                      [("+Inf" if bound == float("inf") else f"{bound:g}", count)
                                       for bound, count in buckets],
                                      sum_value=float(sizes["sum"]))
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue   # written by another version of the replica: left out
    yield family


class GatewayMetrics:
    """The gateway's request metrics and the cluster gauges, in one registry."""

    def __init__(self, read_status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("taskserve_http_requests", "HTTP requests answered, by deployment and status.",
                                ["deployment", "method", "status"], registry=self.registry)
        self.latency = Histogram("taskserve_http_request_duration_seconds",
                                 "Time from a request's arrival to its answer.", ["deployment", "status"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("taskserve_http_errors", "HTTP requests answered with an error, by kind.",
                              ["deployment", "status", "error"], registry=self.registry)
        self.in_flight = Gauge("taskserve_http_requests_in_flight", "HTTP requests waiting for their answer.",
                               ["deployment"], registry=self.registry)
        self.registry.register(ClusterCollector(read_status))

    def observe(self, deployment: str, method: str, status: int, seconds: float, error: str = "") -> None:
        """Count one answered request (``deployment`` is "" when no route matched)."""
        code = str(status)
        self.requests.labels(deployment, method, code).inc()
        self.latency.labels(deployment, code).observe(seconds)
        if error:
            self.errors.labels(deployment, code, error).inc()

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (reads the cluster: call it off the event loop)."""
        return generate_latest(self.registry)
