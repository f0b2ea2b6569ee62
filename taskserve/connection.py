"""Finding the cluster's Redis and keeping one connection to it per process.

Which cluster a process talks to, first match wins:

1. the ``address`` argument (``connect(address)``, ``--address``);
2. ``$TASKSERVE_ADDRESS``;
3. ``./.taskserve/address``: the cluster ``taskserve up`` runs with the data dir in the
   current directory (only while that ``up`` runs);
4. this user's running clusters, which each ``taskserve up`` registers under
   ``~/.taskserve/clusters/`` while it runs: used when there is exactly one; with
   several, an error lists them and asks for ``--address`` or a directory.

Address files are mode 0600 and belong to one user: another user's ``up`` never
changes which cluster yours reaches.

Example::

    taskserve.connect("redis://127.0.0.1:6379/0")
    describe_address()      # 'redis://127.0.0.1:6379/0 (from connect())'
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import redis

from .errors import ConnectionNotConfigured, RedisUnavailable
from .store import Store

ADDRESS_ENV = "TASKSERVE_ADDRESS"
ADDRESS_FILE_NAME = "address"
DATA_DIR_NAME = ".taskserve"
LOCK_FILE_NAME = "up.lock"

_lock = threading.Lock()
_store: Optional[Store] = None
_address: Optional[str] = None
_source: str = ""


@dataclass(frozen=True)
class ClusterAddress:
    """A cluster's Redis URL and where it was found (for ``taskserve status``)."""

    url: str
    source: str


def user_clusters_dir() -> Path:
    """Where this user's running ``taskserve up`` clusters are registered."""
    return Path.home() / DATA_DIR_NAME / "clusters"


def up_is_running(data_dir: Path) -> bool:
    """Whether a ``taskserve up`` holds the lock of ``data_dir`` right now."""
    lock_path = Path(data_dir) / LOCK_FILE_NAME
    try:
        handle = open(lock_path, "a+")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)   # an older file may have had other bits


def register_cluster(url: str, data_dir: Path) -> list[Path]:
    """Record a running ``up``: ``<data_dir>/address`` and this user's registry entry."""
    data_dir = Path(data_dir).resolve()
    entry = user_clusters_dir() / (hashlib.sha256(str(data_dir).encode()).hexdigest()[:16] + ".json")
    _write_private(data_dir / ADDRESS_FILE_NAME, url + "\n")
    _write_private(entry, json.dumps({"url": url, "data_dir": str(data_dir), "pid": os.getpid()}) + "\n")
    return [data_dir / ADDRESS_FILE_NAME, entry]


def unregister_cluster(paths: list[Path]) -> None:
    """Remove what :func:`register_cluster` wrote."""
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def running_clusters() -> list[ClusterAddress]:
    """This user's registered clusters whose ``up`` still runs (stale entries are removed)."""
    found = []
    for entry in sorted(user_clusters_dir().glob("*.json")):
        try:
            record = json.loads(entry.read_text())
            url, data_dir = record["url"], Path(record["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if up_is_running(data_dir):
            found.append(ClusterAddress(url, f"the `taskserve up` with data dir {data_dir}"))
        else:
            entry.unlink(missing_ok=True)
    return found


def find_cluster(address: Optional[str] = None) -> ClusterAddress:
    """The cluster to talk to and why (see the module docstring for the order)."""
    if address:
        return ClusterAddress(_check_url(address), "--address")
    if os.environ.get(ADDRESS_ENV):
        return ClusterAddress(_check_url(os.environ[ADDRESS_ENV]), f"${ADDRESS_ENV}")
    local = Path.cwd() / DATA_DIR_NAME
    local_file = local / ADDRESS_FILE_NAME
    if local_file.is_file() and up_is_running(local):
        text = local_file.read_text().strip()
        if text:
            return ClusterAddress(_check_url(text), str(local_file))
    clusters = running_clusters()
    if len(clusters) == 1:
        return clusters[0]
    if len(clusters) > 1:
        raise ConnectionNotConfigured(
            f"{len(clusters)} taskserve clusters are up ({'; '.join(c.source for c in clusters)}): "
            f"pass --address URL, set ${ADDRESS_ENV}, or run from the directory of the one you mean"
        )
    raise ConnectionNotConfigured(
        "no taskserve cluster address: run `taskserve up` in another terminal, "
        f"or pass connect(address='redis://HOST:PORT') or set ${ADDRESS_ENV}"
    )


def resolve_address(address: Optional[str] = None) -> str:
    """The Redis URL to use, or a ``ConnectionNotConfigured`` saying how to get one."""
    return find_cluster(address).url


def describe_address() -> str:
    """The connected cluster's URL and where it was found, for ``taskserve status``."""
    current_store()
    return f"{_address} (from {_source})"


def _check_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConnectionNotConfigured(
            f"invalid address {url!r}: use a Redis URL like redis://127.0.0.1:6379/0"
        )
    return url


def make_store(address: str) -> Store:
    """A new :class:`Store` on its own connection pool (for long-running processes)."""
    # A Redis that hangs (paused, cut off) fails a call after a while instead of blocking it
    # forever; every blocking read taskserve makes waits for at most a few seconds.
    client = redis.Redis.from_url(address, health_check_interval=30, socket_keepalive=True,
                                  socket_connect_timeout=5, socket_timeout=30)
    return Store(client)


def connect(address: Optional[str] = None) -> Store:
    """Connect this process to a taskserve cluster and check that Redis answers.

    Every API call connects this way on first use, so calling it is optional.

    Example::

        taskserve.connect("redis://127.0.0.1:6379/0")
    """
    global _store, _address, _source
    found = find_cluster(address)
    url = found.url
    with _lock:
        if _store is not None and _address == url:
            return _store
        store = make_store(url)
        try:
            store.redis.ping()
        except redis.RedisError as error:
            raise RedisUnavailable(url, str(error)) from None
        _store, _address, _source = store, url, "connect()" if address else found.source
        return store


def current_store() -> Store:
    """The connected store, connecting with the default resolution if needed."""
    return _store if _store is not None else connect()


def current_address() -> str:
    current_store()
    assert _address is not None
    return _address
