"""Every message format taskserve puts on the wire, encoded and decoded in one place.

Pure: no Redis, no sockets. Handles, the gateway, replicas, the batch server, the node
agent and jobs all call these functions, so a format changes here or nowhere.

**A call** is a Celery task (protocol 2) named :data:`TASK_NAME` whose arguments are
``(method, args, kwargs)``, in the envelope kombu's Redis transport pushes for a message
published to a queue: what ``app.send_task("taskserve.call", args=[METHOD, ARGS, KWARGS],
queue="taskserve.<name>")`` pushes. A plain Celery producer can therefore enqueue calls,
and :func:`decode_call` accepts what Celery's canvas sends too (a chain prepends the
previous result to the task's positional arguments; :func:`signature_args` puts the
method in the keyword arguments so that works). :class:`CallEncoder` builds the headers
Celery would once and fills in each call; pickled calls are signed with the cluster
secret, and a replica never unpickles an unsigned one.

**An answer** is the Celery result record stored under ``celery-task-meta-<task id>``
and published on the channel of that name: ``SUCCESS`` with the method's value as
``result``, or ``FAILURE`` with the exception described as Celery describes one
(``exc_type``, ``exc_message``, ``exc_module``), so ``AsyncResult.get()`` of a plain
Celery producer returns the value or raises. :func:`decode_answer` is the one reader:
a handle and the gateway get the same :class:`Answer` for the same record. A pickled
value travels only signed, inside a JSON record.

Example::

    encoder = CallEncoder(make_app(address))
    item = encoder.encode(Call("c0ffee.1", "__call__", ["hi"], {}, queue="taskserve.echo"))
    redis_client.lpush("taskserve.echo", item)
    ...
    answer = decode_answer(redis_client.get("celery-task-meta-c0ffee.1"))
    answer.value                      # 'hi'
"""

from __future__ import annotations

import base64
import builtins
import json
import pickle
import secrets
import time
import traceback as traceback_module
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

import orjson
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from .errors import ReplicaError
from .signing import ClusterSecret
from .store.keys import CONSUME_ORDER

TASK_NAME = "taskserve.call"

# Priorities as users give them: 0..9, a higher one is taken first; calls and jobs
# without one get DEFAULT_PRIORITY. A message's kombu priority picks the list of the queue
# it waits in (kombu's Redis transport: the queue's own list for 0, "<queue>\x06\x16<n>"
# for n); replicas take the lists in CONSUME_ORDER. The default lives in the queue's own
# list, so a plain Celery producer's call without a priority is taken with the default
# calls, and its priority 1..9 keeps Celery's Redis meaning (a lower one first).
MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5

# Celery's result states that taskserve writes or reads.
SUCCESS, FAILURE, REVOKED, STARTED, PENDING = "SUCCESS", "FAILURE", "REVOKED", "STARTED", "PENDING"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

# The header of a call that carries taskserve's own options (absent on plain calls).
OPTIONS_HEADER = "taskserve"
# The header carrying the HMAC of a pickled body.
SIGNATURE_HEADER = "taskserve_signature"
# What a pickled call's and a pickled answer's MACs cover before the bytes: a signature of
# one can never pass for the other (nor for a goal's, which has its own prefix).
CALL_MAC_DOMAIN = b"taskserve-call\n"
ANSWER_MAC_DOMAIN = b"taskserve-answer\n"
# The result field carrying a signed pickled value (pickle deployments only).
PICKLED_RESULT = "taskserve_pickle"
# The result record's field naming the version that answered (x-taskserve-version).
VERSION_FIELD = "taskserve_version"

_BUILTIN_EXCEPTIONS = frozenset(name for name, value in vars(builtins).items()
                                if isinstance(value, type) and issubclass(value, BaseException))


class NotARequest(Exception):
    """A queue item that is not a taskserve call; the message says why."""


class UnsignedPickle(NotARequest):
    """A pickled call or answer without a valid signature: refused before unpickling."""


def priority_to_transport(priority: Optional[int]) -> int:
    """The kombu priority a taskserve ``priority`` travels as (None: the default).

    >>> [priority_to_transport(p) for p in (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]
    [1, 2, 3, 4, 0, 5, 6, 7, 8, 9]
    """
    if priority is None or priority == DEFAULT_PRIORITY:
        return 0
    return MAX_PRIORITY + 1 - priority if priority > DEFAULT_PRIORITY else MAX_PRIORITY - priority


