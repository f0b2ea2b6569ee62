"""User configuration: reconfigure replicas in place (real replicas)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import taskserve

from .helpers import REPO, RequestLoop, replica_pids, wait_until


class Tunable:
    """Answers with its config; records every reconfigure it saw."""

    def __init__(self) -> None:
        self.config = None
        self.seen = []
        self.reconfiguring = False

    def reconfigure(self, config) -> None:
        if config.get("fail"):
            raise ValueError(f"cannot use {config}")
        self.reconfiguring = True
        time.sleep(config.get("sleep", 0))
        self.config = config
        self.seen.append(config)
        self.reconfiguring = False

    def __call__(self, request_id=None):
        if self.reconfiguring:
            raise RuntimeError("a request ran while reconfigure was running")
        return [self.config, request_id, os.getpid()]

    def history(self):
        return self.seen


def answers_by_pid(handle, count: int) -> dict:
    return {pid: config for config, _, pid in (handle.remote().result(timeout=10) for _ in range(count))}


def test_reconfigure_runs_before_the_first_request(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", user_config={"threshold": 1})
    model.deploy()
    handle = model.get_handle()
    assert handle.history.remote().result(timeout=10) == [{"threshold": 1}]
    assert handle.remote("a").result(timeout=10)[0] == {"threshold": 1}
    model.delete()


def test_update_in_place_keeps_every_pid_and_scale_up_gets_the_current_config(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", num_replicas=3, num_cpus=0.1,
                                                   user_config={"threshold": 1})
    model.deploy()
    pids = replica_pids(unique_name)
    model.options(user_config={"threshold": 2}).deploy()
    assert replica_pids(unique_name) == pids
    status = model.status()
    assert len({r.config_hash for r in status.replicas}) == 1 and status.status == "HEALTHY"
    handle = model.get_handle()
    seen = answers_by_pid(handle, 40)
    assert set(seen) == pids and all(config == {"threshold": 2} for config in seen.values())

    model.options(num_replicas=4, user_config={"threshold": 2}).deploy()
    after = replica_pids(unique_name)
    assert pids < after
    [new_pid] = after - pids
    seen = wait_until(lambda: (lambda s: new_pid in s and s)(answers_by_pid(handle, 40)), timeout=30,
                      message="the new replica to answer")
    assert seen[new_pid] == {"threshold": 2}
    model.delete()


def test_reconfigure_failure_rolls_back_and_raises(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", num_replicas=2, num_cpus=0.1,
                                                   user_config={"threshold": 1})
    model.deploy()
    pids = replica_pids(unique_name)
    with pytest.raises(taskserve.DeploymentError) as caught:
        model.options(user_config={"threshold": 9, "fail": True}).deploy(timeout=60)
    assert "cannot use" in str(caught.value) and "Traceback" in str(caught.value)
    wait_until(lambda: model.status().status == "HEALTHY", timeout=30, message="the old config to be restored")
    assert replica_pids(unique_name) == pids
    assert taskserve.get_deployment(unique_name).user_config == {"threshold": 1}
    seen = answers_by_pid(model.get_handle(), 30)
    assert all(config == {"threshold": 1} for config in seen.values())
    model.delete()


def test_bad_user_config_is_refused_before_any_change(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", user_config={"a": 1})
    model.deploy()
    generation = model.status().generation
    with pytest.raises(TypeError, match=r"user_config\['weights'\]\[2\] is a set"):
        model.options(user_config={"weights": [1, 2, {3}]})
    with pytest.raises(TypeError, match=r"user_config\['x'\] is a set"):
        taskserve.reconfigure_deployment(unique_name, {"x": {1}})

    class NoReconfigure:
        def __call__(self):
            return 1

    with pytest.raises(ValueError, match="no reconfigure"):
        taskserve.deployment(NoReconfigure).options(user_config={"a": 1})
    assert model.status().generation == generation
    model.delete()


def test_reconfigure_under_load_fails_no_request(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", num_replicas=3, num_cpus=0.1,
                                                   user_config={"step": 0})
    model.deploy()
    with RequestLoop(model.get_handle(), threads=3, minimum=50) as load:
        for step in (1, 2):
            model.options(user_config={"step": step, "sleep": 0.3}).deploy()
    results = load.results
    assert not load.failures, load.failures[:3]
    assert all(answer[1] == request_id for request_id, answer in results.items())
    assert {answer[0]["step"] for answer in results.values()} >= {0, 2}
    model.delete()


def test_cli_reconfigure_and_status_show_the_config(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", user_config={"t": 1})
    model.deploy()
    pids = replica_pids(unique_name)
    env = connected.env()
    result = subprocess.run([sys.executable, "-m", "taskserve", "reconfigure", unique_name, '{"t": 5}'],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert model.get_handle().remote().result(timeout=10)[0] == {"t": 5}
    assert replica_pids(unique_name) == pids
    shown = subprocess.run([sys.executable, "-m", "taskserve", "status", unique_name],
                           capture_output=True, text=True, env=env, timeout=60).stdout
    assert model.status().replicas[0].config_hash in shown
    model.delete()


def test_missed_message_is_caught_up_from_redis(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", user_config={"t": 1})
    model.deploy()
    [replica] = model.status().replicas
    store = taskserve.connect()
    controller = connected.processes["controller"]
    # With the controller paused, give the replica a new config in Redis without
    # the wake-up message: its heartbeat must notice on its own.
    controller.send_signal(signal.SIGSTOP)
    try:
        taskserve.reconfigure_deployment(unique_name, {"t": 7}, wait=False)
        goal = store.get_goal(unique_name)
        store.update_replica(replica.replica_id, user_config='{"t": 7}', config_hash=goal.user_config_hash,
                             user_config_signature=goal.user_config_signature)
        wait_until(lambda: model.get_handle().remote().result(timeout=10)[0] == {"t": 7}, timeout=15,
                   message="the replica to catch up")
    finally:
        controller.send_signal(signal.SIGCONT)
    wait_until(lambda: model.status().status == "HEALTHY", timeout=30, message="the deployment to be healthy")
    assert replica_pids(unique_name) == {replica.pid}
    model.delete()


def test_seed_threshold_example_runs_as_written(connected):
    result = subprocess.run([sys.executable, "scripts/deploy_threshold.py"], capture_output=True, text=True,
                            env=connected.env(), cwd=REPO, timeout=180)
    assert result.returncode == 0, result.stderr
    counts = [int(line.split(": ")[1].split("/")[0]) for line in result.stdout.splitlines() if "answers True" in line]
    # P(answer is True) is 0.99, then 0.01: 15 of 20 is far outside chance.
    assert counts[0] >= 15 and counts[1] <= 5 and counts[2] >= 15 and counts[3] <= 5, result.stdout
    same = [line.strip() for line in result.stdout.splitlines() if "same replica processes" in line]
    assert same == ["same replica processes: False", "same replica processes: True"]


def test_user_config_set_back_to_none_finishes_without_a_restart_or_a_call(connected, unique_name):
    model = taskserve.deployment(Tunable).options(name=unique_name, version="1", num_replicas=2, num_cpus=0.1,
                                                   user_config={"threshold": 1})
    model.deploy()
    pids = replica_pids(unique_name)
    model.options(user_config=None).deploy(timeout=60)
    assert replica_pids(unique_name) == pids
    assert model.status().status == "HEALTHY"
    # reconfigure only ever gets a config: None called nothing
    assert model.get_handle().history.remote().result(timeout=10) == [{"threshold": 1}]
    model.options(user_config={"threshold": 3}).deploy(timeout=60)
    assert {config["threshold"] for config in answers_by_pid(model.get_handle(), 20).values()} == {3}
    model.delete()
