"""Calling a deployment from Python: handles and responses.

Example::

    handle = taskserve.get_deployment("echo").get_handle()
    handle.remote("hi").result(timeout=10)      # 'hi'
    handle.pid.remote().result()                # 41237, the replica's process id
"""

from __future__ import annotations

import time
from typing import Any, Optional

import celery.exceptions
import kombu.exceptions

from .celery_app import TASK_NAME, client_app
from .connection import current_address, current_store
from .errors import DeploymentNotFound, ReplicaError
from .store import queue_name

# A handle checks that its deployment still exists at most this often.
EXISTENCE_CHECK_INTERVAL_S = 1.0


class Response:
    """A request in flight; :meth:`result` waits for its value."""

    def __init__(self, async_result: celery.result.AsyncResult, deployment: str) -> None:
        self._async_result = async_result
        self.deployment = deployment

    @property
    def request_id(self) -> str:
        return self._async_result.id

    def result(self, timeout: Optional[float] = None) -> Any:
        """The value the replica returned.

        Raises :class:`ReplicaError` if the replica's code raised, and
        ``TimeoutError`` if no answer came within ``timeout`` seconds.
        """
        try:
            envelope = self._async_result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except celery.exceptions.TimeoutError:
            raise TimeoutError(
                f"no answer from deployment {self.deployment!r} within {timeout}s "
                f"(request {self.request_id}); `taskserve status {self.deployment}` shows its replicas"
            ) from None
        if self._async_result.failed():
            error = envelope
            raise ReplicaError(type(error).__name__, str(error), self._async_result.traceback or "")
        if envelope.get("ok"):
            return envelope["value"]
        raise ReplicaError(envelope["type"], envelope["message"], envelope.get("traceback", ""))

    def __repr__(self) -> str:
        return f"<Response {self.deployment} {self.request_id}>"


class DeploymentHandle:
    """Sends requests to a deployment's queue.

    ``handle.remote(...)`` calls ``__call__``; ``handle.method.remote(...)`` calls
    another public method. Handles are cheap and safe to share between threads.
    """

    def __init__(self, deployment: str, serializer: str = "json", method: str = "__call__") -> None:
        self.deployment = deployment
        self.serializer = serializer
        self.method = method
        self._checked_at = time.monotonic()

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        """Enqueue a call and return at once with its :class:`Response`."""
        self._check_exists()
        app = client_app(current_address(), self.serializer)
        try:
            async_result = app.send_task(
                TASK_NAME,
                args=(self.method, list(args), kwargs),
                queue=queue_name(self.deployment),
            )
        except kombu.exceptions.EncodeError as error:
            raise TypeError(
                f"the arguments of this call to {self.deployment!r} cannot travel as "
                f"{self.serializer} ({error}); pass plain data, or deploy it with serializer='pickle'"
            ) from None
        return Response(async_result, self.deployment)

    def _check_exists(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < EXISTENCE_CHECK_INTERVAL_S:
            return
        if not current_store().deployment_exists(self.deployment):
            raise DeploymentNotFound(self.deployment)
        self._checked_at = now

    def __getattr__(self, method: str) -> "DeploymentHandle":
        if method.startswith("_"):
            raise AttributeError(method)
        handle = DeploymentHandle(self.deployment, self.serializer, method)
        handle._checked_at = self._checked_at
        return handle

    def __repr__(self) -> str:
        suffix = "" if self.method == "__call__" else f".{self.method}"
        return f"DeploymentHandle({self.deployment!r}){suffix}"
