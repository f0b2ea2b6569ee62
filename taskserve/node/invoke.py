"""Calling the user's object: construct it, find a method, run it the way it was written.

A method is one of four shapes (:data:`SYNC`, :data:`ASYNC`, :data:`GENERATOR`,
:data:`ASYNC_GENERATOR`), decided once per method. Coroutines run on the replica's
one event loop (:class:`~taskserve.node.loop.ReplicaLoop`); sync methods in the
calling thread, never on the loop. A generator called without streaming gives the
list of its chunks. ``reconfigure`` and ``check_health`` may be ``async`` too, and so
may ``__init__``: the instance is then made with ``__new__`` and its ``__init__``
awaited on the loop, as Ray Serve does.

:class:`Dispatcher` also keeps ``reconfigure`` apart from requests (its
:class:`~taskserve.node.gate.RequestGate`), and :class:`HealthWatch` counts failed
health checks.

Example::

    loop = ReplicaLoop()
    dispatcher = Dispatcher(construct(Model, "class", (), {}, loop), "class", loop)
    dispatcher.call("predict", [[1, 2]], {})               # a sync caller, any shape
    await dispatcher.call_async("predict", [[1, 2]], {})   # on the loop: an async method
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import threading
import traceback
from concurrent import futures
from typing import Any, Callable, Optional, TypeVar

from ..http import HTTP_METHOD, Request, Response, encode_response
from .gate import RequestGate
from .loop import ReplicaLoop

log = logging.getLogger("taskserve.node.invoke")

T = TypeVar("T")

HEALTH_FAILURES_TO_REPLACE = 3

SYNC, ASYNC, GENERATOR, ASYNC_GENERATOR = "sync", "async", "generator", "async generator"


class HealthCheckTimeout(Exception):
    """``check_health()`` did not return in time: a failure like an exception."""


class ReconfigureFailed(Exception):
    """``reconfigure(user_config)`` raised while the replica started (the cause)."""


def shape_of(function: Any) -> str:
    """How ``function`` runs: :data:`SYNC`, :data:`ASYNC`, :data:`GENERATOR` or :data:`ASYNC_GENERATOR`.

    A callable object counts by its ``__call__``.

    >>> async def a(): pass
    >>> def g(): yield 1
    >>> class Streamer:
    ...     async def __call__(self):
    ...         yield 1
    >>> shape_of(a), shape_of(g), shape_of(Streamer()), shape_of(len)
    ('async', 'generator', 'async generator', 'sync')
    """
    target = function
    if not (inspect.isfunction(target) or inspect.ismethod(target)) and callable(target):
        target = type(target).__call__
    target = inspect.unwrap(target) if hasattr(target, "__wrapped__") else target
    if inspect.isasyncgenfunction(target):
        return ASYNC_GENERATOR
    if inspect.iscoroutinefunction(target):
        return ASYNC
    if inspect.isgeneratorfunction(target):
        return GENERATOR
    return SYNC


def handle_value(value: Any) -> Any:
    """What a handle caller gets for ``value``: an HTTP ``Response`` gives its body.

    >>> handle_value(Response({"ok": True}, status=201))
    {'ok': True}
    >>> handle_value(Response(b"raw"))
    'raw'
    """
    if not isinstance(value, Response):
        return value
    body = value.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise TypeError(
                f"the method returned a taskserve.http.Response ({value.status}) with a binary body, which a "
                "handle caller cannot receive as JSON; return the data itself for handle calls"
            ) from None
    return body


class Dispatcher:
    """Calls the user's object for each request.

    >>> loop = ReplicaLoop()
    >>> dispatcher = Dispatcher(lambda name: f"hi {name}", kind="function", loop=loop)
    >>> dispatcher.call("__call__", ["bob"], {})
    'hi bob'
    >>> class Model:
    ...     async def double(self, x):
    ...         return 2 * x
    ...     def count(self, n):
    ...         yield from range(n)
    >>> model = Dispatcher(Model(), "class", loop)
    >>> model.call("double", [21], {}), model.call("count", [3], {}), model.shape("double")
    (42, [0, 1, 2], 'async')
    >>> loop.stop()
    """

    def __init__(self, target: Any, kind: str, loop: ReplicaLoop) -> None:
        self.target = target
        self.kind = kind
        self.loop = loop
        self.gate = RequestGate()
        self._shapes: dict[str, str] = {}
        self._health_check: Optional[futures.Future] = None

    # ------------------------------------------------------------------ finding methods

    def has(self, method: str) -> bool:
        return self.kind == "class" and callable(getattr(self.target, method, None))

    def resolve(self, method: str) -> Callable[..., Any]:
        """The callable a request to ``method`` calls (the object itself for ``__call__``
        and HTTP requests); ``AttributeError`` naming the public methods otherwise."""
        if method in ("__call__", HTTP_METHOD):
            return self.target
        if self.kind == "function":
            raise AttributeError(f"function deployments have no method {method!r}; call the handle directly")
        if method.startswith("_"):
            raise AttributeError(f"method {method!r} is private; only public methods and __call__ can be called")
        function = getattr(self.target, method, None)
        if not callable(function):
            public = sorted(n for n in dir(self.target) if not n.startswith("_")
                            and callable(getattr(self.target, n, None)))
            raise AttributeError(f"{type(self.target).__name__} has no method {method!r}; "
                                 f"its public methods: {', '.join(public) or 'none'}")
        return function

    def shape(self, method: str) -> str:
        """The shape of ``method`` (:func:`shape_of`), :data:`SYNC` if it does not resolve
        (the error comes when it is called)."""
        shape = self._shapes.get(method)
        if shape is None:
            try:
                shape = shape_of(self.resolve(method))
            except AttributeError:
                shape = SYNC
            self._shapes[method] = shape
        return shape

    def arguments(self, method: str, args: list, kwargs: dict) -> tuple[list, dict]:
        """The arguments ``method`` is called with: an HTTP request's payload becomes a
        :class:`~taskserve.http.Request`."""
        if method == HTTP_METHOD:
            return [Request.from_payload(args[0])], {}
        return args, kwargs

    @staticmethod
    def finish(method: str, value: Any) -> Any:
        """The value a caller receives: HTTP data for an HTTP request, else the value
        (a :class:`~taskserve.http.Response` gives its body)."""
        if method == HTTP_METHOD:
            return encode_response(value)
        return handle_value(value)

    # ------------------------------------------------------------------ calling them

    def call(self, method: str, args: list, kwargs: dict) -> Any:
        """Serve one request from a sync thread (never the loop's): a coroutine is run on
        the loop, a generator is collected into a list."""
        with self.gate.request():
            function = self.resolve(method)
            args, kwargs = self.arguments(method, args, kwargs)
            value = function(*args, **kwargs)
            if inspect.isasyncgen(value):
                value = self.loop.call(_collect(value))
            elif inspect.isawaitable(value):
                value = self.loop.call(value)
            elif inspect.isgenerator(value):
                value = list(value)
            return self.finish(method, value)

    async def call_async(self, method: str, args: list, kwargs: dict) -> Any:
        """Serve one request of an ``async`` method, on the loop. The caller entered the
        gate (:meth:`enter`); this leaves it."""
        try:
            function = self.resolve(method)
            args, kwargs = self.arguments(method, args, kwargs)
            value = function(*args, **kwargs)
            if inspect.isasyncgen(value):
                value = await _collect(value)
            elif inspect.isawaitable(value):
                value = await value
            return self.finish(method, value)
        finally:
            self.gate.leave()

    def begin_stream(self, method: str, args: list, kwargs: dict) -> Any:
        """What ``method`` returns for a streaming call, not consumed: a generator, an async
        generator, or (a method that is neither) a value or coroutine, streamed as one chunk.
        The caller holds the gate (:meth:`enter` / ``gate.request()``)."""
        function = self.resolve(method)
        args, kwargs = self.arguments(method, args, kwargs)
        return function(*args, **kwargs)

    @staticmethod
    def chunk(method: str, value: Any) -> Any:
        """One chunk as it travels: an HTTP response's body as data, else the value as it is."""
        return handle_value(value) if method != HTTP_METHOD else value

    def enter(self) -> None:
        """Enter the gate for a request served on the loop (waits while ``reconfigure`` runs)."""
        self.gate.try_enter()

    def check_health(self, wait_s: float, timeout_s: float) -> Optional[bool]:
        """Run the object's ``check_health()`` alongside the requests in progress.

        Returns True if it passed, None if ``reconfigure`` held the object for
        ``wait_s`` (not a failure). Raises :class:`HealthCheckTimeout` if it did not
        return within ``timeout_s``, else what ``check_health`` raised.

        The check runs in a thread of its own (an ``async`` one on the loop), so a hung
        one holds up nothing but itself; a check still running from last time is waited
        for, not started again.
        """
        if not self.has("check_health"):
            return True
        if not self.gate.try_enter(timeout=wait_s):
            return None
        try:
            check = self._health_check
            if check is None:
                check = self._health_check = _in_thread(
                    lambda: self.loop.resolve(self.target.check_health()), "check_health")
            if not futures.wait([check], timeout=timeout_s).done:
                raise HealthCheckTimeout(f"check_health did not return within {timeout_s:g}s")
            self._health_check = None
            check.result()
            return True
        finally:
            self.gate.leave()

    def reconfigure(self, user_config: Any) -> None:
        """Call ``reconfigure(user_config)`` with no request in flight (an ``async`` one on the loop)."""
        with self.gate.exclusive():
            self.loop.resolve(self.target.reconfigure(user_config))


async def _collect(chunks: Any) -> list:
    return [chunk async for chunk in chunks]


def _in_thread(function: Callable[[], T], name: str) -> "futures.Future[T]":
    """Run ``function`` in a new daemon thread (one that never holds up the exit); its future."""
    future: futures.Future = futures.Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class HealthWatch:
    """Runs ``check_health()`` and counts its failures in a row.

    :meth:`check` returns why the replica should be replaced once ``limit``
    checks in a row failed (raised, or did not return within ``timeout_s``), and
    again after each further failure.

    >>> class Sick:
    ...     def check_health(self):
    ...         raise RuntimeError("out of memory")
    >>> loop = ReplicaLoop()
    >>> watch = HealthWatch(Dispatcher(Sick(), "class", loop), wait_s=1, timeout_s=5, limit=2)
    >>> watch.check() is None
    True
    >>> watch.check().splitlines()[0]
    'check_health failed 2 times in a row: Traceback (most recent call last):'
    >>> loop.stop()
    """

    def __init__(self, dispatcher: Dispatcher, wait_s: float, timeout_s: float,
                 limit: int = HEALTH_FAILURES_TO_REPLACE) -> None:
        self.dispatcher = dispatcher
        self.wait_s = wait_s
        self.timeout_s = timeout_s
        self.limit = limit
        self.failures = 0

    def check(self) -> Optional[str]:
        """One check; the reason to be replaced once there are ``limit`` failures in a row."""
        try:
            passed = self.dispatcher.check_health(wait_s=self.wait_s, timeout_s=self.timeout_s)
        except HealthCheckTimeout as error:
            text = str(error)
        except Exception as error:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        else:
            if passed:
                self.failures = 0
            return None
        self.failures += 1
        log.warning("check_health failed (%d in a row): %s", self.failures, text)
        if self.failures >= self.limit:
            return f"check_health failed {self.failures} times in a row: {text}"
        return None


def align_thread_pools() -> None:
    """Give OpenCV and PyTorch the same thread limit as OMP_NUM_THREADS.

    Both size their own pools when imported, so one imported before the limit
    changed (say by ``os.environ`` in ``__init__``) would keep its old size.
    """
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if not limit.isdigit():
        return
    threads = int(limit)
    if "cv2" in sys.modules and hasattr(sys.modules["cv2"], "setNumThreads"):
        sys.modules["cv2"].setNumThreads(threads)
        log.info("OpenCV imported: cv2.setNumThreads(%d) to match OMP_NUM_THREADS", threads)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads") and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("PyTorch imported: torch.set_num_threads(%d) to match OMP_NUM_THREADS", threads)


def construct(target: Any, kind: str, init_args: tuple, init_kwargs: dict, loop: ReplicaLoop) -> Any:
    """The object requests are served by: an instance of a class, or the function.

    An ``async def __init__`` is awaited on the replica's loop.

    >>> class Client:
    ...     async def __init__(self, url):
    ...         self.lock = asyncio.Lock()
    ...         self.url = url
    >>> loop = ReplicaLoop()
    >>> construct(Client, "class", ("http://x",), {}, loop).url
    'http://x'
    >>> loop.stop()
    """
    if kind == "function":
        return target
    if inspect.iscoroutinefunction(getattr(target, "__init__", None)):
        instance = target.__new__(target)
        loop.call(instance.__init__(*init_args, **init_kwargs))
        return instance
    return target(*init_args, **init_kwargs)


def cancel_on_loop(task: "asyncio.Future[Any]", loop: ReplicaLoop) -> None:
    """Cancel an ``asyncio`` task of the replica's loop from any thread."""
    loop.loop.call_soon_threadsafe(task.cancel)
