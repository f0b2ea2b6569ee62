"""Shipping a deployment's code and constructor arguments to its replicas.

The class or function is pickled with cloudpickle *by value* together with the
module that defines it, so a class from a script (``__main__``) or from a file
that replicas cannot import reaches them, and editing the script then deploying
again ships the edit. Modules installed in site-packages travel by reference:
replicas import them from their own environment.

Example::

    >>> sha, blob, init_sha = pack(len, (), {})
    >>> unpack(blob)[0] is len
    True
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import sysconfig
from typing import Any

import cloudpickle

_INSTALLED_PATHS = tuple(
    path for path in {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"),
                      sysconfig.get_paths().get("stdlib")} if path
)


def _ships_by_value(module_name: str) -> bool:
    if module_name in ("__main__", "builtins") or module_name not in sys.modules:
        return False  # __main__ is pickled by value anyway; builtins never
    module_file = getattr(sys.modules[module_name], "__file__", None) or ""
    return bool(module_file) and not module_file.startswith(_INSTALLED_PATHS)


def pack(target: Any, init_args: tuple, init_kwargs: dict) -> tuple[str, bytes, str]:
    """Pickle ``(target, init_args, init_kwargs)``; return ``(sha, blob, init_sha)``.

    ``init_sha`` identifies the constructor arguments alone: a change of them is a
    rolling update even with the same version. Raises ``TypeError`` naming the
    argument that cannot be pickled.
    """
    module_name = getattr(target, "__module__", "") or ""
    by_value = _ships_by_value(module_name)
    if by_value:
        cloudpickle.register_pickle_by_value(sys.modules[module_name])
    try:
        try:
            init_blob = cloudpickle.dumps((tuple(init_args), dict(init_kwargs)))
        except Exception as error:
            raise TypeError(
                f"the constructor arguments of {getattr(target, '__name__', target)!r} cannot be "
                f"pickled ({error}); pass plain data or objects cloudpickle can serialize"
            ) from None
        blob = cloudpickle.dumps((target, init_blob))
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(sys.modules[module_name])
    return hashlib.sha256(blob).hexdigest(), blob, hashlib.sha256(init_blob).hexdigest()[:16]


def unpack(blob: bytes) -> tuple[Any, tuple, dict]:
    """The ``(target, init_args, init_kwargs)`` that :func:`pack` pickled."""
    target, init_blob = cloudpickle.loads(blob)
    init_args, init_kwargs = cloudpickle.loads(init_blob)
    return target, init_args, init_kwargs


def describe(target: Any) -> str:
    """``module:qualname`` of a class or function, for messages and listings."""
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def is_class(target: Any) -> bool:
    return inspect.isclass(target)
