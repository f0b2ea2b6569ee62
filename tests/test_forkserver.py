"""The node agent's fork server: its protocol with real forks of a tiny target, the
launcher's fallback to plain spawning, and replicas started through it on a cluster.

The protocol tests start fork servers that preload only ``json`` and run ``tinyjob.py``
(written to a temporary directory): what a child reports about itself is compared
with what ``Popen`` would have given a new process. Every test here starts processes,
so all are integration tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import taskserve
from taskserve.node.forkserver import (
    EXIT_STATUS_LOST,
    FORKSERVER_ENV,
    FORKSERVER_MODULE,
    ForkedProcess,
    ForkServer,
    ForkServerError,
    Launcher,
)
from taskserve.node.protocol import REPLICA_MODULE

from .helpers import REPO, replica_pids, start_cluster, wait_until

pytestmark = pytest.mark.integration

TINYJOB = '''
import ctypes, json, os, signal, sys, time

def main(args):
    kind, out = args[0], args[1]
    if kind == "report":
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        with open(out, "w") as f:
            json.dump({"pid": os.getpid(), "sid": os.getsid(0), "ppid": os.getppid(), "cwd": os.getcwd(),
                       "env": dict(os.environ), "c_omp": (libc.getenv(b"OMP_NUM_THREADS") or b"").decode(),
                       "path": sys.path[:3], "argv": sys.argv, "stdin": os.readlink("/proc/self/fd/0")}, f)
        return int(args[2])
    if kind == "sleep":
        def drained(*_):
            open(out, "w").write("drained")
            sys.exit(0)
        signal.signal(signal.SIGTERM, drained)
        open(out + ".ready", "w").write("ready")
        while True:
            time.sleep(0.05)
    if kind == "raise":
        raise RuntimeError("the target failed")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "tinyjob.py").write_text(TINYJOB)
    return tmp_path / "jobs"


def child_env(job_dir: Path, **extra: str) -> dict[str, str]:
    """This process's environment (what an agent's replicas start from), and ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(job_dir), str(REPO)]), "PYTHONUNBUFFERED": "1",
            **extra}


@pytest.fixture
def server(tmp_path: Path, job_dir: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "ONLY_IN_SERVER": "1"}
    server = ForkServer(sys.executable, tmp_path / "forkserver.log", env=env, preload_modules=("json",))
    server.start()
    yield server
    server.close()


def wait_for_file(path: Path, timeout: float = 10.0) -> None:
    wait_until(path.exists, timeout=timeout, interval=0.01, message=f"{path.name} to be written")


def test_a_child_gets_what_a_new_process_would(server: ForkServer, tmp_path: Path, job_dir: Path):
    out = tmp_path / "report.json"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    log_path = tmp_path / "child.log"
    child = server.spawn("tinyjob:main", ["report", str(out), "7"], env=child_env(job_dir, OMP_NUM_THREADS="3"),
                         cwd=str(workdir), log_path=log_path)
    assert isinstance(child, ForkedProcess)
    assert child.wait(timeout=10) == 7
    report = json.loads(out.read_text())
    assert report["pid"] == child.pid and report["sid"] == child.pid      # a session of its own
    assert report["ppid"] == server.process.pid
    assert report["cwd"] == str(workdir)
    assert report["env"]["OMP_NUM_THREADS"] == "3" and report["c_omp"] == "3"   # C libraries see it too
    assert "ONLY_IN_SERVER" not in report["env"]
    assert report["path"] == [str(workdir), str(job_dir), str(REPO)]     # as `python -m` builds it
    assert report["argv"][1:] == ["report", str(out), "7"] and report["argv"][0].endswith("tinyjob.py")
    assert report["stdin"] == "/dev/null"
    assert log_path.read_text().splitlines() == ["to stdout", "to stderr"]


def test_exit_statuses_and_signals_are_reported(server: ForkServer, tmp_path: Path, job_dir: Path):
    env = child_env(job_dir)
    drained = tmp_path / "drained"
    sleeper = server.spawn("tinyjob:main", ["sleep", str(drained)], env, str(tmp_path), tmp_path / "a.log")
    killed = server.spawn("tinyjob:main", ["sleep", str(tmp_path / "never")], env, str(tmp_path), tmp_path / "b.log")
    failing = server.spawn("tinyjob:main", ["raise", "-"], env, str(tmp_path), tmp_path / "c.log")
    wait_for_file(tmp_path / "drained.ready")
    wait_for_file(tmp_path / "never.ready")
    assert sleeper.poll() is None and killed.poll() is None
    sleeper.send_signal(signal.SIGTERM)
    killed.send_signal(signal.SIGKILL)
    assert sleeper.wait(timeout=10) == 0 and drained.read_text() == "drained"
    assert killed.wait(timeout=10) == -signal.SIGKILL
    assert failing.wait(timeout=10) == 1
    assert "RuntimeError: the target failed" in (tmp_path / "c.log").read_text()
    killed.send_signal(signal.SIGTERM)       # exited: nothing happens, nothing raises


