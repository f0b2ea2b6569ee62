"""The deployments' Celery queues as the control plane sees them: how many requests wait
and are being served (the autoscaler's load), requests moved off a canary's queue, and
requests delivered again after their replica died.

The queues themselves are kombu's lists (``keys.queue_name``); requests taken and not
acknowledged sit in kombu's ``unacked`` hash (``keys.UNACKED_KEY``).
"""

from __future__ import annotations

import json
import uuid
from typing import Callable, Iterable, Optional, Union

import redis

from .base import StoreBase
from .keys import (
    CONSUME_ORDER,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    canary_queue_name,
    held_key,
    queue_list,
    queue_lists,
    queue_name,
    stream_key,
)

# A stream ended for a replica that died expires after this, unless it already expires.
STREAM_END_TTL_S = 600


class Queues(StoreBase):
    """The queues part of :class:`taskserve.store.Store`."""

    def waiting_requests(self, names: Iterable[str]) -> dict[str, int]:
        """How many requests wait in each deployment's queue (not yet taken by a
        replica), in one command: what the controller reads between passes, several
        times a second, while deployments autoscale. Reads nothing without ``names``.

        >>> import fakeredis
        >>> queues = Queues(fakeredis.FakeRedis())
        >>> queues.redis.lpush(queue_name("echo"), "request-1", "request-2")
        2
        >>> queues.waiting_requests(["echo", "other"])
        {'echo': 2, 'other': 0}
        """
        names = list(names)
        if not names:
            return {}
        lists = len(CONSUME_ORDER)
        lengths = self._scripts.queue_lengths(keys=[key for name in names for key in queue_lists(queue_name(name))])
        return {name: sum(int(length) for length in lengths[i * lists:(i + 1) * lists]) for i, name in enumerate(names)}

    def deployment_loads(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Each deployment's load as ``(waiting, serving)``, in one round trip: the
        requests in its queue, and those its replicas took and have not acknowledged yet
        (served now, or prefetched) by kombu's ``unacked`` hash. Reads nothing without
        ``names``.

        >>> import fakeredis
        >>> queues = Queues(fakeredis.FakeRedis())
        >>> queues.redis.lpush(queue_name("echo"), "request-1", "request-2")
        2
        >>> queues.redis.hset(UNACKED_KEY, "tag-1", json.dumps([{"body": ""}, "", "taskserve.echo"]))
        1
        >>> queues.deployment_loads(["echo", "other"])
        {'echo': (2, 1), 'other': (0, 0)}
        """
        names = list(names)
        if not names:
            return {}
        # One transaction: a message moving from a queue to the unacked hash meanwhile
        # is not counted twice.
        lists = len(CONSUME_ORDER)
        with self.redis.pipeline(transaction=True) as pipe:
            for name in names:
                for key in queue_lists(queue_name(name)):
                    pipe.llen(key)
            pipe.hgetall(UNACKED_KEY)
            *depths, unacked = pipe.execute()
        serving = _count_serving(names, unacked)
        return {name: (sum(int(depth) for depth in depths[i * lists:(i + 1) * lists]), serving[name])
                for i, name in enumerate(names)}

    def queued_requests(self, queue: str) -> int:
        """How many requests wait in ``queue`` (all its priorities), in one command.

        >>> import fakeredis
        >>> from taskserve.store.keys import queue_list
        >>> queues = Queues(fakeredis.FakeRedis())
        >>> queues.redis.lpush(queue_list("taskserve.echo", 3), "urgent")
        1
        >>> queues.redis.lpush("taskserve.echo", "plain")
        1
        >>> queues.queued_requests("taskserve.echo")
        2
        """
        return sum(int(length) for length in self._scripts.queue_lengths(keys=queue_lists(queue)))

    # ------------------------------------------------------------------ canary releases

    def move_canary_queues(self, names: Iterable[str]) -> dict[str, int]:
        """Move what waits in the canary queue of each of ``names`` (deployments that run
        no canary now) to its own queue, in one round trip; how many moved, by name.

        Requests sent to a canary that was aborted or promoted meanwhile, and those a
        draining canary replica gave back, are served by the stable version this way.

        >>> import fakeredis
        >>> queues = Queues(fakeredis.FakeRedis())
        >>> queues.redis.lpush(canary_queue_name("echo"), '{"delivery_info": {"routing_key": "taskserve.echo@canary"}}')
        1
        >>> queues.move_canary_queues(["echo"]), queues.redis.lrange(queue_name("echo"), 0, -1)
        ({'echo': 1}, [b'{"delivery_info": {"routing_key": "taskserve.echo"}}'])
        """
        names = list(names)
        if not names:
            return {}
        keys, routing = [], []
        for name in names:
            for canary_list, stable_list in zip(queue_lists(canary_queue_name(name)), queue_lists(queue_name(name))):
                keys += [canary_list, stable_list]
                routing += [canary_queue_name(name), queue_name(name)]
        moved = self._scripts.move_canary_queues(keys=keys, args=routing)
        lists = len(CONSUME_ORDER)
        return {name: sum(int(count) for count in moved[i * lists:(i + 1) * lists]) for i, name in enumerate(names)}

    # ------------------------------------------------------------------ redeliveries

    def restore_held(self, replica_id: str, tags: Iterable[str] = (), count: bool = True,
                     drop: Optional[Callable[[dict], bool]] = None, ttl_s: int = 86_400) -> tuple[list[str], list[str]]:
        """Put back on their queues the messages replica ``replica_id`` held (its held set,
        and ``tags`` its agent read from its in-flight file): to be taken next, marked
        redelivered and counted as delivered again (unless ``count`` is False), as kombu's
        own restore does — but under a new delivery tag, so that a tag the dead replica
        still lists can never name the message once another replica took it. A message
        for which ``drop(message)`` is true is acknowledged instead (a streaming call, not
        run again), and so is one whose stream was begun (an HTTP request to a generator
        ``__call__``, which its message does not mark: its caller has its first chunks).
        Returns (the task ids put back, those dropped). Idempotent: a message
        already put back or acknowledged is not in kombu's unacked hash any more.

        >>> import fakeredis
        >>> queues = Queues(fakeredis.FakeRedis())
        >>> message = {"headers": {"id": "t1"}, "properties": {"priority": 0, "delivery_tag": "tag-1"}}
        >>> queues.redis.hset(UNACKED_KEY, "tag-1", json.dumps([message, "", "taskserve.echo"]))
        1
        >>> queues.redis.sadd(held_key("echo-1"), "tag-1")
        1
        >>> queues.restore_held("echo-1"), queues.redeliveries("t1")
        ((['t1'], []), 1)
        >>> back = json.loads(queues.redis.rpop("taskserve.echo"))
        >>> back["headers"]["redelivered"], back["properties"]["delivery_tag"] != "tag-1"
        (True, True)
        >>> queues.restore_held("echo-1", ["tag-1"])       # once only
        ([], [])
        >>> begun = {"headers": {"id": "t2"}, "properties": {"priority": 0, "delivery_tag": "tag-2"}}
        >>> queues.redis.hset(UNACKED_KEY, "tag-2", json.dumps([begun, "", "taskserve.echo"]))
        1
        >>> queues.redis.xadd(stream_key("t2"), {"c": "[]"}) and queues.restore_held("echo-1", ["tag-2"])
        ([], ['t2'])
        """
        key = held_key(replica_id)
        restored: list[str] = []
        dropped: list[str] = []
        for tag in {*(t.decode() if isinstance(t, bytes) else t for t in self.redis.smembers(key)), *tags}:
            outcome: dict = {}

            def put_back(pipe: redis.client.Pipeline, tag: str = tag, outcome: dict = outcome) -> None:
                entry = pipe.hget(UNACKED_KEY, tag)
                begun = entry is not None and bool(pipe.exists(stream_key(_task_id_of(entry))))
                pipe.multi()
                pipe.srem(key, tag)
                outcome.clear()
                if entry is None:
                    return
                try:
                    payload, _, routing_key = json.loads(entry)
                    task_id = str(payload["headers"]["id"])
                    dropping = begun or (drop is not None and drop(payload))
                    payload["headers"]["redelivered"] = True
                    properties = payload["properties"]
                    properties.setdefault("delivery_info", {})["redelivered"] = True
                    properties["delivery_tag"] = str(uuid.uuid4())
                    priority = int(properties.get("priority") or 0)
                except (ValueError, TypeError, KeyError, AttributeError) as error:
                    self.report_unreadable(f"held message {tag!r} of replica {replica_id}", str(error))
                else:
                    outcome.update(task_id=task_id, dropped=dropping)
                    if not dropping:
                        pipe.rpush(queue_list(routing_key, priority), json.dumps(payload))   # taken next
                        if count:
                            pipe.incr(self.deliveries_key(task_id))
                            pipe.expire(self.deliveries_key(task_id), ttl_s)
                pipe.zrem(UNACKED_INDEX_KEY, tag)
                pipe.hdel(UNACKED_KEY, tag)

            # WATCHed: retried while other replicas change the hash meanwhile, as kombu's restore is.
            self.redis.transaction(put_back, UNACKED_KEY)
            if outcome:
                (dropped if outcome["dropped"] else restored).append(outcome["task_id"])
        self.redis.delete(key)
        return restored, dropped

    def redeliveries(self, task_id: str) -> int:
        """How often the request ``task_id`` was put back after its replica died."""
        return int(self.redis.get(self.deliveries_key(task_id)) or 0)

    def end_stream(self, task_id: str, fields: dict, ttl_s: int = STREAM_END_TTL_S) -> None:
        """Append the last entry ``fields`` to ``task_id``'s stream (one its replica could not
        end), which expires after ``ttl_s`` unless it already expires.

        >>> import fakeredis
        >>> queues = Queues(fakeredis.FakeRedis())
        >>> queues.end_stream("t1", {"e": "{}"}); 0 < queues.redis.ttl(stream_key("t1")) <= STREAM_END_TTL_S
        True
        """
        key = stream_key(task_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields)
            pipe.ttl(key)
            _, ttl = pipe.execute()
        if ttl < 0:      # the stream had no entry yet: the end made it
            self.redis.expire(key, ttl_s)


def _task_id_of(entry: Union[str, bytes]) -> str:
    """The task id of kombu's unacked entry, "" if it has none.

    >>> _task_id_of(json.dumps([{"headers": {"id": "d9b1"}}, "", "taskserve.echo"])), _task_id_of("garbage")
    ('d9b1', '')
    """
    try:
        return str(json.loads(entry)[0]["headers"]["id"])
    except (ValueError, TypeError, KeyError, IndexError):
        return ""


def unacked_routing_key(entry: Union[str, bytes]) -> Optional[str]:
    """The routing key (the queue's name) of kombu's unacked entry ``[message, exchange,
    routing_key]``; None for anything else.

    The entry holds the whole message; its routing key is read off the end without
    parsing the rest when the entry ends like a JSON list of strings does.

    >>> unacked_routing_key(json.dumps([{"body": "e30=", "headers": {"id": "d9b1"}}, "", "taskserve.echo"]))
    'taskserve.echo'
    >>> unacked_routing_key(json.dumps([{}, "", 'a "quoted" key']).encode())
    'a "quoted" key'
    >>> unacked_routing_key("not json"), unacked_routing_key("[1]"), unacked_routing_key('["x"]')
    (None, None, None)
    """
    raw = entry if isinstance(entry, bytes) else entry.encode("utf-8", "surrogatepass")
    if raw.endswith(b'"]'):
        start = raw.rfind(b'"', 0, len(raw) - 2)
        key = raw[start + 1:-2]
        # The key is whole only if nothing in it was escaped and a separator precedes it.
        if start > 1 and raw[start - 1:start] in (b" ", b",") and b"\\" not in key:
            try:
                return key.decode()
            except UnicodeDecodeError:
                return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, list) and len(data) == 3 and isinstance(data[2], str):
        return data[2]
    return None


def _count_serving(names: list[str], unacked: dict) -> dict[str, int]:
    """Per deployment of ``names``, the entries of kombu's unacked hash routed to its queue."""
    queues = {queue_name(name): name for name in names}
    counts = dict.fromkeys(names, 0)
    for entry in unacked.values():
        name = queues.get(unacked_routing_key(entry) or "")
        if name is not None:
            counts[name] += 1
    return counts
