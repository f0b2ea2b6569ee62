"""Which cluster a process talks to: the address rules, the per-user registry, `up`'s supervisor."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import taskserve
from taskserve import connection
from taskserve.local import PartSupervisor

from .helpers import REPO


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("TASKSERVE_ADDRESS", raising=False)
    monkeypatch.delenv("TASKSERVE_CLUSTERS_DIR", raising=False)     # the registry under HOME, as users have it
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


NOBODY = 65534


def plant_cluster(directory: Path, owner: int, dir_mode: int = 0o755, lock_mode: int = 0o666,
                  address_mode: int = 0o644):
    """What another local user can leave in a shared directory: a data dir with an address
    of their Redis and a lock they hold, as a running `taskserve up` would have."""
    data = directory / ".taskserve"
    data.mkdir(parents=True)
    (data / "address").write_text("redis://127.0.0.1:6399/0\n")
    (data / "up.lock").touch()
    for path, mode in ((data / "address", address_mode), (data / "up.lock", lock_mode), (data, dir_mode)):
        os.chown(path, owner, owner)
        path.chmod(mode)
    handle = open(data / "up.lock")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root (chown)")
@pytest.mark.integration
def test_a_data_dir_planted_by_another_user_is_ignored_with_one_line_saying_why(home, caplog):
    lock = plant_cluster(Path.cwd(), NOBODY)
    with pytest.raises(taskserve.TaskserveError, match="no taskserve cluster address"):
        connection.find_cluster()
    assert not connection.up_is_running(Path.cwd() / ".taskserve")
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 1 and f"belongs to uid {NOBODY}, not to you" in ignored[0], ignored
    # What the issue saw: `taskserve status` reporting the planted address, `call` reaching it.
    env = {**os.environ, "HOME": str(home / "home"), "PYTHONPATH": str(REPO)}
    env.pop("TASKSERVE_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "taskserve", "status"], cwd=Path.cwd(), env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "6399" not in run.stdout + run.stderr
    assert "no taskserve cluster address" in run.stderr
    assert [line for line in run.stderr.splitlines() if "ignoring" in line] == [
        f"taskserve: ignoring {Path.cwd() / '.taskserve'}: it belongs to uid {NOBODY}, not to you (uid 0); "
        "only files you own that no other user may write are trusted"]
    # `up` does not write its password into another user's directory either.
    run = subprocess.run([sys.executable, "-m", "taskserve", "up", "--data-dir", ".taskserve"], cwd=Path.cwd(),
                         env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 1 and "cannot be used: it belongs to uid 65534" in run.stderr, run.stderr
    lock.close()


def test_a_lock_or_address_file_other_users_may_write_is_ignored(home, caplog):
    lock = plant_cluster(Path.cwd(), os.geteuid(), lock_mode=0o666, address_mode=0o600)
    with pytest.raises(taskserve.TaskserveError, match="no taskserve cluster address"):
        connection.find_cluster()
    assert any("up.lock: other users may write it (mode 666)" in r.getMessage() for r in caplog.records)
    (Path.cwd() / ".taskserve" / "up.lock").chmod(0o644)
    (Path.cwd() / ".taskserve" / "address").chmod(0o622)
    with pytest.raises(taskserve.TaskserveError, match="no taskserve cluster address"):
        connection.find_cluster()
    assert any("address: other users may write it (mode 622)" in r.getMessage() for r in caplog.records)
    (Path.cwd() / ".taskserve" / "address").chmod(0o600)
    assert connection.find_cluster().url == "redis://127.0.0.1:6399/0"     # the owner's own: trusted
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


@pytest.mark.integration
def test_an_address_without_its_password_says_so_and_where_the_password_is(home):
    # Issue: it said "cannot reach Redis ... (Authentication required.); is the cluster up?".
    from taskserve.errors import redact_address
    from taskserve.redis_server import RedisServer, generate_password

    with RedisServer(password=generate_password()) as server:
        bare = redact_address(server.url)
        assert bare != server.url
        with pytest.raises(taskserve.RedisUnavailable) as caught:
            connection.connect(bare)
        message = str(caught.value)
        assert f"Redis at {bare} needs a password, and this address has none" in message
        assert "is the cluster up" not in message and server.password not in message
        assert "the file `address` in its data dir" in message       # where a `taskserve up` keeps it
        # The address of a running `taskserve up`: its address file, by name.
        lock = hold_up_lock(home / "a")
        connection.register_cluster(server.url, home / "a")
        with pytest.raises(taskserve.RedisUnavailable, match=rf"is in {home / 'a' / 'address'} "):
            connection.connect(bare)
        wrong = server.url.replace(server.password, "not-the-password")
        with pytest.raises(taskserve.RedisUnavailable, match=rf"Redis at {bare} refused the password of this address"):
            connection.connect(wrong)
        lock.close()
