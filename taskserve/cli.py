"""The ``taskserve`` command line (docs/reference.md, Command line).

Example::

    taskserve up                                 # Redis + controller + agent + gateway, serving an echo
    taskserve call echo '"hi"'                   # "hi"
    taskserve deploy my_script.py:Model --num-replicas 2
    taskserve status Model
    taskserve scale Model 4
    taskserve delete Model
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import click
import redis
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import api
from .config_file import load_deployments_file, load_target
from .connection import (
    ADDRESS_ENV,
    check_own_directory,
    connect,
    register_cluster,
    resolve_address,
    unregister_cluster,
)
from .errors import TaskserveError, redact_text
from .planner import plural

# Piped output is not cut to 80 columns, so scripts can grep it.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 400)

ADDRESS_OPTION = click.option(
    "--address", envvar=ADDRESS_ENV, default=None,
    help=f"Redis URL of the cluster (default: ${ADDRESS_ENV}, then the address `taskserve up` wrote).",
)

# Control characters (C0 but tab and newline, DEL, C1) and the bidirectional overrides:
# a value from Redis holding them could move the cursor, retitle the terminal, write an
# OSC-8 link or reorder what is shown.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain(value: object, style: str = "") -> Text:
    """``value`` as text to print and nothing else: rich markup in it is shown as written
    (a ``Text`` is never parsed), and control characters (terminal escapes) are dropped.
    Everything read from Redis (names, versions, states, status messages, errors) is
    printed through it.

    >>> esc = chr(27)
    >>> plain(f"[link=https://evil.example]ok[/link] {esc}]8;;https://evil.example{esc}[2J").plain
    '[link=https://evil.example]ok[/link] ]8;;https://evil.example[2J'
    >>> Console(width=40, color_system=None).print(plain("[bold]v2[/bold]")) or None
    [bold]v2[/bold]
    """
    return Text(_UNPRINTABLE.sub("", str(value)), style=style)


def plain_line(*parts: object) -> Text:
    """One line of plain parts: strings written here are markup-free text, other values
    (from Redis) go through :func:`plain`; a ``Text`` is kept as it is (styled).

    >>> plain_line("version ", "[red]2", " ", plain("ok", "green")).plain
    'version [red]2 ok'
    """
    return Text.assemble(*(part if isinstance(part, Text) else plain(part) for part in parts))


class TaskserveGroup(click.Group):
    """Turns every error into one line on stderr and exit code 1.

    ``TASKSERVE_DEBUG=1`` prints the rest of the message (a replica's traceback)
    and, for unexpected errors, the local traceback too.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            raise SystemExit(130)
        except Exception as error:
            expected = isinstance(error, (TaskserveError, ValueError, TypeError, TimeoutError, LookupError,
                                          OSError, redis.RedisError, RuntimeError, ImportError, AttributeError))
            if isinstance(error, KeyError) and not isinstance(error, TaskserveError) and error.args:
                text = str(error.args[0])
            else:
                text = str(error) if expected else f"{type(error).__name__}: {error}"
            first, _, rest = redact_text(text).partition("\n")
            errors.print(plain_line(plain("error:", "red"), " ", first), highlight=False)
            if os.environ.get("TASKSERVE_DEBUG"):
                if rest.strip():
                    errors.print(plain(rest), highlight=False)
                if not expected:
                    errors.print_exception()
            raise SystemExit(1)


@click.group(cls=TaskserveGroup)
@click.version_option(package_name="taskserve")
def main() -> None:
    """taskserve: model deployments on Celery and Redis."""


def _connect(address: Optional[str]) -> None:
    connect(address)


# --------------------------------------------------------------------------- processes


@main.command()
@click.option("--redis-url", default=None, help="Use this Redis instead of starting one.")
@click.option("--redis-port", type=int, default=None, help="Port of the embedded Redis (default: a free one).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".taskserve"), show_default=True,
              help="Where the embedded Redis keeps its append-only file, and the logs.")
@click.option("--num-cpus", type=float, default=None, help="CPUs the local agent offers (default: all cores).")
@click.option("--num-gpus", type=float, default=None, help="GPUs the local agent offers (default: nvidia-smi's count).")
@click.option("--example/--no-example", default=True, show_default=True,
              help="Deploy the example echo deployment so a first request can be sent.")
@click.option("--http-port", type=int, default=8000, show_default=True, help="Port of the HTTP gateway (0: no gateway).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface the HTTP gateway listens on (0.0.0.0: every interface).")
@click.option("--redis-host", default="127.0.0.1", show_default=True,
              help="Interface the embedded Redis listens on (it always requires its generated password).")
def up(redis_url: Optional[str], redis_port: Optional[int], data_dir: Path, num_cpus: Optional[float],
       num_gpus: Optional[float], example: bool, http_port: int, host: str, redis_host: str) -> None:
    """Run a whole cluster here: Redis, a controller, a node agent and the HTTP gateway."""
    from .errors import redact_address
    from .local import LocalCluster, PartExited, PartSupervisor
    from .redis_server import generate_password
    from .signing import SECRET_FILE_ENV, SECRET_FILE_NAME, ensure_secret_file, secret_from_environment

    check_own_directory(data_dir)   # another user's directory would get the password
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)   # it holds the Redis file and the address
    lock = _lock_data_dir(data_dir)  # noqa: F841 (held until this process exits)
    if http_port:
        from .gateway.app import listen

        listen(host, http_port).close()   # a port in use fails here, in one line
    log_dir = data_dir / "logs"
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    env = dict(os.environ)
    if secret_from_environment() is None:
        # Kept across restarts, so the code in the Redis file stays valid; the parts read the file.
        secret_file = (data_dir / SECRET_FILE_NAME).resolve()
        ensure_secret_file(secret_file)
        env[SECRET_FILE_ENV] = str(secret_file)
    cluster = LocalCluster(log_dir, redis_url=redis_url, redis_port=redis_port,
                           redis_data_dir=None if redis_url else data_dir, env=env,
                           redis_password=None if redis_url else generate_password(), redis_host=redis_host)
    written: list[Path] = []
    address = ""
    try:
        address = resolve_address(cluster.start_redis())
        written = register_cluster(address, data_dir)
        cluster.start_controller()
        try:
            gpus = ["--num-gpus", str(num_gpus)] if num_gpus is not None else []
            cluster.start_agent(None, num_cpus, *gpus, data_dir=data_dir)
        except (PartExited, TimeoutError):
            raise RuntimeError(f"the node agent did not start; see its log in {log_dir}/") from None
        connect(address)
        _sign_legacy_goals()
        console.print(f"taskserve is up at [bold]{redact_address(address)}[/bold]  (logs: {log_dir}/; "
                      f"its password is in {data_dir / 'address'})")
        if http_port:
            try:
                cluster.start_gateway(http_port, host)
            except (PartExited, TimeoutError):
                raise RuntimeError(f"the HTTP gateway did not start; see its log in {log_dir}/") from None
            console.print(f"HTTP: [bold]http://{host}:{http_port}/<deployment>[/bold]  "
                          f"(dashboard: http://{host}:{http_port}/-/dashboard)")
        if example:
            _deploy_example()
        console.print("Try: [bold]taskserve call echo '\"hi\"'[/bold]   Stop: Ctrl-C")
        supervisor = PartSupervisor(cluster)
        while not stop.wait(0.5):
            for line in supervisor.check():
                errors.print(line, markup=False, highlight=False)
    finally:
        console.print("stopping taskserve...")
        cluster.stop_all()
        unregister_cluster(written)


