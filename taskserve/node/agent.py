"""The node agent: runs the replica processes the controller assigns to its node.

One agent per machine (or several with distinct ``--node-id``, which is how tests
simulate a cluster). It registers the node's resources, heartbeats, and on each
pass converges the processes to the records assigned to it:

- a record that should run and has no process gets one (``STARTING``);
- a record asked to stop gets SIGTERM (``DRAINING``), and SIGKILL after its
  ``graceful_shutdown_timeout_s``;
- a process that exits is recorded as ``STOPPED`` (it was drained) or ``FAILED``
  (its constructor raised, or it crashed); the request a crashed replica was
  serving is put back on its queue at once;
- a record that names this node but was never started by this agent (the agent
  restarted) is recorded as ``STOPPED`` so the controller replaces it.

Example::

    taskserve agent --address redis://10.0.0.5:6379/0 --num-cpus 8 --node-id gpu-box-1
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

import psutil
import redis

from ..celery_app import make_app
from ..runtime_env import env_key
from ..state import Node, Replica, ReplicaState, Resources, package_sha
from ..store import Store, wait_for_events
from .envs import EnvironmentCache, unpack_working_dir
from .inflight import read_tags
from .protocol import EXIT_CONSTRUCTOR_FAILED, INFLIGHT_FILE_ENV, REPLICA_MODULE, THREAD_LIMIT_VARS

log = logging.getLogger("taskserve.node.agent")

INSTALLING_MESSAGE = "installing runtime env"
DRAINING_POLL_S = 0.05
REDIS_RETRY_S = 1.0
FAILED_BUILD_MEMORY_S = 30.0   # a failed install is not retried sooner for the same pip list


def replica_environment(base: dict[str, str], config: dict, gpu_ids: list[int]) -> dict[str, str]:
    """The environment of a replica process.

    The agent's own environment, with each thread limit defaulting to 1, then the
    deployment's ``runtime_env["env_vars"]`` over it (later wins). The GPUs the
    replica holds are its ``CUDA_VISIBLE_DEVICES`` (empty for a CPU replica),
    counted within the agent's own ``CUDA_VISIBLE_DEVICES`` when that is set.

    >>> env = replica_environment({"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "2,3"},
    ...                           {"runtime_env": {"env_vars": {"A": "b"}}}, gpu_ids=[1])
    >>> env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["A"], env["CUDA_VISIBLE_DEVICES"]
    ('4', '1', 'b', '3')
    """
    env = dict(base)
    for name in THREAD_LIMIT_VARS:
        env.setdefault(name, "1")
    env_vars = ((config.get("runtime_env") or {}).get("env_vars")) or {}
    env.update(env_vars)
    node_gpus = [item for item in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        node_gpus[gpu_id] if gpu_id < len(node_gpus) else str(gpu_id) for gpu_id in gpu_ids
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ManagedProcess:
    replica_id: str
    deployment: str
    popen: subprocess.Popen
    log_file: IO[bytes]
    inflight_path: Path
    graceful_timeout_s: float
    drain_deadline: Optional[float] = None
    killed: bool = False


class NodeAgent:
    """Keeps this node's replica processes matching their records in Redis."""

    def __init__(
        self,
        store: Store,
        address: str,
        node_id: Optional[str] = None,
        resources: Optional[Resources] = None,
        labels: Optional[dict[str, str]] = None,
        data_dir: Path = Path(".taskserve"),
        heartbeat_ttl_s: float = 10.0,
        resync_s: float = 0.5,
    ) -> None:
        self.store = store
        self.address = address
        self.node_id = node_id or socket.gethostname()
        self.resources = resources or default_resources()
        self.labels = labels or {}
        self.data_dir = Path(data_dir)
        self.log_dir = self.data_dir / "logs"
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.resync_s = resync_s
        self.processes: dict[str, ManagedProcess] = {}
        self.envs = EnvironmentCache(self.data_dir / "envs")
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="runtime-env")
        self.builds: dict[str, Future] = {}
        self.build_finished: dict[str, float] = {}
        self.stopping = threading.Event()
        self._celery_app = None

    @property
    def node(self) -> Node:
        return Node(
            node_id=self.node_id,
            total=self.resources,
            labels=self.labels,
            hostname=socket.gethostname(),
            agent_pid=os.getpid(),
        )

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`stop`, then drain every replica."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.store.register_node(self.node, self.heartbeat_ttl_s)
        self._adopt_nothing()
        log.info("node agent %s up: %s", self.node_id, self.resources)
        pubsub = self.store.subscribe()
        next_heartbeat = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    now = time.monotonic()
                    if now >= next_heartbeat:
                        if not self.store.heartbeat_node(self.node_id, self.heartbeat_ttl_s):
                            log.warning("node %s had expired; registering again", self.node_id)
                            self.store.register_node(self.node, self.heartbeat_ttl_s)
                        next_heartbeat = now + min(1.0, self.heartbeat_ttl_s / 4)
                    self.reconcile()
                    # A draining replica's exit is noticed by polling, so poll faster meanwhile.
                    draining = any(p.drain_deadline is not None for p in self.processes.values())
                    wait_for_events(pubsub, DRAINING_POLL_S if draining else self.resync_s)
                except redis.RedisError as error:
                    # Replicas keep serving what they hold; the agent catches up once Redis is back.
                    log.warning("Redis is unreachable (%s); retrying in %.0fs", error, REDIS_RETRY_S)
                    self.stopping.wait(REDIS_RETRY_S)
        finally:
            try:
                pubsub.close()
            except redis.RedisError:
                pass
            self.shutdown()

    def stop(self) -> None:
        self.stopping.set()

    def _adopt_nothing(self) -> None:
        """Records left on this node by an earlier agent have no process any more."""
        for record in self.store.replicas_on_node(self.node_id):
            if not record.is_gone:
                self.store.update_replica(
                    record.replica_id, state=ReplicaState.STOPPED,
                    message="its node agent restarted; the process is gone",
                )
        self.store.notify(f"node:{self.node_id}")

    def reconcile(self) -> None:
        records = {r.replica_id: r for r in self.store.replicas_on_node(self.node_id)}
        changed = self._reap_exited(records)
        for replica_id, record in records.items():
            process = self.processes.get(replica_id)
            if record.desired == "run":
                if process is None and record.state == ReplicaState.PENDING:
                    changed |= self._spawn(record)
                elif process is None and record.state in (ReplicaState.STARTING, ReplicaState.RUNNING,
                                                          ReplicaState.RECONFIGURING, ReplicaState.DRAINING):
                    # Recorded as alive, but this agent has no such process.
                    self.store.update_replica(replica_id, state=ReplicaState.STOPPED, message="process not found on its node")
                    changed = True
            else:
                if process is not None:
                    changed |= self._drain(process, record)
                elif not record.is_gone:
                    self.store.update_replica(replica_id, state=ReplicaState.STOPPED)
                    changed = True
        # Processes whose record the controller already forgot.
        for replica_id, process in list(self.processes.items()):
            if replica_id not in records:
                self._drain(process, None)
        if changed:
            self.store.notify(f"node:{self.node_id}")

    # ------------------------------------------------------------------ processes

    def _spawn(self, record: Replica) -> bool:
        """Start the replica's process, unless its runtime env is still building.

        Returns True if the record changed.
        """
        config = json.loads(record.config)
        runtime_env = config.get("runtime_env") or {}
        try:
            python = self._python_for(record, runtime_env.get("pip"))
            if python is None:
                return False
            working_dir = self._working_dir_for(runtime_env)
        except Exception as error:  # the install or the unpack failed: a failed start
            self.store.update_replica(record.replica_id, state=ReplicaState.FAILED, failure="start",
                                      message=str(error))
            return True
        log_path = self.log_dir / f"{record.replica_id}.log"
        log_file = open(log_path, "ab")
        inflight_path = self.log_dir / f"{record.replica_id}.inflight"
        env = replica_environment(dict(os.environ), config, record.gpu_id_list)
        env[INFLIGHT_FILE_ENV] = str(inflight_path.resolve())
        if working_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(working_dir), env.get("PYTHONPATH")]))
        popen = subprocess.Popen(
            [str(python), "-m", REPLICA_MODULE, "--address", self.address, "--replica-id", record.replica_id],
            env=env,
            cwd=working_dir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the agent's terminal must not reach replicas
        )
        self.processes[record.replica_id] = ManagedProcess(
            replica_id=record.replica_id,
            deployment=record.deployment,
            popen=popen,
            log_file=log_file,
            inflight_path=inflight_path,
            graceful_timeout_s=float(config.get("graceful_shutdown_timeout_s") or 20),
        )
        self.store.update_replica(record.replica_id, state=ReplicaState.STARTING, pid=popen.pid, message="")
        log.info("started replica %s (pid %s), log %s", record.replica_id, popen.pid, log_path)
        return True

    def _python_for(self, record: Replica, pip: Optional[list[str]]) -> Optional[Path]:
        """The Python to run the replica with; None while its environment builds."""
        if not pip:
            return Path(sys.executable)
        key = env_key(pip)
        if self.envs.ready(key):
            return self.envs.python_of(key)
        build = self.builds.get(key)
        if build is not None and build.done() and build.exception() is not None \
                and time.monotonic() - self.build_finished.get(key, 0) > FAILED_BUILD_MEMORY_S:
            build = None  # try a failed install again after a while
        if build is None:
            build = self.executor.submit(self.envs.ensure, pip, lambda line: log.info("[env %s] %s", key, line))
            build.add_done_callback(lambda _: self._build_done(key))
            self.builds[key] = build
        if not build.done():
            if record.message != INSTALLING_MESSAGE:
                self.store.update_replica(record.replica_id, message=INSTALLING_MESSAGE)
            return None
        return build.result()     # raises the installer's error

    def _build_done(self, key: str) -> None:
        self.build_finished[key] = time.monotonic()
        self.store.notify(f"node:{self.node_id}")   # wakes this agent's loop too

    def _working_dir_for(self, runtime_env: dict) -> Optional[Path]:
        sha = package_sha(runtime_env)
        if sha is None:
            return None
        return unpack_working_dir(self.data_dir / "working_dirs", sha, lambda: self.store.get_code(sha))

    def _drain(self, process: ManagedProcess, record: Optional[Replica]) -> bool:
        now = time.monotonic()
        if process.drain_deadline is None:
            process.drain_deadline = now + process.graceful_timeout_s
            _signal(process.popen, signal.SIGTERM)
            if record is not None and record.state != ReplicaState.DRAINING:
                self.store.update_replica(process.replica_id, state=ReplicaState.DRAINING)
            log.info("draining replica %s", process.replica_id)
            return True
        if now >= process.drain_deadline and not process.killed:
            log.warning("replica %s did not drain within %.0fs; killing it", process.replica_id, process.graceful_timeout_s)
            _signal(process.popen, signal.SIGKILL)
            process.killed = True
        return False

    def _reap_exited(self, records: dict[str, Replica]) -> bool:
        changed = False
        for replica_id, process in list(self.processes.items()):
            code = process.popen.poll()
            if code is None:
                continue
            del self.processes[replica_id]
            process.log_file.close()
            changed = True
            record = records.get(replica_id)
            drained = process.drain_deadline is not None
            if not drained or process.killed:
                self._restore_inflight(process)
            try:
                process.inflight_path.unlink()
            except FileNotFoundError:
                pass
            if record is None:
                continue
            if drained:
                state, failure, message = ReplicaState.STOPPED, "", ""
            elif code == EXIT_CONSTRUCTOR_FAILED or record.state in (ReplicaState.PENDING, ReplicaState.STARTING):
                # It never served: a failed start, whether its constructor raised or not.
                fresh = self.store.get_replica(replica_id)
                state, failure = ReplicaState.FAILED, "start"
                message = fresh.message if fresh and fresh.message else _log_tail(self.log_dir / f"{replica_id}.log")
            else:
                state, failure = ReplicaState.FAILED, "crash"
                message = f"replica process exited with code {code}"
                log.warning("replica %s died (exit code %s)", replica_id, code)
            self.store.update_replica(replica_id, state=state, failure=failure, message=message)
            records[replica_id] = Replica.from_fields({**record.to_fields(), "state": state.value, "failure": failure})
        return changed

    def _restore_inflight(self, process: ManagedProcess) -> None:
        """Put the message a dead replica was serving back at the head of its queue."""
        tags = read_tags(process.inflight_path)
        if not tags:
            return
        if self._celery_app is None:
            self._celery_app = make_app(self.address)
        with self._celery_app.connection_for_write() as connection:
            for tag in tags:
                connection.default_channel.qos.restore_by_tag(tag, leftmost=True)
        log.info("put back %d request(s) replica %s held when it died", len(tags), process.replica_id)

    def shutdown(self) -> None:
        """Drain every replica (within their graceful timeouts), then leave the cluster.

        Works without Redis too: the processes are drained either way.
        """
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in list(self.processes.values()):
            self._drain(process, None)
        while self.processes:
            for replica_id, process in list(self.processes.items()):
                if process.popen.poll() is None:
                    self._drain(process, None)       # SIGKILL once its graceful timeout is over
                    continue
                del self.processes[replica_id]
                process.log_file.close()
                if process.killed:
                    try:
                        self._restore_inflight(process)
                    except redis.RedisError as error:
                        log.warning("could not put back what %s held (%s)", replica_id, error)
            time.sleep(DRAINING_POLL_S)
        try:
            for record in self.store.replicas_on_node(self.node_id):
                if not record.is_gone:
                    self.store.update_replica(record.replica_id, state=ReplicaState.STOPPED,
                                              message="its node agent stopped")
            self.store.unregister_node(self.node_id)
        except redis.RedisError as error:
            log.warning("could not record the shutdown in Redis (%s); the node will expire", error)
        log.info("node agent %s stopped", self.node_id)


def default_resources() -> Resources:
    """What this machine offers: its cores, its GPUs (``nvidia-smi -L``), its memory."""
    return Resources(
        num_cpus=float(os.cpu_count() or 1),
        num_gpus=float(_count_gpus()),
        memory=int(psutil.virtual_memory().total),
    )


def _count_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _signal(popen: subprocess.Popen, signum: int) -> None:
    try:
        popen.send_signal(signum)
    except ProcessLookupError:
        pass



def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
