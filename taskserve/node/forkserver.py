"""A fork server: a process with the replica's libraries imported, forking replicas.

Most of a replica's half-second start is spent importing (Celery, kombu, redis,
cloudpickle, taskserve). A fork server pays that once: the node agent starts one per
Python interpreter (lazily, at its first replica), it imports :data:`PRELOAD` and
then forks a child per replica, which starts with all of that already loaded.

The child gets what ``subprocess.Popen`` would have given it: a new session, the
parent-death signal (SIGTERM, as every replica; the fork server itself dies with the
agent, so a replica still drains when its agent dies), its own environment in
``os.environ`` before any user code runs (thread limits, ``CUDA_VISIBLE_DEVICES``),
its own ``sys.path`` (its cwd, then its ``PYTHONPATH``), cwd, stdin from /dev/null,
stdout and stderr to its log file, and ``sys.argv``. Nothing that touches a GPU is
preloaded, and the server checks it runs no thread before it forks.

A replica whose environment changes something only read when an interpreter starts
(``PYTHONHASHSEED``, ``LD_PRELOAD`` ...) cannot be forked faithfully:
:func:`forkable` says so, and the agent spawns it the plain way.

Protocol: one JSON object per message on a ``SOCK_SEQPACKET`` Unix socket pair.
The server says ``{"op": "ready"}`` once its imports are done; the agent asks
``{"op": "spawn", "id": 1, "target": "module:function", "args": [...], "env": {...},
"cwd": ..., "log": ...}`` and gets ``{"op": "spawned", "id": 1, "pid": ...}`` or
``{"op": "error", "id": 1, "message": ...}``; every exit of a child is reported as
``{"op": "exit", "pid": ..., "code": ...}`` (``Popen.returncode``'s convention: minus
the signal's number for a signal).

Example::

    server = ForkServer(sys.executable, Path("/tmp/forkserver.log"))
    server.start()
    child = server.spawn("taskserve.node.replica:main", ["--replica-id", "echo-1a2b"],
                         env=env, cwd="/srv", log_path=Path("/tmp/echo-1a2b.log"))
    child.pid, child.poll()          # (12345, None) while it runs
    child.send_signal(signal.SIGTERM)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional

from .processes import ProcessHandle, die_with_parent

log = logging.getLogger("taskserve.node.forkserver")

FORKSERVER_MODULE = "taskserve.node.forkserver"

# What a fork server imports before it forks anything. Never a GPU library: CUDA
# cannot be used in a child forked after it was initialised.
PRELOAD = (
    "cloudpickle",
    "redis",
    "kombu",
    "kombu.transport.redis",
    "celery",
    "celery.backends.redis",
    "celery.worker",
    "celery.apps.worker",
    "celery.concurrency.solo",
    "celery.concurrency.thread",
    # ... and what a worker imports as it starts (found by diffing sys.modules in a replica)
    "billiard.pool",
    "celery.app.control",
    "celery.app.events",
    "celery.app.log",
    "celery.events",
    "celery.fixups.django",
    "celery.worker.autoscale",
    "celery.worker.components",
    "celery.worker.consumer.delayed_delivery",
    "celery.worker.strategy",
    "encodings.idna",
    "kombu.matcher",
    "kombu.mixins",
    "kombu.pidbox",
    "taskserve.node.replica",
)

# Environment variables an interpreter (or the dynamic loader) reads only when it
# starts: a child whose value differs from its fork server's must be spawned.
STARTUP_ONLY_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_")
# ... except these, which a fork server child applies itself.
APPLIED_IN_CHILD = frozenset({"PYTHONPATH", "PYTHONUNBUFFERED"})

MAX_MESSAGE_BYTES = 1 << 20
START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0   # a fork takes milliseconds: a server this late is stuck


class ForkServerError(RuntimeError):
    """The fork server could not start, or stopped answering."""


def forkable(env: dict[str, str], server_env: dict[str, str]) -> Optional[str]:
    """None if a child with ``env`` can be forked from a server started with
    ``server_env``; else the name of a variable only a new interpreter would apply.

    >>> forkable({"PYTHONPATH": "/app", "OMP_NUM_THREADS": "1"}, {})
    >>> forkable({"PYTHONHASHSEED": "0"}, {})
    'PYTHONHASHSEED'
    """
    for name in sorted(env.keys() | server_env.keys()):
        if name.startswith(STARTUP_ONLY_PREFIXES) and name not in APPLIED_IN_CHILD \
                and env.get(name) != server_env.get(name):
            return name
    return None


# --------------------------------------------------------------------------- messages


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"fork server message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}; "
                         "is the replica's environment that large?")
    sock.sendall(data)


def receive_message(sock: socket.socket) -> Optional[dict[str, Any]]:
    """The next message; None at the end of the stream (the other side is gone)."""
    data = sock.recv(MAX_MESSAGE_BYTES)
    return json.loads(data) if data else None


# --------------------------------------------------------------------------- the server


@dataclass
class ChildJob:
    """What a forked child runs once the server's loop is left behind."""

    target: str
    args: list[str]