def _lock_data_dir(data_dir: Path) -> Any:
    """Hold a lock on the data dir so that two `taskserve up` never share one Redis file."""
    import fcntl

    handle = open(data_dir / "up.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(
            f"another `taskserve up` is running with the data dir {data_dir}; "
            "stop it first, or pass a different --data-dir"
        ) from None
    return handle


def _sign_legacy_goals() -> None:
    """Sign the goals an earlier taskserve wrote in this Redis, where their code vouches
    for them (:func:`taskserve.api.sign_legacy_goals`); name those left unsigned."""
    for name, why_not in api.sign_legacy_goals().items():
        if why_not:
            errors.print(f"the goal of {name} is not signed ({why_not}); it is not served until you deploy "
                         "it again", markup=False, highlight=False)
        else:
            console.print(f"signed the goal of {name}, written by an earlier taskserve", markup=False,
                          highlight=False)


def _deploy_example() -> None:
    from .examples.echo import Echo

    try:
        Echo.deploy(timeout=120)
    except TaskserveError as error:
        errors.print(plain_line(plain("error:", "red"), " the example deployment did not start: ", error),
                     highlight=False)
        return
    console.print(f"deployed [bold]{Echo.name}[/bold] (taskserve.examples.echo)")


@main.command()
@ADDRESS_OPTION
@click.option("--resync", type=float, default=1.0, show_default=True, help="Seconds between full passes.")
@click.option("--health-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write whether this controller leads or stands by to this file on every turn of its loop "
                   "(read by --check).")
@click.option("--check", is_flag=True,
              help="Do not run a controller: exit 0 if the one writing --health-file leads, or stands by while "
                   "another leads; else say why and exit 1 (a container's health check).")
@click.option("--max-age", type=float, default=None,
              help="With --check: seconds after which a health file not rewritten means a stuck controller "
                   "[default: 30].")
def controller(address: Optional[str], resync: float, health_file: Optional[Path], check: bool,
               max_age: Optional[float]) -> None:
    """Run a controller (one leads; others stand by), or --check one."""
    from .connection import cluster_secret, make_store
    from .controller import Controller
    from .controller_health import HEALTH_MAX_AGE_S
    from .controller_health import check as check_health

    url = resolve_address(address)
    if check:
        if health_file is None:
            raise click.UsageError("--check needs --health-file PATH, the file the controller was started with")
        healthy, why = check_health(health_file, make_store(url), HEALTH_MAX_AGE_S if max_age is None else max_age)
        if not healthy:
            errors.print(plain_line(plain("unhealthy:", "red"), " ", redact_text(why)), highlight=False)
            raise SystemExit(1)
        console.print(plain(why))
        return
    if max_age is not None:
        raise click.UsageError("--max-age goes with --check")
    _log_to_stderr()
    # It plans only goals signed with the cluster secret, and signs the rollbacks it writes.
    ctl = Controller(make_store(url), resync_s=resync, health_file=health_file, secret=cluster_secret(url))
    _stop_on_signals(ctl.stop)
    ctl.run()


@main.command()
@ADDRESS_OPTION
@click.option("--node-id", default=None, help="Name of this node (default: the hostname).")
@click.option("--num-cpus", type=float, default=None, help="CPUs to offer (default: all cores).")
@click.option("--num-gpus", type=float, default=None, help="GPUs to offer (default: nvidia-smi's count).")
@click.option("--memory", type=int, default=None, help="Bytes of memory to offer (default: all).")
@click.option("--labels", multiple=True, help="k=v labels of this node, repeatable.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".taskserve"), show_default=True)
@click.option("--heartbeat-timeout", type=float, default=10.0, show_default=True,
              help="Seconds without a heartbeat after which the node counts as dead.")
def agent(address: Optional[str], node_id: Optional[str], num_cpus: Optional[float], num_gpus: Optional[float],
          memory: Optional[int], labels: tuple[str, ...], data_dir: Path, heartbeat_timeout: float) -> None:
    """Run a node agent: it starts and stops this machine's replicas."""
    from .connection import make_store
    from .node.agent import NodeAgent, default_resources
    from .state import Resources

    _log_to_stderr()
    url = resolve_address(address)
    defaults = default_resources()
    resources = Resources(
        num_cpus=defaults.num_cpus if num_cpus is None else num_cpus,
        num_gpus=defaults.num_gpus if num_gpus is None else num_gpus,
        memory=defaults.memory if memory is None else memory,
    )
    label_map = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid label {item!r}: use key=value")
        label_map[key] = value
    node_agent = NodeAgent(make_store(url), url, node_id=node_id, resources=resources, labels=label_map,
                           data_dir=data_dir, heartbeat_ttl_s=heartbeat_timeout)
    _stop_on_signals(node_agent.stop)
    node_agent.run()


@main.command()
@ADDRESS_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-body-size", type=int, default=10 * 1024 * 1024, show_default=True,
              help="Largest request body in bytes; a larger one gets 413.")
@click.option("--debug", is_flag=True, help="Put the replica's traceback in 500 responses.")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Seconds a client has to send a request's headers; then 408.")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds a client has to send a request's body; then 408.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Requests answered at once; beyond it 503 with Retry-After.")
@click.option("--max-inflight-bytes", type=click.IntRange(min=1), default=256 * 2**20, show_default=True,
              help="Bytes of request bodies held at once; beyond it 503 with Retry-After.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name to serve besides the listener's own (and, on loopback, localhost); repeatable. "
                   "Other hosts get 421.")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On SIGTERM, seconds the requests in hand have to be answered; then those no replica took "
                   "are taken off the queue and answered 503 (they never run).")
@click.option("--reuse-port", is_flag=True,
              help="Share the port with other gateways started with it (SO_REUSEPORT; see docs/http.md).")
