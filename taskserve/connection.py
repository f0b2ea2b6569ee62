"""Finding the cluster's Redis and keeping one connection to it per process.

Which cluster a process talks to, first match wins:

1. the ``address`` argument (``connect(address)``, ``--address``);
2. ``$TASKSERVE_ADDRESS``;
3. ``./.taskserve/address``: the cluster ``taskserve up`` runs with the data dir in the
   current directory (only while that ``up`` runs);
4. this user's running clusters, which each ``taskserve up`` registers under
   ``~/.taskserve/clusters/`` (``$TASKSERVE_CLUSTERS_DIR`` when set) while it runs:
   used when there is exactly one; with several, an error lists them and asks for
   ``--address`` or a directory.

Address files are mode 0600 and belong to one user: another user's ``up`` never
changes which cluster yours reaches. A data dir, address, secret or lock file is
trusted only when it is owned by the user running the command and no other user may
write it; anything else (say a ``.taskserve`` planted in a shared directory) is
ignored, with one line on stderr saying why.

An address is a Redis URL: ``redis://[:PASSWORD@]HOST:PORT/DB``, ``rediss://...`` for
TLS (the system's CA store and a verified certificate unless ``ssl_cert_reqs`` /
``ssl_ca_certs`` say otherwise), ``unix://PATH``, or Redis Sentinel as kombu spells
it: ``sentinel://[:PASSWORD@]HOST:PORT;sentinel://HOST2:PORT/DB?master_name=NAME``
(the password is the master's; ``sentinel_password=`` sets the sentinels' own).

The cluster secret that signs code (:mod:`taskserve.signing`), first match wins:
``$TASKSERVE_SECRET``; the file ``$TASKSERVE_SECRET_FILE``; the secret of a
:class:`~taskserve.local.LocalCluster` this process started; the file ``secret``
beside the address file of the ``taskserve up`` whose address this is.

Example::

    taskserve.connect("redis://127.0.0.1:6379/0")
    describe_address()      # 'redis://127.0.0.1:6379/0 (from connect())'
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis

from .errors import (
    ConnectionNotConfigured,
    RedisAuthenticationFailed,
    RedisUnavailable,
    SecretNotConfigured,
    redact_address,
)
from .signing import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SECRET_FILE_NAME,
    ClusterSecret,
    read_secret_file,
    secret_from_environment,
)
from .store import Store

ADDRESS_ENV = "TASKSERVE_ADDRESS"
CLUSTERS_DIR_ENV = "TASKSERVE_CLUSTERS_DIR"
ADDRESS_FILE_NAME = "address"
DATA_DIR_NAME = ".taskserve"
LOCK_FILE_NAME = "up.lock"

log = logging.getLogger("taskserve.connection")

_lock = threading.Lock()
_store: Optional[Store] = None
_address: Optional[str] = None
_source: str = ""
_data_dir: Optional[Path] = None
_known_secrets: dict[str, ClusterSecret] = {}

SENTINEL_SCHEME = "sentinel://"
DEFAULT_MASTER_NAME = "mymaster"


@dataclass(frozen=True)
class ClusterAddress:
    """A cluster's Redis URL and where it was found (for ``taskserve status``);
    ``data_dir`` is that of the ``taskserve up`` it belongs to, when known."""

    url: str
    source: str
    data_dir: Optional[Path] = None


def user_clusters_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where this user's running ``taskserve up`` clusters are registered:
    ``$TASKSERVE_CLUSTERS_DIR``, else ``~/.taskserve/clusters`` (the tests set the
    variable, so that their clusters never show up in a user's registry).

    >>> user_clusters_dir({"TASKSERVE_CLUSTERS_DIR": "/tmp/elsewhere"})
    PosixPath('/tmp/elsewhere')
    >>> user_clusters_dir({}) == Path.home() / ".taskserve" / "clusters"
    True
    """
    return Path(environ.get(CLUSTERS_DIR_ENV) or Path.home() / DATA_DIR_NAME / "clusters")


def trust_problem(info: os.stat_result) -> Optional[str]:
    """Why a file or directory with this ``stat`` may not be trusted (None: it may be).

    Only what the user running this owns, and what no other user may write, is
    trusted: anything else could have been put there, or changed, by another user.

    >>> mine = os.stat_result((0o100600, 0, 0, 1, os.geteuid(), 0, 0, 0, 0, 0))
    >>> trust_problem(mine) is None
    True
    >>> trust_problem(os.stat_result((0o100666, 0, 0, 1, os.geteuid(), 0, 0, 0, 0, 0)))
    'other users may write it (mode 666)'
    >>> trust_problem(os.stat_result((0o100600, 0, 0, 1, os.geteuid() + 1, 0, 0, 0, 0, 0))).startswith("it belongs to uid")
    True
    """
    if info.st_uid != os.geteuid():
        return f"it belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users may write it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