def priority_from_transport(transport_priority: Any) -> int:
    """The taskserve priority of a message whose kombu priority is ``transport_priority``
    (anything unreadable counts as kombu's default, 0: the default priority).

    >>> [priority_from_transport(k) for k in CONSUME_ORDER]
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    >>> priority_from_transport(None), priority_from_transport(42)
    (5, 0)
    """
    try:
        value = min(max(int(transport_priority), MIN_PRIORITY), MAX_PRIORITY)
    except (TypeError, ValueError):
        value = 0
    return MAX_PRIORITY - CONSUME_ORDER.index(value)


def check_priority(priority: Any) -> int:
    """``priority`` if it is a whole number from 0 to 9, else a ``ValueError`` naming the fix.

    >>> check_priority(7)
    7
    >>> check_priority(10)
    Traceback (most recent call last):
    ...
    ValueError: priority=10 is out of range: use a whole number from 0 (last) to 9 (first); the default is 5
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority={priority!r} is out of range: use a whole number from {MIN_PRIORITY} (last) "
                         f"to {MAX_PRIORITY} (first); the default is {DEFAULT_PRIORITY}")
    return priority


# --------------------------------------------------------------------------- values


def _plain_default(value: Any) -> Any:
    """JSON for the values models return that the standard library does not write:
    numpy arrays and scalars (as lists and numbers)."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None and type(value).__module__ == "numpy":
        return tolist()
    raise TypeError(type(value).__name__)


def dumps_json(data: Any) -> bytes:
    """``data`` as JSON bytes: the standard library's encoding (NaN included), numpy
    arrays and scalars as lists and numbers, and kombu's type markers for what else
    Celery's JSON carries (datetime, UUID, Decimal, bytes ...); ``TypeError`` naming the
    type for anything else.

    >>> dumps_json({"x": [1, 2.5, None]})
    b'{"x":[1,2.5,null]}'
    >>> dumps_json(object())
    Traceback (most recent call last):
    ...
    TypeError: Object of type object is not JSON serializable
    """
    try:
        return json.dumps(data, separators=(",", ":"), default=_plain_default).encode()
    except (TypeError, ValueError):
        pass
    try:
        text = kombu_dumps(data)
    except (TypeError, ValueError) as error:
        raise TypeError(str(error)) from None
    return text.encode() if isinstance(text, str) else text


def loads_json(data: bytes | str) -> Any:
    """JSON written by :func:`dumps_json` or by Celery (type markers decoded).

    >>> loads_json(b'{"x":[1,2.5,null]}')
    {'x': [1, 2.5, None]}
    """
    if (b'"__type__"' if isinstance(data, bytes) else '"__type__"') in data:
        return kombu_loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)     # NaN and Infinity, which the standard library writes


def not_json_hint(what: str, error: BaseException) -> TypeError:
    """The one-line error for a value that cannot travel as JSON.

    >>> str(not_json_hint("the result of 'predict'", TypeError("Object of type set is not JSON serializable")))
    "the result of 'predict' cannot travel as JSON (Object of type set is not JSON serializable); return plain data (for numpy: .tolist()), or deploy with serializer='pickle'"
    """
    return TypeError(f"{what} cannot travel as JSON ({error}); return plain data (for numpy: .tolist()), "
                     "or deploy with serializer='pickle'")


# --------------------------------------------------------------------------- calls


@dataclass
class Call:
    """One call of a deployment's method, as a caller sends it and a replica receives it.

    ``priority`` is 0..9 (a higher one first), None for a call that sets none.
    ``job`` marks a durable job (it has a job record), ``stream`` a call whose chunks go
    to a stream. ``expires_at`` (UNIX time) is when a caller that gave up stops waiting:
    a replica does not run it after that; ``eta`` (UNIX time, Celery's ``countdown`` and
    ``eta``) is when it may run at the earliest. On a received call, ``redelivered`` says
    it was put back after its replica died, ``canvas`` that a Celery canvas (chain, chord,
    callbacks) continues after it, and ``from_celery`` that a plain Celery producer sent
    it (taskserve's callers mark theirs): such a call is served as a job.
    """

    task_id: str
    method: str
    args: list
    kwargs: dict
    queue: str = ""
    priority: Optional[int] = None
    expires_at: Optional[float] = None
    job: bool = False
    stream: bool = False
    redelivered: bool = False
    canvas: bool = False
    from_celery: bool = False
    eta: Optional[float] = None
    options: dict = field(default_factory=dict)

    @property
    def durable(self) -> bool:
        """Whether it is served as a job: submitted as one, or sent by a plain Celery producer."""
        return self.job or self.from_celery

    def expired(self, now: Optional[float] = None) -> bool:
        """Whether its caller gave up on it already.

        >>> Call("t", "m", [], {}, expires_at=10.0).expired(now=11.0), Call("t", "m", [], {}).expired()
        (True, False)
        """
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at


