"""Runtime environments with real replicas, offline: wheels built here, pinned by path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import taskserve
from taskserve.runtime_env import env_key, normalize_pip, pack_working_dir

from .helpers import replica_pids


def build_wheel(root: Path, version: str) -> Path:
    project = root / f"tsdemo-{version}"
    (project / "tsdemo").mkdir(parents=True)
    (project / "tsdemo" / "__init__.py").write_text(f'VERSION = "{version}"\n')
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "tsdemo"
        version = "{version}"
    """))
    out = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(project)], check=True, capture_output=True, timeout=120)
    [wheel] = out.glob(f"tsdemo-{version}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wheels")
    return {version: build_wheel(root, version) for version in ("1.0", "2.0")}


class UsesDemo:
    def __call__(self):
        import tsdemo
        return [tsdemo.VERSION, tsdemo.__file__, sys.executable]


class WorkingDirProbe:
    def __call__(self):
        import helper_mod
        return {"value": helper_mod.VALUE, "cwd": os.getcwd(), "files": sorted(os.listdir("."))}


def agent_log(cluster) -> str:
    return (cluster.workdir / "agent-node-a.log").read_text()


def test_two_deployments_pin_conflicting_versions_at_once(connected, unique_name, wheels):
    old = taskserve.deployment(UsesDemo).options(name=unique_name + "-old",
                                                  runtime_env={"pip": [str(wheels["1.0"])]})
    new = taskserve.deployment(UsesDemo).options(name=unique_name + "-new",
                                                  runtime_env={"pip": [str(wheels["2.0"])]})
    old.deploy(timeout=180)
    new.deploy(timeout=180)
    old_version, old_file, old_python = old.get_handle().remote().result(timeout=10)
    new_version, new_file, new_python = new.get_handle().remote().result(timeout=10)
    assert (old_version, new_version) == ("1.0", "2.0")
    assert old_python != new_python != sys.executable
    assert ".taskserve" not in old_file and "envs" in old_file

    # The same spec again reuses the environment: no second build.
    key = env_key(normalize_pip([str(wheels["1.0"])]))
    again = taskserve.deployment(UsesDemo).options(name=unique_name + "-again",
                                                    runtime_env={"pip": [str(wheels["1.0"])]})
    again.deploy(timeout=60)
    assert again.get_handle().remote().result(timeout=10)[2] == old_python
    assert agent_log(connected).count(f"building runtime env {key}") == 1

    listing = subprocess.run([sys.executable, "-m", "taskserve", "env", "list", "--json", "--data-dir",
                              str(connected.workdir / "node-a")], capture_output=True, text=True,
                             env=connected.env(), timeout=60)
    assert listing.returncode == 0, listing.stderr
    [entry] = [item for item in json.loads(listing.stdout) if item["key"] == key]
    assert sorted(entry["used_by"]) == [unique_name + "-again", unique_name + "-old"]

    for deployment in (old, new, again):
        deployment.delete()
    pruned = subprocess.run([sys.executable, "-m", "taskserve", "env", "prune", "--data-dir",
                             str(connected.workdir / "node-a")], capture_output=True, text=True,
                            env=connected.env(), timeout=60)
    assert pruned.returncode == 0 and key in pruned.stdout
    assert not (connected.workdir / "node-a" / "envs" / key).exists()


def test_bad_requirement_fails_the_deploy_and_the_old_version_serves(connected, unique_name, tmp_path):
    # max_surge=1: the new replica starts before the old one stops, so the old one serves throughout.
    model = taskserve.deployment(UsesDemo).options(name=unique_name, version="1", max_surge=1)
    model.options(runtime_env={"env_vars": {"A": "1"}}).deploy()
    before = replica_pids(unique_name)
    missing = tmp_path / "tsdemo-9.0-py3-none-any.whl"
    with pytest.raises(taskserve.DeploymentError) as caught:
        model.options(version="2", runtime_env={"pip": [str(missing)]}).deploy(timeout=120)
    assert "installing the runtime env failed" in str(caught.value)
    assert "tsdemo-9.0" in str(caught.value)
    assert replica_pids(unique_name) == before
    assert model.status().version == "1"
    model.delete()


def test_working_dir_is_the_replicas_cwd_and_first_import_path(connected, unique_name, tmp_path):
    code = tmp_path / "project"
    (code / "__pycache__").mkdir(parents=True)
    (code / "helper_mod.py").write_text("VALUE = 42\n")
    (code / "__pycache__" / "helper_mod.cpython-311.pyc").write_bytes(b"stale")
    (code / "secret.txt").write_text("not shipped")
    (code / ".gitignore").write_text("secret.txt\n")
    model = taskserve.deployment(WorkingDirProbe).options(name=unique_name, runtime_env={"working_dir": str(code)})
    model.deploy()
    answer = model.get_handle().remote().result(timeout=10)
    assert answer["value"] == 42
    assert answer["files"] == [".gitignore", "helper_mod.py"]
    shipped = taskserve.get_deployment(unique_name).config.runtime_env["working_dir"]
    assert answer["cwd"] != str(code) and shipped == f"taskserve-pkg://{Path(answer['cwd']).name}.zip"
    model.delete()


def test_working_dir_size_limit_and_bad_values(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 2048)
    with pytest.raises(ValueError, match="holds more than 0 MB"):
        pack_working_dir(tmp_path, limit=1024)
    with pytest.raises(ValueError, match="not a directory"):
        pack_working_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a file"):
        normalize_pip("no-such-requirements.txt")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# pinned\nrequests==2.31.0\n\nnumpy\n")
    assert normalize_pip(str(requirements)) == ["requests==2.31.0", "numpy"]
    # Same content, same package: a redeploy of unchanged code is not a new spec.
    assert pack_working_dir(tmp_path)[0] == pack_working_dir(tmp_path)[0]


@pytest.mark.integration
def test_without_uv_the_environment_is_built_with_venv_and_pip(tmp_path, wheels, monkeypatch):
    from taskserve.node import envs as runtime_env

    monkeypatch.setattr(runtime_env, "_find_uv", lambda: None)
    cache = runtime_env.EnvironmentCache(tmp_path / "envs")
    lines: list[str] = []
    python = cache.ensure([str(wheels["2.0"])], progress=lines.append)
    probe = subprocess.run([str(python), "-c", "import tsdemo, taskserve; print(tsdemo.VERSION)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "2.0", probe.stderr
    assert any("pip" in line.lower() or "tsdemo" in line for line in lines)
    assert [item.requirements for item in cache.list()] == [[str(wheels["2.0"])]]
    # Ready now: a second call builds nothing.
    lines.clear()
    assert cache.ensure([str(wheels["2.0"])], progress=lines.append) == python and lines == []


def test_a_working_dir_outlives_the_deployment_it_was_uploaded_with(connected, unique_name, tmp_path):
    code = tmp_path / "project"
    code.mkdir()
    (code / "helper_mod.py").write_text("VALUE = 7\n")
    first = taskserve.deployment(WorkingDirProbe).options(name=unique_name, runtime_env={"working_dir": str(code)})
    first.deploy()
    copy = taskserve.get_deployment(unique_name).options(name=unique_name + "-copy")
    copy.deploy()
    first.delete()
    shipped = taskserve.get_deployment(unique_name + "-copy").config.runtime_env["working_dir"]
    sha = shipped.removeprefix("taskserve-pkg://").removesuffix(".zip")
    assert taskserve.connect().get_code(sha)   # still there for replicas on nodes that lack it
    assert copy.get_handle().remote().result(timeout=10)["value"] == 7
    copy.delete()
