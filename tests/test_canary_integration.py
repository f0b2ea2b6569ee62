"""Canary releases on a real cluster (SPEC §9): the split, start/move/abort without
touching the stable replicas, promote within the 20% bound, the automatic abort, no
request lost, and pinning a version from a handle and over HTTP."""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

import taskserve
from taskserve import api
from taskserve.http import Request

from .faults.harness import SteadyLoad
from .helpers import running_gateway, wait_until


class Versioned:
    """Answers with what it was given; ``who()`` says its version label."""

    def __init__(self, label: str, fail: bool = False) -> None:
        self.label = label
        self.fail = fail

    def __call__(self, request_id):
        if self.fail:
            raise ValueError(f"version {self.label} is broken")
        if isinstance(request_id, Request):          # over HTTP
            return {"version": self.label}
        return request_id

    def who(self) -> str:
        return self.label

    def pid(self) -> int:
        return os.getpid()


def deploy(name: str, version: str, num_replicas: int, fail: bool = False, **options) -> taskserve.Deployment:
    model = taskserve.deployment(Versioned).options(name=name, version=version, num_replicas=num_replicas,
                                                    num_cpus=0.1, **options)
    model.deploy(version, fail, timeout=120)
    return model


def stable_pids(name: str) -> set[int]:
    status = taskserve.get_deployment(name).status()
    return {r.pid for r in status.replicas if not r.canary and r.state == "RUNNING"}


def canary_pids(name: str) -> set[int]:
    status = taskserve.get_deployment(name).status()
    return {r.pid for r in status.replicas if r.canary and r.state == "RUNNING"}


def split(handle, count: int = 1000) -> Counter:
    """Which version answered each of ``count`` requests (all sent first, then read)."""
    responses = [handle.who.remote() for _ in range(count)]
    return Counter(response.result(timeout=60) for response in responses)


def no_canary_left(name: str) -> bool:
    status = taskserve.get_deployment(name).status()
    return status.canary is None and not any(r.canary for r in status.replicas) and status.status == "HEALTHY"


def test_start_move_and_abort_keep_the_stable_replicas_and_lose_nothing(connected, unique_name: str) -> None:
    name = unique_name
    deploy(name, "1", 4)
    stable = stable_pids(name)
    assert len(stable) == 4
    handle = taskserve.get_deployment(name).get_handle()
    with SteadyLoad(handle, threads=3, timeout_s=60) as load:
        load.wait_for_answers(20)
        deploy(name, "2", 4, canary={"traffic_percent": 25})            # start
        status = taskserve.get_deployment(name).status()
        assert status.canary["version"] == "2" and status.canary["percent"] == 25
        assert status.canary["replicas"] == 1 and len(canary_pids(name)) == 1
        assert stable_pids(name) == stable
        first_canary = canary_pids(name)

        time.sleep(1.2)     # the handle re-reads the goal once a second
        answers = split(handle)
        assert 200 <= answers["2"] <= 300, answers                  # 25% ± 5 points of 1,000
        assert answers["1"] + answers["2"] == 1000

        api.set_canary_traffic(name, 50, timeout=120)                  # move: 2 canary replicas now
        assert stable_pids(name) == stable
        assert first_canary <= canary_pids(name) and len(canary_pids(name)) == 2
        time.sleep(1.2)
        answers = split(handle)
        assert 450 <= answers["2"] <= 550, answers

        load.wait_for_more_answers(20)
        assert api.rollback_deployment(name, timeout=120) == "1"       # abort
        wait_until(lambda: no_canary_left(name), timeout=60, message="the canary to drain")
        assert stable_pids(name) == stable
        time.sleep(1.2)
        assert split(handle, 200) == Counter({"1": 200})
        load.wait_for_more_answers(20)
    assert not load.lost and not load.failures, (load.lost[:5], list(load.failures.items())[:5])
    assert len(load.answers) == len(load.sent)