class CallEncoder:
    """Builds the queue items of calls: Celery's headers for a ``taskserve.call`` message
    are made once (by ``app``, which never connects) and each call fills in its own.

    >>> from taskserve.celery_app import make_app
    >>> encoder = CallEncoder(make_app("redis://127.0.0.1:6379/0"))
    >>> item = json.loads(encoder.encode(Call("c0ffee.1", "__call__", ["hi"], {}, queue="taskserve.echo")))
    >>> item["headers"]["task"], item["headers"]["id"], item["properties"]["delivery_info"]["routing_key"]
    ('taskserve.call', 'c0ffee.1', 'taskserve.echo')
    >>> json.loads(base64.b64decode(item["body"]))[0], item["properties"]["priority"]
    (['__call__', ['hi'], {}], 0)
    """

    def __init__(self, app: Any) -> None:
        headers, properties, body, _ = app.amqp.create_task_message(
            "", TASK_NAME, ("__call__", [], {}), {}, argsrepr="", kwargsrepr="{}")
        self.headers = headers
        self.properties = properties
        self.embed = body[2]

    def encode(self, call: Call, serializer: str = "json", secret: Optional[ClusterSecret] = None,
               argsrepr: Optional[str] = None) -> bytes:
        """The queue item of ``call``. A pickled call needs ``secret`` (it is signed).

        Raises ``TypeError`` (naming the fix) for arguments ``serializer`` cannot write.
        """
        content_type, raw = _encode_body(((call.method, call.args, call.kwargs), {}, self.embed), serializer)
        headers = {
            **self.headers, "id": call.task_id, "root_id": call.task_id,
            # What `celery inspect` shows: the method; Celery's saferepr of every
            # argument would cost more than the rest of the message.
            "argsrepr": argsrepr or f"({call.method!r}, ...)",
        }
        properties = {
            **self.properties,
            "correlation_id": call.task_id,
            "delivery_mode": 2,                          # persistent, Celery's default
            "priority": priority_to_transport(call.priority),
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": call.queue},
        }
        if call.expires_at is not None:
            headers["expires"] = datetime.fromtimestamp(call.expires_at, timezone.utc).isoformat()
            properties["expiration"] = str(max(0, int((call.expires_at - time.time()) * 1000)))   # as Celery sets it
        options = dict(call.options)
        if call.job:
            options["job"] = 1
        if call.stream:
            options["stream"] = 1
        headers[OPTIONS_HEADER] = options       # present even empty: taskserve's, not a plain producer's
        if serializer == "pickle":
            if secret is None:
                raise ValueError("a pickled call must be signed: no cluster secret was given")
            headers[SIGNATURE_HEADER] = secret.sign(CALL_MAC_DOMAIN + raw)
        # The envelope holds strings, numbers and None only: orjson writes it (compactly)
        # at a tenth of json.dumps's cost.
        return orjson.dumps({
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": "binary" if serializer == "pickle" else "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": properties,
        })


def _encode_body(body: tuple, serializer: str) -> tuple[str, bytes]:
    """(content type, bytes) of a Celery task body, as kombu would write it."""
    if serializer == "pickle":
        return "application/x-python-serialize", pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    if serializer != "json":
        raise ValueError(f"unknown serializer {serializer!r}: use 'json' or 'pickle'")
    try:
        return "application/json", dumps_json(body)
    except TypeError as error:
        raise TypeError(f"the arguments cannot travel as JSON ({error}); pass plain data, "
                        "or deploy with serializer='pickle'") from None


def fresh_item(envelope: Mapping[str, Any]) -> bytes:
    """A message taken from a queue (kombu's envelope, as decoded) as a new queue item:
    without the marks of a redelivery, with a delivery tag of its own. What a job's
    retry queues again.

    >>> item = json.loads(fresh_item({"body": "e30=", "headers": {"id": "j1", "redelivered": True},
    ...     "properties": {"delivery_tag": "t1", "delivery_info": {"routing_key": "q", "redelivered": True}}}))
    >>> item["headers"], item["properties"]["delivery_info"], item["properties"]["delivery_tag"] != "t1"
    ({'id': 'j1'}, {'routing_key': 'q'}, True)
    """
    copied = orjson.loads(orjson.dumps(envelope))
    headers = copied.get("headers")
    if isinstance(headers, dict):
        headers.pop("redelivered", None)
    properties = copied.setdefault("properties", {})
    properties["delivery_tag"] = str(uuid.uuid4())
    info = properties.get("delivery_info")
    if isinstance(info, dict):
        info.pop("redelivered", None)
    return orjson.dumps(copied)


