"""Deployment options and their validation, in one place.

Every option a user can set on ``@taskserve.deployment`` or ``options()`` is a
field of :class:`DeploymentOptions`. Validation errors become one sentence that
names the option, the bad value and the fix.

Example::

    >>> DeploymentOptions(name="my_model", num_replicas=2).num_replicas
    2
    >>> validate_options({"num_replicas": "auto"}).autoscaling_config
    AutoscalingConfig(min_replicas=1, max_replicas=100, target_ongoing_requests=2, upscale_delay_s=3, downscale_delay_s=60)
    >>> validate_options({"num_replica": 2})
    Traceback (most recent call last):
    ...
    TypeError: unknown deployment option 'num_replica'; did you mean 'num_replicas'?
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# "/" or segments like "/a/b": no empty segment, trailing "/", space, "?" or "#".
ROUTE_PREFIX_PATTERN = re.compile(r"/|(/[^/\s?#]+)+")

SERIALIZERS = ("json", "pickle")

# The bounds of every count an option holds: generous for real use (a deployment of 10,000
# replicas is planned in one pass), and what the controller refuses a goal beyond, however
# it got into Redis, so that one goal never takes the control plane down with it.
MAX_REPLICAS = 10_000
MAX_CONCURRENT_QUERIES = 1000
MAX_QUEUED_REQUESTS = 10_000_000
MAX_DELIVERIES = 100
MAX_CANARY_MIN_REQUESTS = 1_000_000_000
MAX_REQUIREMENTS = 10_000
MAX_ENV_VARS = 1000

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


@dataclass(frozen=True)
class AutoscalingConfig:
    """How an autoscaled deployment's replica count follows its load (:mod:`taskserve.autoscaler`).

    The load is the requests waiting in the deployment's queue plus those its replicas
    serve. The defaults are what ``num_replicas="auto"`` means. Constructing one checks
    its values like :func:`check_autoscaling_config` does.

    >>> AutoscalingConfig(max_replicas=10).max_replicas
    10
    >>> AutoscalingConfig(min_replicas=5, max_replicas=2)
    Traceback (most recent call last):
    ...
    ValueError: invalid autoscaling_config: min_replicas=5 is above max_replicas=2; lower min_replicas or raise max_replicas
    """

    min_replicas: int = 1                   # 0: no replica while idle
    max_replicas: int = 100
    target_ongoing_requests: float = 2      # per replica: waiting in the queue + being served
    upscale_delay_s: float = 3              # how long a higher need must last before scaling up
    downscale_delay_s: float = 60           # ... and a lower one before scaling down

    def __post_init__(self) -> None:
        for item in fields(self):
            _check_autoscaling_value(item.name, getattr(self, item.name))
        if self.min_replicas > self.max_replicas:
            raise ValueError(_min_above_max(self.min_replicas, self.max_replicas, max_given=True))


AUTOSCALING_KEYS = tuple(item.name for item in fields(AutoscalingConfig))

# What each autoscaling_config key takes, said as the fix.
_AUTOSCALING_HINTS = {
    "min_replicas": "use a whole number from 0 to 10000 (0: no replica while idle)",
    "max_replicas": "use a whole number from 1 to 10000",
    "target_ongoing_requests": "use a number > 0: the requests each replica should have waiting or in hand",
    "upscale_delay_s": "use a number of seconds from 0 to 86400",
    "downscale_delay_s": "use a number of seconds from 0 to 86400",
}


def _check_autoscaling_value(key: str, value: Any) -> None:
    """Raise ``TypeError`` (not a number of the right kind) or ``ValueError`` (out of
    range) naming ``autoscaling_config[key]``, its value and the fix."""
    whole = key in ("min_replicas", "max_replicas")
    is_number = isinstance(value, int) if whole else isinstance(value, (int, float))
    message = f"invalid autoscaling_config[{key!r}]={value!r}: {_AUTOSCALING_HINTS[key]}"
    if isinstance(value, bool) or not is_number:
        raise TypeError(message)
    if key == "min_replicas":
        fits = 0 <= value <= MAX_REPLICAS
    elif key == "max_replicas":
        fits = 1 <= value <= MAX_REPLICAS
    elif key == "target_ongoing_requests":
        fits = math.isfinite(value) and value > 0
    else:
        fits = math.isfinite(value) and 0 <= value <= 86_400
    if not fits:
        raise ValueError(message)


def _min_above_max(minimum: int, maximum: int, max_given: bool) -> str:
    default = "" if max_given else " (the default)"
    return (
        f"invalid autoscaling_config: min_replicas={minimum} is above max_replicas={maximum}{default}; "
        "lower min_replicas or raise max_replicas"
    )


def check_autoscaling_config(value: Any) -> Optional[AutoscalingConfig]:
    """Return ``value`` as an :class:`AutoscalingConfig` (None stays None: no autoscaling).

    ``value`` is a dict of some of its fields (the others keep their defaults) or an
    AutoscalingConfig. Raises ``TypeError`` for an unknown key or a value of the wrong
    type and ``ValueError`` for one out of range, each one sentence naming the key, the
    value and the fix.

    >>> check_autoscaling_config({"max_replicas": 10, "downscale_delay_s": 30.5})
    AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=2, upscale_delay_s=3, downscale_delay_s=30.5)
    >>> check_autoscaling_config({"max_replica": 10})
    Traceback (most recent call last):
    ...
    TypeError: unknown autoscaling_config key 'max_replica'; did you mean 'max_replicas'?
    >>> check_autoscaling_config({"min_replicas": 200})
    Traceback (most recent call last):
    ...
    ValueError: invalid autoscaling_config: min_replicas=200 is above max_replicas=100 (the default); lower min_replicas or raise max_replicas
    """
    if value is None or isinstance(value, AutoscalingConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(
            f"invalid autoscaling_config={value!r}: use a dict with any of the keys "
            f"{_quoted(AUTOSCALING_KEYS)}, or None for a fixed num_replicas"
        )
    for key in value:
        if key not in AUTOSCALING_KEYS:
            close = difflib.get_close_matches(key, AUTOSCALING_KEYS, n=1) if isinstance(key, str) else []
            hint = f"did you mean {close[0]!r}?" if close else f"the keys are {_quoted(AUTOSCALING_KEYS)}"
            raise TypeError(f"unknown autoscaling_config key {key!r}; {hint}")
    for key, item in value.items():
        _check_autoscaling_value(key, item)
    defaults = AutoscalingConfig()
    minimum = value.get("min_replicas", defaults.min_replicas)
    maximum = value.get("max_replicas", defaults.max_replicas)
    if minimum > maximum:
        raise ValueError(_min_above_max(minimum, maximum, max_given="max_replicas" in value))
    return AutoscalingConfig(**value)


CANARY_KEYS = ("traffic_percent", "min_requests", "max_error_rate_increase", "max_p95_ratio")
CANARY_DEFAULTS: dict[str, Any] = {"min_requests": 20, "max_error_rate_increase": 0.05, "max_p95_ratio": None}


def check_canary_config(value: Any) -> Optional[dict[str, Any]]:
    """A ``canary`` option (SPEC §9) with its defaults filled in, or None; a one-line
    ``TypeError``/``ValueError`` naming the key, the value and the fix otherwise.

    >>> check_canary_config({"traffic_percent": 10})
    {'traffic_percent': 10.0, 'min_requests': 20, 'max_error_rate_increase': 0.05, 'max_p95_ratio': None}
    >>> check_canary_config({"traffic_percent": 0})
    Traceback (most recent call last):
    ...
    ValueError: invalid canary['traffic_percent']=0: use a share of the requests above 0 and at most 100, like 10
    >>> check_canary_config({"traffic": 10})
    Traceback (most recent call last):
    ...
    TypeError: unknown canary key 'traffic'; did you mean 'traffic_percent'?
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"invalid canary={value!r}: use a dict like {{'traffic_percent': 10}}, or None")
    for key in value:
        if key not in CANARY_KEYS:
            close = difflib.get_close_matches(str(key), CANARY_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the keys are {_quoted(CANARY_KEYS)}"
            raise TypeError(f"unknown canary key {key!r}; {hint}")
    if "traffic_percent" not in value:
        raise ValueError("a canary needs its traffic_percent, like canary={'traffic_percent': 10}")
    config = {"traffic_percent": value["traffic_percent"], **CANARY_DEFAULTS,
              **{k: v for k, v in value.items() if k != "traffic_percent"}}

    def number(key: str, ok: bool, fix: str) -> None:
        item = config[key]
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or not ok:
            raise ValueError(f"invalid canary[{key!r}]={item!r}: {fix}")

    percent = config["traffic_percent"]
    number("traffic_percent", isinstance(percent, (int, float)) and 0 < percent <= 100,
           "use a share of the requests above 0 and at most 100, like 10")
    count = config["min_requests"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CANARY_MIN_REQUESTS:
        raise ValueError(f"invalid canary['min_requests']={count!r}: use a whole number of requests from 1 to "
                         f"{MAX_CANARY_MIN_REQUESTS}, like 20")
    increase = config["max_error_rate_increase"]
    number("max_error_rate_increase", isinstance(increase, (int, float)) and 0 <= increase <= 1,
           "use a fraction from 0 to 1, like 0.05 (5 points above the stable version's error rate)")
    if config["max_p95_ratio"] is not None:
        ratio = config["max_p95_ratio"]
        number("max_p95_ratio", isinstance(ratio, (int, float)) and ratio >= 1,
               "use a ratio >= 1, like 1.5 (the canary's p95 latency at most 1.5 times the stable's), or None")
        config["max_p95_ratio"] = float(ratio)
    config["traffic_percent"] = float(percent)
    config["max_error_rate_increase"] = float(increase)
    return config


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(repr(name) for name in names[:-1]) + f" and {names[-1]!r}"


T = TypeVar("T")


def _as_value_error(check: Callable[[Any], T], value: Any) -> T:
    """``check(value)``, its ``TypeError`` raised as ``ValueError``: pydantic reports only
    a ``ValueError`` as a validation error.

    >>> _as_value_error(len, 5)
    Traceback (most recent call last):
    ...
    ValueError: object of type 'int' has no len()
    """
    try:
        return check(value)
    except TypeError as error:
        raise ValueError(str(error)) from None


class DeploymentOptions(BaseModel):
    """The options of one deployment, validated.

    ``name`` may be None until the decorator fills it from the class name.

    ``autoscaling_config`` None means ``num_replicas`` replicas run. Set, the count
    follows the load between its bounds (``num_replicas="auto"`` sets the default one),
    and ``num_replicas`` holds the count an autoscaled deployment starts from: its
    ``min_replicas``. :func:`validate_options` keeps the two consistent.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: Optional[str] = None
    num_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    autoscaling_config: Optional[AutoscalingConfig] = None
    version: Optional[str] = None
    user_config: Any = None
    num_cpus: Union[int, float] = Field(default=1, ge=0, le=100_000)
    num_gpus: Union[int, float] = Field(default=0, ge=0, le=10_000)
    memory: Optional[int] = Field(default=None, ge=0, le=2**60)
    runtime_env: Optional[dict] = None
    # None: served at "/<name>"; False: not served over HTTP.
    route_prefix: Union[Literal[False], str, None] = None
    request_timeout_s: Union[int, float] = Field(default=60, gt=0, le=86_400)
    max_concurrent_queries: int = Field(default=1, ge=1, le=MAX_CONCURRENT_QUERIES)
    max_unavailable: Union[int, float] = Field(default=0.2, ge=0, le=10_000)
    max_surge: Union[int, float] = Field(default=0, ge=0, le=10_000)
    graceful_shutdown_timeout_s: Union[int, float] = Field(default=20, ge=0, le=86_400)
    health_check_period_s: Union[int, float] = Field(default=10, gt=0, le=86_400)
    health_check_timeout_s: Union[int, float] = Field(default=30, gt=0, le=86_400)
    serializer: Literal["json", "pickle"] = "json"
    # None: unlimited. Beyond it a new request is refused at once.
    max_queued_requests: Optional[int] = Field(default=None, ge=1, le=MAX_QUEUED_REQUESTS)
    # How long an answer nobody read stays in Redis.
    result_ttl_s: Union[int, float] = Field(default=600, gt=0, le=7 * 86_400)
    # How long a finished job's record and result are kept (SPEC §12).
    job_ttl_s: Union[int, float] = Field(default=86_400, gt=0, le=365 * 86_400)
    # A request whose replica died this many times is answered with an error, not run again.
    max_deliveries: int = Field(default=3, ge=1, le=MAX_DELIVERIES)
    # SPEC §9: start this version beside the running one, on a share of the requests.
    canary: Optional[dict] = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else check_name(value)

    @field_validator("autoscaling_config", mode="before")
    @classmethod
    def _check_autoscaling_config(cls, value: Any) -> Optional[AutoscalingConfig]:
        return _as_value_error(check_autoscaling_config, value)

    @field_validator("num_gpus")
    @classmethod
    def _check_num_gpus(cls, value: Union[int, float]) -> Union[int, float]:
        # A fraction shares one GPU; more than one GPU is counted in whole devices.
        if value > 1 and not float(value).is_integer():
            raise ValueError(
                f"invalid num_gpus={value!r}: a replica takes a fraction of one GPU or whole GPUs; "
                f"use a number up to 1 (like 0.5) or a whole number (like {int(value) + 1})"
            )
        return value

    @field_validator("canary", mode="before")
    @classmethod
    def _check_canary(cls, value: Any) -> Optional[dict]:
        return _as_value_error(check_canary_config, value)

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
        if isinstance(pip, list) and len(pip) > MAX_REQUIREMENTS:
            raise ValueError(f"runtime_env['pip'] lists {len(pip)} requirements, more than the limit of "
                             f"{MAX_REQUIREMENTS}; install them in the image instead")
        if value.get("working_dir") is not None and not isinstance(value["working_dir"], str):
            raise ValueError("runtime_env['working_dir'] is the path of a local directory")
        env_vars = value.get("env_vars", {})
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise ValueError("runtime_env['env_vars'] maps strings to strings")
        if len(env_vars) > MAX_ENV_VARS:
            raise ValueError(f"runtime_env['env_vars'] sets {len(env_vars)} variables, more than the limit of "
                             f"{MAX_ENV_VARS}; pass the rest in user_config or a file in working_dir")
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
    "autoscaling_config": f"use a dict with any of the keys {_quoted(AUTOSCALING_KEYS)}, or None",
    "num_cpus": "use a number >= 0",
    "num_gpus": "use a number >= 0",
    "memory": "use a whole number of bytes >= 0, or None",
    "version": "use a string, or None to roll every replica on each deploy",
    "max_concurrent_queries": "use a whole number from 1 to 1000 (max_ongoing_requests is the same option)",
    "max_unavailable": "use a fraction like 0.2 or a count like 1",
    "max_surge": "use a fraction like 0.25 or a count like 1; 0 disables surge",
    "graceful_shutdown_timeout_s": "use a number of seconds >= 0",
    "health_check_period_s": "use a number of seconds > 0",
    "health_check_timeout_s": "use a number of seconds > 0",
    "max_queued_requests": "use a whole number >= 1, or None for no limit",
    "result_ttl_s": "use a number of seconds > 0 (at most a week)",
    "job_ttl_s": "use a number of seconds > 0 (at most a year)",
    "max_deliveries": "use a whole number from 1 to 100",
    "serializer": "use 'json' or 'pickle'",
    "route_prefix": "use a path like '/my_model', None for '/<name>', or False to serve no HTTP route",
    "request_timeout_s": "use a number of seconds > 0",
    "runtime_env": "use a dict with 'pip', 'env_vars' and/or 'working_dir'",
    "canary": "use a dict like {'traffic_percent': 10}, or None",
}

OPTION_NAMES = tuple(DeploymentOptions.model_fields)


# Other names an option answers to: Ray Serve's name for it, kept as the one stored.
OPTION_ALIASES = {"max_ongoing_requests": "max_concurrent_queries"}


def _resolve_aliases(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every alias replaced by the option it names; a ``ValueError`` when
    both are given with different values.

    >>> _resolve_aliases({"max_ongoing_requests": 8})
    {'max_concurrent_queries': 8}
    >>> _resolve_aliases({"max_ongoing_requests": 8, "max_concurrent_queries": 2})
    Traceback (most recent call last):
    ...
    ValueError: max_ongoing_requests=8 and max_concurrent_queries=2 name the same option: pass one of them
    """
    if not any(alias in options for alias in OPTION_ALIASES):
        return options
    resolved = dict(options)
    for alias, name in OPTION_ALIASES.items():
        if alias not in resolved:
            continue
        value = resolved.pop(alias)
        if name in resolved and resolved[name] != value:
            raise ValueError(f"{alias}={value!r} and {name}={resolved[name]!r} name the same option: pass one of them")
        resolved[name] = value
    return resolved


def validate_options(options: dict[str, Any], base: Optional[DeploymentOptions] = None) -> DeploymentOptions:
    """Return ``base`` updated with ``options``, validated.

    Raises ``TypeError`` for an unknown option name or a value of the wrong type
    and ``ValueError`` for a value out of range, each naming the option and the fix.

    ``num_replicas="auto"`` autoscales with the default :class:`AutoscalingConfig`
    (and the keys of an ``autoscaling_config`` given with it). A whole-number
    ``num_replicas`` with an ``autoscaling_config`` is refused, and so is one over an
    autoscaled ``base`` unless ``autoscaling_config=None`` comes with it.

    >>> validate_options({"num_replicas": 3}).num_replicas
    3
    >>> autoscaled = validate_options({"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}})
    >>> autoscaled.num_replicas, autoscaled.autoscaling_config.max_replicas
    (2, 8)
    >>> validate_options({"num_replicas": 3}, autoscaled)
    Traceback (most recent call last):
    ...
    ValueError: num_replicas=3 conflicts with the deployment's autoscaling_config (2 to 8 replicas); pass autoscaling_config=None as well to run a fixed count, or change min_replicas and max_replicas
    >>> validate_options({"num_replicas": 3, "autoscaling_config": None}, autoscaled).num_replicas
    3
    """
    options = _resolve_aliases(options)
    for key in options:
        if key not in OPTION_NAMES:
            close = difflib.get_close_matches(key, OPTION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(OPTION_NAMES)}"
            raise TypeError(f"unknown deployment option {key!r}{hint}")
    options = _resolve_scale(options, base)
    merged = {**(base.model_dump() if base else {}), **options}
    try:
        result = DeploymentOptions(**merged)
    except ValidationError as error:
        raise _one_sentence(error, merged) from None
    if result.canary is not None and result.autoscaling_config is not None:
        raise ValueError("a canary cannot start on an autoscaled deployment (its replica count moves); "
                         "deploy it with a fixed num_replicas and autoscaling_config=None, or drop canary")
    if result.canary is not None and result.version is None:
        raise ValueError("a canary needs a version to tell it from the running one; pass version='2' with canary")
    return result


def check_goal_options(options: dict[str, Any], num_replicas: Any) -> DeploymentOptions:
    """A goal's options and replica count as Redis holds them, checked as ``deploy()``
    checks options: what the controller and the status readers do with a goal first, so
    that one written by hand (an unknown or mistyped option, a count beyond its bound)
    costs only its own deployment. ``TypeError`` or ``ValueError`` in one sentence naming
    the option, the value and the bound.

    >>> check_goal_options({"num_cpus": 1, "autoscaling_config": {"max_replicas": 4}}, 1).num_cpus
    1
    >>> check_goal_options({}, 10**9)
    Traceback (most recent call last):
    ...
    ValueError: invalid num_replicas=1000000000: Input should be less than or equal to 10000; use a whole number from 0 to 10000
    >>> check_goal_options({"num_cpu": 1}, 1)
    Traceback (most recent call last):
    ...
    TypeError: unknown deployment option 'num_cpu'; did you mean 'num_cpus'?
    """
    for key in options:
        if key not in OPTION_NAMES:
            close = difflib.get_close_matches(str(key), OPTION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(OPTION_NAMES)}"
            raise TypeError(f"unknown deployment option {key!r}{hint}")
    merged = {**options, "num_replicas": num_replicas}
    try:
        return DeploymentOptions(**merged)
    except ValidationError as error:
        raise _one_sentence(error, merged) from None


def _resolve_scale(options: dict[str, Any], base: Optional[DeploymentOptions]) -> dict[str, Any]:
    """``options`` with ``num_replicas="auto"`` turned into an ``autoscaling_config``, the
    config checked, and ``num_replicas`` set to its ``min_replicas`` when it is new;
    raises when a fixed ``num_replicas`` meets autoscaling."""
    options = dict(options)
    if "autoscaling_config" in options:
        try:
            options["autoscaling_config"] = check_autoscaling_config(options["autoscaling_config"])
        except (TypeError, ValueError) as error:
            raise type(error)(str(error)) from None   # one sentence, like the other option errors
    if "num_replicas" not in options:
        config = options.get("autoscaling_config")
        if config is not None:
            options["num_replicas"] = config.min_replicas
        return options
    count = options["num_replicas"]
    if isinstance(count, str) and count == "auto":
        if "autoscaling_config" in options and options["autoscaling_config"] is None:
            raise ValueError(
                "num_replicas='auto' turns autoscaling on and autoscaling_config=None turns it off; drop one of them"
            ) from None
        config = options.get("autoscaling_config") or AutoscalingConfig()
        options.update(autoscaling_config=config, num_replicas=config.min_replicas)
        return options
    if isinstance(count, str):
        raise TypeError(
            f"invalid num_replicas={count!r}: Input should be a valid integer; "
            "use a whole number from 0 to 10000, or 'auto' to autoscale"
        ) from None
    if options.get("autoscaling_config") is not None:
        raise ValueError(
            f"num_replicas={count!r} and autoscaling_config cannot be used together: drop num_replicas to "
            "autoscale (from min_replicas to max_replicas), or drop autoscaling_config to run a fixed count"
        ) from None
    if "autoscaling_config" not in options and base is not None and base.autoscaling_config is not None:
        config = base.autoscaling_config
        raise ValueError(
            f"num_replicas={count!r} conflicts with the deployment's autoscaling_config "
            f"({config.min_replicas} to {config.max_replicas} replicas); pass autoscaling_config=None as well "
            "to run a fixed count, or change min_replicas and max_replicas"
        ) from None
    return options


def _one_sentence(error: ValidationError, values: dict[str, Any]) -> Exception:
    details = error.errors()
    field = str(details[0]["loc"][0]) if details[0]["loc"] else "options"
    # For a number that may be int or float, the float branch's error says more.
    first = [d for d in details if d["loc"] and str(d["loc"][0]) == field][-1] if details[0]["loc"] else details[0]
    value = values.get(field)
    reason = first["msg"].removeprefix("Value error, ")
    hint = _FIX_HINTS.get(field)
    if first["type"] == "value_error" and (repr(value) in reason or (reason.startswith(f"{field}[") and "; " in reason)
                                           or field == "canary"):   # its validator's messages are whole
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

    ``num_replicas`` and ``autoscaling_config`` (scale) and ``user_config`` (reconfigure
    in place) are not part of it, and neither are rollout or routing options.
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
