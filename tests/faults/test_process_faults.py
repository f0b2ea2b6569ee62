"""Processes killed under a steady load: replicas (serving, draining) and node agents.

Each test sends requests with known ids the whole time, injects its fault, and
checks the row of the fault table: nothing lost, duplicates only where a crash
makes at-least-once delivery run a request twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

import taskserve

from ..helpers import replica_pids, start_cluster, wait_until
from .harness import REDELIVERED, SteadyLoad, check_row, deploy_recorder

pytestmark = pytest.mark.integration


def test_replica_killed_while_serving(connected, unique_name):
    model, served = deploy_recorder(connected.url, unique_name, seconds=0.05, num_replicas=2, version="1")
    client = redis.Redis.from_url(connected.url)
    with SteadyLoad(model.get_handle(), threads=4) as load:
        load.wait_for_answers(40)
        victim = sorted(replica_pids(unique_name))[0]
        fault_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in replica_pids(unique_name, state=None) and
                   len(replica_pids(unique_name)) == 2, timeout=60, message="the killed replica's replacement")
        load.wait_for_more_answers(40)
    result = load.result("replica SIGKILLed while serving", client, served, fault_at,
                         notes="its request is put back at once by its agent", duplicated_because=REDELIVERED)
    check_row(load, result, most_duplicated=1)     # the request it was serving may run again
    model.delete()


def test_replica_killed_while_draining_in_a_rollout(connected, unique_name):
    model, served = deploy_recorder(connected.url, unique_name, seconds=0.3, num_replicas=2, version="1",
                                    graceful_shutdown_timeout_s=30)
    client = redis.Redis.from_url(connected.url)
    store = taskserve.connect(connected.url)
    with SteadyLoad(model.get_handle(), threads=4) as load:
        load.wait_for_answers(10)
        fault_at = time.monotonic()
        rollout = threading.Thread(target=lambda: model.options(version="2").deploy(connected.url, served, 0.3))
        rollout.start()

        def draining_pid():
            _, _, replicas = store.snapshot(unique_name)
            return next((r.pid for r in replicas if r.state.value == "DRAINING" and r.pid), None)

        victim = wait_until(draining_pid, timeout=60, interval=0.005, message="a replica to drain")
        os.kill(victim, signal.SIGKILL)
        rollout.join(timeout=120)
        load.wait_for_more_answers(20)
    result = load.result("replica SIGKILLed while draining (rollout)", client, served, fault_at,
                         notes="restored whatever the replica's state", duplicated_because=REDELIVERED)
    check_row(load, result, most_duplicated=1)
    model.delete()


def test_node_agent_killed_and_restarted(tmp_path):
    cluster = start_cluster(tmp_path, ("node-a",), 4)
    try:
        model, served = deploy_recorder(cluster.url, "agent_killed", seconds=0.05, num_replicas=2, version="1")
        client = redis.Redis.from_url(cluster.url)
        with SteadyLoad(model.get_handle(), threads=3) as load:
            load.wait_for_answers(30)
            fault_at = time.monotonic()
            cluster.stop("agent-node-a", sig=signal.SIGKILL)   # its replicas drain (parent-death signal)
            cluster.restart("agent-node-a")
            wait_until(lambda: len(replica_pids("agent_killed")) == 2, timeout=90,
                       message="the deployment to run 2 replicas again")
            load.wait_for_more_answers(30)
        result = load.result("node agent SIGKILLed, then restarted", client, served, fault_at,
                             notes="replicas drain on their parent's death; the new agent replaces them",
                             duplicated_because=REDELIVERED)
        check_row(load, result, most_duplicated=2)
    finally:
        cluster.stop_all()


def test_node_agent_and_its_replicas_killed_together(tmp_path):
    """As the kernel's OOM killer or a container runtime may: the new agent finds
    the in-flight files the dead replicas left and puts their requests back."""
    cluster = start_cluster(tmp_path, ("node-a",), 4)
    try:
        model, served = deploy_recorder(cluster.url, "all_killed", seconds=0.5, num_replicas=2, version="1")
        client = redis.Redis.from_url(cluster.url)
        with SteadyLoad(model.get_handle(), threads=4, timeout_s=45) as load:
            load.wait_for_answers(8)
            victims = replica_pids("all_killed")
            fault_at = time.monotonic()
            cluster.stop("agent-node-a", sig=signal.SIGKILL)
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            cluster.restart("agent-node-a")
            wait_until(lambda: len(replica_pids("all_killed")) == 2, timeout=90,
                       message="the deployment to run 2 replicas again")
            load.wait_for_more_answers(8)
        result = load.result("node agent and replicas SIGKILLed together", client, served, fault_at,
                             notes="the new agent restores the in-flight files they left",
                             duplicated_because=REDELIVERED)
        check_row(load, result, most_duplicated=None)
    finally:
        cluster.stop_all()