def gateway(address: Optional[str], host: str, port: int, max_body_size: int, debug: bool, header_timeout: float,
            body_timeout: float, max_in_flight: int, max_inflight_bytes: int, allowed_hosts: tuple[str, ...],
            shutdown_grace: float, reuse_port: bool) -> None:
    """Serve every deployment over HTTP at its route prefix."""
    from .gateway.app import serve

    _log_to_stderr()
    serve(resolve_address(address), host=host, port=port, max_body_bytes=max_body_size, debug=debug,
          header_timeout_s=header_timeout, body_timeout_s=body_timeout, max_in_flight=max_in_flight,
          reuse_port=reuse_port, max_inflight_bytes=max_inflight_bytes, extra_hosts=allowed_hosts,
          shutdown_grace_s=shutdown_grace)


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on_signals(stop: Any) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop())


# --------------------------------------------------------------------------- deployments


@main.command()
@click.argument("target", required=False)
@ADDRESS_OPTION
@click.option("-f", "--file", "config_file", type=click.Path(path_type=Path), default=None,
              help="A YAML file of deployments (instead of TARGET).")
@click.option("--name", default=None, help="Deploy under this name.")
@click.option("--num-replicas", type=int, default=None)
@click.option("--version", "version", default=None)
@click.option("--user-config", default=None, help="JSON passed to reconfigure().")
@click.option("--canary", "canary_percent", type=float, default=None,
              help="Start --version as a canary beside the running version, with this percent of the requests.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option("--prune", is_flag=True, help="With -f: delete the deployments the file does not list (after saying which).")
def deploy(target: Optional[str], address: Optional[str], config_file: Optional[Path], name: Optional[str],
           num_replicas: Optional[int], version: Optional[str], user_config: Optional[str],
           canary_percent: Optional[float], timeout: Optional[float], prune: bool) -> None:
    """Deploy TARGET (FILE.py:ATTR or MODULE:ATTR), or every deployment of -f FILE, and wait until they serve.

    \b
    A deployments file:
      deployments:
        - import_path: models.py:Model    # FILE.py:ATTR or MODULE:ATTR
          num_replicas: 2                 # any deployment option
          version: "3"
          init_args: [...]
    """
    if (target is None) == (config_file is None):
        raise click.UsageError("give either TARGET or -f FILE")
    if config_file is not None:
        if any(value is not None for value in (name, num_replicas, version, user_config, canary_percent)):
            raise click.UsageError("--name, --num-replicas, --version, --user-config and --canary apply to a "
                                   "TARGET; with -f, set them in the file")
        _connect(address)
        loaded = load_deployments_file(config_file)
        for item in loaded:
            with _interrupted_note(item.name, "deploy"):
                item.deploy(timeout=timeout)
            console.print(f"deployed [bold]{item.name}[/bold]: {plural(item.num_replicas, 'replica')}")
        if prune:
            _prune({item.name for item in loaded}, timeout)
        return
    if prune:
        raise click.UsageError("--prune deletes what a -f FILE leaves out: give -f FILE")
    chosen = load_target(target)
    _connect(address)
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if num_replicas is not None:
        changes["num_replicas"] = num_replicas
    if version is not None:
        changes["version"] = version
    if user_config is not None:
        changes["user_config"] = _parse_json(user_config, "--user-config")
    if canary_percent is not None:
        changes["canary"] = {**(chosen.config.canary or {}), "traffic_percent": canary_percent}
    if changes:
        chosen = chosen.options(**changes)
    with _interrupted_note(chosen.name, "deploy"):
        chosen.deploy(timeout=timeout)
    if chosen.config.canary is not None:
        console.print(f"[bold]{chosen.name}[/bold]: canary {chosen.version} serves "
                      f"{chosen.config.canary['traffic_percent']:g}% of the requests")
        return
    console.print(f"deployed [bold]{chosen.name}[/bold]: {plural(chosen.num_replicas, 'replica')}")


def _prune(keep: set[str], timeout: Optional[float]) -> None:
    """Delete every deployment not in ``keep``, naming them first."""
    doomed = sorted(set(api.list_deployments()) - keep)
    if not doomed:
        console.print("--prune: every deployment is in the file; nothing to delete")
        return
    console.print(plain(f"--prune: deleting {', '.join(doomed)} (not in the file)"), highlight=False)
    for name in doomed:
        api.delete_deployment(name, timeout=timeout)
        console.print(plain(f"deleted {name}"), highlight=False)


@contextmanager
def _interrupted_note(name: str, what: str) -> Iterator[None]:
    """On Ctrl-C while waiting for ``name``'s rollout, say the state it was left in."""
    try:
        yield
    except KeyboardInterrupt:
        text = f"interrupted: stopped waiting, not the {what}"
        try:
            snapshot = api.deployment_status(name)
            running = sum(1 for r in snapshot.replicas if r.state == "RUNNING")
            text += (f". {name} is {snapshot.status} at version {snapshot.version} (generation "
                     f"{snapshot.generation}), {running}/{snapshot.num_replicas} replicas running"
                     + (f": {_first_line(snapshot.message)}" if snapshot.message else "")
                     + f". The controller carries on; `taskserve status {name} --watch` follows it, "
                     f"`taskserve rollback {name}` undoes it")
        except Exception as error:   # the note must not hide the interrupt
            text += f" (the state of {name} could not be read: {error})"
        errors.print(plain(text), highlight=False)
        raise


@main.command(name="list")
@ADDRESS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(address: Optional[str], as_json: bool) -> None:
    """List deployments."""
    _connect(address)
    statuses, skipped = api.deployment_statuses()
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
        return
    _print_deployments(statuses)
    _print_skipped(skipped)


@main.command()
@click.argument("name", required=False)
@ADDRESS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True,
              help="Follow NAME's rollout (or, if none runs, the next one) with a progress bar until it is done.")
