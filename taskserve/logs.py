"""Finding and reading replica logs: what ``taskserve logs NAME`` prints.

A node agent writes each replica's output (its prints, its logging, a failed
constructor's traceback) to ``<agent data dir>/logs/<replica id>.log`` on its
machine, and records that directory in its node record (``Node.log_dir``). A log on
this machine is read; one on another machine is named (``HOST:PATH``) for you to
fetch.

Example::

    for item in replica_logs("echo"):
        print(item.replica_id, item.path or item.problem)
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import api
from .connection import current_store
from .state import check_id

# Bytes read from the end of a log to find its last lines.
TAIL_WINDOW_BYTES = 1 << 20
FOLLOW_INTERVAL_S = 0.25
REFRESH_INTERVAL_S = 2.0


@dataclass(frozen=True)
class ReplicaLog:
    """Where one replica's log is; ``problem`` says why it cannot be read here."""

    replica_id: str
    path: Optional[Path]
    problem: str = ""


def replica_logs(name: str, replica_id: Optional[str] = None) -> list[ReplicaLog]:
    """The logs of ``name``'s replicas (or of the one ``replica_id``).

    A replica that has exited has no record any more: its log is looked for in the
    log directories of the nodes on this machine. Raises ``LookupError`` naming the
    replicas when ``replica_id`` is none of them.
    """
    if replica_id is not None:
        check_id(replica_id)
    snapshot = api.deployment_status(name)
    nodes = {node.node_id: node for node in current_store().list_nodes()}
    here = socket.gethostname()
    replicas = [r for r in snapshot.replicas if replica_id is None or r.replica_id == replica_id]
    if replica_id is not None and not replicas:
        for node in nodes.values():
            path = Path(node.log_dir) / f"{replica_id}.log" if node.log_dir else None
            if path is not None and node.hostname == here and path.is_file():
                return [ReplicaLog(replica_id, path)]
        known = ", ".join(r.replica_id for r in snapshot.replicas) or "none"
        raise LookupError(f"deployment {name!r} has no replica {replica_id!r} and no log of one on this "
                          f"machine; its replicas: {known}")
    found = []
    for replica in replicas:
        node = nodes.get(replica.node_id)
        try:
            check_id(replica.replica_id)    # it becomes a file name below
        except ValueError as error:
            found.append(ReplicaLog(replica.replica_id, None, f"{error}: its log is not read"))
            continue
        if not replica.node_id:
            found.append(ReplicaLog(replica.replica_id, None, "not placed on a node yet (PENDING), so no log"))
        elif node is None:
            found.append(ReplicaLog(replica.replica_id, None, f"its node {replica.node_id} is gone, with its log"))
        elif not node.log_dir:
            found.append(ReplicaLog(replica.replica_id, None,
                                    f"the agent of node {node.node_id} does not say where its logs are; look in "
                                    f"<its --data-dir>/logs/{replica.replica_id}.log on {node.hostname or 'it'}"))
        elif node.hostname != here:
            path = Path(node.log_dir) / f"{replica.replica_id}.log"
            found.append(ReplicaLog(replica.replica_id, None,
                                    f"runs on another machine (node {node.node_id}): its log is {node.hostname}:{path}"))
        else:
            path = Path(node.log_dir) / f"{replica.replica_id}.log"
            found.append(ReplicaLog(replica.replica_id, path,
                                    "" if path.is_file() else f"no log at {path} yet"))
    return found


def last_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last ``count`` lines of the file at ``path`` and its size (where to follow from).

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as handle:
    ...     _ = handle.write("one\\ntwo\\nthree\\n")
    >>> last_lines(Path(handle.name), 2)
    (['two', 'three'], 14)
    """
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if count == 0:
            return [], size
        start = max(0, size - TAIL_WINDOW_BYTES)
        handle.seek(start)
        lines = handle.read(size - start).decode("utf-8", errors="replace").splitlines()
    if start > 0:
        lines = lines[1:]       # the first may be cut
    return lines[-count:], size


class LogFollower:
    """Prints the tails of some logs, then what is written to them (``tail -f``)."""

    def __init__(self, logs: list[ReplicaLog], tail: int, emit: Callable[[str], None], prefix: bool) -> None:
        self.tail = tail
        self.emit = emit
        self.prefix = prefix
        self.offsets: dict[str, int] = {}
        self.paths: dict[str, Path] = {item.replica_id: item.path for item in logs if item.path is not None}
        self.partial: dict[str, bytes] = {}

    def _line(self, replica_id: str, line: str) -> None:
        self.emit(f"[{replica_id}] {line}" if self.prefix else line)

    def print_tails(self) -> None:
        for replica_id, path in self.paths.items():
            lines, size = last_lines(path, self.tail)
            for line in lines:
                self._line(replica_id, line)
            self.offsets[replica_id] = size

    def follow(self, refresh: Callable[[], list[ReplicaLog]]) -> None:
        """Print new lines until interrupted; ``refresh`` finds replicas started since."""
        refreshed = time.monotonic()
        while True:
            for replica_id, path in list(self.paths.items()):
                self._read_new(replica_id, path)
            if time.monotonic() - refreshed > REFRESH_INTERVAL_S:
                refreshed = time.monotonic()
                for item in refresh():
                    if item.path is not None and item.replica_id not in self.paths:
                        self.paths[item.replica_id] = item.path
                        self.offsets[item.replica_id] = 0     # a new replica: its log from the start
            time.sleep(FOLLOW_INTERVAL_S)

    def _read_new(self, replica_id: str, path: Path) -> None:
        try:
            with open(path, "rb") as handle:
                handle.seek(self.offsets.get(replica_id, 0))
                data = handle.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.offsets[replica_id] = self.offsets.get(replica_id, 0) + len(data)
        data = self.partial.pop(replica_id, b"") + data
        *complete, rest = data.split(b"\n")
        if rest:
            self.partial[replica_id] = rest
        for line in complete:
            self._line(replica_id, line.decode("utf-8", errors="replace"))