def signature_args(method: str, args: list, kwargs: dict) -> tuple[tuple, dict]:
    """The Celery task arguments of a call built for a canvas (:func:`taskserve.signature`):
    the method and its arguments as task keyword arguments, so that a chain can prepend
    the previous result to the (empty) positional ones.

    >>> signature_args("embed", [1], {"k": 2})
    ((), {'method': 'embed', 'args': [1], 'kwargs': {'k': 2}})
    """
    return (), {"method": method, "args": list(args), "kwargs": dict(kwargs)}


def decode_call(headers: Any, body: bytes, content_type: str, properties: Optional[Mapping[str, Any]] = None,
                delivery_info: Optional[Mapping[str, Any]] = None,
                secret: Optional[ClusterSecret] = None, accept_pickle: bool = False) -> Call:
    """The :class:`Call` in a received message (its headers, raw body and content type);
    :class:`NotARequest` saying why when it is not one.

    JSON is always accepted. A pickled body is unpickled only when ``accept_pickle`` and
    its signature verifies with ``secret`` (:class:`UnsignedPickle` otherwise): what a
    Redis writer without the secret pushes never runs code.

    >>> call = decode_call({"task": TASK_NAME, "id": "d9b1"}, b'[["__call__", [1], {}], {}, {}]', "application/json")
    >>> call.method, call.args, call.kwargs, call.priority
    ('__call__', [1], {}, 5)
    >>> decode_call({"task": TASK_NAME, "id": "d9b1"},
    ...             b'[[7], {"method": "embed", "args": [1], "kwargs": {}}, {"chain": [{}]}]', "application/json").args
    [7, 1]
    >>> decode_call({"task": "billing.charge", "id": "x"}, b"[[], {}, {}]", "application/json")
    Traceback (most recent call last):
    ...
    taskserve.wire.NotARequest: a task named 'billing.charge', not taskserve.call
    >>> decode_call({"task": TASK_NAME, "id": "x"}, b'[["__call__", 1], {}, {}]', "application/json")
    Traceback (most recent call last):
    ...
    taskserve.wire.NotARequest: its arguments are not (method, args, kwargs): ['__call__', 1]
    """
    if not isinstance(headers, dict) or "task" not in headers:
        raise NotARequest("not a Celery task (no task header)")
    if headers["task"] != TASK_NAME:
        raise NotARequest(f"a task named {_short(headers['task'])}, not {TASK_NAME}")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise NotARequest("a task without an id")
    decoded = _decode_body(headers, body, content_type, secret, accept_pickle)
    if not (isinstance(decoded, (list, tuple)) and len(decoded) == 3):
        raise NotARequest(f"its body is not Celery's (args, kwargs, embed): {_short(decoded)}")
    task_args, task_kwargs, embed = decoded
    if embed is not None and not isinstance(embed, dict):
        raise NotARequest(f"its options are not a mapping: {_short(embed)}")
    method, args, kwargs = call_arguments(task_args, task_kwargs)
    options = headers.get(OPTIONS_HEADER)
    from_celery = options is None
    options = options or {}
    if not isinstance(options, dict):
        raise NotARequest(f"its {OPTIONS_HEADER} header is not a mapping: {_short(options)}")
    info = delivery_info or {}
    properties = properties or {}
    embed = embed or {}
    return Call(
        task_id=task_id,
        method=method,
        args=list(args),
        kwargs=dict(kwargs),
        queue=str(info.get("routing_key") or ""),
        priority=priority_from_transport(properties.get("priority")),
        expires_at=_expiry(headers.get("expires")),
        job=bool(options.get("job")),
        stream=bool(options.get("stream")),
        redelivered=bool(info.get("redelivered") or headers.get("redelivered")),
        canvas=bool(embed.get("chain") or embed.get("callbacks") or embed.get("errbacks") or embed.get("chord")
                    or headers.get("group")),
        from_celery=from_celery,
        eta=_expiry(headers.get("eta")),
        options=options,
    )


