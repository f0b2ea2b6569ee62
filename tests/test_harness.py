"""The test harness's own rules: an unmarked test that starts a process or a server fails,
and the clusters tests start never register where a user's ``taskserve`` looks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest

from taskserve import connection
from taskserve.connection import CLUSTERS_DIR_ENV

from .conftest import LaunchWatch
from .helpers import REPO, wait_until

POPEN = ("subprocess.Popen", ("/usr/bin/redis-server", ["redis-server", "--port", "7000"], None, None))


class FakeItem:
    def __init__(self, marker: Optional[str]) -> None:
        self.marker = marker

    def get_closest_marker(self, name: str) -> Optional[object]:
        return object() if name == self.marker else None


def test_an_unmarked_test_that_starts_a_process_or_binds_a_port_is_caught():
    watch = LaunchWatch()
    watch.start(FakeItem(None))
    watch.audit(*POPEN)
    watch.audit("os.fork", ())
    with socket.socket() as sock:
        watch.audit("socket.bind", (sock, ("127.0.0.1", 7001)))
        watch.audit("socket.bind", (sock, ("127.0.0.1", 0)))     # an ephemeral port: no server
    watch.audit("open", ("/etc/hosts", "r", 0))
    assert watch.take() == ["a process (redis-server --port 7000)", "a process (os.fork)",
                            "a server (binds 127.0.0.1:7001)"]
    assert watch.take() == []


def test_a_marked_test_may_start_what_it_likes_and_nothing_is_watched_between_tests():
    watch = LaunchWatch()
    watch.start(FakeItem("integration"))
    watch.audit(*POPEN)
    assert watch.take() == []
    watch.start(FakeItem(None))
    watch.stop()
    watch.audit(*POPEN)
    assert watch.take() == []


def test_a_thread_an_earlier_test_left_running_is_not_blamed_on_this_one():
    watch = LaunchWatch()
    go = threading.Event()
    leftover = threading.Thread(target=lambda: go.wait(30) and watch.audit(*POPEN), daemon=True)
    leftover.start()                                       # before this "test" starts
    watch.start(FakeItem(None))
    go.set()
    leftover.join(30)
    assert watch.take() == []
    started_now = threading.Thread(target=lambda: watch.audit(*POPEN))
    started_now.start()
    started_now.join(30)
    assert len(watch.take()) == 1                          # a thread the test started counts


def test_the_watch_is_installed_for_this_run():
    from . import conftest

    assert conftest.launch_watch.watching                  # this very test is unmarked


@pytest.mark.integration
def test_a_tests_up_registers_in_the_runs_own_directory_and_not_in_the_users(tmp_path: Path):
    users = Path.home() / ".taskserve" / "clusters"
    data_dir = (tmp_path / "data").resolve()
    env = {key: value for key, value in os.environ.items() if key != "TASKSERVE_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(tmp_path / "up.log", "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "taskserve", "up", "--data-dir", str(data_dir), "--http-port",
                               "0", "--no-example", "--num-cpus", "1"], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def registered() -> bool:
        try:
            return connection.find_up(data_dir)["data_dir"] == str(data_dir)   # where commands look
        except LookupError:
            return up.poll() is not None

    def naming_data_dir(directory: Path) -> list[Path]:
        return [entry for entry in directory.glob("*.json") if str(data_dir) in entry.read_text()]

    try:
        wait_until(registered, timeout=60, message="taskserve up to register its cluster")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        assert naming_data_dir(users) == []
        assert naming_data_dir(Path(os.environ[CLUSTERS_DIR_ENV])) != []
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
