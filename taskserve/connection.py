"""Finding the cluster's Redis and keeping one connection to it per process.

Resolution order: the ``address`` argument, then ``$TASKSERVE_ADDRESS``, then the
address file that ``taskserve up`` writes (``./.taskserve/address``, then
``~/.taskserve/address``).

Example::

    Example::

        taskserve.connect("redis://127.0.0.1:6379/0")
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import redis

from .errors import ConnectionNotConfigured
from .store import Store

ADDRESS_ENV = "TASKSERVE_ADDRESS"
ADDRESS_FILE_NAME = "address"

_lock = threading.Lock()
_store: Optional[Store] = None
_address: Optional[str] = None


def address_files() -> list[Path]:
    """Where ``taskserve up`` leaves its address, in the order they are read."""
    return [Path.cwd() / ".taskserve" / ADDRESS_FILE_NAME, Path.home() / ".taskserve" / ADDRESS_FILE_NAME]


def resolve_address(address: Optional[str] = None) -> str:
    """The Redis URL to use, or a ``ConnectionNotConfigured`` saying how to get one."""
    if address:
        return _check_url(address)
    if os.environ.get(ADDRESS_ENV):
        return _check_url(os.environ[ADDRESS_ENV])
    for path in address_files():
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return _check_url(text)
    raise ConnectionNotConfigured(
        "no taskserve cluster address: run `taskserve up` in another terminal, "
        f"or pass connect(address='redis://HOST:PORT') or set ${ADDRESS_ENV}"
    )


def _check_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConnectionNotConfigured(
            f"invalid address {url!r}: use a Redis URL like redis://127.0.0.1:6379/0"
        )
    return url


def make_store(address: str) -> Store:
    """A new :class:`Store` on its own connection pool (for long-running processes)."""
    client = redis.Redis.from_url(address, health_check_interval=30, socket_keepalive=True)
    return Store(client)


def connect(address: Optional[str] = None) -> Store:
    """Connect this process to a taskserve cluster and check that Redis answers.

    Every API call connects this way on first use, so calling it is optional.

    Example::

        taskserve.connect("redis://127.0.0.1:6379/0")
    """
    global _store, _address
    url = resolve_address(address)
    with _lock:
        if _store is not None and _address == url:
            return _store
        store = make_store(url)
        try:
            store.redis.ping()
        except redis.RedisError as error:
            raise ConnectionNotConfigured(
                f"cannot reach Redis at {url} ({error}); is `taskserve up` running?"
            ) from None
        _store, _address = store, url
        return store


def current_store() -> Store:
    """The connected store, connecting with the default resolution if needed."""
    return _store if _store is not None else connect()


def current_address() -> str:
    current_store()
    assert _address is not None
    return _address
