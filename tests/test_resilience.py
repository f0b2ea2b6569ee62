"""The cluster rides out a Redis restart: controller and agent retry, replicas keep their state."""

from __future__ import annotations

import taskserve
from taskserve.redis_server import RedisServer

from .conftest import Cluster, replica_pids, wait_until


class Echo:
    def __call__(self, x):
        return x


def test_controller_and_agent_survive_a_redis_restart(tmp_path):
    redis_dir = tmp_path / "redis"
    cluster = Cluster(RedisServer(data_dir=redis_dir).start(), tmp_path)
    try:
        taskserve.connect(cluster.url)
        cluster.start("controller", "controller", "--resync", "0.5")
        cluster.start_agent("node-a", 4)
        model = taskserve.deployment(Echo).options(name="survivor", version="1", num_cpus=0.5)
        model.deploy()
        before = replica_pids("survivor")

        cluster.redis.stop()                       # saves the append-only file
        cluster.redis = RedisServer(port=cluster.redis.port, data_dir=redis_dir).start()

        for name, process in cluster.processes.items():
            assert process.poll() is None, f"{name} exited when Redis went away"
        assert model.get_handle().remote("back").result(timeout=30) == "back"
        model.options(num_replicas=2).deploy(timeout=60)
        after = replica_pids("survivor")
        assert before < after
        model.delete()
    finally:
        cluster.shutdown()
