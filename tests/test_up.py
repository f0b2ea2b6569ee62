"""`taskserve up` from a user's point of view: one command, a working cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request

import psutil
import pytest

from taskserve.redis_server import free_port

from .helpers import REPO, wait_until

pytestmark = pytest.mark.integration

ISSUE_SCRIPT = textwrap.dedent("""
    import taskserve

    @taskserve.deployment(name="my_deployment", num_replicas=1)
    class SimpleDeployment:
        def __init__(self, greeting="hello"):
            self.greeting = greeting
        def __call__(self, name):
            return f"{self.greeting} {name}"
        def pid(self):
            import os; return os.getpid()

    SimpleDeployment.deploy()                         # blocks until the replica serves
    h = SimpleDeployment.get_handle()
    print(h.remote("world").result(timeout=10))       # hello world
    SimpleDeployment.options(num_replicas=2).deploy() # scales to 2
    print(taskserve.list_deployments())
    print(taskserve.get_deployment("my_deployment").num_replicas)  # 2
""")


def start_up(workdir, port, http_port):
    """`taskserve up` in ``workdir``, once it says it is ready: its example deployed and serving."""
    env = {k: v for k, v in os.environ.items() if k != "TASKSERVE_ADDRESS"}
    env["HOME"] = str(workdir)          # the address file goes under this HOME
    env["PYTHONPATH"] = str(REPO)
    log_path = workdir / "up.log"
    log = open(log_path, "ab")
    start = log.tell()
    process = subprocess.Popen(
        [sys.executable, "-m", "taskserve", "up", "--redis-port", str(port), "--num-cpus", "4",
         "--http-port", str(http_port)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )

    def said() -> str:
        with open(log_path, "rb") as handle:
            handle.seek(start)
            return handle.read().decode(errors="replace")

    try:
        wait_until(lambda: "Try: " in said() or process.poll() is not None, timeout=90, interval=0.1,
                   message="taskserve up to say it is ready")
        assert process.poll() is None, said()
    except BaseException:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
        raise
    return process, env


def cli(env, cwd, *args):
    return subprocess.run([sys.executable, "-m", "taskserve", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_up_serves_the_example_runs_the_script_and_stops_everything(tmp_path):
    port, http_port = free_port(), free_port()
    up, env = start_up(tmp_path, port, http_port)
    try:
        called = cli(env, tmp_path, "call", "echo", '"hi"')
        assert called.stdout.strip() == '"hi"', called.stderr
        # The gateway serves the example over HTTP too.
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/echo?x=1", timeout=30) as answer:
            assert json.loads(answer.read())["query_params"] == {"x": "1"}
        # The address file lets a script in any directory find the cluster.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "script.py").write_text(ISSUE_SCRIPT)
        script = subprocess.run([sys.executable, "script.py"], capture_output=True, text=True,
                                cwd=elsewhere, env=env, timeout=180)
        assert script.returncode == 0, script.stderr
        lines = script.stdout.strip().splitlines()
        assert lines[0] == "hello world" and lines[-1] == "2"
        assert "my_deployment" in lines[1] and "echo" in lines[1]
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6       # redis, controller, agent, gateway, 1 echo + 2 my_deployment replicas
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
    for child in children:
        wait_until(lambda child=child: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE,
                   timeout=30, message=f"{child.pid} to exit")
    assert not (tmp_path / ".taskserve" / "address").exists()

    # The append-only file keeps the deployments across a restart.
    up, env = start_up(tmp_path, port, http_port)
    try:
        # Its replica may still be starting: the call waits in its queue until it serves.
        called = cli(env, tmp_path, "call", "my_deployment", '"again"')
        assert called.stdout.strip() == '"hello again"', called.stderr
        listed = json.loads(cli(env, tmp_path, "list", "--json").stdout)
        assert {item["name"] for item in listed} == {"echo", "my_deployment"}
        # A second `up` on the same data dir is refused with one line.
        second = cli(env, tmp_path, "up", "--redis-port", str(free_port()))
        assert second.returncode == 1 and "another `taskserve up` is running" in second.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=90)


def test_up_refuses_a_redis_port_another_server_holds(tmp_path):
    from taskserve.redis_server import RedisServer

    with RedisServer() as other:
        env = {k: v for k, v in os.environ.items() if k != "TASKSERVE_ADDRESS"}
        env["HOME"] = str(tmp_path)
        result = cli(env, tmp_path, "up", "--redis-port", str(other.port), "--http-port", "0", "--no-example")
        assert result.returncode == 1
        assert f"port {other.port} is in use" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert other.process.poll() is None
        assert not (tmp_path / ".taskserve" / "address").exists()


def test_a_restarted_redis_is_ready_only_once_its_append_only_file_is_loaded(tmp_path):
    """`up` on a data dir with a large file: the first command must not get BusyLoadingError."""
    import redis

    from taskserve.redis_server import RedisServer

    server = RedisServer(data_dir=tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=120)     # redis-py's default 5 s is short
        client.execute_command("DEBUG", "POPULATE", 2_000_000)    # about a second to load again
        client.bgrewriteaof()
        wait_until(lambda: not any(int(client.info("persistence")[flag])
                                   for flag in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")),
                   timeout=60, message="the append-only file to be rewritten")
        client.close()
        server.process.kill()          # the rewritten file holds every key; a SHUTDOWN takes seconds more
        server.process.wait()
        server.start()
        assert redis.Redis.from_url(server.url).set("first", "command") is True
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()