def call_arguments(task_args: Any, task_kwargs: Any) -> tuple[str, list, dict]:
    """``(method, args, kwargs)`` from a ``taskserve.call`` task's own arguments: the
    positional form ``(method, args, kwargs)``, or the canvas form of
    :func:`signature_args` (leading positional arguments, a chain's previous result,
    come first); :class:`NotARequest` for anything else.

    >>> call_arguments(["__call__", [1], {}], {})
    ('__call__', [1], {})
    >>> call_arguments([7], {"method": "embed", "args": [1], "kwargs": {}})
    ('embed', [7, 1], {})
    """
    if not isinstance(task_kwargs, dict):
        raise NotARequest(f"it has keyword arguments: {_short(task_kwargs)}")
    if not isinstance(task_args, (list, tuple)):
        raise NotARequest(f"its arguments are not (method, args, kwargs): {_short(task_args)}")
    if set(task_kwargs) == {"method", "args", "kwargs"}:
        method, args, kwargs = task_kwargs["method"], task_kwargs["args"], task_kwargs["kwargs"]
        if not (isinstance(method, str) and isinstance(args, (list, tuple)) and isinstance(kwargs, dict)):
            raise NotARequest(f"its keyword arguments are not (method, args, kwargs): {_short(task_kwargs)}")
        return method, [*task_args, *args], dict(kwargs)
    if task_kwargs:
        raise NotARequest(f"it has keyword arguments: {_short(task_kwargs)}")
    if not (len(task_args) == 3 and isinstance(task_args[0], str) and isinstance(task_args[1], (list, tuple))
            and isinstance(task_args[2], dict)):
        raise NotARequest(f"its arguments are not (method, args, kwargs): {_short(task_args)}")
    return task_args[0], list(task_args[1]), dict(task_args[2])


def _decode_body(headers: dict, body: bytes, content_type: str, secret: Optional[ClusterSecret],
                 accept_pickle: bool) -> Any:
    if content_type == "application/x-python-serialize":
        if not accept_pickle:
            raise NotARequest("a pickled body, and this deployment's serializer is json")
        mac = headers.get(SIGNATURE_HEADER)
        if secret is None or not isinstance(mac, str) or not secret.verify(CALL_MAC_DOMAIN + body, mac):
            raise UnsignedPickle("a pickled body without a valid signature of the cluster secret: not unpickled")
        try:
            return pickle.loads(body)
        except Exception as error:
            raise NotARequest(f"its body cannot be decoded ({_why(error)})") from None
    if content_type not in ("application/json", None, ""):
        raise NotARequest(f"its body is {_short(content_type)}, not JSON")
    try:
        return loads_json(body)
    except Exception as error:
        raise NotARequest(f"its body cannot be decoded ({_why(error)})") from None


def _expiry(expires: Any) -> Optional[float]:
    """UNIX time of Celery's ``expires`` (or ``eta``) header (ISO 8601), None if absent or unreadable.

    >>> _expiry("2020-01-01T00:00:00+00:00"), _expiry(None), _expiry("soon")
    (1577836800.0, None, None)
    """
    if not expires or not isinstance(expires, str):
        return None
    try:
        moment = datetime.fromisoformat(expires)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


# --------------------------------------------------------------------------- answers


@dataclass
class Outcome:
    """What serving a call produced: its value, or the exception it raised (as text)."""

    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    error_module: Optional[str] = None

    @classmethod
    def of_exception(cls, error: BaseException, with_traceback: bool = True) -> "Outcome":
        """The outcome of a call that raised ``error``.

        >>> Outcome.of_exception(ValueError("bad"), with_traceback=False)
        Outcome(ok=False, value=None, error_type='ValueError', message='bad', traceback='', error_module='builtins')
        """
        text = "".join(traceback_module.format_exception(type(error), error, error.__traceback__)) \
            if with_traceback else ""
        module = type(error).__module__
        return cls(False, None, type(error).__name__, str(error), text,
                   "builtins" if module == "builtins" and type(error).__name__ in _BUILTIN_EXCEPTIONS else None)

    @classmethod
    def failure(cls, error_type: str, message: str, traceback: str = "") -> "Outcome":
        """A failure that no exception of the user's raised (a replica that died, say)."""
        return cls(False, None, error_type, message, traceback)

    def error(self) -> ReplicaError:
        return ReplicaError(self.error_type, self.message, self.traceback)


