"""Jobs over HTTP: a request that prefers to be answered later, and the job's own resource.

A request to a deployment's route with the header ``Prefer: respond-async`` (RFC 7240)
is submitted as a job instead of being waited for: the same ``__http__`` call a plain
request travels as, marked a job, queued with its record in one step (the store's
``submit_job`` script, on the gateway's ``redis.asyncio`` client). The answer comes at
once::

    curl -i -H 'Prefer: respond-async' -d '{"x": 1}' http://127.0.0.1:8000/echo
    # HTTP/1.1 202 Accepted
    # location: /-/jobs/9f0c...
    # {"job_id": "9f0c...", "status_url": "/-/jobs/9f0c..."}
    curl http://127.0.0.1:8000/-/jobs/9f0c...      # {"state": "SUCCEEDED", ..., "result": {...}}
    curl -X DELETE http://127.0.0.1:8000/-/jobs/9f0c...

``Idempotency-Key: K`` returns the job already submitted under K for that deployment
(while it is kept); ``Priority: 0..9`` sets its priority (a higher one is taken first).

``GET /-/jobs/<id>`` answers with the job's status (:meth:`JobStatus.to_dict`), its
``result`` once SUCCEEDED and its ``error`` once FAILED or DEAD (the traceback only with
``--debug``). The gateway never unpickles: the result of a job of a pickle deployment
submitted from Python is left out, with a note saying how to read it. ``DELETE`` cancels:
202 with the state after, 409 once the job has finished; 404 for a job unknown or
expired.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Mapping, Optional, Sequence

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from ..connection import async_connection_pool
from ..errors import JobNotFound, RedisUnavailable
from ..http import HTTP_METHOD, response_data
from ..state import Goal
from ..store import Jobs, queue_list
from ..store.keys import goal_key, job_key, result_key
from ..store.lua import source as lua_source
from ..wire import (
    DEFAULT_RETRY_DELAY_S,
    FINISHED_JOB_STATES,
    MAX_PRIORITY,
    MIN_PRIORITY,
    PICKLED_RESULT,
    SUCCEEDED,
    Call,
    CallEncoder,
    JobStatus,
    decode_answer,
    dumps_json,
    job_fields,
    job_status,
    loads_json,
    new_job_id,
    priority_to_transport,
    revoked_answer,
)
from .routes import Route

log = logging.getLogger("taskserve.gateway.jobs")

JOBS_PATH = "/-/jobs/"
PREFER_HEADER = "prefer"
RESPOND_ASYNC = "respond-async"
IDEMPOTENCY_HEADER = "idempotency-key"
PRIORITY_HEADER = "priority"
MAX_IDEMPOTENCY_KEY = 256          # as a handle's idempotency_key
DEFAULT_JOB_TTL_S = 86_400
RETRY_AFTER_S = 1
# Submits go through connections of their own that never resend a command by themselves
# (the gateway's others retry once, for a connection gone stale): see submit_once.
SUBMIT_CONNECTIONS = 16
SUBMIT_POOL_TIMEOUT_S = 10.0
# Job ids: taskserve's 32 hex digits, or a plain Celery producer's (a UUID); anything
# else is no job and never becomes part of a key.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class BadJobRequest(ValueError):
    """A header of a job's request that cannot be used; the message names the fix."""


class SubmitUnsure(Exception):
    """Redis failed under a submit, and then could not be asked whether the job was queued."""


def prefers_async(headers: Mapping[str, str]) -> bool:
    """Whether the request asks to be answered later: ``Prefer: respond-async`` (one
    preference among others, any case, parameters ignored).

    >>> prefers_async({"prefer": "respond-async"}), prefers_async({"prefer": "wait=10, Respond-Async"})
    (True, True)
    >>> prefers_async({"prefer": "return=minimal"}), prefers_async({})
    (False, False)
    """
    value = headers.get(PREFER_HEADER)
    if not value:
        return False
    for preference in value.split(","):
        token = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
        if token == RESPOND_ASYNC:
            return True
    return False


