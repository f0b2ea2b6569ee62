"""Deployments inside the user's own Celery canvas: ``chain``, ``group`` and ``chord``.

:func:`signature` gives the ``celery.Signature`` of a call of a deployment's method; it
works wherever Celery takes one. In a chain, the previous task's result becomes the
method's first argument, as Celery users expect.

Example::

    from celery import chain, group
    import taskserve

    flow = chain(taskserve.signature("ocr", "s3://scans/17.png"),        # -> text
                 taskserve.signature("summarize", method="short"))         # short(text)
    flow.apply_async().get(timeout=60)

    group(taskserve.signature("embed", page) for page in pages).apply_async().get()
"""

from __future__ import annotations

from typing import Any, Optional

from celery import Signature

from .celery_app import client_app
from .connection import current_address
from .store import queue_name
from .wire import TASK_NAME, check_priority, priority_to_transport, signature_args


def signature(deployment: str, *args: Any, method: str = "__call__", priority: Optional[int] = None,
              **kwargs: Any) -> Signature:
    """The Celery signature of ``deployment.method(*args, **kwargs)``, bound to this
    process's cluster (``taskserve.connect``'s address); ``priority`` 0..9, a higher
    one first.

    The method and its arguments travel as the task's keyword arguments (see
    :func:`taskserve.wire.signature_args`), so a chain can prepend the previous result.

    Example::

        taskserve.signature("echo", "hi").apply_async().get(timeout=10)     # 'hi'
    """
    task_args, task_kwargs = signature_args(method, list(args), kwargs)
    options: dict[str, Any] = {"queue": queue_name(deployment)}
    if priority is not None:
        options["priority"] = priority_to_transport(check_priority(priority))
    return Signature(TASK_NAME, task_args, task_kwargs, options=options, app=client_app(current_address(), "json"))
