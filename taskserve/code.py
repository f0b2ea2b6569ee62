"""Shipping a deployment's code and constructor arguments to its replicas.

The class or function is pickled with cloudpickle *by value* together with the
module that defines it, so a class from a script (``__main__``) or from a file
that replicas cannot import reaches them, and editing the script then deploying
again ships the edit. The local modules that module uses (``from mylib import f``
with ``mylib.py`` beside it or below its directory) travel by value too. Modules
installed in site-packages, and packages installed from a checkout (``pip install
-e``), travel by reference: replicas import them from their own environment.

The code keeps its file names and line numbers, so a replica's traceback points at
the user's file and line.

What is stored in Redis is signed by :func:`sign`: sealed with the cluster's secret and a
manifest of how it runs (:mod:`taskserve.signing`); :func:`unpack` checks the seal
before it unpickles anything.

Example::

    >>> from taskserve.signing import ClusterSecret
    >>> secret = ClusterSecret.parse("s3cret")
    >>> _, payload, init_sha = pack(len, (), {})
    >>> sha, blob = sign(payload, {"deployment": "length"}, secret)
    >>> unpack(blob, secret)[0] is len
    True
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import io
import sys
import sysconfig
import types
from collections import ChainMap
from pathlib import Path
from typing import Any, Iterator, Optional

import cloudpickle
from cloudpickle import cloudpickle as _cloudpickle

from .errors import SignatureError
from .signing import ClusterSecret, check_manifest, seal, unseal

_INSTALLED_PATHS = tuple(
    path for path in {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"),
                      sysconfig.get_paths().get("stdlib")} if path
)


def _ships_by_value(module_name: str) -> bool:
    if module_name in ("__main__", "builtins") or module_name not in sys.modules:
        return False  # __main__ is pickled by value anyway; builtins never
    module_file = getattr(sys.modules[module_name], "__file__", None) or ""
    return bool(module_file) and not module_file.startswith(_INSTALLED_PATHS)


@functools.lru_cache(maxsize=1)
def _distribution_packages() -> frozenset[str]:
    """Top-level names of installed distributions (editable ones too): never by value."""
    return frozenset(importlib.metadata.packages_distributions())


def _local_modules(module_name: str) -> list[types.ModuleType]:
    """The module ``module_name`` and the local modules it uses, directly or through
    each other: those whose file is in its directory or below, and that no installed
    distribution provides."""
    root = sys.modules.get(module_name)
    root_file = getattr(root, "__file__", None)
    if root is None or not root_file or not _ships_by_value(module_name):
        return []
    base = Path(root_file).resolve().parent
    found: dict[str, types.ModuleType] = {module_name: root}
    todo = [root]
    while todo:
        for name in _referenced_modules(todo.pop()):
            module = sys.modules.get(name)
            if name in found or module is None or not _ships_by_value(name):
                continue
            if name.partition(".")[0] in _distribution_packages():
                continue
            try:
                Path(module.__file__ or "").resolve().relative_to(base)
            except ValueError:
                continue       # elsewhere on sys.path: the replica imports it like anything else
            found[name] = module
            todo.append(module)
    return list(found.values())


def _referenced_modules(module: types.ModuleType) -> Iterator[str]:
    """Names of the modules ``module``'s globals are, or come from."""
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            yield value.__name__
        else:
            name = getattr(value, "__module__", None)
            if isinstance(name, str):
                yield name


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its real file name kept (cloudpickle
    writes ``<dynamic-code>``), so that tracebacks name the user's file."""
    constructor, args = _cloudpickle._code_reduce(code)
    return constructor, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(value)
    return buffer.getvalue()


def pack(target: Any, init_args: tuple, init_kwargs: dict) -> tuple[str, bytes, str]:
    """Pickle ``(target, init_args, init_kwargs)``; return ``(sha, blob, init_sha)``.

    ``init_sha`` identifies the constructor arguments alone: a change of them is a
    rolling update even with the same version. Raises ``TypeError`` naming the
    argument that cannot be pickled.
    """
    module_name = getattr(target, "__module__", "") or ""
    by_value = [m for m in _local_modules(module_name) if not _cloudpickle._is_registered_pickle_by_value(m)]
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        try:
            init_blob = _dumps((tuple(init_args), dict(init_kwargs)))
        except Exception as error:
            raise TypeError(
                f"the constructor arguments of {getattr(target, '__name__', target)!r} cannot be "
                f"pickled ({error}); pass plain data or objects cloudpickle can serialize"
            ) from None
        blob = _dumps((target, init_blob))
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)
    return hashlib.sha256(blob).hexdigest(), blob, hashlib.sha256(init_blob).hexdigest()[:16]


def sign(payload: bytes, manifest: dict, secret: ClusterSecret) -> tuple[str, bytes]:
    """Seal what :func:`pack` made with ``manifest``; return ``(sha, blob)`` to store."""
    blob = seal(payload, manifest, secret)
    return hashlib.sha256(blob).hexdigest(), blob


def reseal(blob: bytes, manifest: dict, secret: ClusterSecret) -> tuple[str, bytes]:
    """Stored code, checked and sealed again for another deployment or other options,
    without unpickling it; ``(sha, blob)`` to store."""
    return sign(unseal(blob, secret)[1], manifest, secret)


def seal_holds(blob: bytes, secret: ClusterSecret) -> bool:
    """Whether ``blob`` is sealed with ``secret`` (one of its secrets, while rotating)."""
    try:
        unseal(blob, secret)
    except SignatureError:
        return False
    return True


def unpack(blob: bytes, secret: ClusterSecret, expected: Optional[dict] = None) -> tuple[Any, tuple, dict]:
    """The ``(target, init_args, init_kwargs)`` that :func:`pack` pickled and :func:`sign` sealed.

    Nothing is unpickled unless the seal matches ``secret`` and the manifest agrees
    with ``expected`` (its keys only): else :class:`~taskserve.errors.SignatureError`.
    """
    manifest, payload = unseal(blob, secret)
    if expected is not None:
        check_manifest(manifest, expected)
    target, init_blob = cloudpickle.loads(payload)
    init_args, init_kwargs = cloudpickle.loads(init_blob)
    return target, init_args, init_kwargs


def describe(target: Any) -> str:
    """``module:qualname`` of a class or function, for messages and listings."""
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def is_class(target: Any) -> bool:
    return inspect.isclass(target)
