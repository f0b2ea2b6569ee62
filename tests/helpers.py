"""What the tests share: a local cluster, a request loop, polling, the store tests' Redis.

Fixtures every module may use live in ``conftest.py``; the helpers they and the tests
use live here, so tests import them from one ordinary module. The fixtures ``server``
and ``client`` of the store's tests live here too: a module opts into them by importing
them (other modules give those names other meanings)::

    from .helpers import redis_client, redis_under_test  # noqa: F401  (fixtures "client", "server")

Each test that uses them runs twice: on fakeredis (fast, a unit test) and on a real
``redis-server`` (marked ``integration``), so the store's Lua scripts and transactions
are checked against the Redis they run on.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, TypeVar, Union

import fakeredis
import httpx
import pytest
import redis

import taskserve
from taskserve.local import LocalCluster
from taskserve.local import wait_until as _wait_until
from taskserve.redis_server import free_port
from taskserve.signing import SECRET_ENV, generate_secret, node_secret, sign_goal
from taskserve.state import Goal

REPO = Path(__file__).resolve().parent.parent

# One cluster secret for the whole test run, so that any process a test starts with a copy
# of this environment (a CLI command, a script) signs code the clusters accept.
os.environ.setdefault(SECRET_ENV, generate_secret())
SECRET = node_secret()

T = TypeVar("T")


def signed(change: Callable[[Optional[Goal]], Union[Goal, dict, None]]) -> Callable[[Optional[Goal]], Optional[Goal]]:
    """A goal change for ``Store.update_goal`` as a client with the cluster secret makes
    it: the goal it returns (or the previous one with the fields it returns) signed, so
    that the controller, the gateway and handles act on it."""

    def sealed(previous: Optional[Goal]) -> Optional[Goal]:
        changed = change(previous)
        if changed is None:
            return None
        goal = dataclasses.replace(previous, **changed) if isinstance(changed, dict) else changed
        return sign_goal(goal, SECRET)

    return sealed


class RedisUnderTest:
    """The empty Redis a store test runs against: fakeredis's in-memory one (``fake``), or
    the session's real ``redis-server`` on ``port``.

    ``connect()`` makes a client of it; ``connect(Mixin)`` one whose class puts ``Mixin``
    before the client's own (to wrap one of its commands). The clients are closed after
    the test.
    """

    def __init__(self, kind: str, fake: Optional[fakeredis.FakeServer] = None, port: Optional[int] = None) -> None:
        self.kind = kind
        self.fake = fake
        self.port = port
        self.clients: list[redis.Redis] = []

    def connect(self, *mixins: type) -> redis.Redis:
        base = fakeredis.FakeRedis if self.fake is not None else redis.Redis
        cls = type("".join(m.__name__ for m in mixins) + base.__name__, (*mixins, base), {}) if mixins else base
        client = cls(server=self.fake) if self.fake is not None else cls(host="127.0.0.1", port=self.port)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture(name="server", params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.integration)])
def redis_under_test(request: pytest.FixtureRequest) -> Iterator[RedisUnderTest]:
    """The fixture ``server``: an empty Redis of one test, fakeredis's or a real one (the
    session's ``redis-server``, flushed)."""
    if request.param == "fakeredis":
        under_test = RedisUnderTest("fakeredis", fake=fakeredis.FakeServer())
    else:
        process = request.getfixturevalue("redis_server_process")
        under_test = RedisUnderTest("redis-server", port=process.port)
        under_test.connect().flushall()
    try:
        yield under_test
    finally:
        under_test.close()


@pytest.fixture(name="client")
def redis_client(server: RedisUnderTest) -> redis.Redis:
    """The fixture ``client``: a connection to ``server``; make more with ``server.connect()``."""
    return server.connect()


# Whether this run leaves the integration tests out (`pytest -m "not integration"`): set by
# conftest.py's pytest_configure, before any test module is loaded.
FAST_PART_ONLY = False