class Server:
    """The fork server's loop: fork a child per request, report every exit."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # sys.path's head as this interpreter built it: its cwd, then its PYTHONPATH.
        self.path_head = sys.path[:1 + len(_pythonpath_entries(os.environ.get("PYTHONPATH", "")))]
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        self.children: set[int] = set()

    def serve(self) -> Optional[ChildJob]:
        """Serve until the agent closes the socket (None); in a child, its job."""
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # only to wake select()
        send_message(self.sock, {"op": "ready", "pid": os.getpid()})
        while True:
            readable, _, _ = select.select([self.sock, self.wake_read], [], [])
            if self.wake_read in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_read, 512)
            self._reap()
            if self.sock in readable:
                request = receive_message(self.sock)
                if request is None:
                    return None
                job = self._handle(request)
                if job is not None:
                    return job

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 255 << 8
            if done:
                self.children.discard(pid)
                send_message(self.sock, {"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def _handle(self, request: dict[str, Any]) -> Optional[ChildJob]:
        request_id = request.get("id")
        try:
            if request.get("op") != "spawn":
                raise ValueError(f"unknown request {request.get('op')!r}; the agent and fork server differ")
            cwd = str(request["cwd"])
            if not os.path.isdir(cwd):
                raise FileNotFoundError(f"the replica's working directory {cwd} does not exist")
            pid = os.fork()
        except Exception as error:
            send_message(self.sock, {"op": "error", "id": request_id, "message": f"{type(error).__name__}: {error}"})
            return None
        if pid:
            self.children.add(pid)
            send_message(self.sock, {"op": "spawned", "id": request_id, "pid": pid})
            return None
        try:
            self._become_child(request)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        return ChildJob(target=str(request["target"]), args=[str(arg) for arg in request.get("args", [])])

    def _become_child(self, request: dict[str, Any]) -> None:
        """Give this forked process what ``Popen`` would have given a new one."""
        server_pid = os.getppid()
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        die_with_parent(signal.SIGTERM)
        if os.getppid() != server_pid:
            os._exit(0)          # the server (so the agent) died meanwhile: as if drained at once
        self.sock.close()
        os.close(self.wake_read)
        os.close(self.wake_write)
        log_fd = os.open(str(request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        os.chdir(str(request["cwd"]))
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        os.environ.clear()           # through unsetenv/putenv: C libraries see it too
        os.environ.update(env)
        head = [os.getcwd(), *_pythonpath_entries(env.get("PYTHONPATH", ""))]
        if sys.path[:len(self.path_head)] == self.path_head:
            sys.path[:len(self.path_head)] = head
        else:
            sys.path[:0] = head
        importlib.invalidate_caches()
        module = str(request["target"]).partition(":")[0]
        spec = importlib.util.find_spec(module)   # where `python -m module` would find it
        module_file = (spec.origin if spec is not None else None) or module
        sys.argv = [module_file, *[str(arg) for arg in request.get("args", [])]]


def _pythonpath_entries(value: str) -> list[str]:
    """The ``sys.path`` entries an interpreter makes of ``PYTHONPATH`` (absolute, in order).

    >>> _pythonpath_entries("/a::/b")
    ['/a', '/b']
    """
    return [os.path.abspath(entry) for entry in value.split(os.pathsep) if entry]


def _run_job(job: ChildJob) -> Any:
    module_name, _, function_name = job.target.partition(":")
    function: Callable[[list[str]], Any] = getattr(importlib.import_module(module_name), function_name or "main")
    return function(job.args)


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    """Import ``modules``; refuse to serve if that started a thread (forking a process
    with threads copies their locks in whatever state they were)."""
    for name in modules:
        importlib.import_module(name)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    if threads != 1:
        raise ForkServerError(f"preloading {', '.join(modules)} started {threads - 1} thread(s); "
                              "a process with threads cannot fork safely")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {FORKSERVER_MODULE}")
    parser.add_argument("--fd", type=int, required=True, help="this end of the agent's socket pair")
    parser.add_argument("--parent", type=int, default=None, help="the agent's pid: exit if it is gone")
    parser.add_argument("--preload", default=",".join(PRELOAD), help="modules to import, comma-separated")
    args = parser.parse_args(argv)
    die_with_parent(signal.SIGKILL)   # its children drain on their own parent-death signal
    if args.parent is not None and os.getppid() != args.parent:
        return 0                      # the agent died before the line above
    server = Server(socket.socket(fileno=args.fd))
    preload(tuple(name for name in args.preload.split(",") if name))
    job = server.serve()
    if job is None:
        return 0
    # A forked child: run its job as a new interpreter would run its main module.
    return _run_job(job)


# --------------------------------------------------------------------------- the agent's side


class ForkServer:
    """The agent's end of one fork server process (one per Python interpreter)."""

    def __init__(self, python: str, log_path: Path, env: Optional[dict[str, str]] = None,
                 preload_modules: tuple[str, ...] = PRELOAD) -> None:
        self.python = python
        self.log_path = Path(log_path)
        self.env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        self.preload_modules = preload_modules
        self.process: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.exits: dict[int, int] = {}
        self.next_id = 0
        self.lock = threading.Lock()
        self.closed = False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until its imports are done.

        Raises :class:`ForkServerError` with its log's tail if it does not get there.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file, theirs:
            self.process = subprocess.Popen(
                [self.python, "-m", FORKSERVER_MODULE, "--fd", str(theirs.fileno()), "--parent", str(os.getpid()),
                 *([] if self.preload_modules == PRELOAD else ["--preload", ",".join(self.preload_modules)])],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a Ctrl-C in the agent's terminal must not reach it
            )
        self.sock = ours
        try:
            message = self._receive(timeout_s)
        except ForkServerError:
            self.close()
            raise
        if message is None or message.get("op") != "ready":
            self.close()
            raise ForkServerError(f"fork server of {self.python} did not start: {_tail(self.log_path)}")

    @property
    def alive(self) -> bool:
        return not self.closed and self.process is not None and self.process.poll() is None

    def spawn(self, target: str, args: list[str], env: dict[str, str], cwd: str, log_path: Path) -> "ForkedProcess":
        """Fork a child running ``target(args)`` (``"module:function"``).

        Raises :class:`ForkServerError` if the server is gone, ``OSError`` if it
        could not fork (a bad cwd, no memory).
        """
        with self.lock:
            if not self.alive or self.sock is None:
                raise ForkServerError(f"the fork server of {self.python} is not running")
            self.next_id += 1
            request_id = self.next_id
            try:
                send_message(self.sock, {"op": "spawn", "id": request_id, "target": target, "args": args,
                                         "env": env, "cwd": cwd, "log": str(log_path)})
            except OSError as error:
                self._lost()
                raise ForkServerError(f"the fork server of {self.python} is gone ({error})") from error
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while True:
                message = self._receive(max(0.0, deadline - time.monotonic()))
                if message is None:
                    self._lost()
                    raise ForkServerError(f"the fork server of {self.python} exited: {_tail(self.log_path)}")
                if message.get("id") != request_id:
                    continue          # an exit report: kept by _receive
                if message.get("op") == "error":
                    raise OSError(message.get("message", "the fork server could not fork"))
                return ForkedProcess(self, int(message["pid"]))

    def returncode(self, pid: int) -> Optional[int]:
        """The exit code of child ``pid`` once it was reported, else None."""
        with self.lock:
            if pid not in self.exits:
                self._read_reports()
            return self.exits.get(pid)

    def _read_reports(self) -> None:
        """Record every exit report waiting on the socket (the caller holds the lock)."""
        if self.sock is not None and not self.closed:
            with contextlib.suppress(ForkServerError):
                while self._receive(0.0, poll=True) is not None:
                    pass

    def exit_fd(self) -> Optional[int]:
        """A descriptor that turns readable at the next exit report (or when the server
        goes), once the reports already sent are read; None once the server is gone.

        The agent waits on it, so that a replica's exit wakes it at once.
        """
        with self.lock:
            self._read_reports()
            return None if self.closed or self.sock is None else self.sock.fileno()

    def _receive(self, timeout_s: float, poll: bool = False) -> Optional[dict[str, Any]]:
        """The next message, recording exit reports. None: nothing waiting (``poll``),
        or the server is gone."""
        assert self.sock is not None
        while True:
            readable, _, _ = select.select([self.sock], [], [], timeout_s)
            if not readable:
                if poll:
                    return None
                self._lost()
                raise ForkServerError(f"the fork server of {self.python} did not answer within "
                                      f"{timeout_s:.0f}s: {_tail(self.log_path)}")
            try:
                message = receive_message(self.sock)
            except OSError:
                message = None
            if message is None:
                self._lost()
                return None
            if message.get("op") == "exit":
                self.exits[int(message["pid"])] = int(message["code"])
                if poll:
                    return message
                continue
            return message

    def _lost(self) -> None:
        """The server is gone (or stuck): stop it and use no more of it."""
        self.closed = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """Stop the server. Children it forked get their parent-death signal (they drain)."""
        self._lost()
        if self.sock is not None:
            self.sock.close()


