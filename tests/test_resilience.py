"""The cluster rides out a Redis restart: controller and agent retry, replicas keep their state."""

from __future__ import annotations

import pytest

import taskserve

from .helpers import replica_pids, start_cluster

pytestmark = pytest.mark.integration


class Echo:
    def __call__(self, x):
        return x


def test_controller_and_agent_survive_a_redis_restart(tmp_path):
    cluster = start_cluster(tmp_path, ("node-a",), 4, redis_data_dir=tmp_path / "redis")
    try:
        model = taskserve.deployment(Echo).options(name="survivor", version="1", num_cpus=0.5)
        model.deploy()
        before = replica_pids("survivor")

        cluster.restart_redis()                    # from its append-only file

        for name, process in cluster.processes.items():
            assert process.poll() is None, f"{name} exited when Redis went away"
        assert model.get_handle().remote("back").result(timeout=30) == "back"
        model.options(num_replicas=2).deploy(timeout=60)
        after = replica_pids("survivor")
        assert before < after
        model.delete()
    finally:
        cluster.shutdown()
