"""The Celery configuration shared by callers (handles) and replicas.

Requests are Celery tasks named :data:`TASK_NAME` on the deployment's own queue
(``taskserve.<name>``); results go to the same Redis. Replicas acknowledge a
message only after serving it (``acks_late``) and take one at a time
(prefetch 1), so a message a replica did not finish goes back to the queue.
Results expire after the deployment's ``result_ttl_s``, and storing one rides
out a Redis restart (it is retried for about half a minute).

Example::

    app = make_app("redis://127.0.0.1:6379/0")
    app.send_task(TASK_NAME, args=("__call__", ["hi"], {}), queue="taskserve.echo")
"""

from __future__ import annotations

import functools
import math

from celery import Celery

from .connection import parse_sentinel, with_tls_defaults

TASK_NAME = "taskserve.call"

# How long the Redis transport waits before handing an unacknowledged message to
# another consumer. Replicas that die are restored sooner by their node agent.
VISIBILITY_TIMEOUT_S = 3600

# How long a result nobody read stays in Redis, unless the deployment says (result_ttl_s).
DEFAULT_RESULT_EXPIRES_S = 600

# A result write (or read) that finds Redis unreachable is tried again after a random
# pause of up to 0.2 s, 0.4 s, 0.8 s, 1.6 s, then 2 s: about half a minute in all,
# enough for a restart that reloads its append-only file.
RESULT_RETRIES = 35
RESULT_RETRY_BASE_MS = 100
RESULT_RETRY_MAX_MS = 2000


def make_app(address: str, serializer: str = "json", result_expires: float = DEFAULT_RESULT_EXPIRES_S) -> Celery:
    """A Celery app on the cluster's Redis that speaks ``serializer`` ("json" or "pickle").

    The results it stores expire after ``result_expires`` seconds (whole seconds,
    at least one: Redis takes no fraction, and 0 would mean never).
    """
    # Every kombu priority its own list (see taskserve.wire.priority_to_transport): what a
    # node agent puts back lands in the list it came from.
    transport_options: dict = {"visibility_timeout": VISIBILITY_TIMEOUT_S, "priority_steps": list(range(10))}
    sentinel = parse_sentinel(address)
    if sentinel is not None:
        address = sentinel.kombu_url
        transport_options.update(sentinel.transport_options())
    else:
        address = with_tls_defaults(address)   # a verified certificate unless the URL says otherwise
    app = Celery("taskserve", broker=address, backend=address, set_as_current=False)
    app.conf.update(
        task_serializer=serializer,
        result_serializer=serializer,
        accept_content=[serializer],
        result_accept_content=[serializer],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=True,
        result_expires=max(1, math.ceil(result_expires)),
        result_backend_always_retry=True,
        result_backend_max_retries=RESULT_RETRIES,
        result_backend_base_sleep_between_retries_ms=RESULT_RETRY_BASE_MS,
        result_backend_max_sleep_between_retries_ms=RESULT_RETRY_MAX_MS,
        result_extended=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=dict(transport_options),
        result_backend_transport_options={k: v for k, v in transport_options.items() if k != "priority_steps"},
    )
    return app


@functools.lru_cache(maxsize=None)
def client_app(address: str, serializer: str) -> Celery:
    """The one caller-side app per address and serializer in this process."""
    return make_app(address, serializer)