def test_an_exit_report_makes_the_exit_fd_readable_until_it_is_read(server: ForkServer, tmp_path: Path,
                                                                      job_dir: Path):
    import select
    env = child_env(job_dir)
    sleeper = server.spawn("tinyjob:main", ["sleep", str(tmp_path / "s")], env, str(tmp_path), tmp_path / "a.log")
    wait_for_file(tmp_path / "s.ready")
    fd = server.exit_fd()
    assert fd is not None and select.select([fd], [], [], 0.2)[0] == []    # nothing to report: a wait would sleep
    sleeper.send_signal(signal.SIGKILL)
    assert select.select([fd], [], [], 30)[0] == [fd]                     # the report wakes the waiter
    assert server.exit_fd() == fd                                         # ... which reads it
    assert select.select([fd], [], [], 0)[0] == []                        # and waits again
    assert sleeper.poll() == -signal.SIGKILL
    server.close()
    assert server.exit_fd() is None


def test_a_bad_cwd_is_an_error_and_the_server_goes_on(server: ForkServer, tmp_path: Path, job_dir: Path):
    with pytest.raises(OSError, match="does not exist"):
        server.spawn("tinyjob:main", ["raise", "-"], child_env(job_dir), str(tmp_path / "missing"),
                     tmp_path / "x.log")
    child = server.spawn("tinyjob:main", ["report", str(tmp_path / "r.json"), "0"], child_env(job_dir),
                         str(tmp_path), tmp_path / "y.log")
    assert child.wait(timeout=10) == 0


def test_children_drain_when_their_server_dies(server: ForkServer, tmp_path: Path, job_dir: Path):
    drained = tmp_path / "drained"
    child = server.spawn("tinyjob:main", ["sleep", str(drained)], child_env(job_dir), str(tmp_path),
                         tmp_path / "a.log")
    wait_for_file(tmp_path / "drained.ready")
    server.process.kill()
    wait_for_file(drained)                  # its parent-death signal: SIGTERM
    assert child.wait(timeout=10) == EXIT_STATUS_LOST
    assert not server.alive
    with pytest.raises(ForkServerError):
        server.spawn("tinyjob:main", ["raise", "-"], child_env(job_dir), str(tmp_path), tmp_path / "b.log")


