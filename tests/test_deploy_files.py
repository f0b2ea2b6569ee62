"""The Dockerfile, docker-compose.yml and deploy/kubernetes/ are checked without Docker.

Each file is parsed and every ``taskserve ...`` command in it (a service's command, a
container's args, a health check or probe) is parsed by the real command tree,
``taskserve.cli.main``: a typo'd command or option, or a value of the wrong type, fails
here. The rest checks that the parts line up: ports, the Secret a container reads, the
volumes the data dirs live on, the grace periods a drain needs, the environment variables
the reference documents. ``test_*_typo_is_caught`` prove the checks can fail.

The health checks themselves run against a real cluster in
``test_health_checks_pass_against_a_real_cluster``.

Example::

    taskserve_argv_problem(["agent", "--node-id", "a"])      # None
    taskserve_argv_problem(["agent", "--node-name", "a"])    # 'taskserve agent --node-name a: No such option ...'
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import click
import pathspec
import pytest
import yaml

from taskserve.cli import main
from taskserve.config_file import load_target
from taskserve.local import port_open
from taskserve.redis_server import free_port
from taskserve.spec import DeploymentOptions

from .helpers import REPO, wait_until

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
KUBERNETES = REPO / "deploy" / "kubernetes"
REFERENCE = REPO / "docs" / "reference.md"
OPERATIONS = REPO / "docs" / "operations.md"
DATA_DIR_DEFAULT = ".taskserve"
GRACEFUL_TIMEOUT_S = DeploymentOptions.model_fields["graceful_shutdown_timeout_s"].default


def project_field(name: str) -> str:
    """A string field of pyproject.toml's [project] table (tomllib is Python 3.11+)."""
    found = re.search(rf'^{name} = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, f"pyproject.toml has no {name} = \"...\""
    return found.group(1)


# --------------------------------------------------------------------------- taskserve commands


def taskserve_argv_problem(argv: Sequence[str]) -> Optional[str]:
    """What is wrong with ``taskserve ARGV`` (unknown command or option, bad value), or None.

    Parses with click exactly as the command line would, without running anything.

    >>> taskserve_argv_problem(["gateway", "--port", "8000"]) is None
    True
    >>> taskserve_argv_problem(["gateway", "--port", "http"])
    "taskserve gateway --port http: Invalid value for '--port': 'http' is not a valid integer."
    """
    command: click.Command = main
    name, rest, parent = "taskserve", list(argv), None
    try:
        while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
            parent = click.Context(command, info_name=name, parent=parent)
            found_name, found, rest = command.resolve_command(parent, rest)
            assert found is not None and found_name is not None
            name, command = found_name, found
        with contextlib.redirect_stdout(io.StringIO()):
            command.make_context(name, rest, parent=parent)
    except click.exceptions.Exit as done:       # --help, --version
        return None if done.exit_code == 0 else f"taskserve {shlex.join(argv)}: exits {done.exit_code}"
    except click.ClickException as error:
        return f"taskserve {shlex.join(argv)}: {error.format_message()}"
    return None


def option_value(argv: Sequence[str], option: str) -> Optional[str]:
    """The value given to ``option`` in ``argv`` (``--opt V`` or ``--opt=V``), else None.

    >>> option_value(["gateway", "--port", "8000"], "--port"), option_value(["x", "--port=1"], "--port")
    ('8000', '1')
    """
    for index, item in enumerate(argv):
        if item == option and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(option + "="):
            return item.partition("=")[2]
    return None


def python_code(argv: Sequence[str]) -> Optional[str]:
    """The code of a ``python -c CODE`` command, else None."""
    if len(argv) >= 3 and Path(argv[0]).name in ("python", "python3") and argv[1] == "-c":
        return argv[2]
    return None


def check_probe_command(argv: Sequence[str], where: str) -> list[str]:
    """Problems of a health check command: a taskserve command must parse, python code compile."""
    if argv and argv[0] == "taskserve":
        problem = taskserve_argv_problem(argv[1:])
        return [f"{where}: {problem}"] if problem else []
    code = python_code(argv)
    if code is not None:
        try:
            compile(code, where, "exec")
        except SyntaxError as error:
            return [f"{where}: python -c does not compile: {error}"]
    return []


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped.

    >>> dockerfile_instructions("FROM a AS b\\n# c\\nRUN x \\\\\\n    && y\\n")
    [('FROM', 'a AS b'), ('RUN', 'x && y')]
    """
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def exec_form(arguments: str, where: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; a shell form is an error (signals would not reach taskserve)."""
    value = yaml.safe_load(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{where} {arguments!r}: use the JSON form [\"...\"] so the process gets SIGTERM")
    return value


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1]:]