def encode_answer(task_id: str, outcome: Outcome, version: str = "", serializer: str = "json",
                  secret: Optional[ClusterSecret] = None) -> bytes:
    """The result record of ``task_id``: what its key holds and its channel publishes.

    A value JSON cannot carry fails the call with the one-line hint instead (a
    pickled value is signed with ``secret``).

    >>> json.loads(encode_answer("t1", Outcome(True, [1, 2]), version="3"))["result"]
    [1, 2]
    >>> meta = json.loads(encode_answer("t1", Outcome.failure("ValueError", "bad")))
    >>> meta["status"], meta["result"]["exc_type"], meta["result"]["exc_message"]
    ('FAILURE', 'ValueError', ['bad'])
    """
    meta: dict[str, Any] = {"status": SUCCESS if outcome.ok else FAILURE, "traceback": None, "children": [],
                            "date_done": datetime.now(timezone.utc).isoformat(), "task_id": task_id}
    if version:
        meta[VERSION_FIELD] = version
    if not outcome.ok:
        meta["result"] = _exception_info(outcome)
        meta["traceback"] = outcome.traceback or None
        return dumps_json(meta)
    if serializer == "pickle":
        if secret is None:
            raise ValueError("a pickled answer must be signed: no cluster secret was given")
        try:
            raw = pickle.dumps(outcome.value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            return encode_answer(task_id, Outcome.failure("TypeError", f"the result cannot be pickled ({error})"),
                                 version, serializer, secret)
        meta["result"] = {PICKLED_RESULT: base64.b64encode(raw).decode("ascii"),
                          "signature": secret.sign(ANSWER_MAC_DOMAIN + raw)}
        return dumps_json(meta)
    meta["result"] = outcome.value
    try:
        return dumps_json(meta)
    except TypeError as error:
        failure = Outcome.failure("TypeError", str(not_json_hint("the result", error)))
        return encode_answer(task_id, failure, version)


def _exception_info(outcome: Outcome) -> dict[str, Any]:
    """An exception as Celery's result backends describe one."""
    return {"exc_type": outcome.error_type, "exc_message": [outcome.message], "exc_module": outcome.error_module}


@dataclass
class Answer:
    """A finished call as its caller reads it: :attr:`value`, or :attr:`error` to raise.

    :attr:`expired` marks a call no replica ran because its caller had given up
    (Celery's ``REVOKED``).
    """

    state: str
    value: Any = None
    error: Optional[ReplicaError] = None
    version: str = ""

    @property
    def ok(self) -> bool:
        return self.state == SUCCESS

    @property
    def expired(self) -> bool:
        return self.state == REVOKED

    def result(self) -> Any:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


def decode_answer(data: bytes | str, serializer: str = "json", secret: Optional[ClusterSecret] = None) -> Answer:
    """The :class:`Answer` in a result record; its state is not READY while not finished.

    A record that is not one (say, garbage under the key) reads as a failure that says
    so, never as a value; a pickled value is unpickled only for a ``serializer="pickle"``
    reader with the ``secret`` that verifies its signature.

    >>> decode_answer(encode_answer("t", Outcome(True, 42))).value
    42
    >>> decode_answer(b'{"status": "REVOKED", "result": {"exc_type": "TaskRevokedError"}}').expired
    True
    >>> str(decode_answer(b"not json").error)
    "BadAnswer: an answer that is not a result record: b'not json'"
    """
    try:
        meta = loads_json(data)
    except Exception:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("status"), str):
        return Answer(FAILURE, error=ReplicaError("BadAnswer", f"an answer that is not a result record: {_short(data)}"))
    return answer_of(meta, serializer, secret)


def answer_of(meta: Mapping[str, Any], serializer: str = "json", secret: Optional[ClusterSecret] = None) -> Answer:
    """:func:`decode_answer` for a record already parsed (a job's stored result, say)."""
    state = meta["status"]
    version = str(meta.get(VERSION_FIELD) or "")
    result = meta.get("result")
    if state == SUCCESS:
        if isinstance(result, dict) and PICKLED_RESULT in result:
            return _unpickled(result, serializer, secret, version)
        return Answer(SUCCESS, value=result, version=version)
    if state in (FAILURE, REVOKED):
        info = result if isinstance(result, dict) else {}
        args = info.get("exc_message")
        message = str(args[0]) if isinstance(args, (list, tuple)) and len(args) == 1 else str(args or "")
        default = "TaskRevokedError" if state == REVOKED else "Exception"
        error = ReplicaError(str(info.get("exc_type") or default), message or ("expired" if state == REVOKED else ""),
                             str(meta.get("traceback") or ""))
        return Answer(state, error=error, version=version)
    return Answer(state, version=version)


def _unpickled(result: Mapping[str, Any], serializer: str, secret: Optional[ClusterSecret], version: str) -> Answer:
    if serializer != "pickle":
        return Answer(FAILURE, error=ReplicaError(
            "UnsignedPickle", "a pickled answer to a call of a json deployment: not unpickled"), version=version)
    try:
        raw = base64.b64decode(result[PICKLED_RESULT])
    except (TypeError, ValueError):
        raw = b""
    mac = result.get("signature")
    if secret is None or not isinstance(mac, str) or not secret.verify(ANSWER_MAC_DOMAIN + raw, mac):
        return Answer(FAILURE, error=ReplicaError(
            "UnsignedPickle", "a pickled answer without a valid signature of the cluster secret: not unpickled"),
            version=version)
    return Answer(SUCCESS, value=pickle.loads(raw), version=version)


# What a replica puts under a request's result key as it takes it (Celery's STARTED),
# if nothing is there yet: the mark that tells a second delivery of the same id apart.
STARTED_RECORD = b'{"status":"STARTED","result":null,"traceback":null,"children":[]}'


