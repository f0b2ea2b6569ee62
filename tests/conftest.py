"""Fixtures: a real redis-server on a free port, a real controller and node agent.

Integration tests share one cluster per test run (``cluster``) and give each of
their deployments a unique name (``unique_name``); tests that break the cluster
on purpose start their own with :func:`tests.helpers.start_cluster`. Every test
that uses a cluster is marked ``integration`` automatically, so
``pytest -m "not integration"`` runs the fast part alone.

A test that starts a process (a subprocess, a fork) or binds a TCP port of its own
without being marked ``integration`` fails, naming what it started
(:class:`LaunchWatch`): being marked is what keeps such tests out of the fast part.

The tests run in parallel (pytest-xdist, ``-n auto`` in pyproject.toml): each worker is
a process with its own session cluster, Redis ports, temporary directories and
registry of clusters; nothing on disk or in the environment is shared between workers.

The clusters a test's ``taskserve up`` registers go to a temporary directory
(``$TASKSERVE_CLUSTERS_DIR``, set before anything starts and removed at the end), never
to the user's ``~/.taskserve/clusters``, where their own scripts look for the one
running cluster.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from typing import Iterator, Optional

import pytest

import taskserve
from taskserve.connection import CLUSTERS_DIR_ENV
from taskserve.redis_server import RedisServer

from . import helpers
from .helpers import Cluster, start_cluster

# Set whatever the user's environment says: no test's `up` may register where theirs look.
os.environ[CLUSTERS_DIR_ENV] = TEST_CLUSTERS_DIR = tempfile.mkdtemp(prefix="taskserve-test-clusters-")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The fast part alone runs in this process, unless ``-n`` is given on the command line:
    starting workers that each collect every test costs more than they save on 2 cores."""
    asked_for_workers = any(arg == "-n" or arg.startswith(("-n", "--numprocesses"))
                            for arg in config.invocation_params.args)
    if not selects_integration(config.getoption("markexpr")) and not asked_for_workers:
        config.option.numprocesses = 0
        config.option.dist = "no"


def pytest_configure(config: pytest.Config) -> None:
    helpers.FAST_PART_ONLY = not selects_integration(config.getoption("markexpr"))


def selects_integration(markexpr: str) -> bool:
    """Whether ``-m markexpr`` keeps tests marked ``integration``.

    >>> selects_integration(""), selects_integration("not integration"), selects_integration("slow or integration")
    (True, False, True)
    """
    from _pytest.mark.expression import Expression

    return not markexpr or Expression.compile(markexpr).evaluate(lambda name, **_: name == "integration")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(TEST_CLUSTERS_DIR, ignore_errors=True)


# ---- the fault table (tests/faults): made where the fault tests ran, printed once -------------

@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """A pytest-xdist worker finished: keep the rows of the fault table it made."""
    rows = getattr(node, "workeroutput", {}).get("fault_rows", [])
    if rows:
        from .faults.harness import RESULTS, FaultResult

        RESULTS.extend(FaultResult(**row) for row in rows)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    harness = sys.modules.get("tests.faults.harness")
    if harness is None or not harness.RESULTS or hasattr(config, "workeroutput"):
        return
    text = harness.table(harness.RESULTS)
    terminalreporter.section("faults under load")
    terminalreporter.write_line(text)
    path = os.environ.get("TASKSERVE_FAULT_TABLE")
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")

CLUSTER_FIXTURES = {"cluster", "connected", "three_nodes"}
# Fixtures that start a cluster once for a module (the docs' pages, three nodes, the
# autoscaler's own): under pytest-xdist, the tests that use one run on one worker, one
# after the other (`--dist loadgroup`), instead of every worker starting one of its own.
MODULE_CLUSTER_FIXTURES = {"docs_cluster", "three_nodes", "own_cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if CLUSTER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)
        if MODULE_CLUSTER_FIXTURES & fixtures and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


class LaunchWatch:
    """What an unmarked test starts: processes, and TCP ports it binds (a server's).

    An audit hook (:func:`sys.addaudithook`) sees every ``subprocess.Popen``, fork,
    exec and spawn, and every ``bind``, whichever module makes them. It records them
    only while an unmarked test runs, and only from the main thread or from threads
    that test started (a thread an earlier test left running is not this test's).
    A bind to port 0 (an ephemeral port, as :func:`~taskserve.redis_server.free_port`
    asks for) is no server.
    """

    LAUNCHES = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp",
                          "os.system", "os.exec", "os.spawn", "pty.spawn"})

    def __init__(self) -> None:
        self.watching = False
        self.earlier_threads: frozenset[threading.Thread] = frozenset()
        self.seen: list[str] = []

    def audit(self, event: str, args: tuple) -> None:
        if not self.watching or (event not in self.LAUNCHES and event != "socket.bind"):
            return
        thread = threading.current_thread()
        if thread is not threading.main_thread() and thread in self.earlier_threads:
            return
        found = self.describe(event, args)
        if found:
            self.seen.append(found)

    @staticmethod
    def describe(event: str, args: tuple) -> Optional[str]:
        """What the event starts, in a few words (None for a bind that is no server).

        >>> LaunchWatch.describe("subprocess.Popen", ("redis-server", ["redis-server", "--port", "1"], None, None))
        'a process (redis-server --port 1)'
        >>> with socket.socket() as sock:
        ...     LaunchWatch.describe("socket.bind", (sock, ("127.0.0.1", 6379))), LaunchWatch.describe("socket.bind", (sock, ("127.0.0.1", 0)))
        ('a server (binds 127.0.0.1:6379)', None)
        """
        if event == "subprocess.Popen":
            command = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            return f"a process ({' '.join(map(str, command))[:200]})"
        if event == "socket.bind":
            sock, address = args
            if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and address[1]:
                return f"a server (binds {address[0]}:{address[1]})"
            return None
        return f"a process ({event})"

    def start(self, item: pytest.Item) -> None:
        self.seen = []
        self.earlier_threads = frozenset(threading.enumerate())
        self.watching = item.get_closest_marker("integration") is None

    def stop(self) -> None:
        self.watching = False

    def take(self) -> list[str]:
        seen, self.seen = self.seen, []
        return seen


launch_watch = LaunchWatch()
sys.addaudithook(launch_watch.audit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
    launch_watch.start(item)
    try:
        yield
    finally:
        launch_watch.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    started = launch_watch.take()
    if started and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} starts {started[0]}"
            + (f" and {len(started) - 1} more" if len(started) > 1 else "")
            + ' but is not marked integration: mark it @pytest.mark.integration (or its module with'
            ' pytestmark = pytest.mark.integration) so that `pytest -m "not integration"` stays fast'
        )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"))
    os.environ["TASKSERVE_ADDRESS"] = started.url
    try:
        yield started
    finally:
        started.shutdown()
        os.environ.pop("TASKSERVE_ADDRESS", None)


@pytest.fixture(scope="session")
def redis_server_process() -> Iterator[RedisServer]:
    """One real ``redis-server`` (a free port, nothing on disk) for the store's tests that run
    against real Redis (the ``server`` fixture of :mod:`tests.helpers`); each test empties it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def connected(cluster: Cluster) -> Cluster:
    """The shared cluster, with this process connected to it."""
    taskserve.connect(cluster.url)
    return cluster


_counter = itertools.count()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A deployment name no other test uses."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"{base}-{next(_counter)}"