def status(name: Optional[str], address: Optional[str], as_json: bool, watch: bool) -> None:
    """Show every deployment and node, or one deployment and its replicas."""
    _connect(address)
    if watch:
        if name is None:
            raise ValueError("--watch follows one deployment: give its NAME")
        _watch(name)
        return
    if name is None:
        from .connection import describe_address

        statuses, skipped = api.deployment_statuses()
        if as_json:
            click.echo(json.dumps({"cluster": describe_address(), "deployments": [s.to_dict() for s in statuses],
                                   "nodes": _node_rows(), "skipped": skipped}, indent=2))
            return
        console.print(plain(f"cluster: {describe_address()}"), highlight=False)
        _print_deployments(statuses)
        _print_skipped(skipped)
        _print_nodes()
        return
    snapshot = api.deployment_status(name)
    if as_json:
        click.echo(json.dumps(snapshot.to_dict(), indent=2))
        return
    console.print(plain_line(plain(snapshot.name, "bold"), "  ", _colored(snapshot.status), "  version ", snapshot.version,
                       f"  replicas {snapshot.num_replicas}  generation {snapshot.generation}"), highlight=False)
    if snapshot.autoscaling:
        scaling = snapshot.autoscaling
        console.print(plain(f"autoscaling {scaling['min_replicas']}..{scaling['max_replicas']}: {scaling['reason']}"),
                      highlight=False)
    if snapshot.message:
        console.print(plain(snapshot.message), highlight=False)
    if snapshot.canary:
        console.print(plain(describe_canary(snapshot.canary)), highlight=False)
    _print_job_summary(name)
    table = Table("replica", "version", "state", "node", "pid", "user_config", "message")
    for replica in snapshot.replicas:
        version = f"{replica.version} (canary)" if replica.canary else replica.version
        table.add_row(plain(replica.replica_id), plain(version), _colored(replica.state), plain(replica.node_id or "-"),
                      plain(replica.pid or "-"), plain(replica.config_hash or "-"), plain(_first_line(replica.message)))
    console.print(table)
    _print_skipped(snapshot.skipped)


def _print_skipped(skipped: list[str]) -> None:
    """One line for each record left out because it cannot be read ("skipped replica X: pid
    is not a number: 'abc'"), so that a bad record is named, not fatal."""
    for line in skipped:
        errors.print(plain(f"skipped {line}"), highlight=False)


def _watch(name: str) -> None:
    """A progress bar of replicas running the current version, until the rollout ends.

    A deployment with no rollout in progress is watched until its next one starts,
    which is then followed to its end.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .connection import current_store
    from .store import wait_for_events

    store = current_store()
    pubsub = store.subscribe()
    try:
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[message]}", markup=False), console=console) as progress:
            task = progress.add_task(name, total=None, message="")
            snapshot = api.deployment_status(name)
            first_generation, following = snapshot.generation, snapshot.status == "UPDATING"
            if not following:
                progress.console.print(plain(f"{name}: {snapshot.status} at version {snapshot.version} (generation "
                                             f"{snapshot.generation}); waiting for its next rollout (Ctrl-C stops)"),
                                       highlight=False)
            while True:
                snapshot = api.deployment_status(name)
                following = following or snapshot.generation != first_generation or snapshot.status == "UPDATING"
                updated = sum(1 for r in snapshot.replicas if r.version == snapshot.version and r.state == "RUNNING")
                progress.update(task, total=max(1, snapshot.num_replicas), completed=updated,
                                description=plain(f"{name} → {snapshot.version}").plain,
                                message=plain(_first_line(snapshot.message)).plain)
                if following and snapshot.status != "UPDATING":
                    break
                wait_for_events(pubsub, 0.5)
    finally:
        pubsub.close()
    console.print(plain_line(f"{name}: ", _colored(snapshot.status), f" {snapshot.message}".rstrip()), highlight=False)
    if snapshot.status == "UNHEALTHY":
        raise SystemExit(1)


def _print_deployments(statuses: list[api.DeploymentStatus]) -> None:
    if not statuses:
        console.print("no deployments; deploy one with `taskserve deploy FILE.py:ATTR`")
        return
    table = Table("deployment", "status", "running", "version", "message")
    for snapshot in statuses:
        running = sum(1 for r in snapshot.replicas if r.state == "RUNNING")
        table.add_row(plain(snapshot.name), _colored(snapshot.status), f"{running}/{snapshot.num_replicas}",
                      plain(snapshot.version), plain(_first_line(snapshot.message)))
    console.print(table)


def _node_rows() -> list[dict[str, Any]]:
    """Every node as ``status`` shows it (and ``status --json`` prints it)."""
    from .connection import current_store
    from .planner import node_capacities

    store = current_store()
    nodes = store.list_nodes()
    # A record that cannot be read is left out here (the deployments' lines name it).
    free = {c.node_id: c.free for c in node_capacities(nodes, store.all_replicas(unreadable={}))}
    rows = []
    for node in nodes:
        left = free.get(node.node_id, node.total)
        rows.append({"node_id": node.node_id, "alive": node.alive, "hostname": node.hostname,
                     "num_cpus": node.total.num_cpus, "num_cpus_used": node.total.num_cpus - left.num_cpus,
                     "num_gpus": node.total.num_gpus, "num_gpus_used": node.total.num_gpus - left.num_gpus,
                     "memory": node.total.memory, "memory_used": node.total.memory - left.memory,
                     "labels": node.labels, "agent_pid": node.agent_pid, "log_dir": node.log_dir})
    return rows


def _print_nodes() -> None:
    table = Table("node", "alive", "CPUs used/total", "GPUs used/total", "host")
    for row in _node_rows():
        table.add_row(plain(row["node_id"]), "yes" if row["alive"] else "no",
                      f"{row['num_cpus_used']:g}/{row['num_cpus']:g}",
                      f"{row['num_gpus_used']:g}/{row['num_gpus']:g}", plain(row["hostname"]))
    console.print(table)


def _colored(state: str) -> Text:
    color = {"HEALTHY": "green", "RUNNING": "green", "UPDATING": "yellow", "STARTING": "yellow",
             "PENDING": "yellow", "DRAINING": "yellow", "UNHEALTHY": "red", "FAILED": "red"}.get(state)
    return plain(state, color or "")


def _first_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON ({error.msg}): {text!r}; quote strings, like '\"hi\"'") from None


@main.command()
@click.argument("name")
@click.argument("payload", nargs=-1)
@ADDRESS_OPTION
@click.option("--method", default="__call__", show_default=True, help="Method to call.")
@click.option("--kwargs", "kwargs_json", default=None, help="Keyword arguments, a JSON object.")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def call(name: str, payload: tuple[str, ...], address: Optional[str], method: str, kwargs_json: Optional[str],
         timeout: float) -> None:
    """Send one request to NAME; each PAYLOAD (JSON) is one positional argument.

    \b
      taskserve call echo '"hi"'
      taskserve call model 1 2 --kwargs '{"scale": 3}' --method add
    """
    check_method_name(method)
    args = [_parse_json(item, "PAYLOAD" if len(payload) == 1 else f"PAYLOAD {index}")
            for index, item in enumerate(payload, start=1)]
    kwargs = {} if kwargs_json is None else _parse_json(kwargs_json, "--kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs is a JSON object of keyword arguments, not {kwargs_json!r}; "
                         "like '{\"scale\": 3}'")
    _connect(address)
    handle = api.get_deployment(name).get_handle()
    if method != "__call__":
        handle = getattr(handle, method)
    result = handle.remote(*args, **kwargs).result(timeout=timeout)
    click.echo(json.dumps(result))


def check_method_name(method: str) -> None:
    """Refuse a method no request may call: a private one, or not an identifier.

    >>> check_method_name("predict")
    >>> check_method_name("__init__")
    Traceback (most recent call last):
    ...
    ValueError: --method '__init__' cannot be called: only public methods (not starting with '_') and __call__ can; drop --method to call __call__
    """
    if method == "__call__":
        return
    if method.startswith("_"):
        raise ValueError(f"--method {method!r} cannot be called: only public methods (not starting with '_') "
                         "and __call__ can; drop --method to call __call__")
    if not method.isidentifier():
        raise ValueError(f"--method {method!r} is not a method name; give the name of a method of the class")


@main.command()
@click.argument("name")
@click.argument("num_replicas", type=int)
@ADDRESS_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
def scale(name: str, num_replicas: int, address: Optional[str], wait: bool, timeout: Optional[float]) -> None:
    """Set NAME's replica count; running replicas keep running."""
    _connect(address)
    with _interrupted_note(name, "scale"):
        api.scale_deployment(name, num_replicas, wait=wait, timeout=timeout)
    console.print(f"{name}: {plural(num_replicas, 'replica')}" + ("" if wait else " (scaling)"))