class ForkedProcess:
    """A fork server's child as the agent sees it: the part of ``Popen`` it uses.

    Its exit code comes from the server. If the server died first, the child got
    its parent-death signal (SIGTERM: it drains); once it is gone its exit code is
    :data:`EXIT_STATUS_LOST`.
    """

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: Optional[int] = None
        try:
            self.pidfd: Optional[int] = os.pidfd_open(pid)   # signals can never reach a reused pid
        except (AttributeError, OSError):
            self.pidfd = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.returncode(self.pid)
            if self.returncode is None and self.server.closed and self._gone():
                self.returncode = EXIT_STATUS_LOST
            if self.returncode is not None and self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
        return self.returncode

    def _gone(self) -> bool:
        if self.pidfd is not None:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            return bool(readable)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def send_signal(self, signum: int) -> None:
        if self.poll() is not None:
            return
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, signum)
        else:
            os.kill(self.pid, signum)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the exit code (polling); ``subprocess.TimeoutExpired`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode


# The exit code of a fork server's child whose server died before it (its status went with it).
EXIT_STATUS_LOST = 255


class Launcher:
    """Starts the node's replica processes: forked by the fork server of their
    interpreter, else spawned with ``subprocess.Popen`` (the fallback).

    Each interpreter's server starts at its first replica. One that died is started
    again at the next replica; one that cannot start is logged once, and its
    interpreter's replicas are spawned until :data:`RETRY_START_S` passed.
    ``enabled=False`` (or ``TASKSERVE_FORKSERVER=0``) spawns every replica.

    Example::

        launcher = Launcher(Path(".taskserve/logs"))
        handle = launcher.start(sys.executable, "taskserve.node.replica", ["--replica-id", "echo-1"],
                                env=env, cwd=os.getcwd(), log_path=path, log_file=open(path, "ab"))
        handle.pid, handle.poll()
    """

    def __init__(self, log_dir: Path, enabled: Optional[bool] = None,
                 preload_modules: tuple[str, ...] = PRELOAD) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = forkserver_enabled() if enabled is None else enabled
        self.preload_modules = preload_modules
        self.servers: dict[str, ForkServer] = {}
        self.failed_at: dict[str, float] = {}

    def start(self, python: str, module: str, args: list[str], env: dict[str, str], cwd: str,
              log_path: Path, log_file: IO[bytes]) -> ProcessHandle:
        """Run ``python -m module *args``'s ``main(args)`` as a new replica process.

        Raises ``ValueError`` for an environment no process can have, either way.
        """
        check_environment(env)
        server = self._server(python) if self.enabled else None
        if server is not None and forkable(env, server.env) is None:
            try:
                return server.spawn(f"{module}:main", args, env, cwd, log_path)
            except ForkServerError as error:
                log.warning("the fork server of %s failed (%s); spawning this replica", python, error)
        return subprocess.Popen(
            [python, "-m", module, *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the agent's terminal must not reach replicas
        )

    def _server(self, python: str) -> Optional[ForkServer]:
        server = self.servers.get(python)
        if server is not None and server.alive:
            return server
        if server is not None:
            log.warning("the fork server of %s exited; starting another", python)
            server.close()
            del self.servers[python]
        if time.monotonic() - self.failed_at.get(python, -RETRY_START_S) < RETRY_START_S:
            return None
        digest = hashlib.sha256(python.encode()).hexdigest()[:8]
        server = ForkServer(python, self.log_dir / f"forkserver-{digest}.log", preload_modules=self.preload_modules)
        started = time.monotonic()
        try:
            server.start()
        except (ForkServerError, OSError) as error:
            self.failed_at[python] = time.monotonic()
            log.warning("cannot start a fork server for %s (%s); spawning its replicas for the next %.0fs",
                        python, error, RETRY_START_S)
            return None
        self.failed_at.pop(python, None)
        self.servers[python] = server
        assert server.process is not None
        log.info("fork server of %s ready in %.2fs (pid %s)", python, time.monotonic() - started, server.process.pid)
        return server

    def reports_exit(self, handle: ProcessHandle) -> bool:
        """Whether ``handle``'s exit makes one of :meth:`exit_fds` readable: it was
        forked by a server that still runs (a spawned process's exit is only polled)."""
        return isinstance(handle, ForkedProcess) and not handle.server.closed

    def exit_fds(self) -> list[int]:
        """The descriptors to wait on for the next exit of a forked replica."""
        fds = (server.exit_fd() for server in self.servers.values())
        return [fd for fd in fds if fd is not None]

    def close(self) -> None:
        """Stop every fork server (their children, if any are left, drain)."""
        for server in self.servers.values():
            server.close()
        self.servers.clear()


# How long an interpreter whose fork server could not start spawns its replicas.
RETRY_START_S = 60.0

# Set to 0 (or false, no, off) in the agent's environment to spawn every replica.
FORKSERVER_ENV = "TASKSERVE_FORKSERVER"


def check_environment(env: dict[str, str]) -> None:
    """Raise ``ValueError`` (as ``Popen`` would) for a variable no environment can hold.

    >>> check_environment({"A=B": "1"})
    Traceback (most recent call last):
    ...
    ValueError: illegal environment variable name 'A=B': a name holds no '=' and no NUL byte
    """
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"illegal environment variable name {name!r}: a name holds no '=' and no NUL byte")
        if "\0" in value:
            raise ValueError(f"illegal value of environment variable {name}: it holds a NUL byte")


def forkserver_enabled(environ: Optional[dict[str, str]] = None) -> bool:
    """Whether ``TASKSERVE_FORKSERVER`` leaves the fork server on (the default).

    >>> forkserver_enabled({}), forkserver_enabled({"TASKSERVE_FORKSERVER": "0"})
    (True, False)
    """
    value = (os.environ if environ is None else environ).get(FORKSERVER_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


if __name__ == "__main__":
    sys.exit(main())
