"""Autoscaling end to end: real Redis, controller (``--resync 0.5``), agent and replicas.

A burst of slow requests grows the pool to ``max_replicas`` and the pool shrinks back
once it is served, with every request answered; a deployment with ``min_replicas=0``
goes to zero replicas when idle and wakes for the next request; a rolling update of an
autoscaled deployment keeps the count the autoscaler chose. The benchmark's smoke run
(``benchmarks/bench_autoscale.py --smoke``) is here too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Iterator

import pytest

import taskserve
from taskserve.store import Store

from .helpers import Cluster, addressed_cluster, wait_until
from .test_benchmarks import assert_figures, checks, run_benchmark, table_with

pytestmark = pytest.mark.integration


class Slow:
    """Serves a request in ``seconds``; answers with the request's id and its own pid."""

    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag

    def __call__(self, request_id: str, seconds: float) -> list:
        time.sleep(seconds)
        return [request_id, os.getpid(), self.tag]


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with addressed_cluster(tmp_path_factory.mktemp("autoscale"), ("node-a",), 8) as cluster:
        yield cluster


@pytest.fixture
def store(own_cluster: Cluster) -> Store:
    return taskserve.connect(own_cluster.url)


def running(store: Store, name: str) -> list:
    """The replicas of ``name`` that run and are told to."""
    _, _, replicas = store.snapshot(name)
    return [r for r in replicas if r.state.value == "RUNNING" and r.desired == "run"]


def present(store: Store, name: str) -> int:
    _, _, replicas = store.snapshot(name)
    return len(replicas)


def target(store: Store, name: str) -> int:
    state = store.autoscale_state(name)
    assert state is not None, f"no autoscaling state for {name}"
    return state.target


def test_a_burst_grows_the_pool_to_max_and_it_shrinks_back_without_losing_a_request(store, unique_name):
    config = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
              "upscale_delay_s": 0.5, "downscale_delay_s": 2}
    model = taskserve.deployment(Slow).options(name=unique_name, num_cpus=0.5, autoscaling_config=config)
    model.deploy()
    generation = store.get_goal(unique_name).generation
    assert len(running(store, unique_name)) == 1 and target(store, unique_name) == 1

    handle = model.get_handle()
    responses = [handle.remote(f"r{i}", 1.0) for i in range(24)]
    wait_until(lambda: len(running(store, unique_name)) == 4, timeout=60, message="4 RUNNING replicas")
    answers = [response.result(timeout=120) for response in responses]
    assert sorted(answer[0] for answer in answers) == sorted(f"r{i}" for i in range(24)), "every request answered"
    assert len({answer[1] for answer in answers}) >= 3, "served by the new replicas too"

    wait_until(lambda: target(store, unique_name) == 1 and len(running(store, unique_name)) == 1
               and present(store, unique_name) == 1, timeout=60, message="the pool back to 1 replica")
    lines = [e for e in store.history(unique_name) if e["action"] == "autoscale"]
    assert lines and all(e["by"] == "autoscaler" for e in lines)
    assert lines[0]["from"] == 1 and max(e["to"] for e in lines) == 4 and lines[-1]["to"] == 1
    assert store.get_goal(unique_name).generation == generation, "autoscaling writes no goal"
    assert handle.remote("after", 0.0).result(timeout=30)[0] == "after"
    model.delete()


def test_scale_to_zero_when_idle_and_wake_for_the_next_request(store, unique_name):
    config = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
              "upscale_delay_s": 0.5, "downscale_delay_s": 1}
    model = taskserve.deployment(Slow).options(name=unique_name, num_cpus=0.5, autoscaling_config=config)
    model.deploy(timeout=60)
    assert present(store, unique_name) == 0 and target(store, unique_name) == 0
    handle = model.get_handle()
    assert handle.remote("first", 0.0).result(timeout=60)[0] == "first"

    wait_until(lambda: target(store, unique_name) == 0 and present(store, unique_name) == 0, timeout=60,
               message="no replica left once idle")
    started = time.monotonic()
    answer = handle.remote("wake", 0.0).result(timeout=60)
    woke_in = time.monotonic() - started
    assert answer[0] == "wake"
    wake = [e for e in store.history(unique_name) if e["action"] == "autoscale"][-1]
    assert (wake["from"], wake["to"]) == (0, 1) and wake["reason"].endswith("woken from zero")
    assert woke_in < 30, woke_in
    model.delete()


