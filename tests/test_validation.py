"""Bad input gets one clear error before anything in Redis changes."""

from __future__ import annotations

import pytest

import taskserve
from taskserve.store import KEY_PATTERN


class Model:
    def __init__(self, size: int = 1) -> None:
        self.size = size

    def __call__(self, x):
        return x


def redis_state(cluster) -> dict:
    store = taskserve.connect(cluster.url)
    return {key: store.redis.dump(key) for key in sorted(store.redis.keys(KEY_PATTERN))}


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"num_replicas": -1}, ValueError, "num_replicas=-1"),
        ({"num_replicas": 1.5}, TypeError, "num_replicas=1.5"),
        ({"num_replicas": "2"}, TypeError, "num_replicas='2'"),
        ({"num_replica": 2}, TypeError, "did you mean 'num_replicas'"),
        ({"name": "has space"}, ValueError, "invalid deployment name 'has space'"),
        ({"name": "x" * 65}, ValueError, "1 to 64"),
        ({"name": "a/b"}, ValueError, "invalid deployment name 'a/b'"),
        ({"serializer": "yaml"}, TypeError, "serializer='yaml'"),
        ({"user_config": {"weights": [1, 2, {3}]}}, TypeError, "user_config['weights'][2] is a set"),
        ({"num_cpus": -1}, ValueError, "num_cpus=-1"),
        ({"max_concurrent_queries": 0}, ValueError, "max_concurrent_queries=0"),
    ],
)
def test_bad_options_raise_before_anything_changes(connected, options, error, words):
    before = redis_state(connected)
    with pytest.raises(error) as caught:
        taskserve.deployment(Model).options(**options)
    assert words in str(caught.value)
    with pytest.raises(error):
        taskserve.deployment(**options)(Model)
    assert redis_state(connected) == before


def test_bad_constructor_arguments_raise_in_deploy_before_anything_changes(connected, unique_name):
    before = redis_state(connected)
    with pytest.raises(TypeError, match="cannot construct Model"):
        taskserve.deployment(Model).options(name=unique_name).deploy(1, 2, 3)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import threading
        taskserve.deployment(Model).options(name=unique_name).deploy(size=threading.Lock())
    assert redis_state(connected) == before


def test_user_config_needs_a_reconfigure_method(connected):
    with pytest.raises(ValueError, match="has no reconfigure"):
        taskserve.deployment(Model).options(user_config={"a": 1})

    def function(x):
        return x
    with pytest.raises(ValueError, match="is a function"):
        taskserve.deployment(function).options(user_config={"a": 1})


def test_unknown_deployment_raises_deployment_not_found(connected):
    with pytest.raises(taskserve.DeploymentNotFound) as caught:
        taskserve.get_deployment("no-such-deployment")
    assert isinstance(caught.value, KeyError)
    assert "no-such-deployment" in str(caught.value) and "taskserve list" in str(caught.value)
    with pytest.raises(taskserve.DeploymentNotFound):
        taskserve.delete_deployment("no-such-deployment")
    with pytest.raises(taskserve.DeploymentNotFound):
        taskserve.scale_deployment("no-such-deployment", 2)


def test_connect_without_an_address_says_to_run_up(monkeypatch, tmp_path):
    from taskserve import connection

    monkeypatch.delenv("TASKSERVE_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(taskserve.TaskserveError, match="taskserve up"):
        connection.resolve_address(None)
    with pytest.raises(taskserve.TaskserveError, match="redis://"):
        connection.resolve_address("localhost:6379")


@pytest.mark.integration
def test_deploy_without_a_controller_says_so_and_times_out(caplog, monkeypatch):
    from taskserve import connection
    from taskserve.redis_server import RedisServer

    # This process's connection is restored after the test.
    monkeypatch.setattr(connection, "_store", None)
    monkeypatch.setattr(connection, "_address", None)
    with RedisServer() as server:
        taskserve.connect(server.url)
        model = taskserve.deployment(Model).options(name="lonely")
        with caplog.at_level("WARNING", logger="taskserve.deploy"):
            with pytest.raises(taskserve.DeploymentError, match="did not finish within 6"):
                model.deploy(timeout=6)
        assert "no controller is running" in caplog.text


def test_a_route_prefix_serves_one_deployment(connected, unique_name):
    first = taskserve.deployment(Model).options(name=unique_name, route_prefix="/shared", num_replicas=0)
    first.deploy()
    before = redis_state(connected)
    with pytest.raises(ValueError, match=f"route_prefix '/shared' is already served by deployment '{unique_name}'"):
        taskserve.deployment(Model).options(name=unique_name + "-2", route_prefix="/shared").deploy()
    assert redis_state(connected) == before
    # A default prefix, '/<name>', counts too.
    default = taskserve.deployment(Model).options(name=unique_name + "-d", num_replicas=0)
    default.deploy()
    before = redis_state(connected)
    with pytest.raises(ValueError, match=f"already served by deployment '{unique_name}-d'"):
        taskserve.deployment(Model).options(name=unique_name + "-e", route_prefix=f"/{unique_name}-d").deploy()
    assert redis_state(connected) == before
    default.delete()
    first.options(route_prefix="/shared").deploy()      # redeploying the owner is fine
    first.delete()