@main.command()
@click.argument("name")
@click.argument("user_config")
@ADDRESS_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
def reconfigure(name: str, user_config: str, address: Optional[str], wait: bool, timeout: Optional[float]) -> None:
    """Give NAME's replicas a new USER_CONFIG (JSON) in place, without a restart."""
    config = _parse_json(user_config, "USER_CONFIG")
    _connect(address)
    with _interrupted_note(name, "reconfigure"):
        api.reconfigure_deployment(name, config, wait=wait, timeout=timeout)
    console.print(f"{name}: " + ("every replica runs the new user_config" if wait else "reconfiguring"))


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
def restart(name: str, address: Optional[str], wait: bool, timeout: Optional[float]) -> None:
    """Replace every replica of NAME in rolling batches, at the same version."""
    _connect(address)
    with _interrupted_note(name, "restart"):
        api.restart_deployment(name, wait=wait, timeout=timeout)
    console.print(f"{name}: " + ("every replica restarted" if wait else "restarting"))


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--to", "to_version", default=None, help="Roll back to this version (default: the previous one).")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
def rollback(name: str, address: Optional[str], to_version: Optional[str], wait: bool, timeout: Optional[float]) -> None:
    """Roll NAME back to its previous version: a rolling update."""
    _connect(address)
    running = api.deployment_status(name)
    if to_version is not None and to_version == running.version and not running.canary:
        console.print(plain(f"{name}: version {to_version} is the one running; nothing to roll back"))
        return
    with _interrupted_note(name, "rollback"):
        version = api.rollback_deployment(name, to_version=to_version, wait=wait, timeout=timeout)
    console.print(plain(f"{name}: " + (f"rolled back to version {version}" if wait
                                       else f"rolling back to version {version}")))


# --------------------------------------------------------------------------- canary releases (SPEC §9)


def describe_canary(canary: dict[str, Any]) -> str:
    """One line of ``taskserve status NAME`` about its canary.

    >>> print(describe_canary({"version": "2", "percent": 10.0, "replicas": 1, "target_replicas": 1,
    ...     "requests": 40, "errors": 2, "error_rate": 0.05, "p95": 0.025, "min_requests": 20,
    ...     "stable": {"version": "1", "requests": 360, "errors": 0, "error_rate": 0.0, "p95": 0.01}}))
    canary 2 at 10%: 1/1 replicas; 40 requests, 2 errors (5.0%), p95 <= 0.025s; stable 1: 360 requests, 0 errors (0.0%), p95 <= 0.01s
    """
    def p95(value: Optional[float]) -> str:
        return "-" if value is None else f"<= {value:g}s"

    stable = canary["stable"]
    return (f"canary {canary['version']} at {canary['percent']:g}%: {canary['replicas']}/{canary['target_replicas']} "
            f"replicas; {canary['requests']} requests, {canary['errors']} errors ({canary['error_rate']:.1%}), "
            f"p95 {p95(canary['p95'])}; stable {stable['version']}: {stable['requests']} requests, "
            f"{stable['errors']} errors ({stable['error_rate']:.1%}), p95 {p95(stable['p95'])}")


@main.command(name="canary")
@click.argument("name")
@click.option("--percent", type=float, required=True, help="The share of the requests the canary gets.")
@ADDRESS_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
def canary_command(name: str, percent: float, address: Optional[str], wait: bool, timeout: Optional[float]) -> None:
    """Send PERCENT of NAME's requests to its canary (no replica restarts)."""
    _connect(address)
    api.set_canary_traffic(name, percent, wait=wait, timeout=timeout)
    console.print(f"{name}: the canary gets {percent:g}% of the requests")


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
def promote(name: str, address: Optional[str], wait: bool, timeout: Optional[float]) -> None:
    """Promote NAME's canary: a rolling update of every replica to its version."""
    _connect(address)
    version = api.promote_canary(name, wait=wait, timeout=timeout)
    console.print(plain(f"{name}: " + (f"version {version} promoted" if wait else f"promoting version {version}")))


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def history(name: str, address: Optional[str], as_json: bool) -> None:
    """Every goal change of NAME: what it changed, version, who, when, outcome."""
    from .history import annotate

    _connect(address)
    entries = annotate(api.history(name))
    if as_json:
        click.echo(json.dumps([{k: v for k, v in e.items() if k != "goal"} for e in entries], indent=2))
        return
    table = Table("generation", "action", "change", "version", "replicas", "by", "at", "outcome")
    for entry in entries:
        outcome = entry.get("outcome", "")
        replicas = str(entry.get("num_replicas", ""))
        if entry.get("action") == "autoscale":        # a change of count, not of the goal
            replicas = f"{entry.get('from')} -> {entry.get('to')}"
        table.add_row(plain(entry.get("generation")), plain(entry.get("action", "")), plain(entry["change"]),
                      plain(entry.get("version", "")), plain(replicas), plain(entry.get("by", "")),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("at", 0))),
                      plain(outcome, {"done": "green", "failed": "red"}.get(outcome, "")))
    console.print(table)


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--timeout", type=float, default=None)
def delete(name: str, address: Optional[str], timeout: Optional[float]) -> None:
    """Drain NAME's replicas and forget it."""
    _connect(address)
    api.delete_deployment(name, timeout=timeout)
    console.print(f"deleted {name}")


