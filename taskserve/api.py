"""The Python API: ``@deployment``, ``Deployment`` and friends (docs/reference.md, Python API).

Example::

    import taskserve

    @taskserve.deployment(num_replicas=2)
    class Echo:
        def __call__(self, text):
            return text

    Echo.deploy()                                   # blocks until 2 replicas serve
    print(Echo.get_handle().remote("hi").result())  # hi
    Echo.options(num_replicas=3).deploy()           # starts one more, keeps the others
    Echo.delete()
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

from .batching import check_batched_methods
from .canary import VersionStats, baseline_of
from .code import pack, reseal, seal_holds, sign, unpack
from .connection import cluster_secret, current_store
from .errors import DeploymentError, DeploymentNotFound, SignatureError, TaskserveError
from .handle import DeploymentHandle
from .history import previous_goal
from .runtime_env import resolve as resolve_runtime_env
from .signing import ClusterSecret, manifest, resign_user_config, sign_user_config
from .spec import (
    DeploymentOptions,
    check_canary_config,
    check_json_value,
    check_name,
    replica_spec_hash,
    route_of,
    validate_options,
)
from .state import Canary, DeploymentHealth, DeploymentState, Goal, Node, Replica, Resources, package_sha
from .store import AutoscaleState, GoalChange, Store, wait_for_events

log = logging.getLogger("taskserve.deploy")

# A deploy that has seen no controller for this long says so.
NO_CONTROLLER_WARNING_S = 5.0


def _show_progress() -> None:
    """Print deploy progress lines to stderr unless the program set up logging itself."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("taskserve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica as ``status()`` reports it."""

    replica_id: str
    version: str
    state: str
    node_id: str
    pid: Optional[int]
    message: str = ""
    config_hash: str = ""       # the user_config this replica runs ("" when there is none)
    canary: bool = False        # one of the canary's replicas


@dataclass(frozen=True)
class DeploymentStatus:
    """A consistent snapshot of a deployment: its state, why, and its replicas."""

    name: str
    status: str
    message: str
    version: str
    num_replicas: int
    generation: int
    replicas: list[ReplicaInfo] = field(default_factory=list)
    # For an autoscaled deployment: the controller's decision and the load behind it
    # (target, waiting, serving, load, reason, min_replicas, max_replicas); else None.
    autoscaling: Optional[dict[str, Any]] = None
    # While a canary runs (SPEC §9): its version, percent, replicas running, requests,
    # errors, error_rate and p95 (seconds), its thresholds, and the same counts of the
    # stable version since the canary started (under "stable"); else None.
    canary: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "version": self.version,
            "num_replicas": self.num_replicas,
            "generation": self.generation,
            "replicas": [info.__dict__ for info in self.replicas],
            "autoscaling": self.autoscaling,
            "canary": self.canary,
        }


class Deployment:
    """A class or function with the options it is deployed with.

    Made by :func:`deployment`, :meth:`options` or :func:`get_deployment`;
    immutable: ``options()`` returns a new one.
    """

    def __init__(
        self,
        target: Any,
        options: DeploymentOptions,
        init_args: tuple = (),
        init_kwargs: Optional[dict] = None,
        *,
        _code_sha: Optional[str] = None,
        _goal: Optional[Goal] = None,
    ) -> None:
        self._target = target
        self._options = options
        self._init_args = tuple(init_args)
        self._init_kwargs = dict(init_kwargs or {})
        self._code_sha = _code_sha       # set when the code is still only in Redis
        self._goal = _goal

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        assert self._options.name is not None
        return self._options.name

    @property
    def num_replicas(self) -> int:
        return self._options.num_replicas

    @property
    def version(self) -> Optional[str]:
        return self._options.version

    @property
    def user_config(self) -> Any:
        return self._options.user_config

    @property
    def init_args(self) -> tuple:
        self._load_code()
        return self._init_args

    @property
    def init_kwargs(self) -> dict:
        self._load_code()
        return dict(self._init_kwargs)

    @property
    def func_or_class(self) -> Any:
        self._load_code()
        return self._target

    @property
    def config(self) -> DeploymentOptions:
        """All options, validated."""
        return self._options

    def _load_code(self) -> None:
        if self._code_sha is None:
            return
        blob = current_store().get_code(self._code_sha)
        try:
            self._target, self._init_args, self._init_kwargs = unpack(blob, cluster_secret())
        except TaskserveError:
            raise                          # a signature refused, no secret: said plainly
        except Exception as error:
            raise DeploymentError(
                f"cannot load the code of deployment {self.name!r} here ({error}); "
                "import what it needs in this process, or deploy it again from its source"
            ) from None
        self._code_sha = None

    @property
    def _kind(self) -> str:
        if self._goal is not None and self._code_sha is not None:
            return self._goal.kind
        return "class" if inspect.isclass(self._target) else "function"

    # ------------------------------------------------------------------ options

    def options(self, **changes: Any) -> "Deployment":
        """A copy with some options changed (``init_args``/``init_kwargs`` too).

        Example::

            Echo.options(num_replicas=3).deploy()     # scales; the original Echo is unchanged
        """
        init_args = changes.pop("init_args", None)
        init_kwargs = changes.pop("init_kwargs", None)
        options = validate_options(changes, base=self._options)
        copy = Deployment(
            self._target,
            options,
            self._init_args if init_args is None else tuple(init_args),
            self._init_kwargs if init_kwargs is None else dict(init_kwargs),
            _code_sha=self._code_sha,
            _goal=self._goal,
        )
        copy._check_static()
        return copy

    def _check_static(self) -> None:
        """Checks that need only the options and the class, run by decorator and options()."""
        if self._code_sha is not None:
            return
        if self._options.user_config is not None:
            if self._kind == "function":
                raise ValueError(
                    f"deployment {self.name!r} is a function, which cannot take a user_config; "
                    "make it a class with a reconfigure(self, config) method"
                )
            if not callable(getattr(self._target, "reconfigure", None)):
                raise ValueError(
                    f"deployment {self.name!r} has a user_config but {self._target.__name__} has no "
                    "reconfigure(self, config) method; add one, or drop user_config"
                )

    # ------------------------------------------------------------------ deploy

    def deploy(self, *init_args: Any, timeout: Optional[float] = None, **init_kwargs: Any) -> None:
        """Create or update the deployment and wait until the rollout is done.

        Constructor arguments given here replace the ones given before. Raises
        :class:`DeploymentError` if the rollout fails or ``timeout`` seconds pass.
        """
        _show_progress()
        if self._code_sha is not None and self._goal is not None and not (init_args or init_kwargs):
            self._deploy_stored(self._goal, timeout)
            return
        self._load_code()
        if init_args or init_kwargs:
            args, kwargs = tuple(init_args), dict(init_kwargs)
        else:
            args, kwargs = self._init_args, self._init_kwargs
        self._check_static()
        self._check_constructor(args, kwargs)
        check_batched_methods(self._target)
        code_sha, blob, init_sha = pack(self._target, args, kwargs)
        runtime_env, packages = resolve_runtime_env(self._options.runtime_env)
        options = self._options.model_copy(update={"runtime_env": runtime_env})
        store = current_store()
        shipped = package_sha(runtime_env)
        if shipped and shipped not in {sha for sha, _ in packages}:
            # Uploaded by an earlier deploy (maybe of another name): this goal holds it too.
            packages.append((shipped, store.get_code(shipped)))
        version = options.version or secrets.token_hex(4)
        spec_hash = replica_spec_hash(options, version, init_sha)
        new_options = options.model_dump()
        canary_config = new_options.pop("canary")     # the goal holds a canary apart from the options
        # Sealed with what decides how it runs: a replica refuses any other pairing.
        secret = cluster_secret()
        code_sha, blob = sign(blob, manifest(self.name, {**new_options, "kind": self._kind}), secret)
        user_config = new_options.get("user_config")
        _check_route_is_free(store, self.name, new_options)
        health = store.get_health(self.name)
        if canary_config is not None:
            baseline = _prepare_canary(store, self.name, version)
            has_reconfigure = self._kind == "class" and callable(getattr(self._target, "reconfigure", None))

            def make_canary_goal(previous: Optional[Goal]) -> Optional[dict]:
                return _start_or_move_canary(previous, self.name, Canary(
                    version=version, spec_hash=spec_hash, code_sha=code_sha, init_sha=init_sha,
                    options=new_options, kind=self._kind, has_reconfigure=has_reconfigure,
                    baseline=baseline, started_at=time.time(),
                    user_config_signature=sign_user_config(self.name, code_sha, user_config, secret),
                    **canary_config))

            goal = store.update_goal(self.name, make_canary_goal, "canary", blobs=[(code_sha, blob), *packages])
            if goal is None:
                log.info("%s: canary %s already runs with these options; nothing to do", self.name, version)
                return
            log.info("%s: canary %s at %g%% of the requests (generation %d)", self.name, version,
                     canary_config["traffic_percent"], goal.generation)
            wait_for_rollout(store, self.name, goal.generation, timeout)
            self._goal = goal
            return

        # Code stored unsigned (by an older taskserve) or under another secret is not run
        # again: this deploy ships its own, freshly sealed.
        stored_code_holds = _stored_code_holds(store, self.name, secret)

        def make_goal(previous: Optional[Goal]) -> Optional[Goal]:
            # previous is None for a new deployment, or a goal being deleted: deploy creates it again.
            if (
                previous is not None
                and not previous.deleting
                and stored_code_holds
                and options.version is not None
                and previous.user_version == options.version
                and previous.spec_hash == spec_hash
                and previous.options == new_options
                and previous.canary is None     # deploying the stable version again aborts its canary
                # a goal that failed is tried again rather than taken as done
                and not (health.observed_generation == previous.generation and health.outcome == "failed")
                # signed with this secret (else it is written again: a rotated secret re-signs it)
                and previous.user_config_signature == sign_user_config(self.name, previous.code_sha,
                                                                       user_config, secret)
            ):
                return None  # same version, same options: nothing to do
            same_spec = (previous is not None and not previous.deleting and previous.spec_hash == spec_hash
                         and stored_code_holds)
            runs = previous.code_sha if same_spec else code_sha
            return Goal(
                name=self.name,
                generation=0,               # update_goal sets the generation and created_at
                version=version,
                spec_hash=spec_hash,
                num_replicas=options.num_replicas,
                options=new_options,
                # Same version and spec: new replicas must run what the others run.
                code_sha=runs,
                init_sha=init_sha,
                kind=self._kind,
                user_version=options.version,
                restart_nonce=previous.restart_nonce if same_spec else "",
                has_reconfigure=self._kind == "class" and callable(getattr(self._target, "reconfigure", None)),
                user_config_signature=sign_user_config(self.name, runs, user_config, secret),
            )

        self._write_goal(store, make_goal, [(code_sha, blob), *packages], version, timeout)

    def _deploy_stored(self, source: Goal, timeout: Optional[float]) -> None:
        """Deploy these options with the code and constructor arguments ``source`` runs,
        already in the cluster: nothing is loaded or uploaded from this process.

        What ``get_deployment(name).options(...).deploy()`` and an exported file's
        ``code:`` entries do. The update rules are deploy()'s: with an unchanged version,
        resources and init args, running replicas keep running.
        """
        store = current_store()
        if not store.has_code(source.code_sha):
            raise DeploymentError(
                f"the code {source.code_sha[:12]} of deployment {self.name!r} is no longer in the cluster; "
                "deploy it from its source (FILE.py:ATTR or an import_path)"
            )
        if self._options.user_config is not None and not source.has_reconfigure:
            raise ValueError(f"deployment {self.name!r} has a user_config but its class has no "
                             "reconfigure(self, config) method; add one, or drop user_config")
        runtime_env, packages = resolve_runtime_env(self._options.runtime_env)
        options = self._options.model_copy(update={"runtime_env": runtime_env})
        shipped = package_sha(runtime_env)
        if shipped and shipped not in {sha for sha, _ in packages}:
            packages.append((shipped, store.get_code(shipped)))
        version = options.version or secrets.token_hex(4)
        spec_hash = replica_spec_hash(options, version, source.init_sha)
        new_options = options.model_dump()
        new_options.pop("canary", None)     # a canary is started by deploy(), not carried over
        # Signed again for this name and these options (checked, never unpickled here).
        secret = cluster_secret()
        code_sha, blob = reseal(store.get_code(source.code_sha),
                                manifest(self.name, {**new_options, "kind": source.kind}), secret)
        packages.append((code_sha, blob))
        user_config = new_options.get("user_config")
        _check_route_is_free(store, self.name, new_options)
        health = store.get_health(self.name)

        def make_goal(previous: Optional[Goal]) -> Optional[Goal]:
            live = previous is not None and not previous.deleting
            if (
                live
                and options.version is not None
                and options.version in (previous.user_version, previous.version)
                and previous.spec_hash == spec_hash
                and previous.options == new_options
                and getattr(previous, "canary", None) is None
                and not (health.observed_generation == previous.generation and health.outcome == "failed")
                and previous.user_config_signature == sign_user_config(self.name, previous.code_sha,
                                                                       user_config, secret)
            ):
                return None
            same_spec = live and previous.spec_hash == spec_hash
            runs = previous.code_sha if same_spec else code_sha
            return Goal(
                name=self.name, generation=0, version=version, spec_hash=spec_hash,
                num_replicas=options.num_replicas, options=new_options,
                code_sha=runs,
                init_sha=source.init_sha, kind=source.kind,
                user_version=options.version,
                restart_nonce=previous.restart_nonce if same_spec else "",
                has_reconfigure=source.has_reconfigure,
                user_config_signature=sign_user_config(self.name, runs, user_config, secret),
            )

        self._write_goal(store, make_goal, packages, version, timeout)

    def _write_goal(self, store: Store, make_goal: GoalChange,
                    blobs: list[tuple[str, bytes]], version: str, timeout: Optional[float]) -> None:
        """Write the goal ``make_goal`` returns (storing ``blobs`` with it) and wait for its rollout.

        ``make_goal`` returns None when ``version`` already runs with these options:
        then nothing is written and this only says so. Example, the end of :meth:`deploy`::

            self._write_goal(store, make_goal, [(code_sha, blob), *packages], version, timeout)
        """
        goal = store.update_goal(self.name, make_goal, "deploy", blobs=blobs, missing_ok=True)
        if goal is None:
            log.info("%s: version %s is already deployed with these options; nothing to do", self.name, version)
            return
        log.info("%s: deploying version %s (generation %d)", self.name, goal.version, goal.generation)
        wait_for_rollout(store, self.name, goal.generation, timeout)
        self._goal = goal

    def _check_constructor(self, args: tuple, kwargs: dict) -> None:
        if self._kind == "function":
            if args or kwargs:
                raise TypeError(
                    f"deployment {self.name!r} is a function, which takes no constructor "
                    "arguments; pass them in each request instead"
                )
            return
        try:
            inspect.signature(self._target).bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"cannot construct {self._target.__name__} with args={args!r} kwargs={kwargs!r}: {error}; "
                "pass deploy() the arguments its __init__ takes"
            ) from None
        except ValueError:
            pass  # no signature to check (a builtin); the replica will tell

    # ------------------------------------------------------------------ the rest

    def delete(self, timeout: Optional[float] = None) -> None:
        """Drain every replica and forget the deployment; waits until it is gone."""
        delete_deployment(self.name, timeout=timeout)

    def get_handle(self) -> DeploymentHandle:
        """A handle that sends requests to this deployment."""
        goal = current_store().require_goal(self.name)
        return DeploymentHandle(self.name, goal.options.get("serializer", "json"))

    def status(self) -> DeploymentStatus:
        """One consistent snapshot of the deployment and its replicas."""
        return deployment_status(self.name)

    @classmethod
    def _from_goal(cls, goal: Goal) -> "Deployment":
        options = DeploymentOptions(**goal.options)
        return cls(None, options, _code_sha=goal.code_sha, _goal=goal)

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r}, num_replicas={self.num_replicas}, version={self.version!r})"


def deployment(_target: Any = None, **options: Any) -> Any:
    """Turn a class or function into a :class:`Deployment`.

    Usable bare (``@deployment``) or with options (``@deployment(num_replicas=2)``);
    the name defaults to the class or function name.
    """

    def wrap(target: Any) -> Deployment:
        if not callable(target):
            raise TypeError(f"@taskserve.deployment decorates a class or function, not {target!r}")
        validated = validate_options({**options, "name": options.get("name") or getattr(target, "__name__", None)})
        made = Deployment(target, validated)
        made._check_static()
        return made

    if _target is not None:
        if options:
            raise TypeError("use @taskserve.deployment or @taskserve.deployment(option=value, ...)")
        return wrap(_target)
    validate_options(options)  # fail at the decorator line, before the class body matters
    return wrap


def get_deployment(name: str) -> Deployment:
    """The deployment as last deployed; :class:`DeploymentNotFound` if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"a deployment name is a string, not {name!r}")
    goal = current_store().get_goal(name)
    if goal is None or goal.deleting:
        raise DeploymentNotFound(name)
    return Deployment._from_goal(goal)


