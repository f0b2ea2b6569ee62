"""The `taskserve` command line against a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import taskserve

from .helpers import replica_pids


def run_cli(cluster, *args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "taskserve", *args], capture_output=True, text=True,
                            timeout=120, env=cluster.env(), cwd=cwd)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent("""
        import os

        class Doubler:
            def __call__(self, x):
                return 2 * x

            def pid(self):
                return os.getpid()
    """))
    return path


def test_deploy_call_scale_status_delete(connected, unique_name, model_file):
    run_cli(connected, "deploy", f"{model_file}:Doubler", "--name", unique_name, "--version", "1")
    assert run_cli(connected, "call", unique_name, "21").stdout.strip() == "42"
    assert isinstance(json.loads(run_cli(connected, "call", unique_name, "--method", "pid").stdout), int)

    first = replica_pids(unique_name)
    run_cli(connected, "scale", unique_name, "3")
    after = replica_pids(unique_name)
    assert len(after) == 3 and first <= after

    snapshot = json.loads(run_cli(connected, "status", unique_name, "--json").stdout)
    assert snapshot["status"] == "HEALTHY" and snapshot["num_replicas"] == 3
    assert sorted(r["pid"] for r in snapshot["replicas"]) == sorted(after)
    assert {r["state"] for r in snapshot["replicas"]} == {"RUNNING"}

    listed = json.loads(run_cli(connected, "list", "--json").stdout)
    assert unique_name in [item["name"] for item in listed]
    table = run_cli(connected, "status").stdout
    assert unique_name in table and "node-a" in table

    run_cli(connected, "delete", unique_name)
    assert unique_name not in taskserve.list_deployments()


def test_deploy_module_reference(connected, unique_name, model_file):
    run_cli(connected, "deploy", "model:Doubler", "--name", unique_name, cwd=model_file.parent)
    assert run_cli(connected, "call", unique_name, "4").stdout.strip() == "8"
    run_cli(connected, "delete", unique_name)


@pytest.mark.parametrize(
    "args, words",
    [
        (("call", "no-such-deployment", "1"), "deployment 'no-such-deployment' does not exist"),
        (("scale", "no-such-deployment", "2"), "does not exist"),
        (("scale", "x", "--", "-1"), "num_replicas=-1"),
        (("deploy", "missing.py:Model"), "no file 'missing.py'"),
        (("deploy", "nocolon"), "use FILE.py:ATTR or MODULE:ATTR"),
        (("call", "echo", "{not json"), "PAYLOAD is not valid JSON"),
    ],
)
def test_errors_are_one_line_and_exit_1(connected, args, words):
    result = run_cli(connected, *args, check=False)
    assert result.returncode == 1
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_deploy_from_a_file_validates_every_entry_first(connected, unique_name, model_file):
    config = model_file.parent / "deployments.yaml"
    config.write_text(textwrap.dedent(f"""
        deployments:
          - import_path: model.py:Doubler
            name: {unique_name}-a
            version: "1"
          - import_path: model.py:Doubler
            name: {unique_name}-b
            num_replicas: -2
    """))
    result = run_cli(connected, "deploy", "-f", str(config), check=False)
    assert result.returncode == 1
    assert "deployments.1 (model.py:Doubler): invalid num_replicas=-2" in result.stderr
    assert not {f"{unique_name}-a", f"{unique_name}-b"} & set(taskserve.list_deployments())

    config.write_text(config.read_text().replace("num_replicas: -2", "num_replicas: 2"))
    run_cli(connected, "deploy", "-f", str(config), cwd="/")
    assert run_cli(connected, "call", f"{unique_name}-b", "5").stdout.strip() == "10"
    assert taskserve.get_deployment(f"{unique_name}-b").num_replicas == 2
    for suffix in ("a", "b"):
        taskserve.delete_deployment(f"{unique_name}-{suffix}")