# --------------------------------------------------------------------------- declarative use


@main.command()
@ADDRESS_OPTION
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write to this file (default: stdout).")
def export(address: Optional[str], output: Optional[Path]) -> None:
    """Print the running deployments as a file `taskserve deploy -f` accepts.

    Each entry names the code already in the cluster; applying the file unchanged
    restarts nothing.
    """
    from .config_file import export as export_goals
    from .connection import current_store

    _connect(address)
    text = export_goals([goal for goal in current_store().list_goals() if not goal.deleting])
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        errors.print(f"wrote {output}", markup=False, highlight=False)


@main.command()
@ADDRESS_OPTION
@click.option("-f", "--file", "config_file", type=click.Path(path_type=Path), required=True,
              help="The deployments file to compare with the cluster.")
@click.option("--prune", is_flag=True, help="Count the deployments the file leaves out as deleted, as `deploy --prune` does.")
def diff(address: Optional[str], config_file: Path, prune: bool) -> None:
    """What `taskserve deploy -f FILE` would change: exit 0 and "no changes", else 1 with the changes."""
    from .config_file import changes
    from .connection import current_store

    _connect(address)
    loaded = load_deployments_file(config_file)
    lines, notes = changes(loaded, current_store().list_goals(), prune=prune)
    for line in lines:
        console.print(plain(line), highlight=False)
    if not lines:
        console.print("no changes", markup=False, highlight=False)
    for note in notes:
        console.print(plain(note), highlight=False)
    if lines:
        raise SystemExit(1)


# --------------------------------------------------------------------------- operations


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="The data dir of the `taskserve up` to stop (default: ./.taskserve, else your one running up).")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for it to drain its replicas and stop.")
def down(data_dir: Optional[Path], timeout: float) -> None:
    """Stop the cluster `taskserve up` started (its replicas drain first)."""
    from .connection import find_up, up_is_running
    from .errors import redact_address
    from .local import wait_until

    record = find_up(data_dir)
    pid, where = record["pid"], Path(record["data_dir"])
    console.print(plain(f"stopping the taskserve up with pid {pid} (data dir {where}, "
                        f"{redact_address(record['url'])})"), highlight=False)
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not up_is_running(where), timeout, "`taskserve up` to stop", interval_s=0.2)
    except TimeoutError:
        raise RuntimeError(f"the taskserve up with pid {pid} did not stop within {timeout:g}s; its replicas may "
                           f"still be draining: wait, or `kill {pid}` again") from None
    console.print(f"stopped: Redis, the controller, the node agent and the gateway of {where} are down; "
                  f"logs stay in {where / 'logs'}", markup=False, highlight=False)


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--replica", "replica_id", default=None, help="Only this replica (default: every replica of NAME).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the replicas write, until Ctrl-C.")
@click.option("--tail", type=click.IntRange(min=0), default=100, show_default=True,
              help="Lines to print from the end of each log first (0: none).")
def logs(name: str, address: Optional[str], replica_id: Optional[str], follow: bool, tail: int) -> None:
    """Print the logs of NAME's replicas (what they print, their tracebacks).

    A replica's log is <agent data dir>/logs/<replica id>.log on its node; a log on
    another machine is named, not read.
    """
    from .logs import LogFollower, replica_logs

    _connect(address)
    found = replica_logs(name, replica_id)
    for item in found:
        if item.problem:
            errors.print(plain(f"{item.replica_id}: {item.problem}"), highlight=False)
    readable = [item for item in found if not item.problem]
    if not readable and not follow:
        if found:
            raise SystemExit(1)
        raise LookupError(f"deployment {name!r} has no replica{' ' + replica_id if replica_id else ''} "
                          "with a log on this machine; `taskserve status " + name + "` lists its replicas")
    prefix = len(readable) > 1 or (follow and replica_id is None)
    follower = LogFollower(readable, tail, lambda line: click.echo(line), prefix=prefix)
    follower.print_tails()
    if not follow:
        return
    try:
        follower.follow(lambda: replica_logs(name, replica_id))
    except KeyboardInterrupt:
        return


@main.group()
def env() -> None:
    """Runtime environments cached on this machine (built by its node agent)."""


DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None,
    help="The node agent's data dir [default: those of the cluster's agents on this machine, else .taskserve].")


def _agent_data_dirs(data_dir: Optional[Path]) -> list[Path]:
    """The data dirs whose runtime environments ``env`` looks at: ``--data-dir``, else
    those of the connected cluster's agents on this machine (their node records say
    where they log, in ``<data dir>/logs``), else ``./.taskserve``. A directory of
    another user's, or one others may write, is left out (it is said why)."""
    import socket

    from .connection import DATA_DIR_NAME, current_store, trusted_directory

    if data_dir is not None:
        return [data_dir]
    host = socket.gethostname()
    found = sorted({Path(node.log_dir).parent for node in current_store().list_nodes()
                    if node.hostname == host and node.log_dir})
    return [directory for directory in found if trusted_directory(directory)] or [Path(DATA_DIR_NAME)]


def _environments_in_use() -> dict[str, list[str]]:
    """env key -> names of the deployments whose pip list it serves."""
    from .connection import current_store
    from .runtime_env import env_key

    used: dict[str, list[str]] = {}
    for goal in current_store().list_goals():
        pip = (goal.options.get("runtime_env") or {}).get("pip")
        if pip:
            used.setdefault(env_key(pip), []).append(goal.name)
    return used


@env.command(name="list")
@ADDRESS_OPTION
@DATA_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def env_list(address: Optional[str], data_dir: Optional[Path], as_json: bool) -> None:
    """List the cached environments and the deployments that use them."""
    from .node.envs import EnvironmentCache

    _connect(address)
    used = _environments_in_use()
    directories = [directory / "envs" for directory in _agent_data_dirs(data_dir)]
    environments = [item for directory in directories for item in EnvironmentCache(directory).list()]
    if as_json:
        click.echo(json.dumps([{"key": item.key, "requirements": item.requirements, "path": str(item.path),
                                "size_bytes": item.size_bytes, "created_at": item.created_at,
                                "used_by": used.get(item.key, [])} for item in environments], indent=2))
        return
    if not environments:
        console.print(f"no runtime environments in {', '.join(str(d) for d in directories)}")
        return
    table = Table("env", "requirements", "size", "created", "used by", "where")
    for item in environments:
        table.add_row(plain(item.key), plain(" ".join(item.requirements)), f"{item.size_bytes / 2**20:.1f} MB",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(item.created_at)),
                      plain(", ".join(used.get(item.key, [])) or "-"), plain(item.path.parent))
    console.print(table)