def revoked_answer(task_id: str, why: str = "expired") -> bytes:
    """The record of a call not run because its caller gave up (Celery's ``REVOKED``).

    >>> decode_answer(revoked_answer("t")).error
    ReplicaError('TaskRevokedError: expired')
    """
    return dumps_json({"status": REVOKED, "result": {"exc_type": "TaskRevokedError", "exc_message": [why],
                                                     "exc_module": "celery.exceptions"},
                       "traceback": None, "children": [], "task_id": task_id,
                       "date_done": datetime.now(timezone.utc).isoformat()})


# --------------------------------------------------------------------------- streams


# A stream's entries (a Redis stream, one per streaming call): a batch of chunks, in
# order, or the end. STREAM_CHUNKS holds a JSON list of the chunks yielded since the last
# entry (each its own JSON value, bytes as kombu's type marker); STREAM_END holds the
# outcome: {"ok": true} after the last chunk, or the error, which comes after the chunks
# before it. An HTTP stream's first entry carries the response head (STREAM_HEAD).
STREAM_CHUNKS, STREAM_END, STREAM_HEAD = b"c", b"e", b"h"
# What a caller gets when the replica serving its stream died mid-stream.
STREAM_INTERRUPTED = "stream interrupted: the replica serving it stopped; it is not run again"


def stream_chunks(chunks: list) -> dict[bytes, bytes]:
    """The entry of a batch of chunks.

    >>> read_stream_entry(stream_chunks(["to", b"ken", 3]))
    (['to', b'ken', 3], None)
    """
    return {STREAM_CHUNKS: dumps_json(chunks)}


def stream_end(outcome: Optional[Outcome] = None) -> dict[bytes, bytes]:
    """The last entry: the stream ended (``outcome`` None or ok) or failed (its error).

    >>> read_stream_entry(stream_end(Outcome.failure("ValueError", "bad token")))[1].error
    ReplicaError('ValueError: bad token')
    """
    if outcome is None or outcome.ok:
        return {STREAM_END: b'{"ok":true}'}
    return {STREAM_END: dumps_json({"ok": False, "type": outcome.error_type, "message": outcome.message,
                                    "traceback": outcome.traceback})}


def is_streaming_message(message: Mapping[str, Any]) -> bool:
    """Whether a queued message (kombu's envelope, decoded) is a streaming call.

    >>> is_streaming_message({"headers": {"id": "d9b1", "taskserve": {"stream": 1}}})
    True
    >>> is_streaming_message({"headers": {"id": "d9b1"}}), is_streaming_message({"headers": None})
    (False, False)
    """
    options = (message.get("headers") or {}).get(OPTIONS_HEADER)
    return isinstance(options, dict) and bool(options.get("stream"))


def interrupted_stream_end() -> dict[bytes, bytes]:
    """The last entry a node agent writes for a stream whose replica died mid-stream."""
    return stream_end(Outcome.failure("ReplicaError", STREAM_INTERRUPTED))


def read_stream_entry(fields: Mapping[Any, Any]) -> tuple[list, Optional[Answer]]:
    """(the chunks, the end or None) of one stream entry (its fields, bytes keys).

    >>> read_stream_entry(stream_end())
    ([], Answer(state='SUCCESS', value=None, error=None, version=''))
    """
    fields = {(k if isinstance(k, bytes) else k.encode()): v for k, v in fields.items()}
    chunks = loads_json(fields[STREAM_CHUNKS]) if STREAM_CHUNKS in fields else []
    if STREAM_END not in fields:
        return list(chunks), None
    end = loads_json(fields[STREAM_END])
    if end.get("ok"):
        return list(chunks), Answer(SUCCESS)
    error = ReplicaError(str(end.get("type") or "Exception"), str(end.get("message") or ""),
                         str(end.get("traceback") or ""))
    return list(chunks), Answer(FAILURE, error=error)


# --------------------------------------------------------------------------- job records


# A job's states (SPEC: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; DEAD when it
# cannot be run at all, or its replicas died under it max_deliveries times).
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, DEAD = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "DEAD"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, DEAD)
FINISHED_JOB_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, DEAD})
DEFAULT_RETRY_DELAY_S = 1.0


def new_job_id() -> str:
    """A job id: 128 random bits in hex, so nobody guesses another's.

    >>> len(new_job_id()), new_job_id() != new_job_id()
    (32, True)
    """
    return secrets.token_hex(16)


@dataclass(frozen=True)
class JobError:
    """Why a job's last attempt failed: the exception's type, message and traceback."""

    type: str
    message: str
    traceback: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