def dockerfile_problems(text: str) -> list[str]:
    """Everything wrong with the Dockerfile's final image (see the tests for each rule)."""
    problems = []
    stage = final_stage(dockerfile_instructions(text))
    base = stage[0][1].split()[0]
    if base != "python:3.11-slim":
        problems.append(f"the image is built FROM {base}, not python:3.11-slim")
    users = [arguments for keyword, arguments in stage if keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image runs as root: add a USER line with a non-root user")
    entrypoints = [exec_form(a, "ENTRYPOINT") for k, a in stage if k == "ENTRYPOINT"]
    if not entrypoints or entrypoints[-1] != ["taskserve"]:
        problems.append(f"ENTRYPOINT should be [\"taskserve\"], not {entrypoints[-1] if entrypoints else None}")
    commands = [exec_form(a, "CMD") for k, a in stage if k == "CMD"]
    if not commands:
        problems.append("no default CMD")
    elif (problem := taskserve_argv_problem(commands[-1])) is not None:
        problems.append(f"CMD: {problem}")
    for keyword, arguments in dockerfile_instructions(text):
        if keyword == "RUN" and re.search(r"\binstall\b.*\bredis(-server)?\b", arguments):
            problems.append(f"RUN {arguments!r} installs Redis: it is a service of its own")
    return problems


def copied_sources(text: str) -> list[str]:
    """The build-context paths the Dockerfile COPYs (not those copied from a stage)."""
    sources = []
    for keyword, arguments in dockerfile_instructions(text):
        if keyword in ("COPY", "ADD") and "--from=" not in arguments:
            parts = [p for p in arguments.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


# --------------------------------------------------------------------------- docker-compose.yml

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# What a .env gives the compose file in these tests.
SAMPLE_ENVIRONMENT = {"REDIS_PASSWORD": "sample-redis-password", "TASKSERVE_SECRET": "sample-secret"}
CONTROLLER_HEALTH_FILE = "/tmp/taskserve-controller.json"


class RequiredVariableMissing(Exception):
    """``docker compose`` would refuse to start: a ``${VAR:?message}`` has no value."""


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed YAML document (keys aside)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def compose_variables(text: str) -> set[str]:
    """The variables ``docker compose`` interpolates in the file (``$$`` is a literal ``$``;
    comments are not read)."""
    return {m.group(1) or m.group(4) for value in strings(yaml.safe_load(text))
            for m in _INTERPOLATION.finditer(value) if m.group(0) != "$$"}


def interpolate(text: str, environment: Optional[dict[str, str]] = None) -> str:
    """``text`` as ``docker compose`` reads it: ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}``, ``${VAR?message}``, ``${VAR}``, ``$VAR``, ``$$``. A required
    variable without a value raises :class:`RequiredVariableMissing` (compose refuses to
    start); one with neither a value nor a default is an error of the file.

    >>> interpolate("a ${X:-1} $$Y ${Z} ${W:?set W}", {"Z": "z", "W": "w"})
    'a 1 $Y z w'
    >>> interpolate("${W:?set W in .env}", {"W": ""})
    Traceback (most recent call last):
    ...
    tests.test_deploy_files.RequiredVariableMissing: required variable W is missing a value: set W in .env
    """
    environment = environment or {}

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1) or match.group(4), match.group(2), match.group(3)
        colon = bool(operator) and operator.startswith(":")     # ":" also refuses an empty value
        if name in environment and (environment[name] or not colon):
            return environment[name]
        if operator and operator.endswith("?"):
            raise RequiredVariableMissing(f"required variable {name} is missing a value: {argument}")
        if operator:
            return argument
        raise AssertionError(f"docker-compose.yml uses ${{{name}}} without a default: add ${{{name}:?...}}")

    return _INTERPOLATION.sub(replace, text)


def interpolate_tree(value: Any, environment: dict[str, str]) -> Any:
    """A parsed document with :func:`interpolate` applied to every string, as compose does."""
    if isinstance(value, str):
        return interpolate(value, environment)
    if isinstance(value, dict):
        return {key: interpolate_tree(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_tree(item, environment) for item in value]
    return value


def load_compose(text: str, environment: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The compose file as ``docker compose`` reads it with ``environment`` (default: a .env
    with sample values)."""
    return interpolate_tree(yaml.safe_load(text), SAMPLE_ENVIRONMENT if environment is None else environment)


def as_argv(value: Any) -> list[str]:
    """A compose command/entrypoint (a list, or a string split as the shell would)."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else shlex.split(str(value))


def healthcheck_argv(test: Any) -> list[str]:
    """The command of a compose health check: ``[CMD, ...]`` as is, ``CMD-SHELL`` split."""
    argv = as_argv(test)
    if argv[:1] == ["CMD"]:
        return argv[1:]
    if argv[:1] == ["CMD-SHELL"]:
        return shlex.split(" ".join(argv[1:]))
    return argv


def is_taskserve_image(service: dict[str, Any]) -> bool:
    image = str(service.get("image", ""))
    return service.get("build") in (".", "./") or image.split("/")[-1].startswith("taskserve:")


def runs_once(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")).split(":")[0] in ("no", "on-failure")


def compose_taskserve_commands(compose: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """``(where, argv after "taskserve")`` of every taskserve command in the compose file."""
    for name, service in compose["services"].items():
        if is_taskserve_image(service):
            entrypoint = as_argv(service.get("entrypoint")) or ["taskserve"]
            argv = entrypoint + as_argv(service.get("command"))
            if argv[0] == "taskserve":
                yield f"service {name}", argv[1:]
        check = healthcheck_argv((service.get("healthcheck") or {}).get("test"))
        if check[:1] == ["taskserve"]:
            yield f"service {name} healthcheck", check[1:]


def compose_problems(text: str) -> list[str]:
    """Every taskserve command and health check of the compose file that would not run."""
    compose = load_compose(text)
    problems = []
    for where, argv in compose_taskserve_commands(compose):
        problem = taskserve_argv_problem(argv)
        if problem:
            problems.append(f"{where}: {problem}")
    for name, service in compose["services"].items():
        check = healthcheck_argv((service.get("healthcheck") or {}).get("test"))
        if check[:1] != ["taskserve"]:
            problems += check_probe_command(check, f"service {name} healthcheck")
    return problems


def duration_s(text: str) -> float:
    """A compose duration (``1m30s``, ``40s``) in seconds.

    >>> duration_s("1m30s"), duration_s("40s")
    (90.0, 40.0)
    """
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------- Kubernetes


def manifest_files() -> list[Path]:
    """Every manifest (the kustomizations, which list them, aside)."""
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


def kustomization(directory: Path = KUBERNETES) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def load_manifests(paths: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec(doc: dict[str, Any]) -> Optional[dict[str, Any]]:
    if doc.get("kind") in ("Deployment", "DaemonSet", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    return None


def containers(docs: Sequence[tuple[Path, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(where, workload, container)`` of every container in the manifests."""
    for path, doc in docs:
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            yield f"{shown} {doc['kind']}/{doc['metadata']['name']}/{container['name']}", doc, container


def names_taskserve_image(image: str) -> bool:
    """``taskserve``, with or without a registry's path and a tag."""
    return image.split("/")[-1].split(":")[0] == "taskserve"


def is_taskserve_container(container: dict[str, Any]) -> bool:
    """A container of taskserve's image that runs taskserve (not an init container's ``chown``)."""
    return names_taskserve_image(container["image"]) and container.get("command", ["taskserve"])[0] == "taskserve"


def kubernetes_expand(argv: Sequence[str], container: dict[str, Any], where: str) -> list[str]:
    """``$(VAR)`` replaced as the kubelet would, by a sample of the value the container's
    env gives VAR (a resource limit is a number, a field a name, a literal itself)."""
    samples = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            samples[item["name"]] = str(item["value"])
        elif "resourceFieldRef" in source:
            samples[item["name"]] = "4"
        else:
            samples[item["name"]] = "sample-" + item["name"].lower()

    def replace(match: re.Match) -> str:
        name = match.group(1)
        assert name in samples, f"{where}: $({name}) is not in the container's env, so it stays literal"
        return samples[name]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, arg) for arg in argv]


def container_argv(container: dict[str, Any]) -> list[str]:
    """The container's command line: its command, else the image's ENTRYPOINT (taskserve), then args."""
    return list(container.get("command") or ["taskserve"]) + list(container.get("args") or [])


def probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in container:
            yield kind, container[kind]


def manifest_problems(docs: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Every taskserve command (args, exec probes) of the manifests that would not run."""
    problems = []
    for where, _, container in containers(docs):
        commands = [(where, container_argv(container))] if is_taskserve_container(container) else []
        commands += [(f"{where} {kind}", probe["exec"]["command"])
                     for kind, probe in probes(container) if "exec" in probe]
        for label, argv in commands:
            try:
                expanded = kubernetes_expand(argv, container, label)
            except AssertionError as error:
                problems.append(str(error))
                continue
            if expanded[:1] == ["taskserve"] or python_code(expanded) is not None:
                problems += check_probe_command(expanded, label)
    return problems


def named_port(container: dict[str, Any], port: Any) -> int:
    """A probe's or Service's port (a number, or the name of one of the container's ports)."""
    if isinstance(port, int):
        return port
    for item in container.get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    raise AssertionError(f"the container {container['name']} has no port named {port!r}")


# =========================================================================== tests: Dockerfile


def test_dockerfile_builds_one_non_root_taskserve_image_without_redis():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_dockerfile_copies_what_the_build_needs_and_dockerignore_keeps_it():
    text = DOCKERFILE.read_text()
    ignored = pathspec.GitIgnoreSpec.from_lines(DOCKERIGNORE.read_text().splitlines())
    sources = copied_sources(text)
    readme = project_field("readme")
    for needed in ("pyproject.toml", readme, "taskserve"):
        assert needed in sources, f"the Dockerfile does not COPY {needed}, which `pip install .` needs"
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not ignored.match_file(source), f".dockerignore leaves out {source}, which the Dockerfile copies"
    assert ignored.match_file(".git/HEAD") and ignored.match_file(".taskserve/address"), (
        ".dockerignore should keep .git and a local cluster's data dir (its password) out of the image")
    assert (REPO / "taskserve" / "examples" / "echo.py").is_file()


@pytest.mark.parametrize("change, expected", [
    ('CMD ["--help"]', 'CMD ["--hlep"]'),
    ('ENTRYPOINT ["taskserve"]', 'ENTRYPOINT taskserve'),
    ("USER 10001:10001", "USER root"),
])
def test_dockerfile_typo_is_caught(change: str, expected: str):
    text = DOCKERFILE.read_text()
    assert change in text
    try:
        problems = dockerfile_problems(text.replace(change, expected))
    except AssertionError as error:    # the shell form of ENTRYPOINT
        problems = [str(error)]
    assert problems


# =========================================================================== tests: compose


def test_compose_commands_and_health_checks_are_real_taskserve_commands():
    compose = load_compose(COMPOSE.read_text())
    assert len(list(compose_taskserve_commands(compose))) >= 6
    assert compose_problems(COMPOSE.read_text()) == []


@pytest.mark.parametrize("change", [
    ("--node-id", "--node-name"),
    ('"--port", "8000"]', '"--port", "http"]'),
    ('["controller", "--health-file"', '["controler", "--health-file"'),
    ('"--check", "--health-file"', '"--chek", "--health-file"'),
    ("sys.exit(0 if", "sys.exit(0 iff"),
])
def test_compose_typo_is_caught(change: tuple[str, str]):
    text = COMPOSE.read_text()
    assert change[0] in text
    assert compose_problems(text.replace(*change))


def test_every_long_running_compose_service_has_a_health_check():
    services = load_compose(COMPOSE.read_text())["services"]
    for name, service in services.items():
        if runs_once(service):
            continue
        test = healthcheck_argv((service.get("healthcheck") or {}).get("test"))
        assert test, f"service {name} has no healthcheck"
    for name, service in services.items():
        for needed, condition in (service.get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits for {needed} to be healthy; it has no check"


def test_compose_runs_redis_a_controller_a_standby_two_agents_a_gateway_and_deploys_the_example():
    services = load_compose(COMPOSE.read_text())["services"]
    by_part: dict[str, list[str]] = {}
    for where, argv in compose_taskserve_commands({"services": services}):
        if "healthcheck" not in where:
            by_part.setdefault(argv[0], []).append(where.split()[-1])
    assert len(by_part["controller"]) == 2
    standby = [n for n in by_part["controller"] if services[n].get("profiles")]
    assert len(standby) == 1, "the second controller should be a profile away (`--profile standby`)"
    assert len(by_part["agent"]) == 2 and len(by_part["gateway"]) == 1 and len(by_part["deploy"]) == 1

    node_ids = [option_value(as_argv(services[n]["command"]), "--node-id") for n in by_part["agent"]]
    assert None not in node_ids and len(set(node_ids)) == 2, f"the agents need distinct --node-id: {node_ids}"
    for name, node_id in zip(by_part["agent"], node_ids):
        service = services[name]
        data_dir = option_value(as_argv(service["command"]), "--data-dir") or DATA_DIR_DEFAULT
        mounts = [str(v).split(":")[1] for v in service.get("volumes", [])]
        assert data_dir in mounts, f"{name}: its --data-dir {data_dir} is on no volume ({mounts})"
        assert node_id in " ".join(healthcheck_argv(service["healthcheck"]["test"])), (
            f"{name}: its healthcheck does not check its node {node_id}")
        assert duration_s(service.get("stop_grace_period", "10s")) > GRACEFUL_TIMEOUT_S, (
            f"{name}: stop_grace_period must exceed graceful_shutdown_timeout_s ({GRACEFUL_TIMEOUT_S}) to drain")

    deploy = as_argv(services[by_part["deploy"][0]]["command"])
    target = [a for a in deploy[1:] if not a.startswith("-") and a != option_value(deploy, "--timeout")][0]
    assert load_target(target).name == "echo"
    assert set(services[by_part["deploy"][0]]["depends_on"]) >= set(by_part["agent"]) | {by_part["controller"][0]}

    redis = next(s for s in services.values() if str(s.get("image", "")).startswith("redis:"))
    config = " ".join(as_argv(redis["command"]))
    assert "appendonly yes" in config and "requirepass" in config and "maxmemory-policy noeviction" in config
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "Redis keeps its append-only file on a volume"


def test_compose_parts_find_redis_through_the_environment_not_argv():
    text = COMPOSE.read_text()
    services = load_compose(text)["services"]
    redis_password = services["redis"]["environment"]["REDIS_PASSWORD"]
    for where, argv in compose_taskserve_commands({"services": services}):
        assert option_value(argv, "--address") is None, f"{where}: pass the address in $TASKSERVE_ADDRESS"
        service = services[where.split()[1]]
        address = service["environment"]["TASKSERVE_ADDRESS"]
        assert address == f"redis://:{redis_password}@redis:6379/0", f"{where}: {address}"
    assert compose_variables(text) <= set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", OPERATIONS.read_text())), (
        "every variable docker-compose.yml reads is explained in docs/operations.md")


def test_compose_gives_every_part_the_one_signing_secret():
    services = load_compose(COMPOSE.read_text())["services"]
    secrets = {}
    for where, argv in compose_taskserve_commands({"services": services}):
        if "healthcheck" not in where:
            secrets[argv[0]] = services[where.split()[1]]["environment"].get("TASKSERVE_SECRET")
    assert secrets["agent"], "agents check the code they run with the secret"
    assert {secrets[part] for part in ("agent", "deploy", "controller", "gateway")} == {secrets["agent"]}, (
        "who deploys signs with it; the controller and the gateway act only on goals signed with it")


def test_compose_gateway_port_lines_up():
    services = load_compose(COMPOSE.read_text())["services"]
    gateway = next(s for s in services.values() if as_argv(s.get("command"))[:1] == ["gateway"])
    argv = as_argv(gateway["command"])
    port = option_value(argv, "--port")
    assert option_value(argv, "--host") == "0.0.0.0", "in a container the gateway must listen on every interface"
    published = [str(p).rsplit(":", 2) for p in gateway["ports"]]
    assert [p[-1] for p in published] == [port] and published[0][-2] == "8000", (
        f"the gateway listens on {port}; published: {gateway['ports']}")
    assert f":{port}/-/healthz" in " ".join(healthcheck_argv(gateway["healthcheck"]["test"]))


def test_compose_refuses_to_start_without_its_passwords():
    # Issue: without a .env every part fell back to the passwords `change-me` and `change-me-too`.
    text = COMPOSE.read_text()
    for value in strings(yaml.safe_load(text)):
        for match in _INTERPOLATION.finditer(value):
            if match.group(0) != "$$":
                assert match.group(2) == ":?", f"{match.group(0)}: a variable with a fallback; use ${{VAR:?...}}"
    assert "change-me" not in text
    for name in SAMPLE_ENVIRONMENT:
        without = {key: value for key, value in SAMPLE_ENVIRONMENT.items() if key != name}
        for environment in (without, {**without, name: ""}):
            with pytest.raises(RequiredVariableMissing, match=rf"{name} is missing a value: set {name} in \.env"):
                load_compose(text, environment)


def test_compose_controllers_prove_they_lead_or_stand_by():
    # Issue: the controllers' health check (`taskserve status`) proved only that Redis answers.
    services = load_compose(COMPOSE.read_text())["services"]
    controllers = [name for name, service in services.items() if as_argv(service.get("command"))[:1] == ["controller"]]
    assert len(controllers) == 2
    for name in controllers:
        health_file = option_value(as_argv(services[name]["command"]), "--health-file")
        check = healthcheck_argv(services[name]["healthcheck"]["test"])
        assert health_file and check == ["taskserve", "controller", "--check", "--health-file", health_file], (
            f"{name}: its health check must read the health file its controller writes")


# =========================================================================== tests: Kubernetes


def test_kubernetes_commands_and_probes_are_real_taskserve_commands():
    docs = load_manifests(manifest_files())
    assert sum(1 for _, _, c in containers(docs) if is_taskserve_container(c)) == 3
    assert manifest_problems(docs) == []


@pytest.mark.parametrize("file, change", [
    ("agent.yaml", ("- --node-id", "- --node")),
    ("agent.yaml", ("$(CPU_LIMIT)", "$(CPU_LIMITS)")),
    ("gateway.yaml", ('"--port", "8000"', '"--prot", "8000"')),
    ("controller.yaml", ('"--check", "--health-file"', '"--chek", "--health-file"')),
])
def test_kubernetes_typo_is_caught(tmp_path: Path, file: str, change: tuple[str, str]):
    text = (KUBERNETES / file).read_text()
    assert change[0] in text
    broken = tmp_path / file
    broken.write_text(text.replace(*change))
    paths = [broken if p == KUBERNETES / file else p for p in manifest_files()]
    assert broken in paths
    assert manifest_problems(load_manifests(paths))


def test_kubernetes_manifests_are_namespace_free_and_have_every_part():
    docs = load_manifests(manifest_files())
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"
        assert "namespace" not in doc["metadata"], f"{path}: {doc['metadata']['name']} names a namespace"
        spec = doc["spec"] if doc["kind"] != "Secret" else {}
        if "selector" in spec and "template" in spec:
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), f"{path}: selector misses the pods"
    parts = {}
    for _, doc, container in containers(docs):
        if is_taskserve_container(container):
            parts[container_argv(container)[1]] = doc["kind"]
    assert parts == {"controller": "Deployment", "agent": "DaemonSet", "gateway": "Deployment"}
    kinds = [doc["kind"] for _, doc in docs]
    assert "Secret" in kinds and "Service" in kinds


def test_kubernetes_parts_read_the_address_from_the_secret():
    docs = load_manifests(manifest_files())
    secrets = {doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
               for _, doc in docs if doc["kind"] == "Secret"}
    version = project_field("version")
    for where, _, container in containers(docs):
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: no Secret {ref['name']}/{ref['key']}"
        if is_taskserve_container(container):
            assert option_value(container_argv(container), "--address") is None, f"{where}: use $TASKSERVE_ADDRESS"
            names = [item["name"] for item in container.get("env", [])]
            assert "TASKSERVE_ADDRESS" in names, where
            assert "TASKSERVE_SECRET" in names, (
                f"{where}: every part holds the secret (agents check code with it, the controllers and the "
                "gateways act only on goals signed with it)")
        if names_taskserve_image(container["image"]):
            assert container["image"] == "taskserve", (
                f"{where}: name the image `taskserve` only; kustomization.yaml sets its registry and tag (version {version})")


def test_kubernetes_agent_takes_its_node_id_and_resources_from_the_downward_api():
    docs = load_manifests(manifest_files())
    (where, doc, agent), = [c for c in containers(docs) if is_taskserve_container(c[2]) and
                            container_argv(c[2])[1] == "agent"]
    env = {item["name"]: item.get("valueFrom", {}) for item in agent["env"]}
    argv = container_argv(agent)
    node_var = re.fullmatch(r"\$\((\w+)\)", option_value(argv, "--node-id") or "")
    assert node_var and env[node_var.group(1)] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    for option, limit in (("--num-cpus", "limits.cpu"), ("--memory", "limits.memory")):
        variable = re.fullmatch(r"\$\((\w+)\)", option_value(argv, option) or "")
        assert variable and env[variable.group(1)]["resourceFieldRef"]["resource"] == limit, option
        assert env[variable.group(1)]["resourceFieldRef"]["containerName"] == agent["name"]
        assert limit.split(".")[1] in agent["resources"]["limits"], f"{where}: set {limit} for {option}"
    data_dir = option_value(argv, "--data-dir") or DATA_DIR_DEFAULT
    assert data_dir in [m["mountPath"] for m in agent["volumeMounts"]]
    pod = pod_spec(doc)
    assert pod["terminationGracePeriodSeconds"] > GRACEFUL_TIMEOUT_S, f"{where}: too short a grace to drain"
    assert not any(kind == "livenessProbe" for kind, _ in probes(agent)), (
        "an agent must not be restarted for a Redis outage: it would drain its replicas")


def test_kubernetes_gateway_ports_line_up():
    docs = load_manifests(manifest_files())
    (where, doc, gateway), = [c for c in containers(docs) if is_taskserve_container(c[2]) and
                              container_argv(c[2])[1] == "gateway"]
    argv = container_argv(gateway)
    port = int(option_value(argv, "--port") or 8000)
    assert option_value(argv, "--host") == "0.0.0.0"
    assert [p["containerPort"] for p in gateway["ports"]] == [port]
    for kind, probe in probes(gateway):
        check = probe.get("httpGet") or probe.get("tcpSocket")
        assert named_port(gateway, check["port"]) == port, f"{where} {kind}"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/-/healthz"
    labels = doc["spec"]["template"]["metadata"]["labels"]
    services = [d for _, d in docs if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels.items()]
    assert len(services) == 1, "one Service selects the gateway pods"
    for item in services[0]["spec"]["ports"]:
        assert named_port(gateway, item["targetPort"]) == port


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (``matchLabels``, ``matchExpressions``) selects ``labels``.

    >>> label_selector_matches({"matchLabels": {"a": "1"}, "matchExpressions": [
    ...     {"key": "b", "operator": "In", "values": ["x", "y"]}]}, {"a": "1", "b": "y"})
    True
    """
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(docs: Sequence[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """The pod labels of each workload, by its component label."""
    return {doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
            doc["spec"]["template"]["metadata"]["labels"] for _, doc in docs if pod_spec(doc) is not None}


def test_kubernetes_image_is_named_once_in_the_kustomization():
    # Issue: the image's name and tag were written in three files.
    found = kustomization()
    listed = sorted(found["resources"])
    assert listed == sorted(path.name for path in KUBERNETES.glob("*.yaml")
                            if path.name not in ("kustomization.yaml", "secret.yaml")), (
        "kustomization.yaml lists every manifest but the Secret (created by hand, never a placeholder)")
    [image] = found["images"]
    assert image["name"] == "taskserve" and image["newTag"] == project_field("version")
    docs = load_manifests(manifest_files())
    images = [(where, container["image"]) for where, _, container in containers(docs)
              if names_taskserve_image(container["image"])]
    assert len(images) == 4 and all(name == "taskserve" for _, name in images), images
    redis = kustomization(KUBERNETES / "redis")
    assert sorted(redis["resources"]) == sorted(p.name for p in (KUBERNETES / "redis").glob("*.yaml")
                                                if p.name != "kustomization.yaml")


def test_kubernetes_gateway_and_agents_have_disruption_budgets():
    docs = load_manifests(manifest_files())
    labels = pod_labels(docs)
    budgets = [doc for _, doc in docs if doc["kind"] == "PodDisruptionBudget"]
    for component, kind in (("gateway", "Deployment"), ("agent", "DaemonSet")):
        [budget] = [b for b in budgets if label_selector_matches(b["spec"]["selector"], labels[component])]
        spec = budget["spec"]
        if kind == "DaemonSet":
            # Kubernetes cannot scale a DaemonSet: its pods' budget must be a whole minAvailable.
            assert "maxUnavailable" not in spec and isinstance(spec.get("minAvailable"), int), spec
        else:
            assert spec.get("maxUnavailable") == 1 or isinstance(spec.get("minAvailable"), int), spec


def test_kubernetes_only_taskserve_parts_reach_redis():
    docs = load_manifests(manifest_files())
    labels = pod_labels(docs)
    [policy] = [doc for _, doc in docs if doc["kind"] == "NetworkPolicy"]
    assert label_selector_matches(policy["spec"]["podSelector"], labels["redis"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    def admitted(pod: dict[str, str]) -> bool:
        return any(label_selector_matches(peer["podSelector"], pod) and set(peer) == {"podSelector"}
                   for rule in policy["spec"]["ingress"] for peer in rule["from"])

    for part in ("controller", "agent", "gateway"):
        assert admitted(labels[part]), f"the {part}s cannot reach Redis"
    for stranger in ({}, {"app": "other"}, {"app.kubernetes.io/name": "taskserve",
                                            "app.kubernetes.io/component": "redis-cli"}):
        assert not admitted(stranger), f"pods labelled {stranger} reach Redis"
    (_, redis_doc, redis_container), = [c for c in containers(docs) if c[2]["name"] == "redis"]
    ports = {item["port"] for rule in policy["spec"]["ingress"] for item in rule["ports"]}
    assert ports == {item["containerPort"] for item in redis_container["ports"]}


def test_kubernetes_agent_data_dir_outlives_the_pod():
    # Issue: runtime environments lived in an emptyDir, built again in every new agent pod.
    docs = load_manifests(manifest_files())
    (where, doc, agent), = [c for c in containers(docs) if is_taskserve_container(c[2]) and
                            container_argv(c[2])[1] == "agent"]
    pod = pod_spec(doc)
    data_dir = option_value(container_argv(agent), "--data-dir")
    [mount] = [m for m in agent["volumeMounts"] if m["mountPath"] == data_dir]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "hostPath" in volume and volume["hostPath"]["type"] == "DirectoryOrCreate", (
        f"{where}: the data dir (runtime envs, in-flight files) must be on the node")
    user = pod["securityContext"]["runAsUser"]
    owners = [c for c in pod.get("initContainers", [])
              if c["command"][:2] == ["chown", f"{user}:{pod['securityContext']['runAsGroup']}"]
              and data_dir in c["command"] and any(m["name"] == mount["name"] for m in c["volumeMounts"])]
    assert owners, f"{where}: kubelet creates the hostPath as root; an init container must give it to uid {user}"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to run kustomize with")
def test_kubectl_kustomize_builds_both_directories_with_the_one_image():
    image = kustomization()["images"][0]
    for directory in (KUBERNETES, KUBERNETES / "redis"):
        built = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
        images = {c["image"] for doc in docs if pod_spec(doc) for c in
                  pod_spec(doc)["containers"] + pod_spec(doc).get("initContainers", [])}
        if directory == KUBERNETES:
            assert images == {f"{image['newName']}:{image['newTag']}"}
            assert {doc["kind"] for doc in docs} == {"Deployment", "DaemonSet", "Service", "PodDisruptionBudget"}
        else:
            assert {doc["kind"] for doc in docs} == {"StatefulSet", "Service", "NetworkPolicy"}


# =========================================================================== tests: both


def test_environment_variables_used_are_in_the_reference():
    texts = [DOCKERFILE.read_text(), COMPOSE.read_text(), OPERATIONS.read_text()]
    texts += [path.read_text() for path in KUBERNETES.rglob("*") if path.is_file()]
    used = set(re.findall(r"\bTASKSERVE_[A-Z_]+\b", "\n".join(texts)))
    documented = set(re.findall(r"\bTASKSERVE_[A-Z_]+\b", REFERENCE.read_text()))
    assert "TASKSERVE_ADDRESS" in used
    assert used <= documented, f"not in docs/reference.md: {sorted(used - documented)}"


def test_argv_checker_knows_good_from_bad():
    assert taskserve_argv_problem(["agent", "--node-id", "n", "--num-cpus", "4", "--data-dir", "/d"]) is None
    assert taskserve_argv_problem(["env", "list", "--data-dir", "/d"]) is None
    assert taskserve_argv_problem(["--help"]) is None
    assert "No such option" in taskserve_argv_problem(["agent", "--node-name", "n"])
    assert "No such command" in taskserve_argv_problem(["controler"])
    assert "not a valid float" in taskserve_argv_problem(["agent", "--num-cpus", "four"])
    assert taskserve_argv_problem([]) is not None
    assert taskserve_argv_problem(["deploy", "--num-replicas"]) is not None


# =========================================================================== the health checks, run


def _run_check(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    if argv[0] == "taskserve":
        argv = [sys.executable, "-m", "taskserve", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_health_checks_pass_against_a_real_cluster(cluster):
    """Each taskserve-image health check and probe, run against a real cluster.

    The compose agents' node ids become the test cluster's node, the gateway's port a free
    one; an agent check for a node that is not there fails.
    """
    node = "node-a"
    port = free_port()
    health_file = cluster.workdir / f"controller-{port}.json"
    gateway = cluster.start_gateway(port, name=f"gateway-{port}")
    # A second controller, with the health file its checks read: it stands by.
    standby = cluster.start_controller("--health-file", str(health_file), name=f"controller-{port}")
    try:
        _run_health_checks(node, port, cluster.url, health_file)
    finally:
        for process in (gateway, standby):
            process.terminate()
            process.wait(timeout=60)


def _run_health_checks(node: str, port: int, url: str, health_file: Path) -> None:
    wait_until(lambda: port_open(port), message="the gateway to listen")
    wait_until(health_file.exists, message="the standby controller's health file")
    env = {**os.environ, "TASKSERVE_ADDRESS": url, "NODE_NAME": node,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    compose = load_compose(COMPOSE.read_text())
    checks = []
    for name, service in compose["services"].items():
        if not is_taskserve_image(service):
            continue
        argv = healthcheck_argv(service["healthcheck"]["test"]) if "healthcheck" in service else []
        node_id = option_value(as_argv(service.get("command")), "--node-id")
        if argv:
            text = [a.replace(f"'{node_id}'", f"'{node}'") if node_id else a for a in argv]
            checks.append((f"service {name}", [a.replace(":8000/", f":{port}/") for a in text]))
    for where, _, container in containers(load_manifests(manifest_files())):
        if is_taskserve_container(container):
            checks += [(f"{where} {kind}", probe["exec"]["command"])
                       for kind, probe in probes(container) if "exec" in probe]
    checks = [(where, [str(health_file) if a == CONTROLLER_HEALTH_FILE else a for a in argv]) for where, argv in checks]
    assert len(checks) >= 7
    for where, argv in checks:
        result = _run_check(argv, env)
        assert result.returncode == 0, f"{where}: {shlex.join(argv)} failed: {result.stdout}{result.stderr}"

    agent_check = next(argv for where, argv in checks if where == "service agent-1")
    missing = [a.replace(f"'{node}'", "'no-such-node'") for a in agent_check]
    assert missing != agent_check
    assert _run_check(missing, env).returncode == 1, "the agent health check passes for a node that is not there"
    probe = next(argv for where, argv in checks if "DaemonSet" in where)
    assert _run_check(probe, {**env, "NODE_NAME": "no-such-node"}).returncode == 1, (
        "the agent readiness probe passes for a node that is not there")


def test_an_agent_restarted_in_its_container_takes_its_node_back_at_once(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """A restarted container keeps its hostname and numbers its processes from 1 again, so
    the killed agent's claim names the new agent's own pid: a predecessor, not a live agent."""
    fakeredis = pytest.importorskip("fakeredis")
    import psutil
    import redis

    from taskserve.node.agent import NodeAgent
    from taskserve.state import Resources
    from taskserve.store import Store

    store = Store(fakeredis.FakeRedis())
    try:
        store.redis.eval("return 1", 0)
    except redis.ResponseError:
        pytest.skip("fakeredis runs Lua scripts only with the lupa package")

    def agent(data_dir: Path) -> NodeAgent:
        return NodeAgent(store, "redis://127.0.0.1:1/0", node_id="node-1", resources=Resources(1, 0, 2**30),
                         data_dir=data_dir, heartbeat_ttl_s=60)

    # This process's command line, as the agent's is in the container.
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: ["/usr/local/bin/python", "/usr/local/bin/taskserve",
                                                                 "agent", "--node-id", "node-1"])
    killed = agent(tmp_path / "a")
    killed.take_node()                 # and never unregisters: it went with its container
    restarted = agent(tmp_path / "b")
    assert (restarted.claim.pid, restarted.claim.host) == (killed.claim.pid, killed.claim.host)
    assert restarted.claim != killed.claim
    restarted.take_node()
    assert store.node_claim("node-1")[0] == restarted.claim


@pytest.mark.integration
def test_controller_check_tells_a_leader_a_standby_and_a_stuck_or_gone_controller_apart(tmp_path: Path):
    """``taskserve controller --check`` against real controllers: 0 for the leader and for a
    standby while a live one leads; 1 for a controller that is stopped (SIGSTOP), killed, or
    gone, and while none leads. ``taskserve status``, the check it replaces, passes throughout."""
    from .helpers import Cluster

    cluster = Cluster(tmp_path / "cluster")
    files = {name: tmp_path / f"{name}.json" for name in ("controller-a", "controller-b")}

    def check(name: str, max_age: float = 30) -> tuple[int, str]:
        result = subprocess.run([sys.executable, "-m", "taskserve", "controller", "--check", "--health-file",
                                 str(files[name]), "--max-age", str(max_age)],
                                env=cluster.env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        return result.returncode, (result.stdout + result.stderr).strip()

    def status_passes() -> bool:
        return subprocess.run([sys.executable, "-m", "taskserve", "status"], env=cluster.env(), cwd=REPO,
                              capture_output=True, timeout=60).returncode == 0

    def until(name: str, code: int, words: str, max_age: float = 30) -> None:
        wait_until(lambda: (lambda got: got[0] == code and words in got[1])(check(name, max_age)), timeout=60,
                   message=f"{name}: exit {code}, saying {words!r} (last: {check(name, max_age)})")

    try:
        cluster.start_redis()
        assert check("controller-a") == (1, "unhealthy: no health file: the controller was not started with "
                                            "this --health-file, or has not written it yet")
        assert status_passes(), "`taskserve status` passes with no controller at all"
        cluster.start_controller("--health-file", str(files["controller-a"]), name="controller-a")
        until("controller-a", 0, "leads")
        cluster.start_controller("--health-file", str(files["controller-b"]), name="controller-b")
        until("controller-b", 0, "stands by")

        # A hung leader: its file grows old, and once its lease expires the standby leads.
        cluster.processes["controller-a"].send_signal(signal.SIGSTOP)
        until("controller-a", 1, "its loop is stuck", max_age=2)
        assert status_passes(), "`taskserve status` passes with the leader hung"
        until("controller-b", 0, "leads")
        cluster.processes["controller-a"].send_signal(signal.SIGCONT)
        until("controller-a", 0, "stands by")

        # A killed leader: its file stays, its process is gone; the standby takes over.
        cluster.processes["controller-b"].kill()
        cluster.processes["controller-b"].wait(timeout=30)
        until("controller-b", 1, "is not running")
        until("controller-a", 0, "leads")

        # A stopped controller removes its file; with no controller left, nobody leads.
        cluster.stop("controller-a")
        assert not files["controller-a"].exists()
        assert check("controller-a")[0] == 1
        assert check("controller-b")[0] == 1
    finally:
        for process in cluster.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
        cluster.stop_all()