def examples(full: int) -> int:
    """How many examples a property test tries: ``full`` in a run with the integration tests
    (``pytest``, as CI runs it), a quarter of it (at least 20) in a run of the fast part alone,
    which is for quick feedback while working.

    >>> examples(300) == (75 if FAST_PART_ONLY else 300)
    True
    """
    return max(20, full // 4) if FAST_PART_ONLY else full


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    return _wait_until(predicate, timeout, message, interval)


class Cluster(LocalCluster):
    """A :class:`~taskserve.local.LocalCluster` whose parts import this checkout.

    Its ``workdir`` holds the logs and each agent's data dir.
    """

    def __init__(self, workdir: Path, **kwargs: object) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        super().__init__(workdir, env=env, cwd=REPO, **kwargs)  # type: ignore[arg-type]

    @property
    def workdir(self) -> Path:
        return self.log_dir

    def shutdown(self) -> None:
        self.stop_all()


def start_cluster(workdir: Path, agents: tuple[str, ...] = ("node-a",), num_cpus: float = 16,
                  *agent_args: str, redis_data_dir: Optional[Path] = None) -> Cluster:
    """Redis, a controller (``--resync 0.5``) and one agent per node id; this process connected."""
    cluster = Cluster(workdir, redis_data_dir=redis_data_dir)
    try:
        cluster.start_redis()
        taskserve.connect(cluster.url)
        cluster.start_controller("--resync", "0.5")
        for node_id in agents:
            cluster.start_agent(node_id, num_cpus, *agent_args)
    except BaseException:
        cluster.stop_all()
        raise
    return cluster


@contextmanager
def addressed_cluster(workdir: Path, agents: tuple[str, ...] = ("node-a",), num_cpus: float = 16,
                      *agent_args: str) -> Iterator[Cluster]:
    """A test module's own :func:`start_cluster`, named by ``TASKSERVE_ADDRESS`` while it runs.

    On exit it is shut down and ``TASKSERVE_ADDRESS`` is restored (or removed), so the
    session's shared cluster is not disturbed. Example, a module-scoped fixture::

        @pytest.fixture(scope="module")
        def three_nodes(tmp_path_factory):
            with addressed_cluster(tmp_path_factory.mktemp("three"), ("node-a", "node-b", "node-c"), 2) as cluster:
                yield cluster
    """
    cluster = start_cluster(workdir, agents, num_cpus, *agent_args)
    previous = os.environ.get("TASKSERVE_ADDRESS")
    os.environ["TASKSERVE_ADDRESS"] = cluster.url
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if previous is None:
            os.environ.pop("TASKSERVE_ADDRESS", None)
        else:
            os.environ["TASKSERVE_ADDRESS"] = previous


class RequestLoop:
    """Client threads calling ``handle.remote(request_id)`` in a loop, recording every answer.

    Each thread keeps going until :meth:`stop` and until it sent ``minimum`` requests.
    """

    def __init__(self, handle, threads: int = 3, minimum: int = 0) -> None:
        self.handle = handle
        self.minimum = minimum
        self.results: dict[str, object] = {}
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, worker: int) -> None:
        sent = 0
        while not (self._stop.is_set() and sent >= self.minimum):
            request_id = f"{worker}-{sent}"
            try:
                self.results[request_id] = self.handle.remote(request_id).result(timeout=60)
            except BaseException as error:  # recorded; the test asserts there are none
                self.failures.append(error)
            sent += 1

    def __enter__(self) -> "RequestLoop":
        for thread in self._threads:
            thread.start()
        wait_until(lambda: len(self.results) + len(self.failures) >= len(self._threads), timeout=30,
                   message="the request loop to get answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


class OutputLines:
    """The lines a process writes to a pipe, read by a thread as they come, so that a wait
    for one can end at a deadline (a ``readline()`` in a polled predicate blocks for good
    when nothing comes).

    Example::

        process = subprocess.Popen([...], stdout=subprocess.PIPE, text=True)
        output = OutputLines(process.stdout)
        output.wait_for("ready", timeout=30)      # the first unread line containing "ready"
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._unread = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, text: str = "", timeout: float = 30.0) -> str:
        """The next unread line that contains ``text`` (any line for ""); the lines before it
        are read too. Fails, with what came, if the output ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while self._unread < len(self.lines):
                    line = self.lines[self._unread]
                    self._unread += 1
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if self.ended or remaining <= 0:
                    why = "the output ended" if self.ended else f"{timeout:g} s passed"
                    raise AssertionError(f"{why} without a line with {text!r}; it was:\n{''.join(self.lines)}")
                self._changed.wait(remaining)

    def text(self, timeout: float = 30.0) -> str:
        """Everything written, once the pipe is closed (the process ended)."""
        self._reader.join(timeout)
        with self._changed:
            return "".join(self.lines)


def replica_pids(name: str, state: Optional[str] = "RUNNING") -> set[int]:
    status = taskserve.get_deployment(name).status()
    return {r.pid for r in status.replicas if state is None or r.state == state}


@contextmanager
def running_gateway(cluster: Cluster, *args: str) -> Iterator[httpx.Client]:
    """``taskserve gateway`` on a free port, and an httpx client for it."""
    port = free_port()
    name = f"gateway-{port}"
    cluster.start(name, "gateway", "--port", str(port), *args)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def healthy() -> bool:
        try:
            return client.get("/-/healthz").status_code == 200
        except httpx.TransportError:
            assert cluster.processes[name].poll() is None, cluster.logs()
            return False

    try:
        wait_until(healthy, timeout=30, message="the gateway to answer /-/healthz")
        yield client
    finally:
        client.close()
        cluster.stop(name)