@env.command(name="prune")
@ADDRESS_OPTION
@DATA_DIR_OPTION
def env_prune(address: Optional[str], data_dir: Optional[Path]) -> None:
    """Remove the cached environments no deployment uses."""
    from .node.envs import EnvironmentCache

    _connect(address)
    used = _environments_in_use()
    removed = []
    for directory in _agent_data_dirs(data_dir):
        cache = EnvironmentCache(directory / "envs")
        for item in cache.list():
            if item.key not in used:
                cache.remove(item.key)
                removed.append(item)
    console.print(f"removed {len(removed)} unused runtime environment(s)"
                  + (f": {', '.join(item.key for item in removed)}" if removed else ""))


# --------------------------------------------------------------------------- jobs (SPEC §12)


def describe_age(seconds: float) -> str:
    """A duration, short: seconds, then minutes, hours, days.

    >>> describe_age(12.4), describe_age(125), describe_age(7300), describe_age(200000)
    ('12s', '2m5s', '2h1m', '2d7h')
    """
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def describe_jobs(counts: dict[str, int], oldest_queued_at: Optional[float], now: float) -> list[str]:
    """The two lines `taskserve jobs NAME` and `taskserve status NAME` print about a
    deployment's jobs: how many in each state, and how long the oldest waiting one waited.

    >>> for line in describe_jobs({"QUEUED": 2, "RUNNING": 1, "SUCCEEDED": 40, "FAILED": 0, "CANCELLED": 0,
    ...                            "DEAD": 1}, 100.0, 112.0):
    ...     print(line)
    jobs: 2 queued, 1 running, 40 succeeded, 0 failed, 0 cancelled, 1 dead
    oldest waiting job: queued 12s ago
    """
    from .wire import JOB_STATES

    line = "jobs: " + ", ".join(f"{counts.get(state, 0)} {state.lower()}" for state in JOB_STATES)
    waiting = ("oldest waiting job: none waits" if oldest_queued_at is None
               else f"oldest waiting job: queued {describe_age(now - oldest_queued_at)} ago")
    return [line, waiting]


def _job_summary(name: str) -> tuple[dict[str, int], Optional[float]]:
    """``name``'s job counts per state and when its oldest waiting job was queued."""
    from .connection import current_store

    store = current_store()
    return store.count_jobs(name), store.oldest_queued([name])[name]


def _print_job_summary(name: str) -> None:
    """``status NAME``'s job lines, when the deployment has jobs."""
    counts, oldest = _job_summary(name)
    if any(counts.values()):
        for line in describe_jobs(counts, oldest, time.time()):
            console.print(plain(line), highlight=False)


def _job_arguments(payload: tuple[str, ...], kwargs_json: Optional[str]) -> tuple[list, dict]:
    args = [_parse_json(item, "PAYLOAD" if len(payload) == 1 else f"PAYLOAD {index}")
            for index, item in enumerate(payload, start=1)]
    kwargs = {} if kwargs_json is None else _parse_json(kwargs_json, "--kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs is a JSON object of keyword arguments, not {kwargs_json!r}; "
                         "like '{\"scale\": 3}'")
    return args, kwargs


@main.command()
@click.argument("name")
@click.argument("payload", nargs=-1)
@ADDRESS_OPTION
@click.option("--method", default="__call__", show_default=True, help="Method to call.")
@click.option("--kwargs", "kwargs_json", default=None, help="Keyword arguments, a JSON object.")
@click.option("--priority", type=int, default=None, help="0 (last) to 9 (first); default 5.")
@click.option("--max-retries", type=int, default=0, show_default=True,
              help="Attempts that may fail and be retried before the job is FAILED.")
@click.option("--retry-delay", type=float, default=1.0, show_default=True,
              help="Seconds before the first retry; doubled for each next one.")
@click.option("--idempotency-key", default=None,
              help="Submit at most one job under this key: again, it prints the job already submitted.")
def submit(name: str, payload: tuple[str, ...], address: Optional[str], method: str, kwargs_json: Optional[str],
           priority: Optional[int], max_retries: int, retry_delay: float, idempotency_key: Optional[str]) -> None:
    """Queue a call of NAME as a job and print its id; each PAYLOAD (JSON) is one positional argument.

    \b
      taskserve submit ocr '"s3://scans/17.pdf"' --priority 8 --max-retries 3
      taskserve job ID --wait
    """
    check_method_name(method)
    args, kwargs = _job_arguments(payload, kwargs_json)
    _connect(address)
    handle = api.get_deployment(name).get_handle().options(
        method=method, priority=priority, max_retries=max_retries, retry_delay_s=retry_delay,
        idempotency_key=idempotency_key)
    click.echo(handle.submit(*args, **kwargs).id)


def _job_value(job: Any, status: Any) -> Any:
    """A SUCCEEDED job's value as it is printed: an HTTP job's answer as data
    (status, headers, body), anything else as it is."""
    from .http import HTTP_METHOD, response_data

    value = job.result()
    if status.method == HTTP_METHOD and isinstance(value, dict):
        try:
            return response_data(value)
        except (AttributeError, KeyError, TypeError, ValueError):
            return value
    return value


def _print_job(status: Any, value: Any, value_error: Optional[str]) -> None:
    """A job's status in lines (everything read from Redis printed as plain text)."""
    from .wire import SUCCEEDED

    now = time.time()

    def when(moment: Optional[float]) -> str:
        if moment is None:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment)) + f" ({describe_age(now - moment)} ago)"

    method = "" if status.method == "__call__" else f".{status.method}"
    console.print(plain_line("job ", plain(status.job_id, "bold"), f"  of {status.deployment}{method}",
                             f"  priority {status.priority}"), highlight=False)
    progress = "-" if status.progress is None else f"{status.progress:.0%}"
    console.print(plain_line(_job_state(status.state), f"  attempts {status.attempts} (max_retries "
                             f"{status.max_retries})  progress {progress}",
                             "  cancel requested" if status.cancel_requested and not status.finished else ""),
                  highlight=False)
    if status.message:
        console.print(plain_line("message: ", status.message), highlight=False)
    console.print(plain(f"created {when(status.created_at)}, started {when(status.started_at)}, "
                        f"finished {when(status.finished_at)}"), highlight=False)
    if status.error is not None and status.state != SUCCEEDED:
        console.print(plain_line(plain("error:", "red"), f" {status.error.type}: {status.error.message}"),
                      highlight=False)
    if status.state == SUCCEEDED:
        if value_error is not None:
            console.print(plain(f"result: cannot be read here ({value_error})"), highlight=False)
        else:
            console.print(plain_line("result: ", json.dumps(value, default=repr)), highlight=False)


