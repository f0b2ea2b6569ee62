"""Fixtures: a real redis-server on a free port, a real controller and node agent.

Integration tests share one cluster per test run (``cluster``) and give each of
their deployments a unique name (``unique_name``); tests that break the cluster
on purpose start their own with :func:`start_cluster`.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

import taskserve
from taskserve.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@dataclass
class Cluster:
    """A Redis, a controller and one or more node agents, all real processes."""

    redis: RedisServer
    workdir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.redis.url

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TASKSERVE_ADDRESS"] = self.url
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def start(self, name: str, *args: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "taskserve", *args, "--address", self.url],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**self.env(), **(env or {})},
            cwd=REPO,
        )
        self.processes[name] = process
        return process

    def start_agent(self, node_id: str, num_cpus: float = 16, *extra: str,
                    env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        process = self.start(
            f"agent-{node_id}", "agent", "--node-id", node_id, "--num-cpus", str(num_cpus),
            "--data-dir", str(self.workdir / node_id), *extra, env=env,
        )
        store = taskserve.connect(self.url)
        wait_until(lambda: any(n.node_id == node_id and n.alive for n in store.list_nodes()),
                   timeout=20, message=f"agent {node_id} to register")
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def shutdown(self) -> None:
        for name in sorted(self.processes, key=lambda n: not n.startswith("agent")):
            self.stop(name)
        self.redis.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.workdir.glob("*.log"))


def start_cluster(workdir: Path, agents: tuple[str, ...] = ("node-a",), num_cpus: float = 16,
                  *agent_args: str) -> Cluster:
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(RedisServer().start(), workdir)
    taskserve.connect(cluster.url)
    cluster.start("controller", "controller", "--resync", "0.5")
    for node_id in agents:
        cluster.start_agent(node_id, num_cpus, *agent_args)
    return cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"))
    os.environ["TASKSERVE_ADDRESS"] = started.url
    try:
        yield started
    finally:
        started.shutdown()
        os.environ.pop("TASKSERVE_ADDRESS", None)


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


def replica_pids(name: str, state: Optional[str] = "RUNNING") -> set[int]:
    status = taskserve.get_deployment(name).status()
    return {r.pid for r in status.replicas if state is None or r.state == state}
