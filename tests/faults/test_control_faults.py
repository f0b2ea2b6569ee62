"""Faults of the control plane: a leader paused past its lease, Redis paused or
restarted for longer than a node's heartbeat timeout, two agents for one node id.

Each test starts its own cluster (agents with ``--heartbeat-timeout 2``, so that
an outage longer than a node's TTL lasts seconds, not tens of them), and runs a
steady load of requests through its fault, for a row of the fault table.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import datetime
from typing import Callable

import psutil
import pytest
import redis

import taskserve
from taskserve.api import scale_deployment
from taskserve.redis_server import RedisServer
from taskserve.store import Store

from ..helpers import Cluster, replica_pids, start_cluster, wait_until
from .harness import REDELIVERED, REFUSED_WHILE_REDIS_DOWN, SteadyLoad, check_row, deploy_recorder, describe_failures

pytestmark = pytest.mark.integration

TTL_S = 2.0
AGENT_ARGS = ("--heartbeat-timeout", str(TTL_S))


def hold_for(seconds: float, check: Callable[[], object]) -> None:
    """Call ``check`` over and over for ``seconds``: it must return something true all along."""
    deadline = time.monotonic() + seconds

    def checked() -> bool:
        assert check(), "the condition stopped holding"
        return time.monotonic() >= deadline

    wait_until(checked, timeout=seconds + 30, interval=0.1, message=f"{seconds}s to pass")


def log_of(cluster: Cluster, part: str) -> str:
    return (cluster.log_dir / f"{part}.log").read_text(errors="replace")


def logged_at(log: str, text: str) -> float:
    """When the first line of a part's log with ``text`` was written (as ``time.time()``).

    >>> logged_at("2026-01-02 03:04:05,678 INFO x: up", "up") - logged_at("2026-01-02 03:04:04,678 INFO x: up", "up")
    1.0
    """
    line = next(line for line in log.splitlines() if text in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def leader_part(cluster: Cluster, store: Store) -> str:
    """The name of the controller part that holds the lease ("" if none does)."""
    holder = store.lease_holder()
    if not holder:
        return ""
    pid = int(holder.rsplit(":", 2)[1])
    return next((name for name, process in cluster.processes.items()
                 if name.startswith("controller") and process.pid == pid), "")


def stop_after_reading_goals(cluster: Cluster, change: Callable[[], object], controller_pid: int) -> None:
    """Make ``change`` (a goal write), then SIGSTOP the controller as soon as Redis sees a
    pass read the changed goal after it (watched with MONITOR). A pass reads the
    revisions first, then the goals whose revision moved; a handle reads its
    deployment's goal with its health (MGET), and is passed over."""
    client = redis.Redis.from_url(cluster.url, socket_timeout=30)
    try:
        with client.monitor() as monitor:
            writer = threading.Thread(target=change, daemon=True)
            writer.start()
            written = revisions_read = False
            while True:
                command = monitor.next_command()["command"]
                if not written:
                    written = command.startswith(f"SET {Store.goal_key('')}")
                elif not revisions_read:
                    revisions_read = command.startswith(f"HGETALL {Store.REVISIONS_KEY}")
                elif command.startswith(f"GET {Store.goal_key('')}"):
                    os.kill(controller_pid, signal.SIGSTOP)
                    break
            writer.join(timeout=30)
    finally:
        client.close()