def priority_of(headers: Mapping[str, str]) -> Optional[int]:
    """The job's priority from its ``Priority`` header (None without one).

    >>> priority_of({"priority": "9"}), priority_of({})
    (9, None)
    >>> priority_of({"priority": "high"})
    Traceback (most recent call last):
    ...
    taskserve.gateway.jobs.BadJobRequest: Priority: 'high' is not a job priority: use a whole number from 0 (last) to 9 (first); the default is 5
    """
    value = headers.get(PRIORITY_HEADER)
    if value is None:
        return None
    text = value.strip()
    if not (text.isdigit() and MIN_PRIORITY <= int(text) <= MAX_PRIORITY):
        raise BadJobRequest(f"Priority: {value!r} is not a job priority: use a whole number from {MIN_PRIORITY} "
                            f"(last) to {MAX_PRIORITY} (first); the default is 5")
    return int(text)


def idempotency_key_of(headers: Mapping[str, str]) -> str:
    """The request's ``Idempotency-Key`` ("" without one).

    >>> idempotency_key_of({"idempotency-key": "order-17"}), idempotency_key_of({})
    ('order-17', '')
    """
    value = headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return ""
    if not value.strip() or len(value) > MAX_IDEMPOTENCY_KEY:
        raise BadJobRequest(f"Idempotency-Key: use a non-empty value of at most {MAX_IDEMPOTENCY_KEY} characters, "
                            f"not one of {len(value)}")
    return value


def job_body(status: JobStatus, answer: Optional[bytes], debug: bool = False) -> dict[str, Any]:
    """What ``GET /-/jobs/<id>`` answers: the status, the ``result`` once SUCCEEDED (an
    HTTP job's as :func:`taskserve.http.response_data`), the ``error`` once FAILED or
    DEAD, its traceback only with ``debug``. Nothing is unpickled.

    >>> from taskserve.wire import Outcome, encode_answer
    >>> done = JobStatus("j1", "ocr", "SUCCEEDED")
    >>> job_body(done, encode_answer("j1", Outcome(True, {"pages": 3})))["result"]
    {'pages': 3}
    >>> failed = job_status("j2", {"deployment": "ocr", "state": "FAILED",
    ...                            "error": '{"type": "KeyError", "message": "p", "traceback": "Traceback..."}'})
    >>> job_body(failed, None)["error"], "result" in job_body(failed, None)
    ({'type': 'KeyError', 'message': 'p'}, False)
    """
    body = status.to_dict()
    if body.get("error") and not debug:
        body["error"] = {key: value for key, value in body["error"].items() if key != "traceback"}
    if status.state != SUCCEEDED:
        return body
    if answer is None:
        body["result"] = None
        return body
    try:
        meta = loads_json(answer)
    except Exception:
        meta = None
    if isinstance(meta, dict) and isinstance(meta.get("result"), dict) and PICKLED_RESULT in meta["result"]:
        body["result"] = None
        body["result_note"] = ("the result is pickled (the deployment's serializer is pickle) and HTTP never "
                               f"unpickles: read it from Python, taskserve.get_job({status.job_id!r}).result()")
        return body
    decoded = decode_answer(answer)
    if decoded.error is not None:
        body["result"] = None
        body["result_note"] = f"the stored result cannot be read: {decoded.error}"
        return body
    value = decoded.value
    if status.method == HTTP_METHOD and isinstance(value, dict):
        try:
            value = response_data(value)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            body["result_note"] = f"the replica's HTTP answer cannot be read ({error}); given as it was stored"
    body["result"] = value
    return body