def _job_state(state: str) -> Text:
    color = {"QUEUED": "yellow", "RUNNING": "blue", "SUCCEEDED": "green", "FAILED": "red", "DEAD": "red"}.get(state)
    return plain(state, color or "")


@main.command()
@click.argument("job_id")
@ADDRESS_OPTION
@click.option("--wait", is_flag=True, help="Wait until the job ends; print its result, or its error and exit 1.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds (exit 1).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the status, with the result once SUCCEEDED.")
def job(job_id: str, address: Optional[str], wait: bool, timeout: Optional[float], as_json: bool) -> None:
    """Show job JOB_ID: state, progress, attempts, times, result or error.

    With --wait, wait for its end: print the result (JSON), or the error and exit 1 when
    it ends FAILED, DEAD or CANCELLED.
    """
    from .errors import JobCancelled, ReplicaError
    from .jobs import get_job
    from .wire import SUCCEEDED

    _connect(address)
    found = get_job(job_id)
    if wait:
        try:
            found.result(timeout=timeout)
        except (ReplicaError, JobCancelled) as error:
            status = found.status()
            if as_json:
                click.echo(json.dumps(status.to_dict(), indent=2))
            else:
                errors.print(plain_line(plain("error:", "red"), f" job {job_id} is {status.state}: ",
                                        _first_line(str(error)) if isinstance(error, JobCancelled)
                                        else f"{error.type_name}: {_first_line(error.message)}"), highlight=False)
            raise SystemExit(1)
    status = found.status()
    value, value_error = None, None
    if status.state == SUCCEEDED:
        try:
            value = _job_value(found, status)
        except Exception as error:   # a pickled result without the secret here: the status still shows
            if wait:
                raise
            value_error = str(error)
    if as_json:
        data = status.to_dict()
        if status.state == SUCCEEDED:
            data["result"] = value
        click.echo(json.dumps(data, indent=2, default=repr))
    elif wait:
        click.echo(json.dumps(value, default=repr))
    else:
        _print_job(status, value, value_error)


@main.command(name="jobs")
@click.argument("name")
@ADDRESS_OPTION
@click.option("--state", default=None,
              help="Only the jobs in this state: QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED or DEAD.")
@click.option("--limit", type=int, default=20, show_default=True, help="List at most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs_command(name: str, address: Optional[str], state: Optional[str], limit: int, as_json: bool) -> None:
    """NAME's jobs: how many in each state, the oldest waiting one's age, then the jobs, newest first."""
    from .jobs import list_jobs

    _connect(address)
    listed = list_jobs(name, state.upper() if state else None, limit)
    counts, oldest = _job_summary(name)
    now = time.time()
    if as_json:
        click.echo(json.dumps({"deployment": name, "counts": counts, "oldest_queued_at": oldest,
                               "oldest_queued_age_s": None if oldest is None else max(0.0, now - oldest),
                               "jobs": [status.to_dict() for status in listed]}, indent=2))
        return
    for line in describe_jobs(counts, oldest, now):
        console.print(plain(line), highlight=False)
    if not listed:
        console.print(plain(f"no {state.upper() + ' ' if state else ''}jobs of {name}"), highlight=False)
        return
    table = Table("job", "state", "method", "priority", "attempts", "progress", "created", "message")
    for status in listed:
        text = status.message
        if status.error is not None and status.state != "SUCCEEDED":
            text = f"{status.error.type}: {status.error.message}"
        table.add_row(plain(status.job_id), _job_state(status.state), plain(status.method), str(status.priority),
                      str(status.attempts), "-" if status.progress is None else f"{status.progress:.0%}",
                      "-" if status.created_at is None else describe_age(now - status.created_at) + " ago",
                      plain(_first_line(text)))
    console.print(table)


@main.command()
@click.argument("job_id")
@ADDRESS_OPTION
def cancel(job_id: str, address: Optional[str]) -> None:
    """Cancel job JOB_ID: a queued job never runs; a running one is asked to stop."""
    from .jobs import get_job
    from .wire import CANCELLED, RUNNING

    _connect(address)
    found = get_job(job_id)
    before = found.status()
    if before.finished:
        raise RuntimeError(f"job {job_id} has finished ({before.state}): there is nothing to cancel")
    state = found.cancel()
    if state == CANCELLED:
        console.print(plain(f"job {job_id}: CANCELLED (it never runs)"), highlight=False)
    elif state == RUNNING:
        console.print(plain(f"job {job_id}: RUNNING, asked to stop (its method sees job_context().cancelled); "
                            f"`taskserve job {job_id} --wait` follows it"), highlight=False)
    else:
        raise RuntimeError(f"job {job_id} has finished ({state}): there is nothing to cancel")


@main.command()
@click.argument("name")
@click.argument("job_ids", nargs=-1)
@ADDRESS_OPTION
@click.option("--all-failed", is_flag=True, help="Every FAILED job of NAME.")
@click.option("--all-dead", is_flag=True, help="Every DEAD job of NAME.")
def retry(name: str, job_ids: tuple[str, ...], address: Optional[str], all_failed: bool, all_dead: bool) -> None:
    """Queue FAILED or DEAD jobs of NAME again: JOB_ID ..., --all-failed or --all-dead.

    Each runs again under its id, as a new attempt with its retries counted afresh.
    """
    from .jobs import retry_jobs
    from .wire import DEAD, FAILED

    if sum((bool(job_ids), all_failed, all_dead)) != 1:
        raise ValueError("name the jobs to retry: JOB_ID ..., --all-failed or --all-dead (one of them)")
    _connect(address)
    state = FAILED if all_failed else DEAD if all_dead else None
    queued = retry_jobs(name, list(job_ids) if job_ids else None, state=state)
    console.print(plain(f"{name}: {len(queued)} job(s) queued again"), highlight=False)
    for job_id in queued:
        console.print(plain(job_id), highlight=False)
    left = [job_id for job_id in job_ids if job_id not in queued]
    if left:
        console.print(plain(f"left alone (not FAILED or DEAD): {', '.join(left)}"), highlight=False)


@main.command()
@click.argument("name")
@ADDRESS_OPTION
@click.option("--state", required=True, help="FAILED, DEAD, SUCCEEDED or CANCELLED.")
def purge(name: str, address: Optional[str], state: str) -> None:
    """Forget NAME's finished jobs in --state: their records and results."""
    from .jobs import purge_jobs

    _connect(address)
    purged = purge_jobs(name, state.upper())
    console.print(plain(f"{name}: {purged} {state.upper()} job(s) purged"), highlight=False)


if __name__ == "__main__":
    main()