def list_deployments() -> dict[str, Deployment]:
    """Every deployment, by name."""
    return {goal.name: Deployment._from_goal(goal) for goal in current_store().list_goals() if not goal.deleting}


def deployment_status(name: str) -> DeploymentStatus:
    store = current_store()
    goal, health, replicas = store.snapshot(name)
    if goal is None or goal.deleting:
        raise DeploymentNotFound(name)
    scale = store.autoscale_state(name) if goal.options.get("autoscaling_config") else None
    stats = store.stats(name) if goal.canary is not None else {}
    return status_of(goal, health, replicas, scale, stats)


def status_of(goal: Goal, health: DeploymentHealth, replicas: list[Replica], scale: Optional[AutoscaleState],
              stats: dict[str, int]) -> DeploymentStatus:
    """A deployment's status from what was read of it: its goal, health and replicas,
    its autoscaling state (used only with an ``autoscaling_config``) and its stats (used
    only while a canary runs). Reads nothing: the gateway's status page builds every
    deployment's status from one pipelined read this way."""
    name = goal.name
    status = health.status.value if health.observed_generation == goal.generation else DeploymentState.UPDATING.value
    message = health.message if health.observed_generation == goal.generation else "waiting for the controller"
    num_replicas, autoscaling = goal.num_replicas, None
    config = goal.options.get("autoscaling_config")
    if config:
        state = scale
        num_replicas = state.target if state is not None else goal.num_replicas
        autoscaling = {
            "target": num_replicas,
            "waiting": state.waiting if state else 0,
            "serving": state.serving if state else 0,
            "load": state.load if state else 0,
            "reason": state.reason if state else "no load measured yet",
            "min_replicas": config.get("min_replicas"),
            "max_replicas": config.get("max_replicas"),
            "target_ongoing_requests": config.get("target_ongoing_requests"),
        }
    return DeploymentStatus(
        name=name,
        status=status,
        message=message,
        version=goal.version,
        num_replicas=num_replicas,
        generation=goal.generation,
        autoscaling=autoscaling,
        canary=_canary_status(goal, replicas, stats),
        replicas=[
            ReplicaInfo(r.replica_id, r.version, r.state.value, r.node_id, r.pid, r.message, r.applied_config_hash,
                        r.canary)
            for r in sorted(replicas, key=lambda r: (r.created_at, r.replica_id))
        ],
    )


