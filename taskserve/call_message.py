"""The queue item of one handle call, built from a template made once per serializer.

A call travels as the Celery task :data:`~taskserve.celery_app.TASK_NAME` with the
arguments ``(method, args, kwargs)``, in the envelope kombu's Redis transport pushes
for a message published to a queue (``Channel.prepare_message`` and ``basic_publish``
on the default exchange): what ``app.send_task(..., queue=...)`` pushes. Celery builds
the headers, properties and options of a ``taskserve.call`` message once
(:class:`CallMessages`); each call fills in its id and arguments and is encoded in
one go, where ``send_task`` runs Celery's and kombu's publishing layers for every
call. ``tests/test_call_message.py`` checks the result matches ``send_task``'s.

Example::

    messages = CallMessages(make_app("redis://127.0.0.1:6379/0"), "json")
    item = messages.encode("4f2a.1", "taskserve.echo", "__call__", ["hi"], {})
    redis_client.lpush("taskserve.echo", item)
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import kombu.serialization
import orjson
from celery import Celery

from .celery_app import TASK_NAME


def _not_plain(value: Any) -> Any:
    raise TypeError(type(value).__name__)


class CallMessages:
    """Encodes calls of ``app`` (serializer ``serializer``) as the items of a queue.

    >>> from taskserve.celery_app import make_app
    >>> messages = CallMessages(make_app("redis://127.0.0.1:6379/0"), "json")
    >>> import json, base64
    >>> item = json.loads(messages.encode("c0ffee.1", "taskserve.echo", "__call__", ["hi"], {}))
    >>> item["headers"]["task"], item["headers"]["id"], item["properties"]["delivery_info"]
    ('taskserve.call', 'c0ffee.1', {'exchange': '', 'routing_key': 'taskserve.echo'})
    >>> json.loads(base64.b64decode(item["body"]))[0]
    ['__call__', ['hi'], {}]
    """

    def __init__(self, app: Celery, serializer: str) -> None:
        self.serializer = serializer
        headers, properties, body, _ = app.amqp.create_task_message(
            "", TASK_NAME, ("__call__", [], {}), {}, argsrepr="", kwargsrepr="{}")
        self.headers = headers
        self.properties = properties
        self.embed = body[2]

    def encode(self, task_id: str, queue: str, method: str, args: list, kwargs: dict) -> bytes:
        """The queue item of the call ``method(*args, **kwargs)`` with id ``task_id`` on ``queue``.

        Raises ``kombu.exceptions.EncodeError`` for arguments the serializer cannot write.
        """
        content_type, encoding, raw = self._body(((method, args, kwargs), {}, self.embed))
        # The envelope holds strings, numbers and None only: orjson writes it (compactly) at a
        # tenth of json.dumps's cost.
        return orjson.dumps({
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": encoding,
            "content-type": content_type,
            "headers": {
                **self.headers, "id": task_id, "root_id": task_id,
                # What `celery inspect` shows: the method; Celery's saferepr of every
                # argument would cost more than the rest of the message.
                "argsrepr": f"({method!r}, ...)",
            },
            "properties": {
                **self.properties,
                "correlation_id": task_id,
                "delivery_mode": 2,                   # persistent, Celery's default
                "priority": 0,                        # priority 0 lives in the queue's own list
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        })

    def _body(self, body: tuple) -> tuple[str, str, bytes]:
        """(content type, encoding, bytes) of the task body, as kombu would write it."""
        if self.serializer == "json":
            # kombu's JSON encoder is the standard library's plus type markers (a datetime,
            # a UUID, bytes ...): plain data is written alike, without kombu's layers. Not
            # orjson here: it writes NaN as null.
            try:
                return "application/json", "utf-8", json.dumps(body, default=_not_plain).encode()
            except (TypeError, ValueError):
                pass    # not plain data: kombu's encoder, with its markers (or its error)
        content_type, encoding, data = kombu.serialization.dumps(body, self.serializer)
        return content_type, encoding, data.encode(encoding) if isinstance(data, str) else data
