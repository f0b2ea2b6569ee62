"""Answering requests: store each answer and acknowledge its message in one transaction.

An answer is the result record :func:`taskserve.wire.encode_answer` writes, stored under
the call's result key for the deployment's ``result_ttl_s`` and published on the channel
of the same name (as Celery's Redis backend does, so ``AsyncResult`` reads it too). The
same transaction removes the message from kombu's unacknowledged index: the answer is
never stored without its request being acknowledged, nor the other way round, and it
costs one round trip where Celery takes three (read the old result, store, ack).
Everything is retried while Redis is unreachable (restarting), for ``ACK_RETRY_S``.

Example::

    answerer = Answerer(result_ttl_s=600, version="3")
    answerer.answer(message, call, Outcome(True, 42))   # stored, published, acknowledged
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

from kombu.transport import virtual

from ..http import HTTP_METHOD
from ..signing import ClusterSecret
from ..store import result_key
from ..wire import READY_STATES, Call, Outcome, decode_answer, encode_answer, revoked_answer
from .transport import retry_while_unreachable

log = logging.getLogger("taskserve.node.answering")

# A request whose replica died this many times is answered with an error, unless
# the deployment says (max_deliveries).
DEFAULT_MAX_DELIVERIES = 3


class Answerer:
    """Writes the answers of one replica (its version, serializer and result expiry)."""

    def __init__(self, result_ttl_s: float, version: str = "", serializer: str = "json",
                 secret: Optional[ClusterSecret] = None, client: Any = None) -> None:
        self.expires_s = max(1, math.ceil(result_ttl_s))
        self.version = version
        self.serializer = serializer
        self.secret = secret
        self.client = client           # for what is written outside a message's transaction

    def record(self, call: Call, outcome: Optional[Outcome]) -> bytes:
        """The result record of ``call`` (``outcome`` None: expired, not run). An HTTP
        request's answer is plain data, and always JSON: the gateway never unpickles."""
        if outcome is None:
            return revoked_answer(call.task_id)
        serializer = "json" if call.method == HTTP_METHOD else self.serializer
        return encode_answer(call.task_id, outcome, self.version, serializer, self.secret)

    def answer(self, message: Any, call: Call, outcome: Optional[Outcome]) -> None:
        """Store and publish ``call``'s answer and acknowledge ``message``, in one transaction."""
        self.answer_many([(message, call, outcome)])

    def answer_many(self, answers: Iterable[tuple[Any, Call, Optional[Outcome]]]) -> None:
        """:meth:`answer` for several requests of one channel, in one round trip."""
        answers = list(answers)
        if not answers:
            return
        records = [(result_key(call.task_id), self.record(call, outcome)) for _, call, outcome in answers]
        qos = answers[0][0].channel.qos

        def write() -> None:
            with qos.channel.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
                for key, value in records:
                    pipe.setex(key, self.expires_s, value)
                    pipe.publish(key, value)      # on the key's name, as Celery's backend publishes
                for message, _, _ in answers:
                    qos._remove_from_indices(message.delivery_tag, pipe)
                pipe.execute()

        retry_while_unreachable(write, f"store {len(answers)} answer(s) and acknowledge their requests")
        for message, _, _ in answers:
            qos.acknowledged_in_redis(message.delivery_tag)


    def republish(self, call: Call, client: Any = None) -> bool:
        """Publish ``call``'s stored answer again (for a caller that may have missed it);
        False when there is none yet (its first run goes on, and will publish it)."""
        client = client or self.client
        key = result_key(call.task_id)
        data = client.get(key)
        if data is None or decode_answer(data).state not in READY_STATES:
            return False
        client.publish(key, data)
        return True


def answer_duplicate(answerer: Answerer, call: Call, message: Any) -> None:
    """A request whose id a replica took already, not after a crash (its caller pushed it
    twice): not run again; its answer, if there is one, is published again for the caller,
    and the message acknowledged."""
    log.warning("request %s was delivered twice (not after a crash): answered from its first run, "
                "not run again", call.task_id)
    retry_while_unreachable(lambda: answerer.republish(call), "publish an answer again")
    acknowledge([message])


def acknowledge(messages: list[Any]) -> None:
    """Acknowledge kombu Redis messages without an answer, those of one channel in one
    round trip (what ``message.ack()`` does for each); retried while Redis is unreachable."""
    by_channel: dict[int, list[Any]] = {}
    for message in messages:
        by_channel.setdefault(id(message.channel), []).append(message)
    for group in by_channel.values():
        qos = group[0].channel.qos
        tags = [message.delivery_tag for message in group]

        def remove(qos: Any = qos, tags: list[str] = tags) -> None:
            with qos.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                for tag in tags:
                    qos._remove_from_indices(tag, pipe)
                pipe.execute()

        retry_while_unreachable(remove, f"acknowledge {len(tags)} requests")
        for tag in tags:
            virtual.QoS.ack(qos, tag)


def refuse_redelivery(deliveries: int, max_deliveries: int) -> Optional[Outcome]:
    """The answer to a request whose replica died ``deliveries`` times, if that is
    too many to run it again; None to run it.

    >>> refuse_redelivery(2, max_deliveries=3) is None
    True
    >>> refuse_redelivery(3, max_deliveries=3).message
    'a replica died 3 times while serving this request; it is not delivered again (max_deliveries=3)'
    """
    if deliveries < max_deliveries:
        return None
    return Outcome.failure("ReplicaCrashed", f"a replica died {deliveries} times while serving this request; "
                                             f"it is not delivered again (max_deliveries={max_deliveries})")
