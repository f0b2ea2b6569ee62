"""The node agent: runs the replica processes the controller assigns to its node.

One agent per machine (or several with distinct ``--node-id``, which is how tests
simulate a cluster). It claims its node id (refusing one whose agent is alive),
registers the node's resources, heartbeats from a thread of its own (so a slow
pass never lets the node expire), and on each pass converges the processes to the
records assigned to it. What to do is decided
by the pure :func:`taskserve.node.plan.plan_node` (every rule is listed there);
this module gathers its inputs and carries its actions out:

- a record that should run and has no process gets one (``STARTING``);
- a record asked to stop gets SIGTERM (``DRAINING``), and SIGKILL after its
  ``graceful_shutdown_timeout_s``;
- a process that exits is recorded as ``STOPPED`` (it was drained) or ``FAILED``
  (its constructor raised, or it crashed); the requests it held are put back on
  their queue at once;
- a record that names this node but was never started by this agent (the agent
  restarted) is recorded as ``STOPPED`` so the controller replaces it.

An error while acting on one replica fails that replica, never the agent; while
Redis is unreachable the replicas keep serving and the agent retries.

Example::

    taskserve agent --address redis://10.0.0.5:6379/0 --num-cpus 8 --node-id gpu-box-1
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Mapping, Optional

import psutil
import redis

from ..connection import ADDRESS_ENV
from ..runtime_env import env_key
from ..signing import check_assignment
from ..state import Node, Replica, ReplicaState, Resources, check_id, package_sha
from ..store import NodeClaim, NodeTaken, Store, wait_for_events
from ..wire import interrupted_stream_end, is_streaming_message
from .envs import EnvironmentCache, unpack_working_dir
from .forkserver import Launcher
from .inflight import read_tags
from .plan import (
    Mark,
    NodeAction,
    ProcessView,
    Reap,
    Restore,
    Signal,
    Spawn,
    adopt,
    claim_verdict,
    heartbeat_interval,
    plan_node,
    renewed,
)
from .processes import ProcessHandle, lock_held
from .protocol import INFLIGHT_FILE_ENV, REPLICA_MODULE, THREAD_LIMIT_VARS

log = logging.getLogger("taskserve.node.agent")

INSTALLING_MESSAGE = "installing runtime env"
DRAINING_POLL_S = 0.05
# Between notifications, a pass runs at least this often when every replica's exit
# wakes the agent by itself (forked ones), and every ``resync_s`` otherwise: the
# passes then only catch a notification that went missing.
IDLE_RESYNC_S = 5.0
REDIS_RETRY_S = 1.0
FAILED_BUILD_MEMORY_S = 30.0   # a failed install is not retried sooner for the same pip list
CLAIM_POLL_S = 0.05


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
    popen: ProcessHandle       # a subprocess.Popen, or a fork server's ForkedProcess
    log_file: IO[bytes]
    inflight_path: Path
    graceful_timeout_s: float
    drain_deadline: Optional[float] = None
    killed: bool = False

    def view(self) -> ProcessView:
        """This process as the plan sees it (polled now)."""
        return ProcessView(
            replica_id=self.replica_id,
            exit_code=self.popen.poll(),
            drain_deadline=self.drain_deadline,
            killed=self.killed,
            graceful_timeout_s=self.graceful_timeout_s,
        )


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
        idle_resync_s: float = IDLE_RESYNC_S,
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
        self.idle_resync_s = max(idle_resync_s, resync_s)
        self.processes: dict[str, ManagedProcess] = {}
        self.orphans: dict[str, Path] = {}     # in-flight files an earlier agent's replicas left
        self.envs = EnvironmentCache(self.data_dir / "envs")
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="runtime-env")
        self.builds: dict[str, Future] = {}
        self.build_finished: dict[str, float] = {}
        self.stopping = threading.Event()
        self.left = threading.Event()         # set once the node is unregistered: heartbeats end
        self.node_lost = False                # another agent holds the node id now
        self.malformed: set[str] = set()      # records already reported as unreadable
        self.claim = NodeClaim(pid=os.getpid(), host=socket.gethostname(), token=secrets.token_hex(8))
        self.launcher = Launcher(self.log_dir)
        # _wake() writes here: the main loop's wait (up to IDLE_RESYNC_S) ends at once.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    @property
    def node(self) -> Node:
        return Node(
            node_id=self.node_id,
            total=self.resources,
            labels=self.labels,
            hostname=socket.gethostname(),
            agent_pid=os.getpid(),
            heartbeat_ttl_s=self.heartbeat_ttl_s,
            log_dir=str(self.log_dir.resolve()),
        )

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`stop`, then drain every replica.

        Raises :class:`~taskserve.store.NodeTaken` at once, touching nothing, if
        another live agent runs this node id.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.take_node()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        try:
            self._adopt()
            self._find_orphans()
            log.info("node agent %s up: %s", self.node_id, self.resources)
            pubsub = self.store.subscribe()
        except BaseException:
            self.left.set()
            raise
        try:
            while not self.stopping.is_set():
                try:
                    self.reconcile()
                    wait_for_events(pubsub, self._wait_s(), also=[self._wake_read, *self.launcher.exit_fds()])
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 512)
                except redis.RedisError as error:
                    # Replicas keep serving what they hold; the agent catches up once Redis is back.
                    log.warning("Redis is unreachable (%s); retrying in %.0fs", error, REDIS_RETRY_S)
                    self.stopping.wait(REDIS_RETRY_S)
                except Exception:
                    # Errors on one replica are handled in reconcile(); this is the last resort,
                    # so that nothing but stop() ends the loop (and drains the node).
                    log.exception("reconcile pass of node %s failed; retrying", self.node_id)
                    self.stopping.wait(REDIS_RETRY_S)
        finally:
            try:
                pubsub.close()
            except redis.RedisError:
                pass
            self.shutdown()

    def stop(self) -> None:
        """Drain and leave; safe from a signal handler and from another thread."""
        self.stopping.set()
        self._wake()

    def _wake(self) -> None:
        """End the main loop's wait now, for a pass (or the stop) at once; from any thread."""
        with contextlib.suppress(OSError):   # full (a wake-up is pending anyway) or closed
            os.write(self._wake_write, b"\0")

    def _wait_s(self) -> float:
        """How long the next wait for a notification may last.

        Notifications wake the agent for every record change, and a forked replica's
        exit wakes it through its fork server; the rest is polled: a drain's deadline
        (fast), and a spawned replica's exit or an orphan's end (every ``resync_s``).
        """
        processes = self.processes.values()
        if any(process.drain_deadline is not None for process in processes):
            return DRAINING_POLL_S
        if self.orphans or not all(self.launcher.reports_exit(process.popen) for process in processes):
            return self.resync_s
        return self.idle_resync_s

    # ------------------------------------------------------------------ the node id

    def take_node(self) -> None:
        """Claim the node id for this agent and register the node.

        The claim of an agent that died is replaced at once when its process is gone
        from this host; one of another host is waited for (at most its remaining
        TTL) to expire. A claim that is renewed meanwhile, or whose process runs
        here, belongs to a live agent: :class:`~taskserve.store.NodeTaken`.
        """
        replacing: Optional[NodeClaim] = None
        for _ in range(10):   # each round the holder changed; more is a fight over the id
            try:
                self.store.register_node(self.node, self.heartbeat_ttl_s, self.claim, replacing=replacing)
                return
            except NodeTaken as taken:
                holder = taken.holder
                here = holder.host == self.claim.host and holder.pid is not None
                verdict = claim_verdict(here, _agent_running(holder.pid) if here and holder.pid else None)
                if verdict == "refuse" or (verdict == "replace" and replacing == holder):
                    raise
                if verdict == "replace":
                    log.info("node %s was held by %s, which is gone; taking it over", self.node_id, holder.describe())
                    replacing = holder
                    continue
                self._wait_for_expiry(taken)
        raise RuntimeError(f"node {self.node_id}: other agents keep claiming it; pick another --node-id")

    def _wait_for_expiry(self, taken: NodeTaken) -> None:
        """Wait until the claim ``taken`` names is gone or changed; raise ``taken`` if it
        is renewed (its agent heartbeats) or outlives its TTL."""
        log.info("node %s is held by %s; waiting for it to expire (or to heartbeat)",
                 self.node_id, taken.holder.describe())
        claim, pttl_ms = self.store.node_claim(self.node_id)
        deadline = time.monotonic() + pttl_ms / 1000 + 1.0
        while claim is not None and claim.text == taken.holder.text:
            if time.monotonic() > deadline or self.stopping.wait(CLAIM_POLL_S):
                raise taken
            claim, later_ms = self.store.node_claim(self.node_id)
            if claim is not None and claim.text == taken.holder.text and renewed(pttl_ms, later_ms, CLAIM_POLL_S):
                raise taken
            pttl_ms = later_ms

    def _heartbeat_loop(self) -> None:
        """Keep the node alive until it is unregistered, whatever the main loop does.

        After an outage of Redis (or a restart that lost the key) the node is
        registered again at once. If another agent holds the node id now, this agent
        stops, leaving the node and its records to that one.
        """
        interval = heartbeat_interval(self.heartbeat_ttl_s)
        unreachable = False
        while not self.left.wait(interval):
            try:
                if not self.store.heartbeat_node(self.node_id, self.heartbeat_ttl_s, self.claim):
                    log.warning("node %s had expired (Redis was unreachable or lost it); registering again",
                                self.node_id)
                    self.store.register_node(self.node, self.heartbeat_ttl_s, self.claim)
                if unreachable:
                    log.info("node %s heartbeats again", self.node_id)
                unreachable = False
            except NodeTaken as error:
                log.error("%s; this agent stops and leaves its replicas' records to it", error)
                self.node_lost = True
                self.stop()
                return
            except redis.RedisError as error:
                if not unreachable:
                    log.warning("node %s cannot heartbeat: Redis is unreachable (%s); retrying", self.node_id, error)
                unreachable = True
            except Exception:
                log.exception("heartbeat of node %s failed; retrying", self.node_id)

    # ------------------------------------------------------------------ passes

    def _adopt(self) -> None:
        """Records left on this node by an earlier agent have no process any more."""
        self._carry_out(adopt(self._records(), self._views()), {})
        self.store.notify(f"node:{self.node_id}")

    def reconcile(self) -> None:
        """One pass: plan from the records and the processes, then act."""
        self._restore_orphans()
        records = self._records()
        actions = plan_node(records, self._views(), time.monotonic())
        if self._carry_out(actions, records):
            self.store.notify(f"node:{self.node_id}")

    def _views(self) -> list[ProcessView]:
        return [process.view() for process in self.processes.values()]

    def _records(self) -> dict[str, Replica]:
        """This node's records. One that cannot be read is failed and left out."""
        try:
            return {r.replica_id: r for r in self.store.replicas_on_node(self.node_id)}
        except redis.RedisError:
            raise
        except Exception:
            pass  # a malformed record: read them one by one to find it
        records = {}
        for replica_id in self.store.replica_ids_on_node(self.node_id):
            try:
                record = self.store.get_replica(replica_id)
            except redis.RedisError:
                raise
            except Exception as error:
                if replica_id not in self.malformed:
                    self.malformed.add(replica_id)
                    log.exception("the record of replica %s cannot be read", replica_id)
                    self._fail(replica_id, "start", f"malformed replica record: {_one_line(error)}")
                continue
            if record is not None:
                records[replica_id] = record
        return records

    # ------------------------------------------------------------------ actions

    def _carry_out(self, actions: Iterable[NodeAction], records: Mapping[str, Replica]) -> bool:
        """Carry out ``actions`` one by one; True if a record or a process changed.

        An action that raises fails its replica (and is logged); the others still
        run. A Redis error stops the pass: the next one retries.
        """
        changed = False
        for action in actions:
            try:
                changed |= self._act(action, records)
            except redis.RedisError:
                raise
            except Exception as error:
                log.exception("replica %s: %s failed", action.replica_id, type(action).__name__)
                if isinstance(action, Spawn):
                    self._fail(action.replica_id, "start", f"could not start the replica process: {_one_line(error)}")
                else:
                    self._fail(action.replica_id, "crash",
                               f"node agent error ({type(action).__name__}): {_one_line(error)}")
                changed = True
        return changed

    def _act(self, action: NodeAction, records: Mapping[str, Replica]) -> bool:
        if isinstance(action, Spawn):
            return self._spawn(records[action.replica_id])
        if isinstance(action, Signal):
            return self._signal(action)
        if isinstance(action, Mark):
            return self._mark(action)
        if isinstance(action, Restore):
            process = self.processes.get(action.replica_id)
            if process is not None:
                self._restore_inflight(process)
            return False
        if isinstance(action, Reap):
            return self._reap(action.replica_id)
        raise TypeError(f"unknown node action {action!r}")

    def _signal(self, action: Signal) -> bool:
        process = self.processes.get(action.replica_id)
        if process is None:
            return False
        if action.kind == "term":
            process.drain_deadline = action.drain_deadline
            log.info("draining replica %s", process.replica_id)
            _signal(process.popen, signal.SIGTERM)
            return True
        process.killed = True
        log.warning("replica %s did not drain within %.0fs; killing it", process.replica_id, process.graceful_timeout_s)
        _signal(process.popen, signal.SIGKILL)
        return False

    def _mark(self, action: Mark) -> bool:
        fields = action.fields()
        if action.message_from_log:
            fields["message"] = self._start_failure_message(action.replica_id)
        if action.failure == "crash":
            log.warning("replica %s died (%s)", action.replica_id, action.message)
        self.store.update_replica(action.replica_id, **fields)
        return True

    def _start_failure_message(self, replica_id: str) -> str:
        """The replica's own account (its traceback, in its record), else its log's tail."""
        fresh = self.store.get_replica(replica_id)
        if fresh is not None and fresh.message:
            return fresh.message
        return _log_tail(self.replica_file(replica_id, ".log"))

    def _reap(self, replica_id: str) -> bool:
        process = self.processes.pop(replica_id, None)
        if process is None:
            return False
        with contextlib.suppress(OSError):
            process.log_file.close()
        with contextlib.suppress(OSError):
            process.inflight_path.unlink()
        return True

    def _fail(self, replica_id: str, failure: str, message: str) -> None:
        """Record a replica the agent could not act on as FAILED (if it can)."""
        try:
            self.store.update_replica(replica_id, state=ReplicaState.FAILED, failure=failure, message=message)
        except Exception as error:
            log.warning("could not record replica %s as failed (%s)", replica_id, error)

    # ------------------------------------------------------------------ processes

    def _spawn(self, record: Replica) -> bool:
        """Start the replica's process, unless its runtime env is still building.

        Returns True if the record changed.
        """
        check_id(record.replica_id)     # the plan refuses such a record already; never a path from it
        config = json.loads(record.config)
        runtime_env = config.get("runtime_env") or {}
        try:
            python = self._python_for(record, runtime_env.get("pip"))
            if python is None:
                return False
            working_dir = self._working_dir_for(runtime_env)
        except redis.RedisError:
            raise                 # not the replica's fault: retried once Redis is back
        except Exception as error:  # the install or the unpack failed: a failed start
            self.store.update_replica(record.replica_id, state=ReplicaState.FAILED, failure="start",
                                      message=str(error))
            return True
        log_path = self.replica_file(record.replica_id, ".log")
        inflight_path = self.replica_file(record.replica_id, ".inflight")
        env = replica_environment(dict(os.environ), config, record.gpu_id_list)
        env[INFLIGHT_FILE_ENV] = str(inflight_path.resolve())
        env[ADDRESS_ENV] = self.address      # never on the command line: every user can read that
        if working_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(working_dir), env.get("PYTHONPATH")]))
        graceful_timeout_s = float(config.get("graceful_shutdown_timeout_s") or 20)
        log_file = open(log_path, "ab")
        try:
            popen = self.launcher.start(str(python), REPLICA_MODULE, ["--replica-id", record.replica_id], env=env,
                                        cwd=str(working_dir or os.getcwd()), log_path=log_path, log_file=log_file)
        except BaseException:
            log_file.close()
            raise
        self.processes[record.replica_id] = ManagedProcess(
            replica_id=record.replica_id,
            deployment=record.deployment,
            popen=popen,
            log_file=log_file,
            inflight_path=inflight_path,
            graceful_timeout_s=graceful_timeout_s,
        )
        self.store.update_replica(record.replica_id, state=ReplicaState.STARTING, pid=popen.pid, message="")
        log.info("started replica %s (pid %s), log %s", record.replica_id, popen.pid, log_path)
        return True

    def replica_file(self, replica_id: str, suffix: str) -> Path:
        """``<log dir>/<replica id><suffix>``; ``ValueError`` for an id that is not one
        taskserve writes (a record written by hand under ``../../x`` writes nowhere)."""
        return self.log_dir / f"{check_id(replica_id)}{suffix}"

    def _python_for(self, record: Replica, pip: Optional[list[str]]) -> Optional[Path]:
        """The Python to run the replica with; None while its environment builds."""
        # Nothing is installed, unpacked or started for code that is not signed as run so.
        check_assignment(self.store.get_code, record.deployment, record.code_sha, record.config)
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
        self._wake()   # its replicas can start now

    def _working_dir_for(self, runtime_env: dict) -> Optional[Path]:
        sha = package_sha(runtime_env)
        if sha is None:
            return None
        return unpack_working_dir(self.data_dir / "working_dirs", sha, lambda: self.store.get_code(sha))

    def _restore_inflight(self, process: ManagedProcess) -> None:
        # A replica killed because it did not drain in time handed its requests back: a
        # job longer than graceful_shutdown_timeout_s runs again elsewhere, and that is not
        # a crash counted against max_deliveries.
        self._restore_file(process.replica_id, process.inflight_path, count=not process.killed)

    def _restore_file(self, replica_id: str, inflight_path: Path, count: bool = True) -> None:
        """Put the requests a dead replica held back on its queue, to be served next,
        and count them as redelivered (unless ``count`` is False).

        Never raises: while Redis is unreachable the requests stay unacknowledged, and
        the controller puts them back once it forgets the replica.
        """
        try:
            tags = read_tags(inflight_path)
        except Exception as error:
            log.warning("could not read what replica %s held (%s)", replica_id, error)
            return
        try:
            restored, interrupted = self.store.restore_held(replica_id, tags, count=count, drop=is_streaming_message)
        except Exception as error:
            log.warning("could not put back the request(s) replica %s held (%s); the controller puts them "
                        "back when it forgets the replica", replica_id, error)
            return
        if restored:
            log.info("put back %d request(s) replica %s held when it died", len(restored), replica_id)
        for task_id in interrupted:
            # A stream is not run again: its caller learns at once that it ended.
            try:
                self.store.end_stream(task_id, interrupted_stream_end())
                log.info("stream %s interrupted: its replica died", task_id)
            except Exception as error:
                log.warning("could not end stream %s (%s)", task_id, error)

    def _find_orphans(self) -> None:
        """Note the in-flight files an earlier agent's replicas left behind.

        Their requests go back on their queues once those replicas are gone (a
        replica whose agent died drains, and may still be finishing them).
        """
        for path in sorted(self.log_dir.glob("*.inflight")):
            if path.stem not in self.processes:
                self.orphans[path.stem] = path

    def _restore_orphans(self) -> None:
        if not self.orphans:
            return
        alive = _replica_ids_running()
        for replica_id, path in list(self.orphans.items()):
            if replica_id in alive or lock_held(path):
                continue
            self._restore_file(replica_id, path)
            path.unlink(missing_ok=True)
            del self.orphans[replica_id]

    def shutdown(self) -> None:
        """Drain every replica (within their graceful timeouts), then leave the cluster.

        Works without Redis too: the processes are drained either way. The node
        heartbeats until it leaves, so its draining replicas are not replaced
        meanwhile. An agent whose node id another agent took leaves the records
        and the node to that one.
        """
        try:
            self._drain_and_leave()
        finally:
            self.left.set()

    def _drain_and_leave(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        while self.processes:
            # Without records every process is drained (SIGKILL once its graceful
            # timeout is over), and reaped once it exited.
            try:
                self._carry_out(plan_node({}, self._views(), time.monotonic()), {})
            except redis.RedisError as error:
                log.warning("Redis is unreachable while draining (%s)", error)
            if self.processes:
                time.sleep(DRAINING_POLL_S)
        self.launcher.close()
        if self.node_lost:
            log.info("node agent %s stopped (node %s belongs to another agent now)", self.node_id, self.node_id)
            return
        try:
            for record in self._records().values():
                if not record.is_gone:
                    self.store.update_replica(record.replica_id, state=ReplicaState.STOPPED,
                                              message="its node agent stopped")
            self.left.set()    # no heartbeat may register the node again once it left
            self.store.unregister_node(self.node_id, self.claim)
        except redis.RedisError as error:
            log.warning("could not record the shutdown in Redis (%s); the node will expire", error)
        log.info("node agent %s stopped", self.node_id)


def _agent_running(pid: int) -> bool:
    """Whether ``pid`` is a live process of this host that may be a taskserve agent."""
    if pid == os.getpid():
        # Our own pid in a claim is a predecessor's: a restarted container numbers its
        # processes from 1 again, keeping its hostname.
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return any("taskserve" in part for part in process.cmdline())
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def _replica_ids_running() -> set[str]:
    """The replica ids of the spawned replica processes running on this machine (by their
    command line; a forked one is found by the lock on its in-flight file instead)."""
    ids = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if REPLICA_MODULE in cmdline and "--replica-id" in cmdline:
            index = cmdline.index("--replica-id")
            if index + 1 < len(cmdline):
                ids.add(cmdline[index + 1])
    return ids


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


def _signal(popen: ProcessHandle, signum: int) -> None:
    try:
        popen.send_signal(signum)
    except ProcessLookupError:
        pass


def _one_line(error: BaseException) -> str:
    """An error as one line, for a record's message.

    >>> _one_line(ValueError("illegal environment variable name\\nmore"))
    'ValueError: illegal environment variable name'
    """
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