def _canary_status(goal: Goal, replicas: list, stats: dict[str, int]) -> Optional[dict[str, Any]]:
    """``status().canary``: the canary and how it does against the stable version (None without one)."""
    canary = goal.canary
    if canary is None:
        return None
    mine = VersionStats.of(stats, canary.version)
    stable = VersionStats.of(stats, goal.version, canary.baseline)
    running = sum(1 for r in replicas if r.canary and r.spec_hash == canary.spec_hash and r.is_available)
    return {
        "version": canary.version,
        "percent": canary.traffic_percent,
        "replicas": running,
        "target_replicas": canary.replica_count(goal.num_replicas),
        "requests": mine.requests,
        "errors": mine.errors,
        "error_rate": mine.error_rate,
        "p95": _finite(mine.p95),
        "min_requests": canary.min_requests,
        "max_error_rate_increase": canary.max_error_rate_increase,
        "max_p95_ratio": canary.max_p95_ratio,
        "stable": {"version": goal.version, "requests": stable.requests, "errors": stable.errors,
                   "error_rate": stable.error_rate, "p95": _finite(stable.p95)},
    }


def _finite(seconds: Optional[float]) -> Optional[float]:
    """A p95 for JSON: beyond the last latency bound (infinite) it is reported as None."""
    return None if seconds is None or math.isinf(seconds) else seconds