def json_response(data: Any, status_code: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    """``data`` as JSON, with what Celery's JSON carries (datetimes, ...) as Celery writes it."""
    return Response(dumps_json(data), status_code=status_code, headers=headers, media_type="application/json")


def error_response(status: int, error: str, message: str, *, headers: Optional[dict[str, str]] = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status, headers=headers)


class JobEndpoints:
    """Submits requests as jobs, and serves ``/-/jobs/<id>`` (GET, DELETE), on the gateway's
    ``redis.asyncio`` client.

    Example::

        jobs = JobEndpoints(address, client, sender.encoder)
        response, error = await jobs.submit(route, queue, payload, request.headers)
    """

    def __init__(self, address: str, client: redis.asyncio.Redis, encoder: CallEncoder, debug: bool = False,
                 writer: Optional[redis.asyncio.Redis] = None) -> None:
        self.address = address
        self.client = client
        self.encoder = encoder
        self.debug = debug
        self.cancel_script = client.register_script(lua_source("cancel_job"))
        # The client submits go through (made at the first: it needs the event loop).
        self.writer = writer
        self.submit_script: Any = writer.register_script(lua_source("submit_job")) if writer is not None else None

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.aclose()

    async def submit_once(self, job_id: str, keys: list[str], args: list[Any]) -> Sequence[Any]:
        """The reply of the store's ``submit_job`` script for job ``job_id``, run so that
        the job is never queued twice: a submit is not resent blindly when its connection
        fails (its reply may be all that was lost), but checked: if the job's record
        exists, it was queued (the reply given is "submitted"); if not, it is sent once
        more. Raises the connection's error when it was not queued, and
        :class:`SubmitUnsure` when Redis cannot be asked.
        """
        if self.submit_script is None:
            self.writer = redis.asyncio.Redis.from_pool(async_connection_pool(
                self.address, max_connections=SUBMIT_CONNECTIONS, timeout=SUBMIT_POOL_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0), socket_keepalive=True, socket_connect_timeout=5))
            self.submit_script = self.writer.register_script(lua_source("submit_job"))
        failure: Optional[BaseException] = None
        for _ in range(2):
            try:
                return await self.submit_script(keys=keys, args=args)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
                failure = error
            try:
                if await self.client.exists(job_key(job_id)):
                    return [1, job_id]
            except (redis.RedisError, OSError) as error:
                raise SubmitUnsure(f"{failure}; then {error}") from None
        assert failure is not None
        raise failure

    # ------------------------------------------------------------------ submit

    async def submit(self, route: Route, queue: str, payload: dict, headers: Mapping[str, str]) -> tuple[Response, str]:
        """Queue the request (``payload``, for ``queue``) as a job of ``route``'s deployment:
        ``202 Accepted`` with its status URL; the response and the error label for the metrics."""
        try:
            priority = priority_of(headers)
            key = idempotency_key_of(headers)
        except BadJobRequest as error:
            return error_response(400, "BadRequest", str(error)), "bad_request"
        name = route.deployment
        job_id = new_job_id()
        call = Call(job_id, HTTP_METHOD, [payload], {}, queue=queue, priority=priority, job=True)
        # An HTTP request is plain data: JSON whatever the deployment's serializer.
        message = self.encoder.encode(call, argsrepr=f"('{HTTP_METHOD}', '{payload['method']} {payload['path']}')")
        fields = job_fields(name, HTTP_METHOD, priority, 0, DEFAULT_RETRY_DELAY_S, time.time(), key)
        keys, args = Jobs.submit_job_arguments(name, job_id, message, queue_list(queue, priority_to_transport(priority)),
                                               fields, key, route.max_queued, queue)
        try:
            submitted = Jobs.submitted(await self.submit_once(job_id, keys, args))
        except SubmitUnsure as error:
            log.warning("a job of %s may or may not be queued: %s", name, error)
            url = JOBS_PATH + job_id
            return error_response(
                503, "Unavailable", f"Redis failed while job {job_id} was submitted, and whether it was queued cannot "
                f"be told now ({RedisUnavailable(self.address, str(error))}); GET {url} tells once Redis is back: "
                "404 means it was not queued", job_id=job_id, status_url=url), "unavailable"
        except (redis.RedisError, OSError) as error:
            log.warning("cannot submit a job to %s: %s", name, error)
            return self._unreachable(error), "unavailable"
        if submitted.outcome == "full":
            return error_response(
                503, "BackPressure", f"deployment {name!r} has {submitted.queued} requests queued, its "
                f"max_queued_requests of {route.max_queued}; retry later", headers={"retry-after": str(RETRY_AFTER_S)}
            ), "backpressure"
        url = JOBS_PATH + submitted.job_id
        return JSONResponse({"job_id": submitted.job_id, "status_url": url}, status_code=202,
                            headers={"location": url, "preference-applied": RESPOND_ASYNC}), ""

    # ------------------------------------------------------------------ /-/jobs/<id>

    async def get(self, request: HTTPRequest) -> Response:
        """``GET /-/jobs/<id>``: the job's status, result and error (see :func:`job_body`)."""
        job_id = request.path_params["job_id"]
        if not JOB_ID.fullmatch(job_id):
            return self._not_found(job_id)
        try:
            fields = await self.client.hgetall(job_key(job_id))
            if not fields:
                return self._not_found(job_id)
            status = job_status(job_id, fields)
            answer = await self.client.get(result_key(job_id)) if status.state == SUCCEEDED else None
        except (redis.RedisError, OSError) as error:
            return self._unreachable(error)
        return json_response(job_body(status, answer, self.debug))

    async def cancel(self, request: HTTPRequest) -> Response:
        """``DELETE /-/jobs/<id>``: a QUEUED job is CANCELLED and never runs, a RUNNING one is
        asked to stop (202, with the state after); a finished one is left alone (409)."""
        job_id = request.path_params["job_id"]
        if not JOB_ID.fullmatch(job_id):
            return self._not_found(job_id)
        try:
            name, before = await self.client.hmget(job_key(job_id), ["deployment", "state"])
            if name is None:
                return self._not_found(job_id)
            name = name.decode()
            if before is not None and before.decode() in FINISHED_JOB_STATES:
                # Finished already (the script would answer a CANCELLED job's state, as if just cancelled).
                return self._finished(job_id, before.decode())
            ttl_s = await self._job_ttl(name)
            keys, args = Jobs.cancel_job_arguments(name, job_id, ttl_s, revoked_answer(job_id, "cancelled"))
            state = await self.cancel_script(keys=keys, args=args)
        except (redis.RedisError, OSError) as error:
            return self._unreachable(error)
        state = state.decode() if isinstance(state, bytes) else str(state)
        if state == "GONE":
            return self._not_found(job_id)
        if state == "CANCELLED":
            return JSONResponse({"job_id": job_id, "state": state, "message": "cancelled while queued: it never runs"},
                                status_code=202)
        if state == "RUNNING":
            return JSONResponse({"job_id": job_id, "state": state, "cancel_requested": True,
                                 "message": "asked to stop: its method sees job_context().cancelled"}, status_code=202)
        return self._finished(job_id, state)

    def _finished(self, job_id: str, state: str) -> Response:
        return error_response(409, "JobFinished", f"job {job_id} has finished ({state}): there is nothing to cancel",
                              job_id=job_id, state=state)

    async def _job_ttl(self, name: str) -> float:
        text = await self.client.get(goal_key(name))
        try:
            goal = Goal.from_json(text) if text else None
        except (TypeError, ValueError):
            goal = None
        return float((goal.options.get("job_ttl_s") if goal else None) or DEFAULT_JOB_TTL_S)

    def _not_found(self, job_id: str) -> Response:
        return error_response(404, "NotFound", str(JobNotFound(job_id)))

    def _unreachable(self, error: BaseException) -> Response:
        return error_response(503, "Unavailable", f"the gateway {RedisUnavailable(self.address, str(error))}")
