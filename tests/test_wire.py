"""The wire formats against Celery's own: the contract that lets plain Celery producers
and taskserve's callers share one queue.

* a call taskserve encodes is the message ``app.send_task`` pushes (headers, properties,
  body), and a replica decodes ``send_task``'s message as its own;
* an answer a replica writes is what ``AsyncResult`` reads: ``get()`` returns the value,
  or raises for a failure, and ``state`` is Celery's;
* an answer Celery itself stores (``mark_as_done``, ``mark_as_failure``,
  ``mark_as_revoked``) reads as the same :class:`~taskserve.wire.Answer` a handle and
  the gateway get.

These run against a real redis-server (Celery's Redis backend needs one).
"""

from __future__ import annotations

import base64
import datetime
import json
import pickle
import uuid
from typing import Iterator

import pytest
import redis
from celery.result import AsyncResult

import taskserve
from taskserve.celery_app import make_app
from taskserve.redis_server import RedisServer, free_port
from taskserve.signing import ClusterSecret
from taskserve.store import result_key
from taskserve.wire import (
    FAILURE,
    REVOKED,
    SUCCESS,
    TASK_NAME,
    Call,
    CallEncoder,
    NotARequest,
    Outcome,
    UnsignedPickle,
    decode_answer,
    decode_call,
    encode_answer,
    revoked_answer,
    signature_args,
)

pytestmark = pytest.mark.integration