_reported: set[tuple[str, str]] = set()


def _ignore(path: Path, problem: str) -> None:
    """Say, once per process, that ``path`` is ignored and why."""
    if (str(path), problem) in _reported:
        return
    _reported.add((str(path), problem))
    log.warning("taskserve: ignoring %s: %s; only files you own that no other user may write are trusted",
                path, problem)


def trusted_directory(path: Path) -> bool:
    """Whether the directory ``path`` exists and may be trusted (else why not is said once)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    problem = trust_problem(info) if stat.S_ISDIR(info.st_mode) else "it is not a directory"
    if problem is not None:
        _ignore(Path(path), problem)
        return False
    return True


def read_trusted(path: Path) -> Optional[str]:
    """The text of the file at ``path`` if it (and its directory) may be trusted; None
    if it is missing or may not be (which is said once)."""
    path = Path(path)
    if not trusted_directory(path.parent):
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(descriptor) as handle:
        info = os.fstat(handle.fileno())
        problem = trust_problem(info) if stat.S_ISREG(info.st_mode) else "it is not a plain file"
        if problem is not None:
            _ignore(path, problem)
            return None
        return handle.read()


def check_own_directory(path: Path, what: str = "the data dir") -> None:
    """Refuse (``RuntimeError``, one sentence) a directory another user owns or may write.

    ``taskserve up`` writes its Redis password there: in a directory of another user's
    it would be theirs to read, or to replace.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    problem = trust_problem(info)
    if problem is not None:
        raise RuntimeError(f"{what} {path} cannot be used: {problem}; pick a directory of your own with "
                           "--data-dir, or fix its owner and mode (chmod 700)")


