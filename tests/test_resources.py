"""Resources, thread limits and several node agents (three agents on one machine)."""

from __future__ import annotations

import os
import signal

import pytest

import taskserve

from .helpers import RequestLoop, addressed_cluster, wait_until


class Probe:
    def __call__(self, request_id=None):
        return [request_id, os.getpid()]

    def env(self):
        names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS", "CUDA_VISIBLE_DEVICES")
        return {name: os.environ.get(name) for name in names}

    def blas_threads(self):
        import numpy  # noqa: F401  (loads its BLAS)
        from threadpoolctl import threadpool_info
        return sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    with addressed_cluster(tmp_path_factory.mktemp("three"), ("node-a", "node-b", "node-c"), 2,
                           "--heartbeat-timeout", "2") as cluster:
        yield cluster


@pytest.fixture
def on_three(three_nodes):
    taskserve.connect(three_nodes.url)
    return three_nodes


def nodes_of(name: str) -> list[str]:
    return sorted(r.node_id for r in taskserve.get_deployment(name).status().replicas if r.state == "RUNNING")


def test_replicas_spread_over_nodes(on_three, unique_name):
    model = taskserve.deployment(Probe).options(name=unique_name, num_replicas=3, num_cpus=1)
    model.deploy()
    assert nodes_of(unique_name) == ["node-a", "node-b", "node-c"]
    model.delete()


def test_thread_limits_default_to_one_and_follow_overrides(on_three, unique_name):
    model = taskserve.deployment(Probe).options(name=unique_name, num_cpus=0.1)
    model.deploy()
    env = model.get_handle().env.remote().result(timeout=10)
    assert {env[k] for k in env if k != "CUDA_VISIBLE_DEVICES"} == {"1"}
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert model.get_handle().blas_threads.remote().result(timeout=30) == [1]

    model.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}}).deploy()
    env = model.get_handle().env.remote().result(timeout=10)
    assert (env["OMP_NUM_THREADS"], env["OPENBLAS_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("2", "2", "1")
    assert model.get_handle().blas_threads.remote().result(timeout=30) == [2]
    model.delete()


def test_agent_environment_overrides_the_default(on_three, unique_name):
    on_three.start_agent("node-omp", 2, "--labels", "omp=3", env={"OMP_NUM_THREADS": "3"})
    try:
        # Fill the other nodes so the replica lands on node-omp.
        filler = taskserve.deployment(Probe).options(name=unique_name + "-fill", num_replicas=3, num_cpus=2)
        filler.deploy()
        model = taskserve.deployment(Probe).options(name=unique_name, num_cpus=2)
        model.deploy()
        assert nodes_of(unique_name) == ["node-omp"]
        env = model.get_handle().env.remote().result(timeout=10)
        assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("3", "1")
        model.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": "5"}}).deploy()
        assert model.get_handle().env.remote().result(timeout=10)["OMP_NUM_THREADS"] == "5"
        model.delete()
        filler.delete()
    finally:
        on_three.stop("agent-node-omp")


def test_too_big_stays_pending_with_the_reason_then_fits_a_new_node(on_three, unique_name):
    model = taskserve.deployment(Probe).options(name=unique_name, num_cpus=4)
    with pytest.raises(taskserve.DeploymentError, match="needs 4 CPUs; the largest free is 2 on node-"):
        model.deploy(timeout=3)
    [replica] = model.status().replicas
    assert replica.state == "PENDING" and "needs 4 CPUs" in replica.message
    on_three.start_agent("node-big", 8)
    try:
        wait_until(lambda: model.status().status == "HEALTHY", timeout=30, message="placement on node-big")
        assert nodes_of(unique_name) == ["node-big"]
        model.delete()
    finally:
        on_three.stop("agent-node-big")


def test_fractional_gpus_share_a_gpu(on_three, unique_name):
    on_three.start_agent("node-gpu", 4, "--num-gpus", "2")
    try:
        model = taskserve.deployment(Probe).options(name=unique_name, num_replicas=3, num_cpus=0, num_gpus=0.5)
        model.deploy()
        visible = [r["CUDA_VISIBLE_DEVICES"] for r in
                   (model.get_handle().env.remote().result(timeout=10) for _ in range(30))]
        assert set(visible) <= {"0", "1"} and len(set(visible)) == 2
        shown = sorted(r.node_id for r in model.status().replicas)
        assert shown == ["node-gpu"] * 3
        model.delete()
    finally:
        on_three.stop("agent-node-gpu")


def test_killed_agent_moves_its_replicas_and_fails_no_request(on_three, unique_name):
    model = taskserve.deployment(Probe).options(name=unique_name, num_replicas=3, num_cpus=1)
    model.deploy()
    assert nodes_of(unique_name) == ["node-a", "node-b", "node-c"]
    with RequestLoop(model.get_handle(), threads=2) as load:
        on_three.stop("agent-node-c", sig=signal.SIGKILL)
        wait_until(lambda: len(nodes_of(unique_name)) == 3 and "node-c" not in nodes_of(unique_name),
                   timeout=60, message="the replicas of node-c to move")
    assert not load.failures, load.failures[:3]
    assert all(answer[0] == request_id for request_id, answer in load.results.items())
    # Its replicas may move before its alive key's TTL runs out: when the agent dies, its fork
    # server and then the replicas get their parent-death signal, drain and are replaced at once.
    wait_until(lambda: not {n.node_id: n for n in taskserve.connect().list_nodes()}["node-c"].alive,
               timeout=30, message="node-c to be seen dead")

    # The agent comes back: it reclaims nothing of what it ran before.
    on_three.start_agent("node-c", 2, "--heartbeat-timeout", "2")
    model.options(num_replicas=5).deploy()
    assert "node-c" in nodes_of(unique_name)
    model.delete()
