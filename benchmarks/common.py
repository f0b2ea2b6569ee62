"""Shared plumbing of the benchmarks in this package: a throwaway cluster and the report.

Not a benchmark itself. The benchmarks run as modules from the repository root
(``python -m benchmarks.bench_requests``) and import it as
``from benchmarks.common import ...``.

* :func:`bench_main` runs a benchmark's body with a temporary log directory,
  turns SIGTERM into Ctrl-C, removes the logs on success and keeps them (path
  printed) on failure;
* :func:`cluster` starts a :class:`~taskserve.local.LocalCluster`: an embedded
  Redis (no persistence), a controller (``--resync 0.5`` unless told otherwise)
  and one node agent, connects this process and stops everything in order on
  exit (agent first, so it drains its replicas). Further ``taskserve`` parts,
  such as a gateway, are started on the cluster it yields;
* :class:`Child` starts a process that is not a taskserve part (a bare Celery
  worker), stopped on exit;
* :func:`deleted_on_exit` deletes the named deployments on exit, whatever happened;
* :func:`wait_until` (poll with a deadline; no bare sleeps as synchronisation)
  and :func:`log_tail` are those of :mod:`taskserve.local`;
* :func:`split` divides requests into blocks, :func:`cpu_seconds` reads the CPU
  time of processes;
* :func:`print_head` prints the report's head (:func:`machine_lines`, then what
  the benchmark adds, such as :func:`command_line`); :func:`markdown_table` and
  :func:`percentile` format the rest of the report.

Example::

    def body(work_dir: Path) -> None:
        with cluster(work_dir, num_cpus=16) as local, deleted_on_exit(["echo"]):
            print_head(local.url, command_line("bench_echo"))
            ...

    sys.exit(bench_main(body, "bench_echo-"))
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import celery
import kombu
import psutil
import redis

import taskserve
from taskserve.local import START_TIMEOUT_S, LocalCluster, log_tail, wait_until
from taskserve.node.processes import die_with_parent
from taskserve.node.protocol import THREAD_LIMIT_VARS

__all__ = [
    "START_TIMEOUT_S", "STOP_TIMEOUT_S", "THREAD_LIMIT_VARS", "Child", "LocalCluster", "bench_main", "cluster",
    "cluster_environment", "command_line", "cpu_seconds", "deleted_on_exit", "load_average", "log_tail",
    "machine_lines", "markdown_table", "percentile", "print_head", "split", "wait_until",
]

STOP_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- processes


class Child:
    """A process that is not a taskserve part, logging to ``log_path``; a context manager that stops it.

    taskserve's own parts (controller, agent, gateway) are started with
    :meth:`LocalCluster.start` instead.

    Example::

        with Child("celery worker 0", [sys.executable, "-m", "celery", ...], work_dir / "w0.log") as worker:
            ...
            worker.check_alive()    # RuntimeError with its log's tail if it exited
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Optional[dict[str, str]] = None) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,      # Ctrl-C reaches only the benchmark, which stops them in order
                preexec_fn=die_with_parent,  # ...and they go too if the benchmark is killed outright
            )

    def check_alive(self) -> None:
        """``RuntimeError`` with the tail of its log if the process has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; "
                               f"log {self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a graceful stop), then SIGKILL after ``timeout_s``."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def cluster_environment(clear_thread_limits: bool, environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``environ`` (default: this process's environment) for the cluster's parts.

    With ``clear_thread_limits``, without the ``*_NUM_THREADS`` variables: every
    replica then gets taskserve's default of 1 (unless its ``runtime_env`` says
    otherwise), whatever the shell running the benchmark set.

    >>> cluster_environment(True, {"OMP_NUM_THREADS": "4", "PATH": "/bin"})
    {'PATH': '/bin'}
    >>> cluster_environment(False, {"OMP_NUM_THREADS": "4", "PATH": "/bin"})
    {'OMP_NUM_THREADS': '4', 'PATH': '/bin'}
    """
    env = dict(os.environ if environ is None else environ)
    if clear_thread_limits:
        for name in THREAD_LIMIT_VARS:
            env.pop(name, None)
    return env


@contextlib.contextmanager
def cluster(work_dir: Path, num_cpus: float, resync_s: Optional[float] = 0.5,
            clear_thread_limits: bool = True) -> Iterator[LocalCluster]:
    """Redis, a controller and one node agent offering ``num_cpus``; yields the running cluster.

    Its parts log to ``work_dir`` (``controller.log``, ``agent.log``, ...) and
    its address is ``.url``. ``resync_s`` is the controller's ``--resync``
    (``None``: the controller's own default). With ``clear_thread_limits`` the
    parts, so the agent and its replicas, run without the ``*_NUM_THREADS``
    variables of this process (see :func:`cluster_environment`); otherwise they
    inherit them.

    This process is connected to it (``taskserve.connect``). On exit the agent
    stops first (it drains its replicas), then any gateway, the controller, then Redis.
    """
    resync = [] if resync_s is None else ["--resync", str(resync_s)]
    with LocalCluster(work_dir, env=cluster_environment(clear_thread_limits)) as local:
        local.start_redis()
        local.start_controller(*resync)
        local.start_agent(None, num_cpus, data_dir=work_dir / "agent")
        taskserve.connect(local.url)
        yield local