def up_is_running(data_dir: Path) -> bool:
    """Whether a ``taskserve up`` holds the lock of ``data_dir`` right now.

    Only a lock file and data dir this user owns, which no other user may write,
    count: another user's lock (held, say, in a shared directory) is ignored, with
    a line saying so.
    """
    data_dir = Path(data_dir)
    if not trusted_directory(data_dir):
        return False
    lock_path = data_dir / LOCK_FILE_NAME
    try:
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(descriptor) as handle:
        problem = trust_problem(os.fstat(handle.fileno()))
        if problem is not None:
            _ignore(lock_path, problem)
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
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
            record = json.loads(read_trusted(entry) or "")
            url, data_dir = record["url"], Path(record["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if up_is_running(data_dir):
            found.append(ClusterAddress(url, f"the `taskserve up` with data dir {data_dir}", data_dir))
        else:
            entry.unlink(missing_ok=True)
    return found


def find_up(data_dir: Optional[Path] = None) -> dict:
    """The registry entry (``url``, ``data_dir``, ``pid``) of a running ``taskserve up``:
    the one of ``data_dir``, else of ``./.taskserve``, else this user's only one.

    Raises ``LookupError`` saying what runs when none (or several) match.
    """
    entries = []
    for entry in sorted(user_clusters_dir().glob("*.json")):
        try:
            record = json.loads(read_trusted(entry) or "")
            record["data_dir"], record["pid"] = str(record["data_dir"]), int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if up_is_running(Path(record["data_dir"])):
            entries.append(record)
    wanted = data_dir if data_dir is not None else (
        Path.cwd() / DATA_DIR_NAME if up_is_running(Path.cwd() / DATA_DIR_NAME) else None)
    if wanted is not None:
        for record in entries:
            if Path(record["data_dir"]) == Path(wanted).resolve():
                return record
        raise LookupError(f"no `taskserve up` runs with the data dir {wanted}"
                          + (f"; running: {', '.join(r['data_dir'] for r in entries)}" if entries else ""))
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise LookupError("no `taskserve up` of yours is running here")
    raise LookupError(f"{len(entries)} `taskserve up` are running (data dirs "
                      f"{', '.join(r['data_dir'] for r in entries)}); pass --data-dir DIR to say which")


def find_cluster(address: Optional[str] = None) -> ClusterAddress:
    """The cluster to talk to and why (see the module docstring for the order)."""
    if address:
        return ClusterAddress(_check_url(address), "--address")
    if os.environ.get(ADDRESS_ENV):
        return ClusterAddress(_check_url(os.environ[ADDRESS_ENV]), f"${ADDRESS_ENV}")
    local = _local_cluster()
    if local is not None:
        return local
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


def _local_cluster() -> Optional[ClusterAddress]:
    """The running ``up`` of ``./.taskserve``, if there is one."""
    local = Path.cwd() / DATA_DIR_NAME
    local_file = local / ADDRESS_FILE_NAME
    if local_file.is_file() and up_is_running(local):
        text = (read_trusted(local_file) or "").strip()
        if text:
            return ClusterAddress(_check_url(text), str(local_file), local)
    return None


def _address_file_of(url: str) -> Optional[str]:
    """The address file of the running ``up`` (here, or registered) whose Redis ``url``
    names, password or not: where the whole address is."""
    local = _local_cluster()
    for cluster in ([local] if local else []) + running_clusters():
        if redact_address(cluster.url) == redact_address(url) and cluster.data_dir is not None:
            return str(cluster.data_dir / ADDRESS_FILE_NAME)
    return None


def _data_dir_of(url: str) -> Optional[Path]:
    """The data dir of the running ``up`` (here, or registered) whose address is ``url``."""
    local = _local_cluster()
    for cluster in ([local] if local else []) + running_clusters():
        if cluster.url == url:
            return cluster.data_dir
    return None


def remember_secret(url: str, secret: ClusterSecret) -> None:
    """Use ``secret`` for the cluster at ``url`` in this process (what LocalCluster does)."""
    _known_secrets[url] = secret


def cluster_secret(url: Optional[str] = None) -> ClusterSecret:
    """The secret that signs and checks code for the cluster at ``url`` (default: the
    connected one); the order is in the module docstring. :class:`SecretNotConfigured`
    says how to give one.
    """
    found = secret_from_environment()
    if found is not None:
        return found
    url = url or current_address()
    if url in _known_secrets:
        return _known_secrets[url]
    data_dir = _data_dir if url == _address and _data_dir is not None else _data_dir_of(url)
    if data_dir is not None and (data_dir / SECRET_FILE_NAME).is_file() \
            and read_trusted(data_dir / SECRET_FILE_NAME) is not None:
        return read_secret_file(data_dir / SECRET_FILE_NAME)
    raise SecretNotConfigured(
        f"no cluster secret for {redact_address(url)}, so no code can be signed or checked: set ${SECRET_ENV} "
        f"to the cluster's secret (the file {DATA_DIR_NAME}/{SECRET_FILE_NAME} of its `taskserve up`), "
        f"or ${SECRET_FILE_ENV} to that file's path"
    )


def resolve_address(address: Optional[str] = None) -> str:
    """The Redis URL to use, or a ``ConnectionNotConfigured`` saying how to get one."""
    return find_cluster(address).url


def describe_address() -> str:
    """The connected cluster's URL (without its password) and where it was found,
    for ``taskserve status``."""
    current_store()
    return f"{redact_address(_address or '')} (from {_source})"


def _check_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME)):
        raise ConnectionNotConfigured(
            f"invalid address {redact_address(url)!r}: use a Redis URL like redis://127.0.0.1:6379/0, "
            "rediss://... for TLS, or sentinel://HOST:PORT;sentinel://HOST2:PORT/0?master_name=NAME"
        )
    return url


