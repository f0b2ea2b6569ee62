"""The operator's commands against a real cluster: export / diff / deploy -f --prune,
logs, down, call with several arguments, history and status as JSON, watching, and the
papercuts a new user found (issue 17)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import taskserve
from taskserve.api import deployment
from taskserve.errors import DeploymentError, ReplicaError
from taskserve.handle import DeploymentHandle
from taskserve.spec import validate_options

from .helpers import REPO, OutputLines, replica_pids, wait_until
from .test_cli import run_cli

MODEL = '''
import os
import time

from taskserve.http import Response


class Model:
    def __init__(self, delay=0.0):
        print("constructed in", os.getpid(), flush=True)
        time.sleep(delay)
        self.threshold = None

    def reconfigure(self, config):
        if config.get("bad"):
            raise ValueError("this config is bad")
        self.threshold = config["threshold"]

    def __call__(self, x):
        return x

    def add(self, a, b, scale=1):
        return (a + b) * scale

    def created(self):
        return Response({"id": 7}, status=201)

    def text(self):
        return Response("plain words")

    def _private(self):
        return "secret"

    def pid(self):
        return os.getpid()

    def boom(self):
        raise ValueError("boom in the model")
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def deploy_cli(cluster, model_file, name, *args):
    return run_cli(cluster, "deploy", f"{model_file}:Model", "--name", name, *args)


# --------------------------------------------------------------------------- declarative use


def test_export_applies_unchanged_and_diff_and_prune_say_what_changes(connected, unique_name, model_file, tmp_path):
    deploy_cli(connected, model_file, unique_name, "--version", "1", "--user-config", '{"threshold": 2}')
    deploy_cli(connected, model_file, f"{unique_name}-extra", "--version", "1")
    run_cli(connected, "scale", unique_name, "2")
    pids = replica_pids(unique_name)

    exported = tmp_path / "exported.yaml"
    exported.write_text(run_cli(connected, "export").stdout)
    assert f"name: {unique_name}" in exported.read_text()
    same = run_cli(connected, "diff", "-f", str(exported))
    assert same.stdout.strip().startswith("no changes")

    run_cli(connected, "deploy", "-f", str(exported))
    assert replica_pids(unique_name) == pids            # applying the export restarted nothing
    assert taskserve.get_deployment(unique_name).user_config == {"threshold": 2}

    # Keep only the first deployment, scaled and reconfigured.
    text = exported.read_text()
    entries = text.split("\n- ")
    mine = next(entry for entry in entries if entry.startswith(f"name: {unique_name}\n"))
    edited = mine.replace("num_replicas: 2", "num_replicas: 3").replace("threshold: 2", "threshold: 5")
    kept = tmp_path / "kept.yaml"
    kept.write_text("deployments:\n- " + edited.rstrip() + "\n")
    changed = run_cli(connected, "diff", "-f", str(kept), "--prune", check=False)
    assert changed.returncode == 1, changed.stderr
    assert f"~ {unique_name}: num_replicas 2 -> 3 (scale)" in changed.stdout
    assert "user_config {\"threshold\": 2} -> {\"threshold\": 5} (reconfigure in place)" in changed.stdout
    assert f"- {unique_name}-extra: not in the file; deleted (--prune)" in changed.stdout

    pruned = run_cli(connected, "deploy", "-f", str(kept), "--prune")
    assert f"deleting {unique_name}-extra" in pruned.stdout or f"{unique_name}-extra" in pruned.stdout
    assert f"{unique_name}-extra" not in taskserve.list_deployments()
    assert pids <= replica_pids(unique_name) and len(replica_pids(unique_name)) == 3
    assert run_cli(connected, "diff", "-f", str(kept)).stdout.strip().startswith("no changes")
    taskserve.delete_deployment(unique_name)


def test_an_entry_needs_import_path_or_code(connected, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("deployments:\n  - num_replicas: 2\n")
    result = run_cli(connected, "diff", "-f", str(path), check=False)
    assert result.returncode == 1
    assert "give each entry either import_path" in result.stderr
    path.write_text("deployments:\n  - name: gone\n    code: 0123456789abcdef\n")
    result = run_cli(connected, "deploy", "-f", str(path), check=False)
    assert result.returncode == 1 and "no deployment in the cluster runs the code 0123456789abcdef" in result.stderr


# --------------------------------------------------------------------------- calls


def test_call_takes_several_arguments_and_kwargs_and_refuses_private_methods(connected, unique_name, model_file):
    deploy_cli(connected, model_file, unique_name, "--version", "1", "--user-config", '{"threshold": 1}')
    added = run_cli(connected, "call", unique_name, "--method", "add", "1", "2", "--kwargs", '{"scale": 3}')
    assert added.stdout.strip() == "9"
    for method in ("__init__", "_private"):
        refused = run_cli(connected, "call", unique_name, "--method", method, check=False)
        assert refused.returncode == 1
        assert f"--method {method!r} cannot be called: only public methods" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    missing = run_cli(connected, "call", unique_name, "--method", "nope", check=False)
    assert "Model has no method 'nope'; its public methods: add, boom, created" in missing.stderr
    bad_kwargs = run_cli(connected, "call", unique_name, "--kwargs", "[1]", check=False)
    assert "--kwargs is a JSON object" in bad_kwargs.stderr

    # The replica refuses them too, whoever sends the request.
    with pytest.raises(ReplicaError, match="method '_private' is private"):
        DeploymentHandle(unique_name, method="_private").remote().result(timeout=30)
    with pytest.raises(ReplicaError, match="method '__init__' is private"):
        DeploymentHandle(unique_name, method="__init__").remote().result(timeout=30)

    # An HTTP Response returned to a handle caller gives its body.
    handle = taskserve.get_deployment(unique_name).get_handle()
    assert handle.created.remote().result(timeout=30) == {"id": 7}
    assert handle.text.remote().result(timeout=30) == "plain words"
    taskserve.delete_deployment(unique_name)


def test_a_timed_out_call_prints_one_line(connected, unique_name, model_file, tmp_path):
    (tmp_path / "sleepy.py").write_text("import time\nclass Sleepy:\n    def __call__(self, s):\n"
                                        "        time.sleep(s)\n        return s\n")
    run_cli(connected, "deploy", f"{tmp_path / 'sleepy.py'}:Sleepy", "--name", unique_name)
    result = run_cli(connected, "call", unique_name, "3", "--timeout", "0.5", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no answer from deployment" in result.stderr and "Exception ignored" not in result.stderr
    taskserve.delete_deployment(unique_name)


def test_local_modules_travel_and_tracebacks_name_the_users_file(connected, unique_name, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mylib.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    (project / "app.py").write_text(textwrap.dedent("""
        from mylib import shout


        class App:
            def __call__(self, text):
                return shout(text)

            def fail(self):
                raise RuntimeError("failing on purpose")
    """))
    run_cli(connected, "deploy", "app.py:App", "--name", unique_name, cwd=project)
    assert run_cli(connected, "call", unique_name, '"hi"', cwd="/").stdout.strip() == '"HI!"'
    with pytest.raises(ReplicaError) as caught:
        taskserve.get_deployment(unique_name).get_handle().fail.remote().result(timeout=30)
    assert f'File "{project / "app.py"}", line 10, in fail' in caught.value.traceback_text
    assert "<dynamic-code>" not in caught.value.traceback_text
    taskserve.delete_deployment(unique_name)


# --------------------------------------------------------------------------- history, status, rollback


def test_history_and_status_json_carry_what_the_tables_show(connected, unique_name, model_file):
    deploy_cli(connected, model_file, unique_name, "--version", "1", "--user-config", '{"threshold": 1}')
    run_cli(connected, "reconfigure", unique_name, '{"threshold": 2}')
    scaled = run_cli(connected, "scale", unique_name, "2")
    assert f"{unique_name}: scaling to 2 replicas" in scaled.stderr      # progress, as deploy shows it
    assert scaled.stdout.strip() == f"{unique_name}: 2 replicas"

    entries = json.loads(run_cli(connected, "history", unique_name, "--json").stdout)
    assert [e["action"] for e in entries] == ["deploy", "reconfigure", "scale"]
    assert entries[0]["change"] == 'created: version 1, 1 replica, user_config {"threshold": 1}'
    assert entries[1]["change"] == 'user_config {"threshold": 1} -> {"threshold": 2}'
    assert entries[1]["user_config"] == {"threshold": 2}
    assert entries[2]["change"] == "replicas 1 -> 2" and entries[2]["num_replicas"] == 2
    table = run_cli(connected, "history", unique_name).stdout
    assert "replicas 1 -> 2" in table

    same = run_cli(connected, "rollback", unique_name, "--to", "1")
    assert "version 1 is the one running; nothing to roll back" in same.stdout
    assert len(taskserve.history(unique_name)) == 3

    everything = json.loads(run_cli(connected, "status", "--json").stdout)
    assert unique_name in [d["name"] for d in everything["deployments"]]
    node = next(n for n in everything["nodes"] if n["node_id"] == "node-a")
    assert node["alive"] is True and node["num_cpus_used"] >= 2 and node["log_dir"].endswith("logs")
    taskserve.delete_deployment(unique_name)


def test_a_failing_reconfigure_is_reported_as_such(connected, unique_name, model_file):
    with pytest.raises(DeploymentError) as caught:
        run_model = _load(model_file).options(name=unique_name, version="1", user_config={"bad": True})
        run_model.deploy(timeout=120)
    message = str(caught.value)
    assert "reconfigure failed 3 times: ValueError: this config is bad" in message
    assert "constructor" not in message.splitlines()[0]
    taskserve.delete_deployment(unique_name)


def _load(path):
    from taskserve.config_file import load_target

    return load_target(f"{path}:Model")


# --------------------------------------------------------------------------- logs, watch, Ctrl-C


def test_logs_prints_what_replicas_write(connected, unique_name, model_file):
    deploy_cli(connected, model_file, unique_name, "--version", "1", "--user-config", '{"threshold": 1}')
    replica = taskserve.get_deployment(unique_name).status().replicas[0]
    printed = run_cli(connected, "logs", unique_name).stdout
    assert f"constructed in {replica.pid}" in printed
    one = run_cli(connected, "logs", unique_name, "--replica", replica.replica_id, "--tail", "1000").stdout
    assert f"constructed in {replica.pid}" in one and not one.startswith("[")
    unknown = run_cli(connected, "logs", unique_name, "--replica", "nope", check=False)
    assert unknown.returncode == 1 and "has no replica 'nope'" in unknown.stderr

    # --tail 1000: the new replica's first line is printed whether `logs -f` finds it at its
    # start (a slow start on a loaded machine) or while it follows.
    follow = subprocess.Popen([sys.executable, "-m", "taskserve", "logs", unique_name, "-f", "--tail", "1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=connected.env())
    output = OutputLines(follow.stdout)
    try:
        taskserve.scale_deployment(unique_name, 2)
        # The one that is not the first (pids wrap around: the larger pid need not be the newer).
        (new,) = [r for r in taskserve.get_deployment(unique_name).status().replicas
                  if r.replica_id != replica.replica_id]
        line = output.wait_for(f"constructed in {new.pid}", timeout=30)
        assert line.startswith(f"[{new.replica_id}] ")
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=30)
    taskserve.delete_deployment(unique_name)


def test_status_watch_follows_the_next_rollout(connected, unique_name, model_file):
    deploy_cli(connected, model_file, unique_name, "--version", "1", "--user-config", '{"threshold": 1}')
    watch = subprocess.Popen([sys.executable, "-m", "taskserve", "status", unique_name, "--watch"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=connected.env())
    output = OutputLines(watch.stdout)
    try:
        output.wait_for("waiting for its next rollout", timeout=30)
        assert watch.poll() is None           # a HEALTHY deployment does not end the watch
        run_cli(connected, "restart", unique_name)
        watch.wait(timeout=60)
        err = watch.stderr.read()
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, err
    assert "HEALTHY" in output.text()
    taskserve.delete_deployment(unique_name)


def test_ctrl_c_says_what_state_it_left(connected, unique_name, model_file):
    deploy_cli(connected, model_file, unique_name, "--version", "1", "--user-config", '{"threshold": 1}')
    # The new version's constructor takes 20 s: Ctrl-C interrupts the wait meanwhile.
    slow = tmp_model_with_delay(model_file)
    process = subprocess.Popen([sys.executable, "-m", "taskserve", "deploy", f"{slow}:Model", "--name", unique_name,
                                "--version", "2", "--user-config", '{"threshold": 1}'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=connected.env())
    try:
        wait_until(lambda: taskserve.get_deployment(unique_name).status().status == "UPDATING", timeout=30,
                   message="the rollout to start")
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "interrupted: stopped waiting, not the deploy" in err
    assert f"{unique_name} is UPDATING at version 2" in err
    assert f"`taskserve rollback {unique_name}` undoes it" in err
    taskserve.delete_deployment(unique_name)


def tmp_model_with_delay(model_file):
    slow = model_file.parent / "slow_model.py"
    slow.write_text(MODEL.replace("def __init__(self, delay=0.0):", "def __init__(self, delay=20.0):"))
    return slow


# --------------------------------------------------------------------------- down


@pytest.mark.slow
@pytest.mark.integration
def test_down_stops_the_up_it_finds(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("TASKSERVE_ADDRESS", None)
    data_dir = tmp_path / "data"
    up = subprocess.Popen([sys.executable, "-m", "taskserve", "up", "--data-dir", str(data_dir), "--http-port", "0",
                           "--no-example", "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: (data_dir / "address").is_file() and up.poll() is None, timeout=60,
                   message="taskserve up to write its address")
        wait_until(lambda: "taskserve is up" in (up.stdout.readline() or "") or up.poll() is not None, timeout=60)
        assert up.poll() is None
        down = subprocess.run([sys.executable, "-m", "taskserve", "down"], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=150)
        assert down.returncode == 0, down.stderr
        assert f"stopping the taskserve up with pid {up.pid}" in down.stdout
        assert "stopped:" in down.stdout
        assert up.wait(timeout=30) is not None
        again = subprocess.run([sys.executable, "-m", "taskserve", "down"], capture_output=True, text=True,
                               env=env, cwd=tmp_path, timeout=60)
        assert again.returncode == 1 and "no `taskserve up` of yours is running here" in again.stderr
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


# --------------------------------------------------------------------------- validation


def test_num_gpus_above_one_must_be_whole():
    assert validate_options({"num_gpus": 0.5}).num_gpus == 0.5
    assert validate_options({"num_gpus": 2}).num_gpus == 2
    with pytest.raises(ValueError, match=r"invalid num_gpus=1.5: .* a whole number \(like 2\)"):
        validate_options({"num_gpus": 1.5})
    with pytest.raises(ValueError, match="num_gpus=1.5"):
        deployment(num_gpus=1.5)(lambda: None)