SECRET = ClusterSecret.parse("wire-test-secret")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("wire-redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def decoded(item: bytes) -> dict:
    message = json.loads(item)
    raw = base64.b64decode(message["body"])
    message["raw"] = raw
    message["body"] = pickle.loads(raw) if message["content-type"] == "application/x-python-serialize" \
        else json.loads(raw)
    return message


def received(item: bytes, **kwargs: object) -> Call:
    """The call a replica decodes from a queue item."""
    message = decoded(item)
    return decode_call(message["headers"], message["raw"], message["content-type"], message["properties"],
                       message["properties"]["delivery_info"], **kwargs)


# --------------------------------------------------------------------------- calls


@pytest.mark.parametrize("serializer, args", [
    ("json", [1, "two", {"three": [3.5, None, True]}, float("nan")]),
    ("json", [datetime.datetime(2024, 5, 1, 12, 0), uuid.UUID(int=7)]),    # kombu's type markers
    ("pickle", [(1, 2), {1, 2}]),
])
def test_a_call_is_the_message_send_task_pushes(url, client, serializer, args):
    queue = f"taskserve.wire-{uuid.uuid4().hex[:8]}"
    app = make_app(url, serializer)
    app.send_task(TASK_NAME, args=("echo", args, {"k": 1}), queue=queue, task_id="t1")
    celery_message = decoded(client.rpop(queue))
    ours = decoded(CallEncoder(app).encode(Call("t1", "echo", args, {"k": 1}, queue=queue), serializer, SECRET))

    if serializer == "json" and args[-1] != args[-1]:      # NaN: equal only as text
        assert json.dumps(ours["body"]) == json.dumps(celery_message["body"])
    else:
        assert ours["body"] == celery_message["body"]
    differ = {"delivery_tag", "reply_to", "origin", "argsrepr", "ignore_result",     # per message or display only
              "taskserve_signature",                                                # pickled calls are signed
              "taskserve"}                                                          # taskserve's own options
    for part in ("headers", "properties"):
        assert {k: v for k, v in ours[part].items() if k not in differ} == \
            {k: v for k, v in celery_message[part].items() if k not in differ}
    assert ours["headers"]["argsrepr"] == "('echo', ...)" and ours["headers"]["taskserve"] == {}


def test_a_replica_reads_send_tasks_message_as_its_own(url, client):
    queue = f"taskserve.wire-{uuid.uuid4().hex[:8]}"
    make_app(url).send_task(TASK_NAME, args=["predict", [[1, 2]], {"top": 3}], queue=queue, task_id="c1",
                            expires=60)
    call = received(client.rpop(queue))
    assert (call.task_id, call.method, call.args, call.kwargs, call.queue) == ("c1", "predict", [[1, 2]],
                                                                              {"top": 3}, queue)
    assert not call.expired() and not call.job and not call.canvas


def test_a_signature_in_a_chain_gets_the_previous_result_first(url, client):
    queue = f"taskserve.wire-{uuid.uuid4().hex[:8]}"
    taskserve.connect(url)
    signature = taskserve.signature("ranker", "query", method="rank", top=3)
    assert signature.options["queue"] == "taskserve.ranker"
    args, kwargs = signature_args("rank", ["query"], {"top": 3})
    assert (tuple(signature.args), dict(signature.kwargs)) == (args, kwargs)
    app = make_app(url)
    app.send_task(TASK_NAME, args=["doc-7"], kwargs=kwargs, queue=queue, task_id="c2")   # as a chain sends it
    call = received(client.rpop(queue))
    assert (call.method, call.args, call.kwargs) == ("rank", ["doc-7", "query"], {"top": 3})


def test_json_the_arguments_cannot_carry_is_refused_naming_the_fix(url):
    with pytest.raises(TypeError, match="cannot travel as JSON .*serializer='pickle'"):
        CallEncoder(make_app(url)).encode(Call("t1", "echo", [{1, 2}], {}, queue="q"))


def test_a_pickled_call_runs_only_when_signed_with_the_secret(url, client):
    queue = f"taskserve.wire-{uuid.uuid4().hex[:8]}"
    item = CallEncoder(make_app(url, "pickle")).encode(Call("t1", "echo", [(1, 2)], {}, queue=queue), "pickle",
                                                       SECRET)
    assert received(item, secret=SECRET, accept_pickle=True).args == [(1, 2)]
    with pytest.raises(UnsignedPickle):
        received(item, secret=ClusterSecret.parse("someone-else"), accept_pickle=True)
    with pytest.raises(NotARequest, match="serializer is json"):
        received(item, secret=SECRET)
    # What a Redis writer without the secret pushes (send_task's pickle) is never unpickled.
    make_app(url, "pickle").send_task(TASK_NAME, args=["echo", [1], {}], queue=queue, task_id="t2")
    with pytest.raises(UnsignedPickle, match="without a valid signature"):
        received(client.rpop(queue), secret=SECRET, accept_pickle=True)


# --------------------------------------------------------------------------- answers


def store(client: redis.Redis, task_id: str, record: bytes) -> None:
    client.set(result_key(task_id), record)


def test_asyncresult_reads_a_replicas_answer_with_celerys_meaning(url, client):
    app = make_app(url)
    store(client, "ok-1", encode_answer("ok-1", Outcome(True, {"label": "cat", "p": [0.9]}), version="3"))
    result = AsyncResult("ok-1", app=app)
    assert (result.state, result.get(timeout=5)) == ("SUCCESS", {"label": "cat", "p": [0.9]})

    try:
        raise ValueError("no such image")
    except ValueError as error:
        store(client, "bad-1", encode_answer("bad-1", Outcome.of_exception(error)))
    result = AsyncResult("bad-1", app=app)
    assert result.state == "FAILURE"
    with pytest.raises(ValueError, match="no such image"):      # a builtin type comes back as itself
        result.get(timeout=5)

    class ModelError(Exception):
        pass

    store(client, "bad-2", encode_answer("bad-2", Outcome.of_exception(ModelError("weights missing"))))
    with pytest.raises(Exception, match="weights missing") as caught:
        AsyncResult("bad-2", app=app).get(timeout=5)
    assert type(caught.value).__name__ == "ModelError"          # a type the producer cannot import


def test_celerys_own_records_read_as_the_same_answers(url):
    app = make_app(url)
    backend = app.backend
    backend.mark_as_done("c-ok", [1, 2])
    backend.mark_as_failure("c-bad", KeyError("k"))
    backend.mark_as_revoked("c-gone", "expired")
    read = {task_id: decode_answer(backend.client.get(result_key(task_id))) for task_id in ("c-ok", "c-bad", "c-gone")}
    assert (read["c-ok"].state, read["c-ok"].value) == (SUCCESS, [1, 2])
    assert (read["c-bad"].state, read["c-bad"].error.type_name) == (FAILURE, "KeyError")
    assert read["c-gone"].expired and read["c-gone"].error.type_name == "TaskRevokedError"
    ours = decode_answer(revoked_answer("c-gone"))
    assert (ours.state, ours.error.type_name, ours.error.message) == (REVOKED, "TaskRevokedError", "expired")
    with pytest.raises(taskserve.ReplicaError, match="TaskRevokedError: expired"):
        ours.result()


def test_a_value_json_cannot_carry_fails_the_call_with_the_hint():
    answer = decode_answer(encode_answer("t", Outcome(True, {1, 2})))
    assert answer.state == FAILURE and answer.error.type_name == "TypeError"
    assert "cannot travel as JSON" in answer.error.message and ".tolist()" in answer.error.message


def test_numpy_values_travel_as_lists_and_numbers():
    numpy = pytest.importorskip("numpy")
    value = {"embedding": numpy.arange(3, dtype=numpy.float32) / 2, "count": numpy.int64(7)}
    assert decode_answer(encode_answer("t", Outcome(True, value))).value == {"embedding": [0.0, 0.5, 1.0],
                                                                            "count": 7}


def test_a_pickled_answer_is_unpickled_only_signed_and_only_by_a_pickle_reader():
    record = encode_answer("t", Outcome(True, (1, {2})), serializer="pickle", secret=SECRET)
    assert decode_answer(record, "pickle", SECRET).value == (1, {2})
    for serializer, secret in (("json", SECRET), ("pickle", ClusterSecret.parse("other")), ("pickle", None)):
        answer = decode_answer(record, serializer, secret)
        assert answer.state == FAILURE and answer.error.type_name == "UnsignedPickle"
    forged = json.dumps({"status": "SUCCESS", "result": {"taskserve_pickle": base64.b64encode(
        pickle.dumps(1)).decode(), "signature": "0" * 64}}).encode()
    assert decode_answer(forged, "pickle", SECRET).error.type_name == "UnsignedPickle"


def test_garbage_under_a_result_key_is_a_failure_never_a_value():
    for data in (b"not json", b"[1, 2]", b'{"result": 1}'):
        answer = decode_answer(data)
        assert answer.state == FAILURE and answer.error.type_name == "BadAnswer"
