"""The replica process: load the code, construct it, then serve its queue.

A node agent starts one per replica::

    python -m taskserve.node.replica --replica-id echo-1a2b3c4d     # the address in $TASKSERVE_ADDRESS

The order is what makes a replica safe to route to: the constructor (and
``reconfigure``) run first; only then does the server start consuming the
deployment's queue, and ``RUNNING`` is recorded when it does. SIGTERM drains: the
server stops taking messages, finishes those it serves and exits; a message it held
but had not started goes back to the queue.

This module is the process and its lifecycle only. The layers under it:

* :mod:`~taskserve.node.invoke` calls the user's object (sync, async, generators) on
  :mod:`~taskserve.node.loop`, the replica's one event loop;
* :mod:`~taskserve.node.answering` stores answers and acknowledges messages;
* :mod:`~taskserve.node.transport` is kombu's and Celery's Redis transport, made to
  ride out faults; :mod:`~taskserve.node.stats` counts requests;
* the servers, siblings on those layers: :mod:`~taskserve.node.celery_server` (a
  Celery worker) and :mod:`~taskserve.node.batch_server` (batched methods).

Faults it rides out: ``check_health()`` runs beside the requests, in a thread of its
own with a time limit, so a hung one holds up nothing and counts as a failure; a
request its replicas died serving ``max_deliveries`` times is answered with a
``ReplicaCrashed`` error instead of being run again; storing an answer and
acknowledging the message are retried while Redis restarts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Optional

import redis

from ..batching import batched_methods
from ..celery_app import DEFAULT_RESULT_EXPIRES_S, make_app
from ..code import unpack
from ..connection import ADDRESS_ENV, make_store
from ..errors import SecretNotConfigured, SignatureError
from ..planner import RECONFIGURE_FAILED_MARK
from ..signing import check_user_config, manifest, node_secret
from ..state import Replica, ReplicaState
from ..store import Store, replica_queue
from ..store.keys import held_key
from .answering import DEFAULT_MAX_DELIVERIES, Answerer
from .batch_server import BatchServer
from .celery_server import CeleryServer
from .inflight import InflightFile
from .invoke import Dispatcher, HealthWatch, ReconfigureFailed, align_thread_pools, construct
from .jobs import DEFAULT_JOB_TTL_S, JobRunner
from .loop import ReplicaLoop
from .processes import die_with_parent, hold_lock
from .protocol import EXIT_CONSTRUCTOR_FAILED, INFLIGHT_FILE_ENV
from .stats import InFlightReport, RequestStats
from .streams import StreamWriter
from .transport import ReplicaQoS

log = logging.getLogger("taskserve.node.replica")

# How often a replica re-reads its record even without a wake-up, so one that
# missed a reconfigure message (its push lost to a Redis failure) catches up. Nothing
# else reads it: liveness is the agent's heartbeat, and every config change wakes it.
CONTROL_HEARTBEAT_S = 10.0

# How soon a replica that could not read its record (Redis away) tries again.
REDIS_RETRY_S = 1.0


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
        self.stats = RequestStats(store, record.deployment, record.version)

    def load(self) -> Dispatcher:
        """Construct the object and give it its user_config: all before any request."""
        # Checked before anything is unpickled: signed with the cluster's secret, for this
        # deployment, serializer, kind and runtime_env.
        target, init_args, init_kwargs = unpack(self.store.get_code(self.record.code_sha), node_secret(),
                                                manifest(self.record.deployment, self.config))
        kind = self.config.get("kind", "class")
        self.loop = ReplicaLoop()
        dispatcher = Dispatcher(construct(target, kind, init_args, init_kwargs, self.loop), kind, self.loop)
        align_thread_pools()
        record = self.store.get_replica(self.replica_id) or self.record
        if record.config_hash:
            self.check_config(record)     # unsigned: fails the start, as unsigned code does
            try:
                dispatcher.reconfigure(json.loads(record.user_config))
            except Exception as error:
                raise ReconfigureFailed() from error
        self.applied_config_hash = record.config_hash
        self.store.update_replica(self.replica_id, applied_config_hash=record.config_hash)
        return dispatcher

    def follow_config(self, dispatcher: Dispatcher) -> None:
        """Apply each new user_config the controller gives this replica, in place.

        Woken by a control message, and re-reading the record every ``CONTROL_HEARTBEAT_S`` anyway.
        """
        rejected: Optional[str] = None     # the hash of a config reconfigure refused

        def loop() -> None:
            nonlocal rejected
            while not self.draining:
                try:
                    self.store.wait_for_control(self.replica_id, CONTROL_HEARTBEAT_S)
                    record = self.store.get_replica(self.replica_id)
                except redis.RedisError as error:
                    log.warning("cannot read this replica's record (%s); retrying", error)
                    time.sleep(REDIS_RETRY_S)
                    continue
                if record is None or self.draining:
                    return
                if record.config_hash in (self.applied_config_hash, rejected):
                    continue
                if self.apply_config(dispatcher, record):
                    rejected = None
                else:
                    rejected = record.config_hash

        threading.Thread(target=loop, name="follow_config", daemon=True).start()

    def check_config(self, record: Replica) -> None:
        """Refuse (:class:`SignatureError`) a user_config its client did not sign for this
        deployment and the code this process loaded (``self.record``, not a record
        re-read since: that one may have been rewritten)."""
        check_user_config(self.record.deployment, self.record.code_sha, json.loads(record.user_config),
                          record.user_config_signature, node_secret())

    def apply_config(self, dispatcher: Dispatcher, record: Replica) -> bool:
        """Run ``reconfigure`` with the record's user_config; record the outcome.

        A user_config set back to None calls nothing (``reconfigure`` only ever gets a
        config); the replica just acknowledges it.
        """
        if not record.config_hash:
            self.applied_config_hash = ""
            self.store.update_replica(self.replica_id, applied_config_hash="", config_error="")
            self.store.notify(f"replica:{self.record.deployment}")
            return True
        try:
            self.check_config(record)
        except (SignatureError, SecretNotConfigured) as error:
            # Not given to reconfigure(): the replica serves on with the config it has.
            log.error("refused user_config %s: %s", record.config_hash, error)
            self.store.update_replica(self.replica_id, config_error=str(error))
            self.store.notify(f"replica:{self.record.deployment}")
            return False
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
        watch = HealthWatch(dispatcher, wait_s=period, timeout_s=float(self.config.get("health_check_timeout_s") or 30))

        def loop() -> None:
            while True:
                time.sleep(period)
                reason = watch.check()
                if reason is None:
                    continue
                try:
                    self.store.update_replica(self.replica_id, unhealthy=True, message=reason)
                    self.store.notify(f"replica:{self.record.deployment}")
                except redis.RedisError as error:
                    log.warning("cannot record that this replica is unhealthy (%s)", error)

        threading.Thread(target=loop, name="watch_health", daemon=True).start()

    def fail_start(self, error: BaseException) -> None:
        if isinstance(error, ReconfigureFailed) and error.__cause__ is not None:
            cause = error.__cause__
            text = RECONFIGURE_FAILED_MARK + "\n" + "".join(
                traceback.format_exception(type(cause), cause, cause.__traceback__))
        elif isinstance(error, (SignatureError, SecretNotConfigured)):
            text = str(error)       # refused, not a bug: one line says why
        else:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        log.error("the start of %s failed:\n%s", self.record.deployment, text)
        self.store.update_replica(self.replica_id, state=ReplicaState.FAILED, failure="start", message=text)

    def redeliveries(self, task_id: str) -> int:
        """How often ``task_id`` was put back after its replica died (0 if Redis cannot tell)."""
        try:
            return self.store.redeliveries(task_id)
        except redis.RedisError as error:
            log.warning("cannot read how often request %s was delivered (%s); serving it", task_id, error)
            return 0

    def started(self, dispatcher: Dispatcher) -> None:
        """Taking requests: check health, follow the user_config, and say RUNNING."""
        self.watch_health(dispatcher)
        self.follow_config(dispatcher)
        self.stats.start()
        self.store.update_replica(self.replica_id, state=ReplicaState.RUNNING, pid=os.getpid(), message="")
        self.store.notify(f"replica:{self.record.deployment}")
        log.info("replica %s serves %s", self.replica_id, replica_queue(self.record))

    def stopping(self) -> None:
        """Draining: taking no more requests, finishing those in hand."""
        self.draining = True
        self.store.update_replica(self.replica_id, state=ReplicaState.DRAINING)

    def serve(self, dispatcher: Dispatcher) -> int:
        """Serve the deployment's queue until drained: with a Celery worker
        (:class:`~taskserve.node.celery_server.CeleryServer`), or a
        :class:`~taskserve.node.batch_server.BatchServer` when the class has batched methods."""
        serializer = self.config.get("serializer", "json")
        concurrency = int(self.config.get("max_ongoing_requests") or self.config.get("max_concurrent_queries") or 1)
        if serializer == "pickle" and hasattr(os, "getuid") and os.getuid() == 0:
            # Celery refuses pickle under root unless told; the deployment asked for it.
            os.environ.setdefault("C_FORCE_ROOT", "1")
        app = make_app(self.address, serializer,
                       result_expires=float(self.config.get("result_ttl_s") or DEFAULT_RESULT_EXPIRES_S))
        result_ttl_s = float(self.config.get("result_ttl_s") or DEFAULT_RESULT_EXPIRES_S)
        answerer = Answerer(result_ttl_s, self.record.version, serializer,
                            node_secret() if serializer == "pickle" else None, client=self.store.redis)
        ReplicaQoS.taken_mark_ttl_s = max(1, int(result_ttl_s))
        ReplicaQoS.held_key = held_key(self.replica_id)     # what this replica holds, for its node's death
        inflight = InflightFile(self.inflight_path)
        self.in_flight = InFlightReport(self.store, self.replica_id, inflight, self.record.deployment,
                                        self.stats.wake)
        self.stats.also.append(self.in_flight.report)
        max_deliveries = int(self.config.get("max_deliveries") or DEFAULT_MAX_DELIVERIES)
        jobs = JobRunner(self.store, self.replica_id, self.record.deployment, answerer,
                         float(self.config.get("job_ttl_s") or DEFAULT_JOB_TTL_S), on_attempt=self.stats.count_attempt)
        try:
            if batched_methods(dispatcher.target):
                return BatchServer(self, dispatcher, app, inflight, answerer, jobs, max_deliveries, concurrency,
                                   serializer).serve()
            streams = StreamWriter(self.store, float(self.config.get("result_ttl_s") or DEFAULT_RESULT_EXPIRES_S))
            return CeleryServer(self, dispatcher, app, inflight, answerer, jobs, streams, max_deliveries, concurrency,
                                accept_pickle=serializer == "pickle").serve(replica_queue(self.record))
        finally:
            self.stats.flush()


def main(argv: list[str] | None = None) -> int:
    """Run replica ``--replica-id`` on the cluster at ``$TASKSERVE_ADDRESS``.

    ``--address`` is still accepted, but a node agent passes the address in the
    environment: a command line can be read by every user of the machine.
    """
    parser = argparse.ArgumentParser(prog="python -m taskserve.node.replica")
    parser.add_argument("--address", default=os.environ.get(ADDRESS_ENV),
                        help=f"Redis URL of the cluster (default: ${ADDRESS_ENV})")
    parser.add_argument("--replica-id", required=True)
    args = parser.parse_args(argv)
    if not args.address:
        parser.error(f"no cluster address: set ${ADDRESS_ENV} (as the node agent does) or pass --address")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    if os.environ.get(INFLIGHT_FILE_ENV):
        # Held until this process is gone: how a restarted agent knows it still runs.
        _lock_fd = hold_lock(os.environ[INFLIGHT_FILE_ENV])  # noqa: F841

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