@dataclass(frozen=True)
class JobStatus:
    """A job as its record says: its state, progress and times (UNIX seconds).

    ``attempts`` counts the runs started (a replica dying under one starts another
    without using up a retry); ``error`` is the last attempt's failure.
    """

    job_id: str
    deployment: str
    state: str
    method: str = "__call__"
    priority: int = DEFAULT_PRIORITY
    progress: Optional[float] = None
    message: str = ""
    attempts: int = 0
    max_retries: int = 0
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S
    created_at: Optional[float] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    error: Optional[JobError] = None
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_JOB_STATES

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON data (the gateway's ``/-/jobs/<id>``, ``taskserve job --json``)."""
        return {"job_id": self.job_id, "deployment": self.deployment, "method": self.method, "state": self.state,
                "priority": self.priority, "progress": self.progress, "message": self.message,
                "attempts": self.attempts, "max_retries": self.max_retries, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "error": self.error.to_dict() if self.error else None}


def job_fields(deployment: str, method: str, priority: Optional[int], max_retries: int, retry_delay_s: float,
               created_at: float, idempotency_key: str = "") -> dict[str, str]:
    """The fields of a new job's record (its Redis hash), QUEUED.

    >>> job_status("j1", job_fields("ocr", "__call__", 7, 2, 0.5, 1700000000.0)).priority
    7
    """
    fields = {"deployment": deployment, "method": method, "state": QUEUED,
              "priority": str(DEFAULT_PRIORITY if priority is None else priority), "attempts": "0",
              "failures": "0", "max_retries": str(max_retries), "retry_delay_s": repr(float(retry_delay_s)),
              "created_at": repr(created_at)}
    if idempotency_key:
        fields["idempotency_key"] = idempotency_key
    return fields


def job_status(job_id: str, fields: Mapping[Any, Any]) -> JobStatus:
    """The :class:`JobStatus` of a job record (its hash, as bytes or text).

    >>> status = job_status("j1", {b"deployment": b"ocr", b"state": b"FAILED", b"attempts": b"2",
    ...                            b"error": b'{"type": "ValueError", "message": "bad page", "traceback": ""}'})
    >>> status.state, status.attempts, status.error.message, status.progress
    ('FAILED', 2, 'bad page', None)
    """
    text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}
    error = None
    if text.get("error"):
        try:
            data = json.loads(text["error"])
            error = JobError(str(data.get("type", "")), str(data.get("message", "")), str(data.get("traceback", "")))
        except (ValueError, AttributeError):
            error = JobError("Unreadable", text["error"])
    return JobStatus(
        job_id=job_id, deployment=text.get("deployment", ""), state=text.get("state", QUEUED),
        method=text.get("method", "__call__"), priority=_int(text.get("priority"), DEFAULT_PRIORITY),
        progress=_float(text.get("progress")), message=text.get("message", ""),
        attempts=_int(text.get("attempts"), 0), max_retries=_int(text.get("max_retries"), 0),
        retry_delay_s=_float(text.get("retry_delay_s")) or DEFAULT_RETRY_DELAY_S,
        created_at=_float(text.get("created_at")), started_at=_float(text.get("started_at")),
        finished_at=_float(text.get("finished_at")), error=error,
        cancel_requested=text.get("cancel_requested") == "1")


def job_error(outcome: Outcome) -> str:
    """A failed outcome as a record's ``error`` field (JSON).

    >>> job_error(Outcome.failure("ValueError", "bad page"))
    '{"type":"ValueError","message":"bad page","traceback":""}'
    """
    return json.dumps({"type": outcome.error_type, "message": outcome.message, "traceback": outcome.traceback},
                      separators=(",", ":"))


def retry_delay(retry_delay_s: float, failures: int) -> float:
    """Seconds before a job whose ``failures``-th attempt failed runs again:
    ``retry_delay_s × 2^(failures-1)``.

    >>> [retry_delay(1.0, n) for n in (1, 2, 3)]
    [1.0, 2.0, 4.0]
    """
    return retry_delay_s * 2 ** max(0, failures - 1)


def _int(text: Optional[str], default: int) -> int:
    try:
        return int(text) if text not in (None, "") else default
    except ValueError:
        return default


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- helpers


def _line(text: str, limit: int = 120) -> str:
    """``text`` on one line of at most ``limit`` characters, for a log line.

    >>> _line("Expecting value:\\n  line 1", limit=20)
    'Expecting value:...'
    """
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line of at most ``limit`` characters.

    >>> _short("x" * 100, limit=10)
    "'xxxxxx..."
    """
    return _line(repr(value), limit)


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {_line(str(error))}"