def test_an_erroring_canary_is_aborted_by_the_controller(connected, unique_name: str) -> None:
    name = unique_name
    deploy(name, "1", 2)
    stable = stable_pids(name)
    deploy(name, "2", 2, fail=True, canary={"traffic_percent": 50, "min_requests": 20})
    handle = taskserve.get_deployment(name).get_handle()      # new: it reads the goal at its first call
    pinned = handle.options(version="2")
    errors = 0
    for index in range(20):                 # the canary's 20 requests, all failing
        with pytest.raises(taskserve.ReplicaError, match="version 2 is broken"):
            pinned.remote(index).result(timeout=30)
        errors += 1
    crossed = time.monotonic()
    wait_until(lambda: taskserve.get_deployment(name).status().canary is None, timeout=15,
               message="the controller to abort the canary")
    took = time.monotonic() - crossed
    entries = [e for e in taskserve.history(name) if e["action"] == "canary-abort"]
    assert entries and entries[-1]["by"] == "controller"
    assert "error rate 100.0% (20 of 20 requests)" in entries[-1]["reason"]
    wait_until(lambda: no_canary_left(name), timeout=60, message="the canary to drain")
    assert stable_pids(name) == stable
    assert [handle.remote(i).result(timeout=30) for i in range(20)] == list(range(20))
    print(f"aborted {took:.2f}s after the canary's {errors}th failed request")


def test_promote_keeps_the_20_percent_bound_and_loses_nothing(connected, unique_name: str) -> None:
    name = unique_name
    deploy(name, "1", 5)
    deploy(name, "2", 5, canary={"traffic_percent": 20})
    handle = taskserve.get_deployment(name).get_handle()
    lowest = 5
    with SteadyLoad(handle, threads=3, timeout_s=60) as load:
        load.wait_for_answers(20)
        api.promote_canary(name, wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = taskserve.get_deployment(name).status()
            available = sum(1 for r in status.replicas if not r.canary and r.state == "RUNNING")
            lowest = min(lowest, available)
            if status.status == "HEALTHY" and status.version == "2" and not any(r.canary for r in status.replicas):
                break
            time.sleep(0.05)
        load.wait_for_more_answers(20)
    assert lowest >= 4          # at most max(1, floor(0.2 × 5)) = 1 of the 5 unavailable
    status = taskserve.get_deployment(name).status()
    assert status.version == "2" and status.canary is None
    assert {r.version for r in status.replicas} == {"2"} and len(status.replicas) == 5
    assert not load.lost and not load.failures, (load.lost[:5], list(load.failures.items())[:5])
    actions = [e["action"] for e in taskserve.history(name)]
    assert actions[-2:] == ["canary", "promote"]


def test_pinning_a_version_from_a_handle_and_over_http(connected, unique_name: str) -> None:
    name = unique_name
    deploy(name, "1", 1)
    deploy(name, "2", 1, canary={"traffic_percent": 10})
    handle = taskserve.get_deployment(name).get_handle()
    assert {handle.options(version="2").who.remote().result(timeout=30) for _ in range(20)} == {"2"}
    assert {handle.options(version="1").who.remote().result(timeout=30) for _ in range(20)} == {"1"}
    with pytest.raises(ValueError, match="not '7'"):
        handle.options(version="7").remote(1)
    with running_gateway(connected) as http:
        pinned = http.get(f"/{name}", headers={"x-taskserve-version": "2"})
        assert pinned.status_code == 200 and pinned.headers["x-taskserve-version"] == "2"
        answered = Counter(http.get(f"/{name}").headers["x-taskserve-version"] for _ in range(200))
        assert set(answered) <= {"1", "2"} and answered["1"] > answered["2"]
        unknown = http.get(f"/{name}", headers={"x-taskserve-version": "7"})
        assert unknown.status_code == 400 and unknown.json()["error"] == "UnknownVersion"
        metrics = http.get("/-/metrics").text
        assert f'taskserve_canary_traffic_percent{{deployment="{name}",version="2"}} 10.0' in metrics
