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


def build_wheel(root: Path, version: str, name: str = "tsdemo") -> Path:
    module = name.replace("-", "_")
    project = root / f"{name}-{version}"
    (project / module).mkdir(parents=True)
    (project / module / "__init__.py").write_text(f'VERSION = "{version}"\n')
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "{name}"
        version = "{version}"
    """))
    out = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(project)], check=True, capture_output=True, timeout=120)
    [wheel] = out.glob(f"{module}-{version}-*.whl")
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


def test_two_deployments_pin_conflicting_versions_at_once(connected, unique_name, wheels, tmp_path):
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

    # Without --data-dir, from a directory of no cluster: the data dir of the cluster's agent on
    # this machine (issue: it looked in ./.taskserve only, and found nothing).
    listing = subprocess.run([sys.executable, "-m", "taskserve", "env", "list", "--json"], capture_output=True,
                             text=True, env=connected.env(), cwd=tmp_path, timeout=60)
    assert listing.returncode == 0, listing.stderr
    [entry] = [item for item in json.loads(listing.stdout) if item["key"] == key]
    assert sorted(entry["used_by"]) == [unique_name + "-again", unique_name + "-old"]
    assert Path(entry["path"]).parent == (connected.workdir / "node-a" / "envs").resolve()

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


# --------------------------------------------------------------------------- the machine's pip configuration

MIRRORED = "taskserve-mirror-probe"       # on no public index: only the local one below has it


class SimpleIndex:
    """A PEP 503 index of one project on 127.0.0.1 (``python -m http.server``), and the
    paths it was asked for."""

    def __init__(self, root: Path, wheel: Path) -> None:
        project = root / "simple" / MIRRORED
        project.mkdir(parents=True)
        (project / wheel.name).write_bytes(wheel.read_bytes())
        (project / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
        self.log = root / "requests.log"
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline()     # "Serving HTTP on 127.0.0.1 port 43117 (...) ..."
        self.url = f"http://127.0.0.1:{first.split(' port ')[1].split()[0]}/simple"

    def requested(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def mirrored_wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("mirrored"), "3.0", MIRRORED)


@pytest.fixture
def simple_index(tmp_path, mirrored_wheel):
    index = SimpleIndex(tmp_path / "index", mirrored_wheel)
    try:
        yield index
    finally:
        index.stop()


@pytest.fixture
def machine_without_network(tmp_path, monkeypatch) -> Path:
    """No pip or uv setting of this machine's user, an empty uv cache, and every connection
    beyond 127.0.0.1 refused (a proxy on a closed port): the only index is the test's.
    Returns the home directory, where a test may write a pip.conf."""
    for name in list(os.environ):
        if name.startswith(("PIP_", "UV_")) or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


@pytest.mark.integration
@pytest.mark.parametrize("configured_by", ["PIP_INDEX_URL", "pip.conf", "PIP_FIND_LINKS and PIP_NO_INDEX"])
def test_a_runtime_env_installs_from_where_the_machines_pip_does(configured_by, tmp_path, simple_index,
                                                                  mirrored_wheel, machine_without_network,
                                                                  monkeypatch):
    from taskserve.node.envs import EnvironmentCache

    if configured_by == "PIP_INDEX_URL":
        monkeypatch.setenv("PIP_INDEX_URL", simple_index.url)
    elif configured_by == "pip.conf":
        conf = machine_without_network / ".config" / "pip" / "pip.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text(f"[global]\nindex-url = {simple_index.url}\n")
    else:
        monkeypatch.setenv("PIP_FIND_LINKS", str(mirrored_wheel.parent))
        monkeypatch.setenv("PIP_NO_INDEX", "1")
    lines: list[str] = []
    # The deployment's list names the package only: where it comes from is the machine's business.
    python = EnvironmentCache(tmp_path / "envs").ensure([f"{MIRRORED}==3.0"], progress=lines.append)
    probe = subprocess.run([str(python), "-c", "import taskserve_mirror_probe as m; print(m.VERSION)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "3.0", (probe.stderr, lines)
    if configured_by != "PIP_FIND_LINKS and PIP_NO_INDEX":
        assert f"/simple/{MIRRORED}/" in simple_index.requested()
    assert any("pip configuration" in line for line in lines), lines


def test_pip_settings_map_onto_uv_and_uv_own_variables_win(tmp_path):
    from taskserve.node.pip_config import uv_settings

    system = tmp_path / "pip-system.conf"
    system.write_text("[global]\nindex-url = https://system.example/simple\ntrusted-host = system.example\n"
                      "cert = /etc/company-ca.pem\n"
                      "find-links =\n    /srv/wheels\n    /srv/more\n")
    user = tmp_path / "pip-user.conf"
    user.write_text("[global]\nindex-url = https://user.example/simple\n"
                    "[install]\nextra-index-url = https://extra.example/simple https://extra2.example/simple\n"
                    "no-index = false\n")
    files = [system, user, tmp_path / "missing.conf"]

    env, flags = uv_settings({}, files, uv_files=[])
    assert env == {
        "UV_INDEX_URL": "https://user.example/simple",                  # the later file wins
        "UV_EXTRA_INDEX_URL": "https://extra.example/simple https://extra2.example/simple",
        "UV_FIND_LINKS": "/srv/wheels,/srv/more",
        "UV_INSECURE_HOST": "system.example",
        "SSL_CERT_FILE": "/etc/company-ca.pem",
    }
    assert flags == []
    # A PIP_ variable beats the files; [install] beats [global].
    env, flags = uv_settings({"PIP_INDEX_URL": "https://env.example/simple", "PIP_NO_INDEX": "true"}, files, [])
    assert env["UV_INDEX_URL"] == "https://env.example/simple" and flags == ["--no-index"]
    # uv's own settings win, each on its own.
    env, _ = uv_settings({"UV_DEFAULT_INDEX": "https://uv.example/simple", "UV_INDEX": "https://uv2.example"}, files, [])
    assert "UV_INDEX_URL" not in env and "UV_EXTRA_INDEX_URL" not in env and env["UV_FIND_LINKS"]
    # A uv.toml of its own: pip's configuration is not read at all.
    (tmp_path / "uv.toml").write_text('index-url = "https://uv.example/simple"\n')
    assert uv_settings({"UV_CONFIG_FILE": str(tmp_path / "uv.toml")}, files) == ({}, [])
