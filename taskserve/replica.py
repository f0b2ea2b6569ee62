"""The replica process: load the code, construct it, then serve its queue.

A node agent starts one per replica::

    python -m taskserve.replica --address redis://127.0.0.1:6379/0 --replica-id echo-1a2b3c4d

The order is what makes a replica safe to route to: the constructor (and
``reconfigure``) run first; only then does the Celery worker start consuming the
deployment's queue, and ``RUNNING`` is recorded when it does. SIGTERM drains: the
worker stops taking messages, finishes the one it serves and exits; a message it
held but had not started goes back to the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from celery import signals

from .celery_app import TASK_NAME, make_app
from .code import unpack
from .connection import make_store
from .processes import die_with_parent
from .state import ReplicaState
from .store import Store, queue_name

log = logging.getLogger("taskserve.replica")

EXIT_CONSTRUCTOR_FAILED = 3

# Written by the serving thread, read by the agent if this process dies: the
# delivery tag of the message being served, so it can be put back at once.
INFLIGHT_FILE_ENV = "TASKSERVE_INFLIGHT_FILE"


HEALTH_FAILURES_TO_REPLACE = 3


class Dispatcher:
    """Calls the user's object for each request.

    With one request at a time (``max_concurrent_queries=1``), requests and the
    object's own upkeep (``check_health``) take turns under one lock.

    >>> dispatcher = Dispatcher(lambda name: f"hi {name}", kind="function")
    >>> dispatcher("__call__", ["bob"], {})
    'hi bob'
    """

    def __init__(self, target: Any, kind: str, exclusive: bool = True) -> None:
        self.target = target
        self.kind = kind
        self.lock = threading.Lock() if exclusive else None

    def __call__(self, method: str, args: list, kwargs: dict) -> Any:
        if self.lock is None:
            return self._call(method, args, kwargs)
        with self.lock:
            return self._call(method, args, kwargs)

    def check_health(self, wait_s: float) -> bool | None:
        """Run the object's ``check_health()``: True if it passed, None if it was busy.

        Raises what ``check_health`` raised.
        """
        check = getattr(self.target, "check_health", None) if self.kind == "class" else None
        if check is None:
            return True
        if self.lock is not None and not self.lock.acquire(timeout=wait_s):
            return None  # serving a long request; not a failure
        try:
            result = check()
            if inspect.isawaitable(result):
                asyncio.run(_await(result))
            return True
        finally:
            if self.lock is not None:
                self.lock.release()

    def _call(self, method: str, args: list, kwargs: dict) -> Any:
        if method == "__call__":
            function = self.target
        elif self.kind == "function":
            raise AttributeError(f"function deployments have no method {method!r}; call the handle directly")
        elif method.startswith("_"):
            raise AttributeError(f"method {method!r} is private; only public methods can be called")
        else:
            function = getattr(self.target, method)
        result = function(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def construct(target: Any, kind: str, init_args: tuple, init_kwargs: dict) -> Any:
    """The object requests are served by: an instance of a class, or the function."""
    if kind == "function":
        return target
    return target(*init_args, **init_kwargs)


class ReplicaProcess:
    """One replica: its record, its user object and its Celery worker."""

    def __init__(self, store: Store, address: str, replica_id: str) -> None:
        self.store = store
        self.address = address
        self.replica_id = replica_id
        record = store.get_replica(replica_id)
        if record is None:
            raise SystemExit(f"replica {replica_id} has no record in Redis; nothing to run")
        self.record = record
        self.config = json.loads(record.config)
        self.inflight_path = os.environ.get(INFLIGHT_FILE_ENV, "")

    def load(self) -> Dispatcher:
        target, init_args, init_kwargs = unpack(self.store.get_code(self.record.code_sha))
        kind = self.config.get("kind", "class")
        instance = construct(target, kind, init_args, init_kwargs)
        exclusive = int(self.config.get("max_concurrent_queries") or 1) == 1
        return Dispatcher(instance, kind, exclusive=exclusive)

    def watch_health(self, dispatcher: Dispatcher) -> None:
        """Call ``check_health()`` every period; after 3 failures in a row, ask to be replaced."""
        if dispatcher.kind != "class" or not callable(getattr(dispatcher.target, "check_health", None)):
            return
        period = float(self.config.get("health_check_period_s") or 10)

        def loop() -> None:
            failures = 0
            while True:
                time.sleep(period)
                try:
                    passed = dispatcher.check_health(wait_s=period)
                except Exception as error:
                    failures += 1
                    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                    log.warning("check_health failed (%d in a row):\n%s", failures, text)
                    if failures == HEALTH_FAILURES_TO_REPLACE:
                        self.store.update_replica(
                            self.replica_id, unhealthy=True,
                            message=f"check_health failed {failures} times in a row: {text}")
                        self.store.notify(f"replica:{self.record.deployment}")
                    continue
                if passed:
                    failures = 0

        threading.Thread(target=loop, name="check_health", daemon=True).start()

    def fail_start(self, error: BaseException) -> None:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        log.error("constructor of %s failed:\n%s", self.record.deployment, text)
        self.store.update_replica(self.replica_id, state=ReplicaState.FAILED, failure="start", message=text)

    def serve(self, dispatcher: Dispatcher) -> int:
        serializer = self.config.get("serializer", "json")
        concurrency = int(self.config.get("max_concurrent_queries") or 1)
        if serializer == "pickle" and hasattr(os, "getuid") and os.getuid() == 0:
            # Celery refuses pickle under root unless told; the deployment asked for it.
            os.environ.setdefault("C_FORCE_ROOT", "1")
            log.warning("serving pickled requests as root: anyone who can write to this Redis can run code here")
        app = make_app(self.address, serializer)
        inflight = _InflightFile(self.inflight_path)

        @app.task(name=TASK_NAME, acks_late=True)
        def call(method: str, args: list, kwargs: dict) -> Any:
            return _envelope(dispatcher, method, args, kwargs)

        @signals.task_received.connect(weak=False)
        def on_received(request: Any = None, **_: Any) -> None:
            inflight.add(request.id, request.message.delivery_tag)

        @signals.task_postrun.connect(weak=False)
        def on_done(task_id: str = "", **_: Any) -> None:
            inflight.remove(task_id)

        @signals.worker_ready.connect(weak=False)
        def on_ready(**_: Any) -> None:
            self.watch_health(dispatcher)
            self.store.update_replica(self.replica_id, state=ReplicaState.RUNNING, pid=os.getpid(), message="")
            self.store.notify(f"replica:{self.record.deployment}")
            log.info("replica %s serves %s", self.replica_id, queue_name(self.record.deployment))

        @signals.worker_shutting_down.connect(weak=False)
        def on_shutdown(**_: Any) -> None:
            self.store.update_replica(self.replica_id, state=ReplicaState.DRAINING)

        worker = app.Worker(
            hostname=f"{self.replica_id}@{socket.gethostname()}",
            queues=[queue_name(self.record.deployment)],
            pool="solo" if concurrency == 1 else "threads",
            concurrency=concurrency,
            loglevel="INFO",
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            optimization="fair",
            quiet=True,
        )
        worker.start()
        return worker.exitcode or 0


def _envelope(dispatcher: Dispatcher, method: str, args: list, kwargs: dict) -> dict:
    """The user's result, or their exception as data the caller re-raises."""
    try:
        return {"ok": True, "value": dispatcher(method, args, kwargs)}
    except Exception as error:  # the caller gets it as ReplicaError
        return {
            "ok": False,
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        }