def test_a_server_whose_preload_starts_a_thread_refuses_to_serve(tmp_path: Path):
    (tmp_path / "threadstarter.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    server = ForkServer(sys.executable, tmp_path / "fs.log", env=env, preload_modules=("threadstarter",))
    with pytest.raises(ForkServerError, match="thread"):
        server.start(timeout_s=30)
    assert not server.alive


def test_the_launcher_forks_restarts_a_dead_server_and_spawns_what_it_cannot_fork(tmp_path: Path, job_dir: Path):
    launcher = Launcher(tmp_path, enabled=True, preload_modules=("json",))
    try:
        def start(*extra: str, **env: str):
            out = tmp_path / f"r{time.monotonic_ns()}.json"
            log_path = tmp_path / "child.log"
            with open(log_path, "ab") as log_file:
                handle = launcher.start(sys.executable, "tinyjob", ["report", str(out), "0", *extra],
                                        child_env(job_dir, **env), str(tmp_path), log_path, log_file)
            assert handle.wait(timeout=30) == 0
            return handle

        first = start()
        assert isinstance(first, ForkedProcess)
        first_server = first.server
        first_server.process.kill()
        first_server.process.wait()
        second = start()
        assert isinstance(second, ForkedProcess) and second.server is not first_server
        # Read only as an interpreter starts: not forked.
        assert isinstance(start(PYTHONHASHSEED="123"), subprocess.Popen)
    finally:
        launcher.close()


def test_the_launcher_spawns_when_no_server_can_start(tmp_path: Path, job_dir: Path):
    launcher = Launcher(tmp_path, enabled=True, preload_modules=("no_such_module_anywhere",))
    out = tmp_path / "r.json"
    with open(tmp_path / "child.log", "ab") as log_file:
        handle = launcher.start(sys.executable, "tinyjob", ["report", str(out), "5"], child_env(job_dir),
                                str(tmp_path), tmp_path / "child.log", log_file)
    assert isinstance(handle, subprocess.Popen)
    assert handle.wait(timeout=30) == 5
    assert json.loads(out.read_text())["env"]["PYTHONUNBUFFERED"] == "1"
    assert "no_such_module_anywhere" in next(tmp_path.glob("forkserver-*.log")).read_text()
    assert launcher.servers == {}


# --------------------------------------------------------------------------- on a cluster


class Probe:
    def __call__(self) -> dict:
        return {"pid": os.getpid(), "address": os.environ.get("TASKSERVE_ADDRESS"),
                "omp": os.environ.get("OMP_NUM_THREADS")}

    def slow(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def parent_cmdline(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return cmdline(int(stat.rsplit(")", 1)[1].split()[1]))


def check_replicas(url: str, name: str, forked: bool) -> set[int]:
    """The RUNNING replicas of ``name``: the address nowhere on their command lines
    (nor their parent's), started the way ``forked`` says, and serving."""
    pids = replica_pids(name)
    port = url.rsplit(":", 1)[1].split("/")[0]
    for pid in pids:
        line = " ".join(cmdline(pid) + parent_cmdline(pid))
        assert url not in line and port not in line, line
        assert (FORKSERVER_MODULE in cmdline(pid)) is forked, cmdline(pid)
        assert (REPLICA_MODULE in cmdline(pid)) is not forked, cmdline(pid)
    handle = taskserve.get_deployment(name).get_handle()
    answers = [handle.remote().result(timeout=30) for _ in range(4)]
    assert {answer["address"] for answer in answers} == {url}
    assert {answer["omp"] for answer in answers} == {"1"}
    assert {answer["pid"] for answer in answers} <= pids
    return pids


def test_forked_replicas_serve_drain_and_are_seen_dead(connected, unique_name):
    model = taskserve.deployment(Probe).options(name=unique_name, num_replicas=2, version="1",
                                                graceful_shutdown_timeout_s=30)
    model.deploy()
    try:
        pids = check_replicas(connected.url, unique_name, forked=True)
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in replica_pids(unique_name, state=None) and
                   len(replica_pids(unique_name)) == 2, timeout=60, message="the killed replica's replacement")
        # Drained by the agent's SIGTERM: the request it serves is answered.
        model.options(num_replicas=1).deploy()
        [pid] = replica_pids(unique_name)
        slow = model.get_handle().slow.remote(1.5)
        time.sleep(0.3)   # let the replica take it
        deleting = threading.Thread(target=model.delete)
        deleting.start()
        assert slow.result(timeout=30) == pid
        deleting.join(timeout=60)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, message="the drained replica to exit")
    finally:
        if taskserve.list_deployments().get(unique_name) is not None:
            model.delete()


SITECUSTOMIZE = """import sys
if "taskserve.node.forkserver" in sys.orig_argv:
    sys.exit("this environment cannot run a fork server")
"""


@pytest.mark.slow
def test_an_agent_spawns_replicas_when_its_fork_server_cannot_start(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cluster = start_cluster(tmp_path, ())
    try:
        pythonpath = os.pathsep.join([str(tmp_path / "site"), cluster.base_env.get("PYTHONPATH", "")])
        cluster.start_agent("node-a", 4, env={"PYTHONPATH": pythonpath})
        model = taskserve.deployment(Probe).options(name="spawned", num_replicas=2, version="1")
        model.deploy()
        check_replicas(cluster.url, "spawned", forked=False)
        log = (tmp_path / "agent-node-a.log").read_text()
        assert log.count("cannot start a fork server") == 1, log
        model.delete()
    finally:
        cluster.stop_all()


@pytest.mark.slow
def test_an_agent_with_the_fork_server_off_spawns_replicas(tmp_path):
    cluster = start_cluster(tmp_path, ())
    try:
        cluster.start_agent("node-a", 4, env={FORKSERVER_ENV: "0"})
        model = taskserve.deployment(Probe).options(name="plain", num_replicas=1, version="1")
        model.deploy()
        check_replicas(cluster.url, "plain", forked=False)
        assert not list((tmp_path / "node-a" / "logs").glob("forkserver-*.log"))
        model.delete()
    finally:
        cluster.stop_all()