def test_a_scale_down_stops_the_idle_replica_and_the_busy_one_answers(store, unique_name):
    # The busy replica is the newest one: the one a scale-down blind to the load would stop.
    config = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
              "upscale_delay_s": 0.5, "downscale_delay_s": 2}
    model = taskserve.deployment(Slow).options(name=unique_name, num_cpus=0.5, autoscaling_config=config)
    model.deploy()
    [first] = running(store, unique_name)
    handle = model.get_handle()
    short = handle.remote("short", 3.0)          # taken by the first replica at once
    long = handle.remote("long", 10.0)           # waits for the second replica the load asks for
    wait_until(lambda: len(running(store, unique_name)) == 2, timeout=30, message="2 RUNNING replicas")
    [second] = [r for r in running(store, unique_name) if r.replica_id != first.replica_id]
    assert second.created_at > first.created_at
    wait_until(lambda: store.get_replica(second.replica_id).in_flight == 1, timeout=10,
               message="the second replica reports the request it serves")
    assert short.result(timeout=30)[:2] == ["short", first.pid]
    wait_until(lambda: store.get_replica(first.replica_id) is None, timeout=30,
               message="the idle first replica stopped")
    assert [r.replica_id for r in running(store, unique_name)] == [second.replica_id]
    assert long.result(timeout=30)[:2] == ["long", second.pid], "the busy replica kept its request"
    lines = [(e["from"], e["to"]) for e in store.history(unique_name) if e["action"] == "autoscale"]
    assert lines == [(1, 2), (2, 1)]
    model.delete()


def test_a_rolling_update_keeps_the_autoscaled_count(store, unique_name):
    config = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
              "upscale_delay_s": 0.5, "downscale_delay_s": 600}
    model = taskserve.deployment(Slow).options(name=unique_name, num_cpus=0.5, version="v1",
                                               autoscaling_config=config)
    model.deploy("v1")
    handle = model.get_handle()
    responses = [handle.remote(f"r{i}", 3.0) for i in range(3)]     # a load of 3 for a few seconds
    wait_until(lambda: len(running(store, unique_name)) == 3, timeout=60, message="3 RUNNING replicas")
    assert [r.result(timeout=60)[0] for r in responses] == ["r0", "r1", "r2"]
    assert target(store, unique_name) == 3
    assert store.get_goal(unique_name).num_replicas == 1            # the goal holds min_replicas only

    model.options(version="v2").deploy("v2", timeout=120)
    replicas = running(store, unique_name)
    assert sorted(r.version for r in replicas) == ["v2", "v2", "v2"]
    assert present(store, unique_name) == 3
    assert target(store, unique_name) == 3
    answers = [handle.remote(f"after{i}", 0.0).result(timeout=30) for i in range(3)]
    assert {answer[2] for answer in answers} == {"v2"}
    model.delete()


@pytest.mark.slow
def test_bench_autoscale_smoke() -> None:
    out = run_benchmark("bench_autoscale", "--smoke")
    found = checks(out)
    assert_figures(found, ["controller decided after, s", "max_replicas RUNNING after, s", "drain, s",
                           "one replica's drain (measured), s", "first answer from zero, s (p50)",
                           "controller woke after, s (p50)"])
    assert re.fullmatch(r"\d+\.\d{3} (ok|MISS)", found["drain / one replica's (target <= 0.35)"])
    assert found["requests answered"] == found["requests sent"]
    idle = table_with(out, "controller CPU ms/s")
    assert [row["setup"] for row in idle] == ["no deployment", "2 fixed, 1 replica each",
                                              "2 autoscaled, 1 replica each", "2 autoscaled, at zero"]
    for row in idle:
        assert_figures(row, ["controller CPU ms/s", "controller CPU %"])


def test_status_history_and_scale_speak_of_the_autoscaler(store, own_cluster, unique_name):
    config = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
              "upscale_delay_s": 0.3, "downscale_delay_s": 30}
    model = taskserve.deployment(Slow).options(name=unique_name, num_cpus=0.5, autoscaling_config=config)
    model.deploy()
    handle = model.get_handle()
    responses = [handle.remote(f"r{i}", 1.0) for i in range(6)]
    wait_until(lambda: target(store, unique_name) > 1, timeout=30, message="the autoscaler to scale up")
    status = model.status()
    assert status.autoscaling is not None and status.num_replicas == status.autoscaling["target"] > 1
    assert re.fullmatch(r"\d+ replicas? for \d+ waiting/serving, target 1 each.*", status.autoscaling["reason"])
    assert [r[0] for r in (response.result(timeout=60) for response in responses)] == [f"r{i}" for i in range(6)]
    lines = [entry for entry in taskserve.history(unique_name) if entry.get("action") == "autoscale"]
    assert lines and lines[0]["by"] == "autoscaler" and lines[0]["from"] == 1 and lines[0]["to"] > 1
    with pytest.raises(ValueError, match="is autoscaled"):
        taskserve.scale_deployment(unique_name, 2)
    result = subprocess.run(
        [sys.executable, "-m", "taskserve", "status", unique_name], capture_output=True, text=True,
        timeout=60, env={**os.environ, "TASKSERVE_ADDRESS": own_cluster.url})
    assert "autoscaling 1..3:" in result.stdout and "waiting/serving" in result.stdout
    model.delete()