class _InflightFile:
    """The delivery tags of the messages this replica holds, in a small local file.

    The agent reads it after a crash to put those messages back at once; keeping
    it costs a local write per request, not a network round trip.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) if path else None
        self.tags: dict[str, str] = {}
        self.lock = threading.Lock()

    def add(self, task_id: str, tag: Any) -> None:
        if self.fd is not None and tag:
            with self.lock:
                self.tags[task_id] = str(tag)
                self._write()

    def remove(self, task_id: str) -> None:
        if self.fd is not None:
            with self.lock:
                if self.tags.pop(task_id, None) is not None:
                    self._write()

    def _write(self) -> None:
        data = "\n".join(self.tags.values()).encode()
        os.pwrite(self.fd, data.ljust(64), 0)
        os.ftruncate(self.fd, max(64, len(data)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m taskserve.replica")
    parser.add_argument("--address", required=True)
    parser.add_argument("--replica-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()

    store = make_store(args.address)
    replica = ReplicaProcess(store, args.address, args.replica_id)
    store.update_replica(args.replica_id, pid=os.getpid())
    # A drain requested while the constructor runs ends the process once it returns.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        dispatcher = replica.load()
    except SystemExit:
        return 0
    except BaseException as error:
        replica.fail_start(error)
        return EXIT_CONSTRUCTOR_FAILED
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return replica.serve(dispatcher)


if __name__ == "__main__":
    sys.exit(main())