@contextlib.contextmanager
def deleted_on_exit(names: Iterable[str]) -> Iterator[None]:
    """Deletes the deployments ``names`` (those that exist) on exit."""
    try:
        yield
    finally:
        for name in names:
            with contextlib.suppress(taskserve.DeploymentNotFound):
                taskserve.delete_deployment(name, timeout=STOP_TIMEOUT_S)


def raise_keyboard_interrupt(*_: object) -> None:
    """A signal handler that turns the signal (SIGTERM) into Ctrl-C."""
    raise KeyboardInterrupt


def bench_main(body: Callable[[Path], None], prefix: str) -> int:
    """Run ``body(work_dir)``; the exit code. Logs are kept only when it fails."""
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        body(work_dir)
    except KeyboardInterrupt:
        print(f"\ninterrupted; everything was stopped. Logs kept in {work_dir}", file=sys.stderr)
        return 130
    except Exception:
        print(f"\nthe benchmark failed; everything was stopped. Logs kept in {work_dir}", file=sys.stderr)
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- measuring


def split(total: int, parts: int) -> list[int]:
    """``total`` as at most ``parts`` near-equal block sizes (positive unless ``total`` is 0).

    >>> split(10, 3)
    [4, 3, 3]
    >>> split(2, 4)
    [1, 1]
    """
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time the processes ``pids`` have used so far."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


# --------------------------------------------------------------------------- report


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.0
    >>> percentile([float(i) for i in range(1, 21)], 0.9)
    18.0
    """
    index = max(0, min(len(sorted_values) - 1, int(round(fraction * len(sorted_values))) - 1))
    return sorted_values[index]


def machine_lines(address: str, extra: Optional[dict[str, str]] = None) -> list[str]:
    """Lines describing the machine and the versions in use, for the report."""
    with redis.Redis.from_url(address) as client:
        server = client.info("server")
    versions = {
        "taskserve": f"{taskserve.__version__} (git {source_revision()})",
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "redis-server": server["redis_version"],
        **(extra or {}),
    }
    return [
        f"machine:  {os.cpu_count()} cores ({cpu_model()}), {platform.system()} {platform.release()}",
        f"python:   {platform.python_version()} ({sys.executable})",
        "versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"load:     {load_average()} (1/5/15 min) at the start",
    ]


def print_head(address: str, *lines: str, extra: Optional[dict[str, str]] = None) -> None:
    """Print the report's head: :func:`machine_lines` (with ``extra`` versions), then ``lines``.

    Flushed, so that it shows before the first figure is measured. Example::

        print_head(local.url, command_line("bench_idle"), extra={"numpy": numpy.__version__})
    """
    print("\n".join([*machine_lines(address, extra), *lines]), flush=True)


def command_line(module: str, argv: Optional[list[str]] = None) -> str:
    """The report's line naming the command that ran: ``argv`` defaults to this process's arguments.

    >>> command_line("bench_echo", ["--seconds", "2"])
    'command:  python -m benchmarks.bench_echo --seconds 2'
    >>> command_line("bench_echo", [])
    'command:  python -m benchmarks.bench_echo'
    """
    args = sys.argv[1:] if argv is None else argv
    return f"command:  python -m benchmarks.{module} {' '.join(args)}".rstrip()


def source_revision() -> str:
    """``git describe`` of the checkout this package sits in, or "unknown"."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as "0.12 0.34 0.56"."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def markdown_table(header: list[str], rows: list[list[str]], left: int = 1, align: Optional[str] = None) -> str:
    """A Markdown table; the first ``left`` columns left-aligned, the rest right-aligned.

    ``align``, one letter per column (``l`` left, ``r`` right), replaces ``left``.

    >>> print(markdown_table(["a", "b"], [["x", "1"]]))
    | a | b |
    |---|--:|
    | x | 1 |
    >>> print(markdown_table(["n", "a"], [["1", "x"]], align="rl"))
    | n | a |
    |--:|---|
    | 1 | x |
    """
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lefts = [letter == "l" for letter in align] if align is not None else [i < left for i in range(len(widths))]
    if len(lefts) != len(widths):
        raise ValueError(f"align {align!r} does not give one letter for each of {len(widths)} columns")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) if is_left else cell.rjust(w)
                                 for cell, w, is_left in zip(cells, widths, lefts)) + " |"

    rule = "|" + "|".join("-" * (w + 2) if is_left else "-" * (w + 1) + ":"
                          for w, is_left in zip(widths, lefts)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
