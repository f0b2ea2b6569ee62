"""The replica process: load the code, construct it, then serve its queue.

A node agent starts one per replica::

    python -m taskserve.node.replica --address redis://127.0.0.1:6379/0 --replica-id echo-1a2b3c4d

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
from typing import Any, Optional

import redis
from celery import signals

from ..celery_app import TASK_NAME, make_app
from ..code import unpack
from ..connection import make_store
from ..http import HTTP_METHOD, Request, encode_response
from ..state import Replica, ReplicaState
from ..store import Store, queue_name
from .gate import RequestGate
from .inflight import InflightFile
from .processes import die_with_parent
from .protocol import EXIT_CONSTRUCTOR_FAILED, INFLIGHT_FILE_ENV

log = logging.getLogger("taskserve.node.replica")


HEALTH_FAILURES_TO_REPLACE = 3

# How often a replica re-reads its record even without a wake-up, so one that
# missed a reconfigure message catches up.
CONTROL_HEARTBEAT_S = 1.0


class Dispatcher:
    """Calls the user's object for each request.

    >>> dispatcher = Dispatcher(lambda name: f"hi {name}", kind="function")
    >>> dispatcher("__call__", ["bob"], {})
    'hi bob'
    """

    def __init__(self, target: Any, kind: str) -> None:
        self.target = target
        self.kind = kind
        self.gate = RequestGate()

    def __call__(self, method: str, args: list, kwargs: dict) -> Any:
        with self.gate.request():
            return self._call(method, args, kwargs)

    def has(self, method: str) -> bool:
        return self.kind == "class" and callable(getattr(self.target, method, None))

    def check_health(self, wait_s: float) -> Optional[bool]:
        """Run the object's ``check_health()``: True if it passed, None if it was busy.

        Raises what ``check_health`` raised.
        """
        if not self.has("check_health"):
            return True
        if not self.gate.try_exclusive(timeout=wait_s):
            return None  # serving a long request; not a failure
        try:
            _run(self.target.check_health())
            return True
        finally:
            self.gate.release_exclusive()

    def reconfigure(self, user_config: Any) -> None:
        """Call ``reconfigure(user_config)`` with no request in flight."""
        with self.gate.exclusive():
            _run(self.target.reconfigure(user_config))

    def _call(self, method: str, args: list, kwargs: dict) -> Any:
        if method == HTTP_METHOD:   # from the gateway: __call__(Request), the answer as HTTP data
            return encode_response(_run(self.target(Request.from_payload(args[0]))))
        if method == "__call__":
            function = self.target
        elif self.kind == "function":
            raise AttributeError(f"function deployments have no method {method!r}; call the handle directly")
        elif method.startswith("_"):
            raise AttributeError(f"method {method!r} is private; only public methods can be called")
        else:
            function = getattr(self.target, method)
        return _run(function(*args, **kwargs))


def _run(result: Any) -> Any:
    """The value of ``result``, awaiting it if the user's method was ``async``."""
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def align_thread_pools() -> None:
    """Give OpenCV and PyTorch the same thread limit as OMP_NUM_THREADS.

    Both size their own pools when imported, so one imported before the limit
    changed (say by ``os.environ`` in ``__init__``) would keep its old size.
    """
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if not limit.isdigit():
        return
    threads = int(limit)
    if "cv2" in sys.modules and hasattr(sys.modules["cv2"], "setNumThreads"):
        sys.modules["cv2"].setNumThreads(threads)
        log.info("OpenCV imported: cv2.setNumThreads(%d) to match OMP_NUM_THREADS", threads)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads") and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("PyTorch imported: torch.set_num_threads(%d) to match OMP_NUM_THREADS", threads)


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
        self.applied_config_hash = ""
        self.draining = False

    def load(self) -> Dispatcher:
        """Construct the object and give it its user_config: all before any request."""
        target, init_args, init_kwargs = unpack(self.store.get_code(self.record.code_sha))
        kind = self.config.get("kind", "class")
        dispatcher = Dispatcher(construct(target, kind, init_args, init_kwargs), kind)
        align_thread_pools()
        record = self.store.get_replica(self.replica_id) or self.record
        if record.config_hash:
            dispatcher.reconfigure(json.loads(record.user_config))
        self.applied_config_hash = record.config_hash
        self.store.update_replica(self.replica_id, applied_config_hash=record.config_hash)
        return dispatcher

    def follow_config(self, dispatcher: Dispatcher) -> None:
        """Apply each new user_config the controller gives this replica, in place.

        Woken by a control message, and re-reading the record every second anyway.
        """
        rejected = ""

        def loop() -> None:
            nonlocal rejected
            while not self.draining:
                try:
                    self.store.wait_for_control(self.replica_id, CONTROL_HEARTBEAT_S)
                    record = self.store.get_replica(self.replica_id)
                except redis.RedisError as error:
                    log.warning("cannot read this replica's record (%s); retrying", error)
                    time.sleep(CONTROL_HEARTBEAT_S)
                    continue
                if record is None or self.draining:
                    return
                if record.config_hash in (self.applied_config_hash, rejected):
                    continue
                if self.apply_config(dispatcher, record):
                    rejected = ""
                else:
                    rejected = record.config_hash

        threading.Thread(target=loop, name="follow_config", daemon=True).start()

    def apply_config(self, dispatcher: Dispatcher, record: Replica) -> bool:
        """Run ``reconfigure`` with the record's user_config; record the outcome."""
        self.store.update_replica(self.replica_id, state=ReplicaState.RECONFIGURING)
        self.store.notify(f"replica:{self.record.deployment}")
        try:
            dispatcher.reconfigure(json.loads(record.user_config))
        except Exception as error:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            log.error("reconfigure rejected user_config %s:\n%s", record.config_hash, text)
            fields = {"config_error": text}
            ok = False
        else:
            log.info("reconfigured to user_config %s", record.config_hash)
            self.applied_config_hash = record.config_hash
            fields = {"applied_config_hash": record.config_hash, "config_error": ""}
            ok = True
        if not self.draining:
            fields["state"] = ReplicaState.RUNNING
        self.store.update_replica(self.replica_id, **fields)
        self.store.notify(f"replica:{self.record.deployment}")
        return ok

    def watch_health(self, dispatcher: Dispatcher) -> None:
        """Call ``check_health()`` every period; after 3 failures in a row, ask to be replaced."""
        if not dispatcher.has("check_health"):
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
        inflight = InflightFile(self.inflight_path)

        @app.task(name=TASK_NAME, acks_late=True)
        def call(method: str, args: list, kwargs: dict) -> Any:
            return _envelope(dispatcher, method, args, kwargs)

        @signals.task_received.connect(weak=False)
        def on_received(request: Any = None, **_: Any) -> None:
            inflight.add(request.id, request.message.delivery_tag)

        @signals.task_postrun.connect(weak=False)
        def on_done(task_id: str = "", **_: Any) -> None:
            inflight.remove(task_id)

        @signals.task_revoked.connect(weak=False)
        def on_revoked(request: Any = None, **_: Any) -> None:
            # An HTTP request whose caller gave up (it expired in the queue): acknowledged, not run.
            if request is not None:
                inflight.remove(request.id)

        @signals.worker_ready.connect(weak=False)
        def on_ready(**_: Any) -> None:
            self.watch_health(dispatcher)
            self.follow_config(dispatcher)
            self.store.update_replica(self.replica_id, state=ReplicaState.RUNNING, pid=os.getpid(), message="")
            self.store.notify(f"replica:{self.record.deployment}")
            log.info("replica %s serves %s", self.replica_id, queue_name(self.record.deployment))

        @signals.worker_shutting_down.connect(weak=False)
        def on_shutdown(**_: Any) -> None:
            self.draining = True
            self.store.update_replica(self.replica_id, state=ReplicaState.DRAINING)

        # Celery logs every request and its result at INFO: costly per request, and
        # results may be private. Startup and errors still reach the log.
        for per_request in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(per_request).setLevel(logging.WARNING)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m taskserve.node.replica")
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
