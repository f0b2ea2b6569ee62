"""A whole cluster on this machine: Redis, a controller, node agents and a gateway.

``taskserve up``, the tests and the benchmarks all start their clusters with
:class:`LocalCluster`: every part is a child process (``python -m taskserve ...``)
that logs to ``<log_dir>/<part>.log``, dies with this process (parent-death
signal), and is stopped in order by :meth:`LocalCluster.stop_all` — the gateways
first (they answer or withdraw the requests in hand while the replicas still run),
then the controller, the agents (they drain their replicas), and Redis last.

Example::

    with LocalCluster(Path("/tmp/cluster")) as cluster:
        cluster.start_redis()
        cluster.start_controller()
        cluster.start_agent("node-a", num_cpus=4)
        taskserve.connect(cluster.url)
        ...

:func:`wait_until` is the one way this project waits for a condition: it polls
with a deadline, never sleeps blindly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

import redis

from .connection import remember_secret
from .redis_server import RedisServer
from .signing import SECRET_ENV, generate_secret, secret_from_environment

T = TypeVar("T")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
ADDRESS_ENV = "TASKSERVE_ADDRESS"


def wait_until(condition: Callable[[], T], timeout_s: float = 30.0, what: str = "a condition",
               interval_s: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises ``TimeoutError`` naming ``what`` after ``timeout_s`` seconds.

    >>> wait_until(lambda: 42, timeout_s=1)
    42
    >>> wait_until(lambda: 0, timeout_s=0.05, what="zero to be true")
    Traceback (most recent call last):
    ...
    TimeoutError: timed out after 0.05s waiting for zero to be true
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        socket.create_connection((target, port), timeout=1).close()
        return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the log at ``path`` ("" if there is none yet)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _die_with_parent() -> None:
    from .node.processes import die_with_parent

    die_with_parent()


class PartExited(RuntimeError):
    """A part of the cluster exited when it should be running."""


class LocalCluster:
    """Redis, a controller, node agents and gateways as child processes.

    ``redis_url`` uses a running Redis instead of starting one; ``redis_data_dir``
    gives the started one an append-only file there (no persistence without);
    ``redis_password`` makes it require that password, ``redis_host`` the address
    it listens on (127.0.0.1). ``env`` is the environment of every part (default:
    this process's); ``cwd`` their working directory; ``secret`` the cluster's
    signing secret, given to the parts as ``$TASKSERVE_SECRET``.
    """

    def __init__(self, log_dir: Path, *, redis_url: Optional[str] = None, redis_port: Optional[int] = None,
                 redis_data_dir: Optional[Path] = None, env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None, redis_password: Optional[str] = None,
                 redis_host: str = "127.0.0.1", secret: Optional[str] = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis: Optional[RedisServer] = None
        self._redis_url = redis_url
        self._redis_port = redis_port
        self._redis_data_dir = redis_data_dir
        self._redis_password = redis_password
        self._redis_host = redis_host
        self.base_env = dict(os.environ if env is None else env)
        # A cluster needs a secret to run code: one from the environment, else a new one.
        self.secret = secret
        if secret is None and secret_from_environment(self.base_env) is None:
            self.secret = generate_secret()
        self.cwd = cwd
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[tuple[str, ...], Optional[dict[str, str]]]] = {}

    # ------------------------------------------------------------------ Redis

    @property
    def url(self) -> str:
        """The Redis URL every part and client uses."""
        if self._redis_url is not None:
            return self._redis_url
        if self.redis is None:
            raise RuntimeError("the cluster has no Redis yet: call start_redis() or pass redis_url")
        return self.redis.url

    def start_redis(self) -> str:
        """Start the embedded Redis (unless a ``redis_url`` was given); its URL."""
        if self._redis_url is None and self.redis is None:
            self.redis = RedisServer(port=self._redis_port, data_dir=self._redis_data_dir,
                                     password=self._redis_password, host=self._redis_host).start()
        known = secret_from_environment(self.env())
        if known is not None:
            remember_secret(self.url, known)     # so that this process can deploy to it
        return self.url

    def restart_redis(self) -> None:
        """Stop Redis (saving its append-only file) and start it again on the same port."""
        if self.redis is None:
            raise RuntimeError("only an embedded Redis can be restarted")
        self.redis.stop()
        self.redis = RedisServer(port=self.redis.port, data_dir=self._redis_data_dir,
                                 password=self._redis_password, host=self._redis_host).start()

    # ------------------------------------------------------------------ parts

    def env(self) -> dict[str, str]:
        """The environment of the parts: the base one with the cluster's address (and secret)."""
        env = {**self.base_env, ADDRESS_ENV: self.url}
        if self.secret is not None:
            env[SECRET_ENV] = self.secret
        return env

    def start(self, name: str, *args: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        """Start ``python -m taskserve ARGS`` as the part ``name`` (its log: ``<name>.log``).

        The address reaches it through ``$TASKSERVE_ADDRESS``, not its command line.
        """
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"the part {name!r} is already running")
        with open(self.log_dir / f"{name}.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "taskserve", *args],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env={**self.env(), **(env or {})}, cwd=self.cwd,
                start_new_session=True,        # a Ctrl-C reaches only us; we stop the parts in order
                preexec_fn=_die_with_parent,   # and they go too if we are killed outright
            )
        self.processes[name] = process
        self.commands[name] = (tuple(args), env)
        return process

    def restart(self, name: str) -> subprocess.Popen:
        """Start the part ``name`` again, as it was started (it must have exited)."""
        args, env = self.commands[name]
        return self.start(name, *args, env=env)

    def start_controller(self, *args: str, name: str = "controller") -> subprocess.Popen:
        return self.start(name, "controller", *args)

    def start_agent(self, node_id: Optional[str] = None, num_cpus: Optional[float] = None, *args: str,
                    num_gpus: Optional[float] = None, data_dir: Optional[Path] = None,
                    env: Optional[dict[str, str]] = None, wait: bool = True,
                    name: Optional[str] = None) -> subprocess.Popen:
        """Start a node agent (``--node-id``, ``--num-cpus`` ...); by default wait until it registered."""
        name = name or (f"agent-{node_id}" if node_id else "agent")
        argv = ["agent"]
        if node_id:
            argv += ["--node-id", node_id]
        if num_cpus is not None:
            argv += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            argv += ["--num-gpus", str(num_gpus)]
        argv += ["--data-dir", str(data_dir or self.log_dir / (node_id or "agent"))]
        process = self.start(name, *argv, *args, env=env)
        if wait:
            self.wait_for_node(node_id, part=name)
        return process

    def start_gateway(self, port: int, host: str = "127.0.0.1", *args: str, name: str = "gateway",
                      wait: bool = True) -> subprocess.Popen:
        """Start an HTTP gateway on ``host:port``; by default wait until it accepts connections."""
        process = self.start(name, "gateway", "--host", host, "--port", str(port), *args)
        if wait:
            self.wait_for(lambda: port_open(port, host), f"the gateway to listen on {host}:{port}", part=name)
        return process

    def wait_for(self, condition: Callable[[], T], what: str, part: Optional[str] = None,
                 timeout_s: float = START_TIMEOUT_S) -> T:
        """:func:`wait_until`, failing at once (with its log) if ``part`` or any part exits."""

        def check() -> T:
            self.check_alive([part] if part else None)
            return condition()

        return wait_until(check, timeout_s, what)

    def wait_for_node(self, node_id: Optional[str] = None, part: Optional[str] = None,
                      timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the node ``node_id`` (any node when None) is alive in Redis."""
        client = redis.Redis.from_url(self.url)
        from .store import Store

        store = Store(client)
        try:
            self.wait_for(lambda: any(n.alive and (node_id is None or n.node_id == node_id)
                                      for n in store.list_nodes()),
                          f"node agent {node_id or ''} to register".replace("  ", " "), part, timeout_s)
        finally:
            client.close()

    def check_alive(self, names: Optional[Iterable[str]] = None) -> None:
        """Raise :class:`PartExited` (with its log's tail) if one of the parts has exited."""
        for name in (self.processes if names is None else names):
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise PartExited(f"{name} exited with code {process.returncode}; its log "
                                 f"{self.log_dir / (name + '.log')} ends:\n{log_tail(self.log_dir / (name + '.log'))}")

    def exited(self) -> list[str]:
        """The parts that have exited."""
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> Optional[int]:
        """Stop one part: ``sig``, then SIGKILL after ``timeout_s``; its exit code."""
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every part in order: gateways (a request is answered, or taken off its
        queue and refused, while the replicas still run), controllers, agents (they
        drain their replicas), then Redis."""

        def order(name: str) -> int:
            for rank, prefix in enumerate(("gateway", "controller", "agent")):
                if name.startswith(prefix):
                    return rank
            return 3

        for name in sorted(self.processes, key=order):
            self.stop(name, timeout_s=timeout_s)
        if self.redis is not None:
            self.redis.stop()

    def logs(self, tail: int = 3000) -> str:
        """The end of every part's log, for a failing test's message."""
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}"
                         for path in sorted(self.log_dir.glob("*.log")))

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


class PartSupervisor:
    """Restarts the parts of a cluster that died, with a growing pause; what ``up`` runs.

    One bad deployment must never take the cluster down: a part that exits is
    started again (after 1 s, doubling up to 60 s while it keeps dying within a
    minute of its start), and each restart is reported as one line.
    """

    def __init__(self, cluster: LocalCluster, clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.clock = clock
        self.started_at = {name: clock() for name in cluster.processes}
        self.delay = {name: 1.0 for name in cluster.processes}
        self.due: dict[str, float] = {}

    def check(self) -> list[str]:
        """Restart what is due; the lines to report."""
        lines = []
        now = self.clock()
        for name in self.cluster.exited():
            if name not in self.due:
                code = self.cluster.processes[name].returncode
                if now - self.started_at.get(name, now) > 60:
                    self.delay[name] = 1.0          # it ran a good while: start over
                self.due[name] = now + self.delay[name]
                lines.append(f"{name} exited with code {code}; restarting it in {self.delay[name]:g}s "
                             f"(log: {self.cluster.log_dir / (name + '.log')})")
                self.delay[name] = min(60.0, self.delay[name] * 2)
        for name, due in list(self.due.items()):
            if now >= due:
                del self.due[name]
                self.cluster.restart(name)
                self.started_at[name] = now
        return lines
