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

TASK_NAME = "taskserve.call"

# Priorities as users give them: 0..9, a higher one is taken first; calls and jobs
# without one get DEFAULT_PRIORITY. kombu's Redis transport takes its priority 0 first,
# so a taskserve priority p travels as kombu priority MAX_PRIORITY - p; a plain Celery
# producer's `priority=` keeps Celery's Redis meaning (0 first).
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


def priority_to_transport(priority: int) -> int:
    """The kombu priority a taskserve ``priority`` travels as.

    >>> priority_to_transport(9), priority_to_transport(5), priority_to_transport(0)
    (0, 4, 9)
    """
    return MAX_PRIORITY - priority


def priority_from_transport(transport_priority: Any) -> int:
    """The taskserve priority of a message whose kombu priority is ``transport_priority``
    (anything unreadable counts as kombu's default, 0: a plain Celery producer's call).

    >>> priority_from_transport(4), priority_from_transport(None), priority_from_transport(42)
    (5, 9, 0)
    """
    try:
        value = min(max(int(transport_priority), MIN_PRIORITY), MAX_PRIORITY)
    except (TypeError, ValueError):
        value = 0
    return MAX_PRIORITY - value


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
    ``job`` marks a durable job (its record is ``taskserve:job:<task_id>``), ``stream``
    a call whose chunks go to a stream. ``expires_at`` (UNIX time) is when a caller that
    gave up stops waiting: a replica does not run it after that. On a received call,
    ``redelivered`` says it was put back after its replica died and ``canvas`` that a
    Celery canvas (chain, chord, callbacks) continues after it.
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
    options: dict = field(default_factory=dict)

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
            "priority": 0 if call.priority is None else priority_to_transport(call.priority),
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
        if options:
            headers[OPTIONS_HEADER] = options
        if serializer == "pickle":
            if secret is None:
                raise ValueError("a pickled call must be signed: no cluster secret was given")
            headers[SIGNATURE_HEADER] = secret.sign(raw)
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
    ('__call__', [1], {}, 9)
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
    options = headers.get(OPTIONS_HEADER) or {}
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
        if secret is None or not isinstance(mac, str) or not secret.verify(body, mac):
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
    """UNIX time of Celery's ``expires`` header (ISO 8601), None if absent or unreadable.

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
        meta["result"] = {PICKLED_RESULT: base64.b64encode(raw).decode("ascii"), "signature": secret.sign(raw)}
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
    if secret is None or not isinstance(mac, str) or not secret.verify(raw, mac):
        return Answer(FAILURE, error=ReplicaError(
            "UnsignedPickle", "a pickled answer without a valid signature of the cluster secret: not unpickled"),
            version=version)
    return Answer(SUCCESS, value=pickle.loads(raw), version=version)


def revoked_answer(task_id: str, why: str = "expired") -> bytes:
    """The record of a call not run because its caller gave up (Celery's ``REVOKED``).

    >>> decode_answer(revoked_answer("t")).error
    ReplicaError('TaskRevokedError: expired')
    """
    return dumps_json({"status": REVOKED, "result": {"exc_type": "TaskRevokedError", "exc_message": [why],
                                                     "exc_module": "celery.exceptions"},
                       "traceback": None, "children": [], "task_id": task_id,
                       "date_done": datetime.now(timezone.utc).isoformat()})


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
