"""Deployments end to end: real Redis, real controller, agent and replica processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import taskserve
from taskserve import handle as handle_module
from taskserve.store import KEY_PATTERN

from .helpers import replica_pids, wait_until


class Greeter:
    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def __call__(self, name: str, punctuation: str = "") -> str:
        return f"{self.greeting} {name}{punctuation}"

    def pid(self) -> int:
        return os.getpid()

    def fail(self, text: str) -> None:
        raise ValueError(f"bad input: {text}")

    def echo(self, value):
        return value


def test_deploy_and_call_positional_keyword_and_method(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name)
    greeter.deploy("hi")
    handle = greeter.get_handle()

    assert handle.remote("world").result(timeout=10) == "hi world"
    assert handle.remote(name="bob", punctuation="!").result(timeout=10) == "hi bob!"
    replica_pid = handle.pid.remote().result(timeout=10)
    assert replica_pid != os.getpid()

    status = greeter.status()
    assert status.status == "HEALTHY"
    [replica] = status.replicas
    assert (replica.state, replica.pid, replica.node_id) == ("RUNNING", replica_pid, "node-a")
    assert replica.version == status.version
    greeter.delete()


def test_replica_exception_comes_back_as_replica_error(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name)
    greeter.deploy()
    with pytest.raises(taskserve.ReplicaError) as caught:
        greeter.get_handle().fail.remote("xyz").result(timeout=10)
    assert caught.value.type_name == "ValueError"
    assert "bad input: xyz" in caught.value.message
    assert "Traceback" in caught.value.traceback_text and "def fail" not in caught.value.message
    assert "in fail" in caught.value.traceback_text
    # The replica survives its user's exception.
    assert greeter.get_handle().remote("x").result(timeout=10) == "hello x"
    greeter.delete()


def test_json_is_the_default_and_pickle_is_opt_in(connected, unique_name):
    as_json = taskserve.deployment(Greeter).options(name=unique_name)
    as_json.deploy()
    handle = as_json.get_handle()
    assert handle.echo.remote((1, 2)).result(timeout=10) == [1, 2]     # tuples arrive as lists
    with pytest.raises(TypeError, match="serializer='pickle'"):
        handle.echo.remote({1, 2})
    as_json.delete()

    as_pickle = taskserve.deployment(Greeter).options(name=unique_name + "-pickle", serializer="pickle")
    as_pickle.deploy()
    assert as_pickle.get_handle().echo.remote({1, 2}).result(timeout=10) == {1, 2}
    as_pickle.delete()


def test_scale_up_keeps_existing_replicas_and_scale_down_drains(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name, version="1")
    greeter.deploy()
    [first_pid] = replica_pids(unique_name)

    greeter.options(num_replicas=3).deploy()
    after_up = replica_pids(unique_name)
    assert len(after_up) == 3 and first_pid in after_up
    assert taskserve.get_deployment(unique_name).num_replicas == 3

    greeter.options(num_replicas=1).deploy()
    after_down = replica_pids(unique_name, state=None)
    assert len(after_down) == 1 and after_down <= after_up
    for pid in after_up - after_down:
        wait_until(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=30, message=f"drained replica {pid} to exit")
    greeter.delete()


def test_same_version_redeploy_is_a_no_op_and_unversioned_rolls(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name, version="v1", num_replicas=2)
    greeter.deploy()
    before = replica_pids(unique_name)
    generation = greeter.status().generation
    greeter.deploy()
    assert replica_pids(unique_name) == before
    assert greeter.status().generation == generation        # nothing was written

    unversioned = greeter.options(version=None)
    unversioned.deploy()
    after = replica_pids(unique_name)
    assert len(after) == 2 and not (after & before)
    greeter.delete()


def test_scale_to_zero_and_back(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name, version="1")
    greeter.deploy()
    greeter.options(num_replicas=0).deploy()
    assert greeter.status().replicas == [] and greeter.status().status == "HEALTHY"
    greeter.options(num_replicas=1).deploy()
    assert greeter.get_handle().remote("again").result(timeout=10) == "hello again"
    greeter.delete()


def test_get_and_list_deployments(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name, num_replicas=2, version="7")
    greeter.deploy("hey")
    found = taskserve.get_deployment(unique_name)
    assert (found.name, found.num_replicas, found.version) == (unique_name, 2, "7")
    assert found.init_args == ("hey",)
    assert unique_name in taskserve.list_deployments()
    # A deployment read back from Redis can be redeployed with other options.
    found.options(num_replicas=1).deploy()
    assert found.get_handle().remote("you").result(timeout=10) == "hey you"
    greeter.delete()
    assert unique_name not in taskserve.list_deployments()


def test_delete_stops_replicas_and_forgets_the_deployment(connected, unique_name, monkeypatch):
    greeter = taskserve.deployment(Greeter).options(name=unique_name, num_replicas=2)
    greeter.deploy()
    pids = replica_pids(unique_name)
    handle = greeter.get_handle()
    greeter.delete()

    with pytest.raises(taskserve.DeploymentNotFound):
        taskserve.get_deployment(unique_name)
    with pytest.raises(KeyError):
        taskserve.get_deployment(unique_name)
    monkeypatch.setattr(handle_module, "EXISTENCE_CHECK_INTERVAL_S", 0.0)
    with pytest.raises(taskserve.DeploymentNotFound):
        handle.remote("late")
    for pid in pids:
        wait_until(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=30, message=f"replica {pid} to exit")
    store = taskserve.connect(connected.url)
    assert not [key for key in store.redis.keys(KEY_PATTERN) if unique_name.encode() in key]


def test_function_deployment(connected, unique_name):
    @taskserve.deployment(name=unique_name)
    def double(x):
        return 2 * x

    double.deploy()
    assert double.get_handle().remote(21).result(timeout=10) == 42
    with pytest.raises(TypeError, match="takes no constructor arguments"):
        double.deploy(1)
    double.delete()


def test_class_from_main_script_ships_by_value(connected, unique_name, tmp_path):
    script = tmp_path / "my_script.py"
    script.write_text(textwrap.dedent(f"""
        import taskserve

        @taskserve.deployment(name="{unique_name}")
        class FromMain:
            def __call__(self, x):
                return {{"from_main": x, "module": __name__}}

        FromMain.deploy()
        print(FromMain.get_handle().remote(5).result(timeout=10))
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env=connected.env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "{'from_main': 5, 'module': '__main__'}" in result.stdout
    taskserve.get_deployment(unique_name).delete()