class ReplicaCounter:
    """Counts a deployment's replica records every few milliseconds, in a thread."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.most = max(self.most, len(self.store.replicas_of(self.name)))
            except Exception:
                pass    # the test's own checks report a broken Redis

    def start(self) -> "ReplicaCounter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_a_leader_paused_past_its_lease_steps_down_and_writes_nothing(tmp_path):
    cluster = start_cluster(tmp_path, ("node-a",), 4, *AGENT_ARGS)
    try:
        cluster.start_controller("--resync", "0.5", name="controller-2")
        store = taskserve.connect(cluster.url)
        model, served = deploy_recorder(cluster.url, "leased", num_replicas=2, num_cpus=0.5, timeout=60)
        # Idle deployments, planned before "leased", give the pass below room between
        # its reads and its writes for "leased".
        for index in range(8):
            deploy_recorder(cluster.url, f"idle-{index}", num_replicas=0, timeout=60)
        paused = wait_until(lambda: leader_part(cluster, store), timeout=30, message="a leader")
        standby = next(name for name in cluster.processes if name.startswith("controller") and name != paused)

        with SteadyLoad(model.get_handle(), threads=2) as load:
            load.wait_for_answers(20)
            fault_at = time.monotonic()
            # The leader is stopped in the middle of the pass that read a scale to 3: it has
            # planned a start it has not written yet.
            stop_after_reading_goals(cluster, lambda: scale_deployment("leased", 3, wait=False),
                                     cluster.processes[paused].pid)
            try:
                wait_until(lambda: leader_part(cluster, store) == standby, timeout=30,
                           message="the standby to take over the lease")
                wait_until(lambda: len(replica_pids("leased")) == 3, timeout=60,
                           message="3 replicas under the new leader")
                # What the paused leader read (3 wanted, 2 there) is stale now.
                scale_deployment("leased", 2, timeout=60)
                assert len(store.replicas_of("leased")) == 2
                before = replica_pids("leased")
                counter = ReplicaCounter(store, "leased").start()
            finally:
                os.kill(cluster.processes[paused].pid, signal.SIGCONT)

            try:
                wait_until(lambda: "stands by" in log_of(cluster, paused), timeout=30,
                           message="the paused leader to step down")
                hold_for(2.0, lambda: leader_part(cluster, store) == standby)
            finally:
                counter.stop()
            load.wait_for_more_answers(20)
        result = load.result("controller leader SIGSTOPped past its lease (scaled 2-3-2 meanwhile)",
                             redis.Redis.from_url(cluster.url), served, fault_at,
                             notes="the standby leads; the old one steps down on waking and writes nothing")
        check_row(load, result)
        assert counter.most <= 2, f"up to {counter.most} replicas for a target of 2 (no surge)"
        assert replica_pids("leased") == before
        assert model.status().status == "HEALTHY"
        model.delete(timeout=60)
    finally:
        cluster.shutdown()


def test_replicas_outlive_a_redis_pause_longer_than_the_node_ttl(tmp_path):
    cluster = start_cluster(tmp_path, ("node-a", "node-b"), 2, *AGENT_ARGS)
    try:
        model, served = deploy_recorder(cluster.url, "paused-redis", num_replicas=2, num_cpus=0.5, timeout=60)
        before = replica_pids("paused-redis")
        assert len(before) == 2
        store = taskserve.connect(cluster.url)
        records = {r.replica_id for r in store.replicas_of("paused-redis")}
        redis_pid = cluster.redis.process.pid
        slow_agent = cluster.processes["agent-node-b"]
        with SteadyLoad(model.get_handle(), threads=2) as load:
            load.wait_for_answers(20)
            fault_at = time.monotonic()
            # node-b's agent also comes back a while after Redis does (still within a TTL).
            os.kill(slow_agent.pid, signal.SIGSTOP)
            os.kill(redis_pid, signal.SIGSTOP)
            try:
                hold_for(TTL_S + 1.5, lambda: all(psutil.pid_exists(pid) for pid in before))
                os.kill(redis_pid, signal.SIGCONT)
                resumed_at = time.monotonic()
                wait_until(lambda: [n.node_id for n in store.list_nodes() if n.alive] == ["node-a"], timeout=30,
                           message="node-a to heartbeat again")
                hold_for(TTL_S / 4, lambda: {r.replica_id for r in store.replicas_of("paused-redis")} == records)
            finally:
                os.kill(redis_pid, signal.SIGCONT)
                os.kill(slow_agent.pid, signal.SIGCONT)
            load.wait_for_more_answers(20, timeout_s=60)
            # A node counted dead at once would lose its replicas within a TTL or two.
            hold_for(2 * TTL_S + 1, lambda: replica_pids("paused-redis") == before)
        result = load.result("Redis SIGSTOPped past the node TTL", redis.Redis.from_url(cluster.url), served, fault_at,
                             notes=f"paused {resumed_at - fault_at:.1f}s (TTL {TTL_S:g}s); calls wait it out; "
                                   "every node registers again, no replica is replaced")
        # Every answer is the request's own: a wrong one counts as failed.
        check_row(load, result)
        assert replica_pids("paused-redis") == before
        assert model.status().status == "HEALTHY"
        for node_id in ("node-a", "node-b"):   # the outage did outlast the heartbeats
            assert "registering again" in log_of(cluster, f"agent-{node_id}")
        model.delete(timeout=60)
    finally:
        cluster.shutdown()


def test_replicas_outlive_a_redis_restart_from_its_aof_after_the_node_ttl(tmp_path):
    data_dir = tmp_path / "redis"
    cluster = start_cluster(tmp_path / "cluster", ("node-a", "node-b"), 2, *AGENT_ARGS, redis_data_dir=data_dir)
    try:
        model, served = deploy_recorder(cluster.url, "restarted-redis", num_replicas=2, num_cpus=0.5, timeout=60)
        before = replica_pids("restarted-redis")
        assert len(before) == 2
        store = taskserve.connect(cluster.url)
        records = {r.replica_id for r in store.replicas_of("restarted-redis")}
        agents = [cluster.processes[f"agent-{node_id}"] for node_id in ("node-a", "node-b")]
        port = cluster.redis.port

        with SteadyLoad(model.get_handle(), threads=2) as load:
            load.wait_for_answers(20)
            assert not load.failures, describe_failures(load)
            # While Redis is down a call is refused at once (RedisUnavailable): failed, not lost.
            fault_at = time.monotonic()
            cluster.redis.stop()
            hold_for(TTL_S + 1.5, lambda: all(psutil.pid_exists(pid) for pid in before))
            # The agents come back later than the controller: it sees every node dead first,
            # then node-b still dead after node-a is back.
            for agent in agents:
                os.kill(agent.pid, signal.SIGSTOP)
            try:
                cluster.redis = RedisServer(port=port, data_dir=data_dir).start()
                back_at = time.monotonic()
                wait_until(lambda: store.controller_alive(), timeout=30, message="the controller to lead again")
                hold_for(1.5, lambda: not any(node.alive for node in store.list_nodes()))
                os.kill(agents[0].pid, signal.SIGCONT)
                wait_until(lambda: [n.node_id for n in store.list_nodes() if n.alive] == ["node-a"], timeout=30,
                           message="node-a to heartbeat again")
                hold_for(TTL_S / 2, lambda: {r.replica_id for r in store.replicas_of("restarted-redis")} == records)
            finally:
                for agent in agents:
                    os.kill(agent.pid, signal.SIGCONT)
            hold_for(2 * TTL_S + 1, lambda: replica_pids("restarted-redis") == before)
            load.wait_for_more_answers(20)
        result = load.result("Redis stopped past the node TTL, restarted from its AOF",
                             redis.Redis.from_url(cluster.url), served, fault_at,
                             failed_because=REFUSED_WHILE_REDIS_DOWN,
                             notes=f"down {back_at - fault_at:.1f}s (TTL {TTL_S:g}s); answers resume as the replicas' "
                                   "Celery consumers reconnect (at most 1 s apart); no replica is replaced")
        # Refused only while Redis was down; none once it was back, and every answer the request's own.
        check_row(load, result, refused_between=(fault_at, back_at))
        assert replica_pids("restarted-redis") == before
        assert model.status().status == "HEALTHY"
        for node_id in ("node-a", "node-b"):   # the alive keys had expired in the append-only file
            assert "registering again" in log_of(cluster, f"agent-{node_id}")
        model.delete(timeout=60)
    finally:
        cluster.shutdown()


def test_a_second_agent_for_a_live_node_id_is_refused_at_once(tmp_path):
    cluster = start_cluster(tmp_path, ("node-a",), 4, *AGENT_ARGS)
    try:
        model, served = deploy_recorder(cluster.url, "one-agent", num_replicas=2, num_cpus=0.5, timeout=60)
        before = replica_pids("one-agent")
        first = cluster.processes["agent-node-a"]

        # A light load: the refused agent must not disturb it, and the one that replaces
        # a dead agent must not lose any of it.
        with SteadyLoad(model.get_handle(), threads=2) as load:
            load.wait_for_answers(20)
            fault_at = time.monotonic()
            second = cluster.start_agent("node-a", 4, *AGENT_ARGS, name="agent-node-a-again", wait=False)
            assert second.wait(timeout=60) != 0
            log = log_of(cluster, "agent-node-a-again")
            expected = (f"node node-a already has a live agent (pid {first.pid} on {socket.gethostname()}); "
                        "stop it or pick another --node-id")
            errors = [line for line in log.splitlines() if "error" in line.lower()]
            assert len(errors) == 1 and expected in errors[0], log
            assert "waiting for it to expire" not in log

            hold_for(2 * TTL_S + 1, lambda: replica_pids("one-agent") == before)
            assert first.poll() is None
            assert model.status().status == "HEALTHY"
            assert not load.failures and not load.lost, describe_failures(load)

            # An agent that died is replaced at once by a new one on this host: it takes the
            # dead one's claim over instead of waiting it out.
            cluster.stop("agent-node-a", sig=signal.SIGKILL)
            _, claim_left_ms = taskserve.connect(cluster.url).node_claim("node-a")
            claim_ends = time.time() + claim_left_ms / 1000
            cluster.start_agent("node-a", 4, *AGENT_ARGS, name="agent-node-a-restarted", wait=False)
            cluster.wait_for(lambda: "node agent node-a up" in log_of(cluster, "agent-node-a-restarted"),
                             "the restarted agent to come up", part="agent-node-a-restarted")
            restarted = log_of(cluster, "agent-node-a-restarted")
            assert "waiting for it to expire" not in restarted
            # Unless its start took longer than the claim had left (a loaded machine): then
            # there was no claim to take over.
            if logged_at(restarted, "node agent node-a up") < claim_ends:
                assert "which is gone; taking it over" in restarted, restarted
            wait_until(lambda: model.status().status == "HEALTHY" and len(replica_pids("one-agent")) == 2,
                       timeout=60, message="the replicas to run on the restarted agent")
            load.wait_for_more_answers(20)
        result = load.result("a second agent for a live node id; then the first SIGKILLed and replaced",
                             redis.Redis.from_url(cluster.url), served, fault_at, duplicated_because=REDELIVERED,
                             notes="the second is refused at once; a new one takes over the dead one's node id")
        check_row(load, result, most_duplicated=2)
        assert not replica_pids("one-agent") & before
        model.delete(timeout=60)
    finally:
        cluster.shutdown()
