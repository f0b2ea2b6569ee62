"""Which cluster a process talks to: the address rules, the per-user registry, `up`'s supervisor."""

from __future__ import annotations

import fcntl
import stat
from pathlib import Path

import pytest

import taskserve
from taskserve import connection
from taskserve.local import PartSupervisor


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("TASKSERVE_ADDRESS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def hold_up_lock(data_dir: Path):
    """What a running `taskserve up` holds on its data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "up.lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_explicit_address_beats_the_environment_which_beats_files(home, monkeypatch):
    lock = hold_up_lock(home / "a")
    connection.register_cluster("redis://127.0.0.1:1111/0", home / "a")
    assert connection.find_cluster().url == "redis://127.0.0.1:1111/0"
    monkeypatch.setenv("TASKSERVE_ADDRESS", "redis://127.0.0.1:2222/0")
    assert connection.find_cluster() == connection.ClusterAddress("redis://127.0.0.1:2222/0", "$TASKSERVE_ADDRESS")
    assert connection.find_cluster("redis://127.0.0.1:3333/0").url == "redis://127.0.0.1:3333/0"
    lock.close()


def test_the_data_dir_in_the_current_directory_wins_over_the_users_other_clusters(home):
    locks = [hold_up_lock(home / "elsewhere"), hold_up_lock(Path.cwd() / ".taskserve")]
    connection.register_cluster("redis://127.0.0.1:1111/0", home / "elsewhere")
    connection.register_cluster("redis://127.0.0.1:2222/0", Path.cwd() / ".taskserve")
    found = connection.find_cluster()
    assert found.url == "redis://127.0.0.1:2222/0" and found.source.endswith(".taskserve/address")
    for lock in locks:
        lock.close()


def test_several_running_clusters_are_named_instead_of_picking_one(home):
    locks = [hold_up_lock(home / "a"), hold_up_lock(home / "b")]
    connection.register_cluster("redis://127.0.0.1:1111/0", home / "a")
    connection.register_cluster("redis://127.0.0.1:2222/0", home / "b")
    with pytest.raises(taskserve.TaskserveError, match=r"2 taskserve clusters are up .*--address"):
        connection.find_cluster()
    for lock in locks:
        lock.close()


def test_a_cluster_whose_up_stopped_is_not_reached_and_its_entry_goes(home):
    lock = hold_up_lock(home / "a")
    written = connection.register_cluster("redis://127.0.0.1:1111/0", home / "a")
    lock.close()                                 # `up` died without cleaning up
    with pytest.raises(taskserve.TaskserveError, match="taskserve up"):
        connection.find_cluster()
    assert not written[1].exists()


def test_address_files_are_private_to_their_user(home):
    lock = hold_up_lock(home / "a")
    for path in connection.register_cluster("redis://:secret@127.0.0.1:1111/0", home / "a"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((Path.home() / ".taskserve" / "clusters").stat().st_mode) == 0o700
    lock.close()


def test_unregister_removes_what_register_wrote(home):
    lock = hold_up_lock(home / "a")
    written = connection.register_cluster("redis://127.0.0.1:1111/0", home / "a")
    connection.unregister_cluster(written)
    assert not any(path.exists() for path in written)
    lock.close()


class FakePopen:
    def __init__(self, code=None):
        self.returncode = code

    def poll(self):
        return self.returncode


class FakeCluster:
    """The parts of a LocalCluster the supervisor uses."""

    def __init__(self):
        self.processes = {"controller": FakePopen(), "agent": FakePopen()}
        self.log_dir = Path("/logs")
        self.restarted: list[str] = []

    def exited(self):
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def restart(self, name):
        self.restarted.append(name)
        self.processes[name] = FakePopen()


def test_up_restarts_a_part_that_died_with_a_growing_pause():
    clock = [0.0]
    cluster = FakeCluster()
    supervisor = PartSupervisor(cluster, clock=lambda: clock[0])
    assert supervisor.check() == []
    cluster.processes["agent"] = FakePopen(1)
    lines = supervisor.check()
    assert len(lines) == 1 and "agent exited with code 1; restarting it in 1s" in lines[0]
    assert cluster.restarted == []
    clock[0] = 1.0
    supervisor.check()
    assert cluster.restarted == ["agent"]
    cluster.processes["agent"] = FakePopen(1)             # dies again at once: waits longer
    clock[0] = 1.5
    assert "restarting it in 2s" in supervisor.check()[0]
    clock[0] = 3.0
    supervisor.check()
    assert cluster.restarted == ["agent"]
    clock[0] = 3.5
    supervisor.check()
    assert cluster.restarted == ["agent", "agent"]
    assert "controller" not in cluster.restarted
