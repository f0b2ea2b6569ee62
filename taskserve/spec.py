"""Deployment options and their validation, in one place.

Every option a user can set on ``@taskserve.deployment`` or ``options()`` is a
field of :class:`DeploymentOptions`. Validation errors become one sentence that
names the option, the bad value and the fix.

Example::

    >>> DeploymentOptions(name="my_model", num_replicas=2).num_replicas
    2
    >>> validate_options({"num_replica": 2})
    Traceback (most recent call last):
    ...
    TypeError: unknown deployment option 'num_replica'; did you mean 'num_replicas'?
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# "/" or segments like "/a/b": no empty segment, trailing "/", space, "?" or "#".
ROUTE_PREFIX_PATTERN = re.compile(r"/|(/[^/\s?#]+)+")

SERIALIZERS = ("json", "pickle")

# What a replica's environment variable may be called (POSIX's portable names).
ENV_VAR_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(name: Any) -> str:
    """Return ``name`` if it is a valid deployment name, else raise ``ValueError``.

    >>> check_name("resnet-50.v2")
    'resnet-50.v2'
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid deployment name {name!r}: use 1 to 64 letters, digits, "
            "'-', '_' or '.'"
        )
    return name


class DeploymentOptions(BaseModel):
    """The options of one deployment, validated.

    ``name`` may be None until the decorator fills it from the class name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: Optional[str] = None
    num_replicas: int = Field(default=1, ge=0, le=10_000)
    version: Optional[str] = None
    user_config: Any = None
    num_cpus: Union[int, float] = Field(default=1, ge=0, le=100_000)
    num_gpus: Union[int, float] = Field(default=0, ge=0, le=10_000)
    memory: Optional[int] = Field(default=None, ge=0, le=2**60)
    runtime_env: Optional[dict] = None
    # None: served at "/<name>"; False: not served over HTTP.
    route_prefix: Union[Literal[False], str, None] = None
    request_timeout_s: Union[int, float] = Field(default=60, gt=0, le=86_400)
    max_concurrent_queries: int = Field(default=1, ge=1, le=1000)
    max_unavailable: Union[int, float] = Field(default=0.2, ge=0, le=10_000)
    max_surge: Union[int, float] = Field(default=0, ge=0, le=10_000)
    graceful_shutdown_timeout_s: Union[int, float] = Field(default=20, ge=0, le=86_400)
    health_check_period_s: Union[int, float] = Field(default=10, gt=0, le=86_400)
    health_check_timeout_s: Union[int, float] = Field(default=30, gt=0, le=86_400)
    serializer: Literal["json", "pickle"] = "json"
    # None: unlimited. Beyond it a new request is refused at once.
    max_queued_requests: Optional[int] = Field(default=None, ge=1, le=10_000_000)
    # How long an answer nobody read stays in Redis.
    result_ttl_s: Union[int, float] = Field(default=600, gt=0, le=7 * 86_400)
    # A request whose replica died this many times is answered with an error, not run again.
    max_deliveries: int = Field(default=3, ge=1, le=100)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else check_name(value)

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not (0 < len(value) <= 128):
            raise ValueError("a version is 1 to 128 characters")
        return value

    @field_validator("route_prefix")
    @classmethod
    def _check_route_prefix(cls, value: Union[bool, str, None]) -> Union[bool, str, None]:
        if not isinstance(value, str):
            return value
        if not value.startswith("/"):
            raise ValueError("a route_prefix starts with '/'")
        if value == "/-" or value.startswith("/-/"):
            raise ValueError("paths under '/-/' belong to the gateway (metrics, dashboard)")
        if not ROUTE_PREFIX_PATTERN.fullmatch(value):
            raise ValueError("a route_prefix has no spaces, '?', '#', '//' or trailing '/'")
        return value

    @field_validator("user_config")
    @classmethod
    def _check_user_config(cls, value: Any) -> Any:
        check_json_value(value, "user_config")
        return value

    @field_validator("runtime_env")
    @classmethod
    def _check_runtime_env(cls, value: Optional[dict]) -> Optional[dict]:
        if value is None:
            return None
        unknown = set(value) - {"pip", "env_vars", "working_dir"}
        if unknown:
            raise ValueError(
                f"unknown runtime_env key {sorted(unknown)[0]!r}; "
                "the keys are 'pip', 'env_vars' and 'working_dir'"
            )
        pip = value.get("pip")
        if pip is not None and not isinstance(pip, str) and not (
            isinstance(pip, list) and all(isinstance(item, str) for item in pip)
        ):
            raise ValueError("runtime_env['pip'] is a list of requirement strings or the path of a requirements file")
        if value.get("working_dir") is not None and not isinstance(value["working_dir"], str):
            raise ValueError("runtime_env['working_dir'] is the path of a local directory")
        env_vars = value.get("env_vars", {})
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise ValueError("runtime_env['env_vars'] maps strings to strings")
        for key, item in env_vars.items():
            if not ENV_VAR_NAME_PATTERN.fullmatch(key):
                raise ValueError(
                    f"runtime_env['env_vars'] has the name {key!r}, which no process environment can hold; "
                    "use letters, digits and '_', not starting with a digit"
                )
            if "\0" in item:
                raise ValueError(f"runtime_env['env_vars'][{key!r}] holds a NUL character, which no process environment can hold; remove it")
        return value


# A hint that tells how to fix each option, used in error messages.
_FIX_HINTS = {
    "num_replicas": "use a whole number from 0 to 10000",
    "num_cpus": "use a number >= 0",
    "num_gpus": "use a number >= 0",
    "memory": "use a whole number of bytes >= 0, or None",
    "version": "use a string, or None to roll every replica on each deploy",
    "max_concurrent_queries": "use a whole number from 1 to 1000",
    "max_unavailable": "use a fraction like 0.2 or a count like 1",
    "max_surge": "use a fraction like 0.25 or a count like 1; 0 disables surge",
    "graceful_shutdown_timeout_s": "use a number of seconds >= 0",
    "health_check_period_s": "use a number of seconds > 0",
    "health_check_timeout_s": "use a number of seconds > 0",
    "max_queued_requests": "use a whole number >= 1, or None for no limit",
    "result_ttl_s": "use a number of seconds > 0 (at most a week)",
    "max_deliveries": "use a whole number from 1 to 100",
    "serializer": "use 'json' or 'pickle'",
    "route_prefix": "use a path like '/my_model', None for '/<name>', or False to serve no HTTP route",
    "request_timeout_s": "use a number of seconds > 0",
    "runtime_env": "use a dict with 'pip', 'env_vars' and/or 'working_dir'",
}

OPTION_NAMES = tuple(DeploymentOptions.model_fields)


def validate_options(options: dict[str, Any], base: Optional[DeploymentOptions] = None) -> DeploymentOptions:
    """Return ``base`` updated with ``options``, validated.

    Raises ``TypeError`` for an unknown option name or a value of the wrong type
    and ``ValueError`` for a value out of range, each naming the option and the fix.

    >>> validate_options({"num_replicas": 3}).num_replicas
    3
    """
    for key in options:
        if key not in OPTION_NAMES:
            close = difflib.get_close_matches(key, OPTION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(OPTION_NAMES)}"
            raise TypeError(f"unknown deployment option {key!r}{hint}")
    merged = {**(base.model_dump() if base else {}), **options}
    try:
        return DeploymentOptions(**merged)
    except ValidationError as error:
        raise _one_sentence(error, merged) from None


def _one_sentence(error: ValidationError, values: dict[str, Any]) -> Exception:
    details = error.errors()
    field = str(details[0]["loc"][0]) if details[0]["loc"] else "options"
    # For a number that may be int or float, the float branch's error says more.
    first = [d for d in details if d["loc"] and str(d["loc"][0]) == field][-1] if details[0]["loc"] else details[0]
    value = values.get(field)
    reason = first["msg"].removeprefix("Value error, ")
    hint = _FIX_HINTS.get(field)
    if first["type"] == "value_error" and (repr(value) in reason or (reason.startswith(f"{field}[") and "; " in reason)):
        message = reason
    else:
        message = f"invalid {field}={value!r}: {reason}" + (f"; {hint}" if hint else "")
    if first["type"].endswith("_type") or first["type"] in ("int_from_float", "literal_error"):
        return TypeError(message)
    return ValueError(message)


def check_json_value(value: Any, path: str) -> None:
    """Raise ``TypeError`` naming the key path of the first value JSON cannot hold.

    >>> check_json_value({"weights": [1, 2, {3}]}, "user_config")
    Traceback (most recent call last):
    ...
    TypeError: user_config['weights'][2] is a set, which JSON cannot hold; use lists, dicts, strings, numbers, booleans or None
    """
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError(f"{path} is {value!r}, which JSON cannot hold; use a finite number")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_json_value(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{path} has the key {key!r}, which JSON cannot hold; use string keys"
                )
            check_json_value(item, f"{path}[{key!r}]")
        return
    raise TypeError(
        f"{path} is a {type(value).__name__}, which JSON cannot hold; "
        "use lists, dicts, strings, numbers, booleans or None"
    )


def route_of(name: str, options: dict[str, Any]) -> Optional[str]:
    """The path a deployment is served at: its ``route_prefix``, ``/<name>`` when that is
    None, and None (not served) when it is False.

    >>> route_of("echo", {}), route_of("m", {"route_prefix": "/v1/m"}), route_of("m", {"route_prefix": False})
    ('/echo', '/v1/m', None)
    """
    prefix = options.get("route_prefix")
    if prefix is False:
        return None
    return prefix or f"/{name}"


def stable_hash(value: Any) -> str:
    """A short sha256 of ``value``'s canonical JSON, stable across processes.

    >>> stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})
    True
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def replica_spec_hash(options: DeploymentOptions, version: str, init_sha: str) -> str:
    """What a running replica is: a change of any of these needs a new process.

    ``num_replicas`` (scale) and ``user_config`` (reconfigure in place) are not part
    of it, and neither are rollout or routing options.
    """
    return stable_hash(
        {
            "version": version,
            "init": init_sha,
            "num_cpus": float(options.num_cpus),   # 1 and 1.0 are the same request
            "num_gpus": float(options.num_gpus),
            "memory": options.memory,
            "runtime_env": options.runtime_env,
            "max_concurrent_queries": options.max_concurrent_queries,
            "serializer": options.serializer,
        }
    )