def scale_deployment(name: str, num_replicas: int, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Set a deployment's replica count without touching its code: a scale only.

    What ``taskserve scale NAME N`` does; running replicas keep running.
    """
    validate_options({"num_replicas": num_replicas})
    store = current_store()

    def rescale(previous: Goal) -> Optional[dict]:
        if previous.options.get("autoscaling_config"):
            raise ValueError(
                f"deployment {name!r} is autoscaled, so the controller sets its replica count; "
                "change its autoscaling_config (min_replicas, max_replicas), or deploy it with "
                "autoscaling_config=None and num_replicas to fix the count"
            )
        if previous.num_replicas == num_replicas:
            return None
        return {"num_replicas": num_replicas, "options": {**previous.options, "num_replicas": num_replicas}}

    goal = store.update_goal(name, rescale, "scale")
    if goal is not None and wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: scaling to %d replicas (generation %d)", name, num_replicas, goal.generation)


def reconfigure_deployment(name: str, user_config: Any, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Give every replica of ``name`` a new ``user_config`` in place: no restart.

    What ``taskserve reconfigure NAME JSON`` does. Replicas switch in the same
    batches as a rollout; if ``reconfigure`` rejects the config, the replicas that
    switched go back and this raises :class:`DeploymentError`.
    """
    check_json_value(user_config, "user_config")
    store = current_store()
    secret = cluster_secret()

    def reconfigure(previous: Goal) -> Optional[dict]:
        if not previous.has_reconfigure:
            raise ValueError(
                f"deployment {name!r} has no reconfigure(self, config) method, so it cannot take a "
                "user_config; add one and deploy it again"
            )
        signature = sign_user_config(name, previous.code_sha, user_config, secret)
        if previous.options.get("user_config") == user_config and previous.user_config_signature == signature:
            return None
        return {"options": {**previous.options, "user_config": user_config}, "user_config_signature": signature}

    goal = store.update_goal(name, reconfigure, "reconfigure")
    if goal is not None and wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: giving the replicas a new user_config (generation %d)", name, goal.generation)


def restart_deployment(name: str, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Replace every replica of ``name`` in rolling batches, at the same version.

    What ``taskserve restart NAME`` does, to refresh a worker pool.
    """
    store = current_store()

    def restart(previous: Goal) -> dict:
        return {"restart_nonce": secrets.token_hex(4)}

    goal = store.update_goal(name, restart, "restart")
    if wait and goal is not None:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: restarting every replica (generation %d)", name, goal.generation)


def rollback_deployment(name: str, to_version: Optional[str] = None, wait: bool = True,
                        timeout: Optional[float] = None) -> str:
    """Roll ``name`` back to its previous goal (or the newest one of ``to_version``).

    A rolling update like any other; the replica count stays as it is. Returns the
    version rolled back to.
    """
    store = current_store()
    secret = cluster_secret()
    history = store.history(name)
    running = store.require_goal(name)
    if to_version is not None and to_version == running.version and getattr(running, "canary", None) is None:
        _show_progress()
        log.info("%s: version %s is the one running; nothing to roll back", name, to_version)
        return running.version

    def roll_back(current: Goal) -> Goal:
        if current.canary is not None and to_version in (None, current.version):
            return replace(current, canary=None)     # aborts the canary: the stable version stays
        target = previous_goal(history, current, version=to_version)
        if target is None:
            versions = sorted({e["goal"]["version"] for e in history if e.get("goal")} - {current.version})
            if to_version is not None:
                raise ValueError(
                    f"deployment {name!r} has no version {to_version!r} in its history; "
                    f"known versions: {', '.join(versions) or 'none'}"
                )
            raise ValueError(f"deployment {name!r} has no earlier version to roll back to")
        # The count, and whether the controller sets it, stay as they are now. The old
        # user_config keeps a signature only if it had a valid one (then signed with the
        # current secret, which may have been rotated since).
        try:
            signature = resign_user_config(name, target.code_sha, target.options.get("user_config"),
                                           target.user_config_signature, secret)
        except SignatureError as error:
            raise SignatureError(f"cannot roll {name!r} back to version {target.version}: its {error}") from None
        return replace(target, num_replicas=current.num_replicas,
                       options={**target.options, "num_replicas": current.num_replicas,
                                "autoscaling_config": current.options.get("autoscaling_config")},
                       deleting=False, user_config_signature=signature)

    goal = store.update_goal(name, roll_back, "rollback")
    assert goal is not None
    if wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: rolling back to version %s (generation %d)", name, goal.version, goal.generation)
    return goal.version


def _stored_code_holds(store: Store, name: str, secret: ClusterSecret) -> bool:
    """Whether the code the goal of ``name`` runs is sealed with ``secret`` (True with no goal)."""
    goal = store.get_goal(name)
    if goal is None or goal.deleting:
        return True
    try:
        return seal_holds(store.get_code(goal.code_sha), secret)
    except LookupError:
        return False


def promote_canary(name: str, wait: bool = True, timeout: Optional[float] = None) -> str:
    """Promote the canary of ``name``: a rolling update of the stable replicas to its
    version (by the usual rules), after which the canary's replicas drain.

    What ``taskserve promote NAME`` does, and what a deploy of the canary's version
    without ``canary`` does. Returns the version promoted.
    """
    store = current_store()

    def promote(current: Goal) -> Goal:
        canary = current.canary
        if canary is None:
            raise ValueError(f"deployment {name!r} runs no canary; start one with "
                             f"`taskserve deploy ... --version V --canary PERCENT`")
        count = current.num_replicas
        return Goal(name=name, generation=0, version=canary.version, spec_hash=canary.spec_hash, num_replicas=count,
                    options={**canary.options, "num_replicas": count}, code_sha=canary.code_sha,
                    init_sha=canary.init_sha, kind=canary.kind, user_version=canary.version,
                    has_reconfigure=canary.has_reconfigure, user_config_signature=canary.user_config_signature)

    goal = store.update_goal(name, promote, "promote")
    assert goal is not None
    if wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: promoting canary %s (generation %d)", name, goal.version, goal.generation)
    return goal.version


def set_canary_traffic(name: str, traffic_percent: float, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Send ``traffic_percent`` of the requests of ``name`` to its canary (no replica
    restarts; the canary's replica count follows). What ``taskserve canary NAME --percent P`` does."""
    store = current_store()

    def move(current: Goal) -> Optional[dict]:
        canary = current.canary
        if canary is None:
            raise ValueError(f"deployment {name!r} runs no canary; start one with "
                             f"`taskserve deploy ... --version V --canary PERCENT`")
        config = check_canary_config({"traffic_percent": traffic_percent, "min_requests": canary.min_requests,
                                      "max_error_rate_increase": canary.max_error_rate_increase,
                                      "max_p95_ratio": canary.max_p95_ratio})
        assert config is not None
        if config["traffic_percent"] == canary.traffic_percent:
            return None
        return {"canary": replace(canary, traffic_percent=config["traffic_percent"])}

    goal = store.update_goal(name, move, "canary")
    if goal is not None and wait:
        _log_and_wait(store, name, goal.generation, timeout, "%s: canary %s at %g%% (generation %d)",
                      name, goal.canary.version if goal.canary else "", traffic_percent, goal.generation)


def _prepare_canary(store: Store, name: str, version: str) -> dict[str, int]:
    """Before a canary of ``version`` starts (not when it moves): forget what replicas of
    that version counted before, and return the stable version's counters now, from
    which the two are compared."""
    current = store.get_goal(name)
    if current is None or current.deleting or (current.canary is not None and current.canary.version == version):
        return current.canary.baseline if current is not None and current.canary is not None else {}
    if current.version != version:
        store.reset_stats(name, version)
    return baseline_of(store.stats(name), current.version)


def _start_or_move_canary(previous: Optional[Goal], name: str, canary: Canary) -> Optional[dict]:
    """The change of a deploy with ``canary``: start it beside the running version, move
    the split (same version and code), or replace a canary of another version."""
    if previous is None or previous.deleting:
        raise ValueError(f"deployment {name!r} does not run yet, so a canary has nothing to run beside; "
                         "deploy it once without canary first")
    if previous.version == canary.version:
        raise ValueError(f"version {canary.version!r} of {name!r} already runs as its stable version; "
                         "a canary needs another version")
    if canary.options.get("serializer") != previous.options.get("serializer", "json"):
        raise ValueError(f"the canary's serializer {canary.options.get('serializer')!r} differs from the running "
                         f"version's {previous.options.get('serializer', 'json')!r}; callers send both the same "
                         "messages, so keep the serializer (change it with a rolling update)")
    running = previous.canary
    if running is not None and (running.version, running.spec_hash) == (canary.version, canary.spec_hash):
        moved = replace(running, traffic_percent=canary.traffic_percent, min_requests=canary.min_requests,
                        max_error_rate_increase=canary.max_error_rate_increase, max_p95_ratio=canary.max_p95_ratio)
        return None if moved == running else {"canary": moved}
    return {"canary": canary}


def history(name: str) -> list[dict]:
    """Every goal change of ``name``, oldest first (action, by, at, version, outcome)."""
    store = current_store()
    if store.get_goal(name) is None:
        raise DeploymentNotFound(name)
    return store.history(name)


def delete_deployment(name: str, timeout: Optional[float] = None) -> None:
    """Drain every replica of ``name`` and forget it; waits until it is gone."""
    check_name(name)
    store = current_store()

    goal = store.update_goal(name, lambda previous: {"deleting": True}, "delete")
    _show_progress()
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = store.subscribe()
    last_message = None
    try:
        while store.get_goal(name) is not None:
            health = store.get_health(name)
            if health.observed_generation == goal.generation and health.message != last_message:
                log.info("%s: %s", name, health.message)
                last_message = health.message
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"deployment {name!r} was not deleted within {timeout}s; its replicas are still draining")
            wait_for_events(pubsub, 0.5)
    finally:
        pubsub.close()
    log.info("%s: deleted", name)


def _log_and_wait(store: Store, name: str, generation: int, timeout: Optional[float],
                  message: str, *args: Any) -> None:
    """Log ``message % args`` as deploy progress, then :func:`wait_for_rollout` of ``generation``.

    Example::

        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: restarting every replica (generation %d)", name, goal.generation)
    """
    _show_progress()
    log.info(message, *args)
    wait_for_rollout(store, name, generation, timeout)


def wait_for_rollout(store: Store, name: str, generation: int, timeout: Optional[float]) -> None:
    """Wait until the controller reports generation ``generation`` done or failed.

    Logs each new status message (to stderr, unless the program set up logging). Raises
    :class:`DeploymentError` when the rollout failed, ``timeout`` seconds passed, or
    waiting cannot help: a replica needs more than any live node has in total.
    """
    _show_progress()
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = store.subscribe()
    last_message = None
    controller_seen_at = time.monotonic()
    warned = False
    try:
        while True:
            if store.controller_alive():
                controller_seen_at = time.monotonic()
            elif not warned and time.monotonic() - controller_seen_at > NO_CONTROLLER_WARNING_S:
                log.warning("%s: no controller is running, so nothing happens yet; start one with "
                            "`taskserve up` or `taskserve controller`", name)
                warned = True
            goal = store.get_goal(name)
            if goal is None or goal.deleting:
                raise DeploymentError(f"deployment {name!r} was deleted while it was deploying")
            if goal.generation > generation:
                for entry in reversed(store.history(name)):
                    if entry.get("rollback_of") == generation:
                        raise DeploymentError(
                            f"deploying {name!r} failed and was rolled back to version {entry['version']}: "
                            f"{entry.get('reason', '')}\n\nReplica traceback:\n{entry.get('error', '').rstrip()}"
                        )
                raise DeploymentError(
                    f"deployment {name!r} was changed by another deploy (generation {goal.generation}) "
                    "before this one finished; the later one wins"
                )
            health = store.get_health(name)
            if health.observed_generation == generation:
                if health.outcome == "done":
                    log.info("%s: version %s is healthy", name, goal.version)
                    return
                if health.outcome == "failed":
                    raise DeploymentError(
                        f"deploying {name!r} failed: {health.message}\n\nReplica traceback:\n{health.last_error.rstrip()}"
                    )
                if health.message != last_message:
                    log.info("%s: %s", name, health.message)
                    last_message = health.message
                    # The controller's "pending: needs 4 CPUs; the largest free is 2 on node-a" may
                    # mean busy nodes (wait) or nodes too small (waiting cannot help).
                    why = _unplaceable(goal.resources, store.list_nodes()) if "needs " in health.message else None
                    if why is not None:
                        raise DeploymentError(
                            f"deployment {name!r} cannot be placed, and waiting cannot help: {why}. The "
                            f"controller says: {health.message}. Its goal stays as written: deploy it with "
                            f"smaller num_cpus/num_gpus/memory (or `taskserve rollback {name}`), or add a node "
                            "that has them"
                        )
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(
                    f"deployment {name!r} did not finish within {timeout}s: {health.message or 'no progress'}"
                )
            remaining = 0.5 if deadline is None else max(0.01, min(0.5, deadline - time.monotonic()))
            wait_for_events(pubsub, remaining)
    finally:
        pubsub.close()


def _check_route_is_free(store: Store, name: str, options: dict) -> None:
    """Refuse a route prefix that another deployment already serves."""
    prefix = route_of(name, options)
    if prefix is None:
        return
    for goal in store.list_goals():
        if goal.name != name and not goal.deleting and route_of(goal.name, goal.options) == prefix:
            raise ValueError(
                f"route_prefix {prefix!r} is already served by deployment {goal.name!r}; "
                "choose another route_prefix, or route_prefix=False to serve no HTTP route"
            )


def _unplaceable(need: Resources, nodes: Iterable[Node]) -> Optional[str]:
    """Why no live node can ever hold a replica that needs ``need``: it needs more than
    the largest one has in total. None if one could once it has room, or if no node is
    alive (one may yet join).

    >>> a = Node("node-a", Resources(2, 1, 8 * 2**30))
    >>> _unplaceable(Resources(4), [a])
    'a replica needs 4 CPUs and no node has 4 CPUs (the largest, node-a, has 2)'
    >>> _unplaceable(Resources(1, 2), [a, Node("node-b", Resources(64, 1), alive=False)])
    'a replica needs 2 GPUs and no node has 2 GPUs (the largest, node-a, has 1)'
    >>> _unplaceable(Resources(2, 0.5), [a]) is None      # it fits once node-a has room
    True
    >>> _unplaceable(Resources(4), [Node("node-b", Resources(2), alive=False)]) is None
    True
    """
    live = [node for node in nodes if node.alive]
    if not live:
        return None
    gpus = math.ceil(need.num_gpus - 1e-9) if need.num_gpus >= 1 else need.num_gpus   # whole GPUs
    for label, wanted, total_of in (
        ("CPUs", need.num_cpus, lambda n: n.total.num_cpus),
        ("GPUs", gpus, lambda n: n.total.num_gpus),
        ("bytes of memory", need.memory, lambda n: n.total.memory),
    ):
        largest = max(live, key=total_of)
        if wanted > total_of(largest) + 1e-9:
            return (f"a replica needs {_amount(wanted)} {label} and no node has {_amount(wanted)} {label} "
                    f"(the largest, {largest.node_id}, has {_amount(total_of(largest))})")
    return None


def _amount(value: float) -> str:
    """A resource amount as the controller writes it: whole numbers without a fraction.

    >>> _amount(4.0), _amount(0.5), _amount(17179869184)
    ('4', '0.5', '17179869184')
    """
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