@dataclass(frozen=True)
class SentinelAddress:
    """A ``sentinel://`` address taken apart.

    >>> found = parse_sentinel("sentinel://:pw@h1:26379;sentinel://:pw@h2:26380/2?master_name=cache")
    >>> found.sentinels, found.master_name, found.db, found.password
    ([('h1', 26379), ('h2', 26380)], 'cache', 2, 'pw')
    >>> found.kombu_url
    'sentinel://:pw@h1:26379/2;sentinel://:pw@h2:26380/2'
    """

    sentinels: list[tuple[str, int]]
    master_name: str
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    sentinel_password: Optional[str] = None
    tls: bool = False

    @property
    def kombu_url(self) -> str:
        """The address as kombu and Celery take it (the options go in transport options)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(f"{SENTINEL_SCHEME}{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)

    def transport_options(self) -> dict:
        """kombu's and Celery's transport options for it."""
        options: dict = {"master_name": self.master_name}
        sentinel_kwargs = {}
        if self.sentinel_password is not None:
            sentinel_kwargs["password"] = self.sentinel_password
        if self.tls:
            sentinel_kwargs["ssl"] = True
        if sentinel_kwargs:
            options["sentinel_kwargs"] = sentinel_kwargs
        return options


def parse_sentinel(url: str) -> Optional[SentinelAddress]:
    """The parts of a ``sentinel://`` address; None for any other URL.

    Options (``master_name``, ``sentinel_password``, ``ssl``) may follow any of the
    ``;``-separated parts; the password of the first part that has one is the master's.
    """
    if not url.startswith(SENTINEL_SCHEME):
        return None
    sentinels: list[tuple[str, int]] = []
    query: dict[str, str] = {}
    db, username, password = 0, None, None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConnectionNotConfigured(
                f"invalid Sentinel address {redact_address(part)!r}: write sentinel://HOST:PORT, several "
                "joined by ';', like sentinel://h1:26379;sentinel://h2:26379/0?master_name=mymaster"
            )
        sentinels.append((parts.hostname, parts.port or 26379))
        query.update(parse_qsl(parts.query))
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        if password is None and parts.password is not None:
            username, password = parts.username or None, unquote(parts.password)
    return SentinelAddress(sentinels, query.get("master_name") or DEFAULT_MASTER_NAME, db, username, password,
                           query.get("sentinel_password"), query.get("ssl", "").lower() in ("1", "true", "yes"))


def with_tls_defaults(url: str) -> str:
    """A ``rediss://`` URL with ``ssl_cert_reqs=required`` when it sets none: the
    certificate is verified against the system's CA store unless the URL says
    otherwise (Celery's result backend refuses rediss without it).

    >>> with_tls_defaults("rediss://:pw@cache:6380/0")
    'rediss://:pw@cache:6380/0?ssl_cert_reqs=required'
    >>> with_tls_defaults("rediss://cache:6380/0?ssl_cert_reqs=none")
    'rediss://cache:6380/0?ssl_cert_reqs=none'
    >>> with_tls_defaults("redis://cache:6379/0")
    'redis://cache:6379/0'
    """
    if not url.startswith("rediss://") or "ssl_cert_reqs=" in url:
        return url
    return url + ("&" if "?" in url else "?") + "ssl_cert_reqs=required"


def redis_client(url: str, **kwargs: object) -> redis.Redis:
    """A redis-py client for any address taskserve takes (Sentinel: the current master)."""
    sentinel = parse_sentinel(url)
    if sentinel is None:
        return redis.Redis.from_url(with_tls_defaults(url), **kwargs)  # type: ignore[arg-type]
    from redis.sentinel import Sentinel

    options = sentinel.transport_options()
    watchers = Sentinel(sentinel.sentinels, sentinel_kwargs=options.get("sentinel_kwargs"),
                        socket_connect_timeout=kwargs.get("socket_connect_timeout", 5))
    return watchers.master_for(sentinel.master_name, db=sentinel.db, username=sentinel.username,
                               password=sentinel.password, ssl=sentinel.tls, **kwargs)


def async_connection_pool(url: str, max_connections: int, timeout: float, **kwargs: object) -> object:
    """A ``redis.asyncio`` connection pool for any address taskserve takes: one that
    waits up to ``timeout`` for a free connection, or for Sentinel the current master's
    pool (which fails at once beyond ``max_connections``)."""
    import redis.asyncio

    sentinel = parse_sentinel(url)
    if sentinel is None:
        return redis.asyncio.BlockingConnectionPool.from_url(
            with_tls_defaults(url), max_connections=max_connections, timeout=timeout, **kwargs)
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    options = sentinel.transport_options()
    watchers = Sentinel(sentinel.sentinels, sentinel_kwargs=options.get("sentinel_kwargs"),
                        socket_connect_timeout=kwargs.get("socket_connect_timeout", 5))
    return SentinelConnectionPool(sentinel.master_name, watchers, max_connections=max_connections,
                                  db=sentinel.db, username=sentinel.username, password=sentinel.password,
                                  ssl=sentinel.tls, **kwargs)


def make_store(address: str) -> Store:
    """A new :class:`Store` on its own connection pool (for long-running processes)."""
    # A Redis that hangs (paused, cut off) fails a call after a while instead of blocking it
    # forever; every blocking read taskserve makes waits for at most a few seconds.
    client = redis_client(address, health_check_interval=30, socket_keepalive=True,
                          socket_connect_timeout=5, socket_timeout=30)
    return Store(client)


def connect(address: Optional[str] = None) -> Store:
    """Connect this process to a taskserve cluster and check that Redis answers.

    Every API call connects this way on first use, so calling it is optional.

    Example::

        taskserve.connect("redis://127.0.0.1:6379/0")
    """
    global _store, _address, _source, _data_dir
    found = find_cluster(address)
    url = found.url
    with _lock:
        if _store is not None and _address == url:
            return _store
        store = make_store(url)
        try:
            store.redis.ping()
        except redis.AuthenticationError as error:
            raise RedisAuthenticationFailed(url, str(error), _address_file_of(url)) from None
        except redis.RedisError as error:
            raise RedisUnavailable(url, str(error)) from None
        _store, _address, _source = store, url, "connect()" if address else found.source
        _data_dir = found.data_dir
        return store


def current_store() -> Store:
    """The connected store, connecting with the default resolution if needed."""
    return _store if _store is not None else connect()


def current_address() -> str:
    current_store()
    assert _address is not None
    return _address