def test_killed_replica_is_replaced(connected, unique_name):
    greeter = taskserve.deployment(Greeter).options(name=unique_name, num_replicas=2, version="1")
    greeter.deploy()
    before = replica_pids(unique_name)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)

    def back_to_two():
        pids = replica_pids(unique_name)
        return len(pids) == 2 and victim not in pids and pids
    after = wait_until(back_to_two, timeout=30, message="a replacement replica")
    assert (before - {victim}) <= after
    assert greeter.get_handle().remote("x").result(timeout=10) == "hello x"
    greeter.delete()


def test_constructor_failure_fails_the_first_deploy(connected, unique_name):
    class Broken:
        def __init__(self):
            raise RuntimeError("model file missing")

        def __call__(self):
            return None

    broken = taskserve.deployment(Broken).options(name=unique_name)
    with pytest.raises(taskserve.DeploymentError, match="model file missing"):
        broken.deploy(timeout=60)
    status = taskserve.get_deployment(unique_name).status()
    assert status.status == "UNHEALTHY" and "model file missing" in status.message
    broken.delete()


def test_max_concurrent_queries_serves_requests_at_once(connected, unique_name):
    class Meeting:
        def __init__(self):
            import threading
            self.barrier = threading.Barrier(3)

        def __call__(self):
            # Passes only if three requests wait here at the same time.
            self.barrier.wait(timeout=20)
            return os.getpid()

    model = taskserve.deployment(Meeting).options(name=unique_name, max_concurrent_queries=3)
    model.deploy()
    responses = [model.get_handle().remote() for _ in range(3)]
    assert len({response.result(timeout=30) for response in responses}) == 1
    model.delete()


def test_same_version_deploy_after_a_failed_first_deploy_tries_again(connected, unique_name, tmp_path):
    flag = tmp_path / "broken"
    flag.touch()

    class SometimesBroken:
        def __init__(self):
            if flag.exists():
                raise RuntimeError("not yet")

        def __call__(self):
            return "fixed"

    model = taskserve.deployment(SometimesBroken).options(name=unique_name, version="1")
    with pytest.raises(taskserve.DeploymentError, match="not yet"):
        model.deploy(timeout=60)
    flag.unlink()
    model.deploy(timeout=60)
    assert model.get_handle().remote().result(timeout=10) == "fixed"
    model.delete()


def test_the_readme_example_scales_to_2_without_restarting_its_replica(connected):
    """README's "Deploy your own" example, run as written, with a look at the replicas at its
    "# scales to 2" line: the replica that served keeps serving (issue: the example had no
    version, so that line was a full rolling restart)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [block] = [b for b in readme.split("```python\n")[1:] if "# scales to 2" in b.split("```")[0]]
    lines = block.split("```")[0].splitlines(keepends=True)
    [at] = [i for i, line in enumerate(lines) if "# scales to 2" in line]
    namespace: dict = {"__name__": "readme_example"}
    exec(compile("".join(lines[:at]), "README.md", "exec"), namespace)
    before = {r.replica_id for r in taskserve.get_deployment("my_deployment").status().replicas}
    exec(compile("".join(lines[at:at + 1]), "README.md", "exec"), namespace)
    after = {r.replica_id for r in taskserve.get_deployment("my_deployment").status().replicas
             if r.state == "RUNNING"}
    try:
        assert len(before) == 1 and before < after and len(after) == 2, (before, after)
    finally:
        exec(compile("".join(lines[at + 1:]), "README.md", "exec"), namespace)    # it deletes the deployment
