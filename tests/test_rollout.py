"""Versions and rolling updates with real replicas: bounds, load, failure, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import taskserve

from .helpers import RequestLoop, replica_pids, start_cluster, wait_until


class Versioned:
    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag

    def __call__(self, request_id):
        return [self.tag, request_id]

    def slow(self, marker: str, seconds: float) -> int:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(seconds)
        return os.getpid()


class BrokenInV2:
    def __init__(self, tag: str) -> None:
        if tag == "v2":
            raise RuntimeError("weights for v2 not found")
        self.tag = tag

    def __call__(self, x):
        return self.tag


def running_count(name: str) -> int:
    store = taskserve.connect()
    _, _, replicas = store.snapshot(name)
    return sum(1 for r in replicas if r.state.value == "RUNNING")


def sample_during(action, name: str, interval: float = 0.01) -> list[int]:
    """Run ``action`` in a thread; sample available replicas until it returns."""
    errors: list[BaseException] = []

    def run():
        try:
            action()
        except BaseException as error:  # re-raised below
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    samples = []
    while thread.is_alive():
        samples.append(running_count(name))
        time.sleep(interval)
    thread.join()
    if errors:
        raise errors[0]
    return samples


@pytest.mark.parametrize("replicas, floor", [(5, 4), (10, 8)])
def test_rollout_never_drops_below_the_availability_bound(connected, unique_name, replicas, floor):
    model = taskserve.deployment(Versioned).options(name=unique_name, num_replicas=replicas, version="v1",
                                                     num_cpus=0.1)
    model.deploy("v1")
    old = replica_pids(unique_name)
    samples = sample_during(lambda: model.options(version="v2").deploy("v2"), unique_name)
    assert len(samples) > 20
    assert min(samples) >= floor, samples
    new = replica_pids(unique_name)
    assert len(new) == replicas and not (new & old)
    assert {r.version for r in model.status().replicas} == {"v2"}
    model.delete()


def test_surge_keeps_full_capacity(connected, unique_name):
    model = taskserve.deployment(Versioned).options(name=unique_name, num_replicas=4, version="v1",
                                                     num_cpus=0.1, max_surge=1)
    model.deploy("v1")
    samples = sample_during(lambda: model.options(version="v2").deploy("v2"), unique_name)
    assert min(samples) >= 4, samples
    assert {r.version for r in model.status().replicas} == {"v2"}
    model.delete()


def test_rollout_under_load_loses_and_fails_no_request(connected, unique_name):
    model = taskserve.deployment(Versioned).options(name=unique_name, num_replicas=3, version="v1", num_cpus=0.1)
    model.deploy("v1")
    with RequestLoop(model.get_handle(), threads=4, minimum=100) as load:
        model.options(version="v2").deploy("v2")
    results = load.results
    assert not load.failures, load.failures[:3]
    assert len(results) >= 300
    assert all(answer[1] == request_id for request_id, answer in results.items())
    tags = {answer[0] for answer in results.values()}
    assert tags == {"v1", "v2"}
    model.delete()


def test_failing_new_version_rolls_back_and_raises_with_traceback(connected, unique_name):
    # With a surge, new replicas start before old ones stop: the old ones serve throughout.
    model = taskserve.deployment(BrokenInV2).options(name=unique_name, num_replicas=2, version="v1", num_cpus=0.1,
                                                      max_surge=1)
    model.deploy("v1")
    before = replica_pids(unique_name)
    with pytest.raises(taskserve.DeploymentError) as caught:
        model.options(version="v2").deploy("v2", timeout=120)
    assert "weights for v2 not found" in str(caught.value)
    assert "Traceback" in str(caught.value) and "rolled back to version v1" in str(caught.value)

    status = model.status()
    assert status.version == "v1"
    wait_until(lambda: model.status().status == "HEALTHY", timeout=30, message="v1 to be healthy")
    assert replica_pids(unique_name) == before        # the old replicas served on throughout
    assert model.get_handle().remote(1).result(timeout=10) == "v1"
    actions = [(e["action"], e["version"], e.get("outcome")) for e in taskserve.history(unique_name)]
    assert ("deploy", "v2", "failed") in actions and actions[-1][:2] == ("auto-rollback", "v1")
    model.delete()


def test_deploy_timeout_bounds_the_wait(connected, unique_name):
    class Slow:
        def __init__(self):
            time.sleep(60)

        def __call__(self):
            return None

    started = time.monotonic()
    with pytest.raises(taskserve.DeploymentError, match="did not finish within 2"):
        taskserve.deployment(Slow).options(name=unique_name).deploy(timeout=2)
    assert time.monotonic() - started < 10
    taskserve.delete_deployment(unique_name)


def test_killed_replica_request_is_redelivered(connected, unique_name, tmp_path):
    model = taskserve.deployment(Versioned).options(name=unique_name, num_replicas=2, version="v1", num_cpus=0.1)
    model.deploy()
    marker = tmp_path / "serving"
    response = model.get_handle().slow.remote(str(marker), 4)
    serving = int(wait_until(lambda: marker.exists() and marker.read_text(), timeout=20, message="the request to start"))
    marker.unlink()
    os.kill(serving, signal.SIGKILL)
    answered_by = response.result(timeout=60)
    assert answered_by != serving
    model.delete()


def test_concurrent_deploys_do_not_interleave(connected, unique_name):
    base = taskserve.deployment(Versioned).options(name=unique_name, num_replicas=2, num_cpus=0.1)
    base.options(version="a").deploy("a")
    outcomes: dict[str, str] = {}

    def deploy(version: str) -> None:
        try:
            base.options(version=version).deploy(version, timeout=120)
            outcomes[version] = "done"
        except taskserve.DeploymentError as error:
            outcomes[version] = str(error)

    threads = [threading.Thread(target=deploy, args=(v,)) for v in ("b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = taskserve.get_deployment(unique_name)
    assert final.version in ("b", "c")
    assert outcomes[final.version] == "done"
    loser = ({"b", "c"} - {final.version}).pop()
    assert outcomes[loser] == "done" or "another deploy" in outcomes[loser]
    wait_until(lambda: final.status().status == "HEALTHY", timeout=60, message="the winner to be healthy")
    assert {r.version for r in final.status().replicas} == {final.version}
    assert [e["generation"] for e in taskserve.history(unique_name)] == [1, 2, 3]
    final.delete()


def test_unhealthy_replica_is_replaced(connected, unique_name, tmp_path):
    flag = tmp_path / "sick"

    class Checked:
        def __call__(self):
            return os.getpid()

        def check_health(self):
            if flag.exists():
                raise RuntimeError("sick")

    model = taskserve.deployment(Checked).options(name=unique_name, version="1", health_check_period_s=0.3)
    model.deploy()
    [sick] = replica_pids(unique_name)
    flag.touch()
    wait_until(lambda: sick not in replica_pids(unique_name, state=None), timeout=30,
               message="the unhealthy replica to be replaced")
    flag.unlink()
    wait_until(lambda: len(replica_pids(unique_name)) == 1 and model.status().status == "HEALTHY", timeout=30,
               message="a healthy replacement")
    model.delete()


def cli(cluster, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "taskserve", *args], capture_output=True, text=True,
                            timeout=120, env=cluster.env())
    assert result.returncode == 0, result.stderr
    return result


def test_restart_and_rollback_from_the_cli(connected, unique_name):
    model = taskserve.deployment(Versioned).options(name=unique_name, num_replicas=2, num_cpus=0.1)
    model.options(version="v1").deploy("v1")
    model.options(version="v2").deploy("v2")
    v2_pids = replica_pids(unique_name)

    cli(connected, "restart", unique_name)
    restarted = replica_pids(unique_name)
    assert len(restarted) == 2 and not (restarted & v2_pids)
    assert model.status().version == "v2"
    # A same-version deploy after a restart restarts nothing.
    model.options(version="v2").deploy("v2")
    assert replica_pids(unique_name) == restarted

    cli(connected, "rollback", unique_name)
    assert model.status().version == "v1"
    assert model.get_handle().remote("x").result(timeout=10) == ["v1", "x"]
    cli(connected, "rollback", unique_name, "--to", "v2")
    assert model.get_handle().remote("y").result(timeout=10) == ["v2", "y"]

    entries = json.loads(cli(connected, "history", unique_name, "--json").stdout)
    assert [e["action"] for e in entries] == ["deploy", "deploy", "restart", "rollback", "rollback"]
    assert all(e.get("outcome") == "done" for e in entries)
    # --watch on a HEALTHY deployment waits for its next rollout (tests/test_cli_operations.py).
    watched = cli(connected, "status", unique_name)
    assert "HEALTHY" in watched.stdout
    model.delete()


@pytest.mark.integration
def test_rollout_out_of_replicas_that_never_found_room_completes(tmp_path):
    # The numbers: 4 replicas of 7.5 CPUs on a 16-CPU node, two run and two wait for
    # room that never comes. A new version of 1.5 CPUs fits 4 times; the two that never ran
    # spend the unavailability budget, which used to stop the rollout for good.
    cluster = start_cluster(tmp_path, ("node-a",), 16)
    try:
        model = taskserve.deployment(Versioned).options(name="too_big", num_replicas=4, version="1", num_cpus=7.5)
        with pytest.raises(taskserve.DeploymentError, match="did not finish"):
            model.deploy("v1", timeout=1)
        wait_until(lambda: [r.state for r in model.status().replicas].count("RUNNING") == 2, timeout=60,
                   message="two of the four running")
        model.options(version="2", num_cpus=1.5).deploy("v2", timeout=60)
        status = model.status()
        assert status.status == "HEALTHY"
        assert sorted((r.version, r.state) for r in status.replicas) == [("2", "RUNNING")] * 4
        assert model.get_handle().remote(1).result(timeout=30) == ["v2", 1]
        model.delete()
    finally:
        cluster.shutdown()
