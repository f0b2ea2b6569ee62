"""What the gateway reports: the cluster's status as JSON, and Prometheus metrics.

:func:`cluster_status` is one read of every deployment (status, versions, replicas by
node and state, queue depth, recent rollout events); the dashboard shows it and the
metrics export parts of it. :class:`GatewayMetrics` counts the gateway's own requests
in its own ``CollectorRegistry`` and adds the cluster gauges at each scrape.

Example::

    metrics = GatewayMetrics(lambda: cluster_status(store))
    metrics.observe("echo", "GET", 200, 0.004)
    print(metrics.render().decode())
    # taskserve_http_requests_total{deployment="echo",method="GET",status="200"} 1.0
    # taskserve_queue_depth{deployment="echo"} 0.0 ...
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from .. import api
from ..batching import BATCH_SIZES_FIELD
from ..errors import DeploymentNotFound
from ..spec import route_of
from ..store import Store

log = logging.getLogger("taskserve.gateway.metrics")

# Rollout events the dashboard shows per deployment, newest first.
HISTORY_SHOWN = 8

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def cluster_status(store: Store) -> dict[str, Any]:
    """Every deployment with its replicas, queue depth and recent rollout events, and the nodes.

    Reads through :func:`taskserve.api.deployment_status`, so it needs the process to be
    connected (``taskserve.connect``) to the same Redis as ``store``.
    """
    goals = [goal for goal in store.list_goals() if not goal.deleting]
    depths = store.queue_depths(goal.name for goal in goals)
    deployments = []
    for goal in goals:
        try:
            status = api.deployment_status(goal.name)
        except DeploymentNotFound:
            continue   # deleted since the goals were read
        events = [
            {key: entry.get(key) for key in ("generation", "action", "version", "by", "at", "outcome", "outcome_message",
                                              "from", "to", "reason")}
            for entry in store.history(goal.name)[-HISTORY_SHOWN:]
        ]
        batch_sizes = {}
        for replica_id, text in store.replica_field((r.replica_id for r in status.replicas), BATCH_SIZES_FIELD).items():
            try:
                batch_sizes[replica_id] = json.loads(text)
            except ValueError:
                log.warning("replica %s has unreadable batch sizes; left out of the metrics", replica_id)
        deployments.append({
            **status.to_dict(),
            "batch_sizes": batch_sizes,
            "route_prefix": route_of(goal.name, goal.options),
            "queue_depth": depths.get(goal.name, 0),
            "history": events[::-1],
        })
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
    }


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
        yield from _batch_size_histograms(status["deployments"])
        yield GaugeMetricFamily("taskserve_rollouts_in_progress", "Deployments whose rollout is not done yet.",
                                value=status["rollouts_in_progress"])


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
