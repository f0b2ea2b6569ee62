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
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Union

from .batching import check_batched_methods
from .canary import baseline_of
from .code import pack, reseal, seal_holds, sign, unpack
from .connection import cluster_secret, current_store
from .errors import DeploymentError, DeploymentNotFound, SignatureError, TaskserveError
from .goals import (
    GoalDecision,
    Proposal,
    next_goal,
    promoted,
    propose,
    reconfigured,
    restarted,
    rolled_back,
    scaled,
    with_canary,
    without_canary,
)
from .handle import DeploymentHandle, check_callable_goal
from .history import previous_goal
from .runtime_env import resolve as resolve_runtime_env
from .signing import (
    ClusterSecret,
    check_goal,
    check_manifest,
    check_user_config,
    goal_signed_now,
    manifest,
    resign_user_config,
    sign_goal,
    sign_user_config,
    unseal,
)
from .spec import (
    DeploymentOptions,
    check_canary_config,
    check_goal_options,
    check_json_value,
    check_name,
    route_of,
    validate_options,
)
from .state import Canary, Goal, Node, Resources, package_sha

# DeploymentStatus and ReplicaInfo live in taskserve.status; users import them from here too.
from .status import DeploymentStatus, status_of
from .status import ReplicaInfo as ReplicaInfo
from .store import GoalChange, Store, wait_for_events

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
        :class:`DeploymentError` if the rollout fails or ``timeout`` seconds pass. What
        the update does to the replicas is :func:`taskserve.goals.next_goal`'s decision.
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
        _, blob, init_sha = pack(self._target, args, kwargs)
        runtime_env, packages = resolve_runtime_env(self._options.runtime_env)
        options = self._options.model_copy(update={"runtime_env": runtime_env})
        store = current_store()
        shipped = package_sha(runtime_env)
        if shipped and shipped not in {sha for sha, _ in packages}:
            # Uploaded by an earlier deploy (maybe of another name): this goal holds it too.
            packages.append((shipped, store.get_code(shipped)))
        has_reconfigure = self._kind == "class" and callable(getattr(self._target, "reconfigure", None))
        proposal = propose(self.name, options, code_sha="", init_sha=init_sha, kind=self._kind,
                           has_reconfigure=has_reconfigure)
        # As the controller will check it: a resolved runtime_env is within its bounds too.
        check_goal_options(proposal.options, proposal.num_replicas)
        # Sealed with what decides how it runs: a replica refuses any other pairing.
        secret = cluster_secret()
        code_sha, blob = sign(blob, manifest(self.name, {**proposal.options, "kind": self._kind}), secret)
        proposal = replace(proposal, code_sha=code_sha)
        _check_route_is_free(store, self.name, proposal.options)
        if options.canary is not None:
            canary = Canary(
                version=proposal.version, spec_hash=proposal.spec_hash, code_sha=code_sha, init_sha=init_sha,
                options=proposal.options, kind=self._kind, has_reconfigure=has_reconfigure,
                baseline=_prepare_canary(store, self.name, proposal.version), started_at=time.time(),
                user_config_signature=sign_user_config(self.name, code_sha, proposal.options.get("user_config"),
                                                       secret),
                **options.canary)
            goal = store.update_goal(self.name, _sealed(lambda previous: with_canary(self.name, previous, canary).goal,
                                                        secret), "canary", blobs=[(code_sha, blob), *packages])
            if goal is None:
                log.info("%s: canary %s already runs with these options; nothing to do", self.name, canary.version)
                return
            log.info("%s: canary %s at %g%% of the requests (generation %d)", self.name, canary.version,
                     canary.traffic_percent, goal.generation)
            wait_for_rollout(store, self.name, goal.generation, timeout)
            self._goal = goal
            return
        self._write_goal(store, proposal, [(code_sha, blob), *packages], timeout)

    def _deploy_stored(self, source: Goal, timeout: Optional[float]) -> None:
        """Deploy these options with the code and constructor arguments ``source`` runs,
        already in the cluster: nothing is loaded or uploaded from this process.

        What ``get_deployment(name).options(...).deploy()`` and an exported file's
        ``code:`` entries do. The update rules are deploy()'s: with an unchanged version,
        resources and init args, running replicas keep running.
        """
        store = current_store()
        secret = cluster_secret()
        # Its options and code are built on: only if someone with the secret wrote them.
        _check_goal(source, secret)
        if not store.has_code(source.code_sha):
            raise DeploymentError(
                f"the code {source.code_sha[:12]} of deployment {self.name!r} is no longer in the cluster; "
                "deploy it from its source (FILE.py:ATTR or an import_path)"
            )
        if self._options.user_config is not None and not source.has_reconfigure:
            raise ValueError(f"deployment {self.name!r} has a user_config but its class has no "
                             "reconfigure(self, config) method; add one, or drop user_config")
        runtime_env, packages = resolve_runtime_env(self._options.runtime_env)
        options = self._options.model_copy(update={"runtime_env": runtime_env, "canary": None})
        shipped = package_sha(runtime_env)
        if shipped and shipped not in {sha for sha, _ in packages}:
            packages.append((shipped, store.get_code(shipped)))
        # A canary is started by deploy(), not carried over.
        proposal = propose(self.name, options, code_sha="", init_sha=source.init_sha, kind=source.kind,
                           has_reconfigure=source.has_reconfigure)
        check_goal_options(proposal.options, proposal.num_replicas)
        # Signed again for this name and these options (checked, never unpickled here).
        code_sha, blob = reseal(store.get_code(source.code_sha),
                                manifest(self.name, {**proposal.options, "kind": source.kind}), secret)
        packages.append((code_sha, blob))
        _check_route_is_free(store, self.name, proposal.options)
        self._write_goal(store, replace(proposal, code_sha=code_sha), packages, timeout)

    def _write_goal(self, store: Store, proposal: Proposal, blobs: list[tuple[str, bytes]],
                    timeout: Optional[float]) -> None:
        """Write the goal :func:`~taskserve.goals.next_goal` makes of ``proposal`` (storing
        ``blobs`` with it) and wait for its rollout; when it decides there is nothing to
        do, write nothing and only say so."""
        secret = cluster_secret()
        health = store.get_health(self.name)
        holds = _CodeCheck(store, secret)
        decided: list[GoalDecision] = []

        def make_goal(previous: Optional[Goal]) -> Optional[Goal]:
            # previous is None for a new deployment, or a goal being deleted: deploy creates it again.
            if previous is None or previous.deleting:
                decision = next_goal(previous, proposal)
            else:
                decision = next_goal(
                    previous, proposal,
                    failed=health.observed_generation == previous.generation and health.outcome == "failed",
                    # A goal someone without the secret wrote, or code stored unsigned (by an
                    # older taskserve) or under another secret, is not built on: this deploy
                    # writes its own goal, with its own code, freshly sealed.
                    trusted=_goal_holds(previous, secret) and holds(previous.code_sha),
                    signed_now=goal_signed_now(previous, secret) and _user_config_signed_now(previous, secret),
                )
            decided.append(decision)
            if decision.goal is None:
                return None
            goal = decision.goal
            return sign_goal(replace(goal, user_config_signature=sign_user_config(
                self.name, goal.code_sha, goal.options.get("user_config"), secret)), secret)

        goal = store.update_goal(self.name, make_goal, "deploy", blobs=blobs, missing_ok=True)
        if goal is None:
            log.info("%s: version %s is already deployed with these options; nothing to do",
                     self.name, proposal.version)
            return
        log.info("%s: deploying version %s: %s (generation %d)", self.name, goal.version, decided[-1].change.value,
                 goal.generation)
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
        """A handle that sends requests to this deployment (with the serializer its signed goal says)."""
        goal = current_store().require_goal(self.name)
        serializer = goal.options.get("serializer", "json")
        check_callable_goal(goal, serializer)
        return DeploymentHandle(self.name, serializer)

    def status(self) -> DeploymentStatus:
        """One consistent snapshot of the deployment and its replicas."""
        return deployment_status(self.name)

    @classmethod
    def _from_goal(cls, goal: Goal) -> "Deployment":
        """The deployment a goal describes; ``TypeError``/``ValueError`` in one sentence
        for options that cannot be what they say (written into Redis by hand)."""
        return cls(None, check_goal_options(goal.options, goal.num_replicas), _code_sha=goal.code_sha, _goal=goal)

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
    try:
        return Deployment._from_goal(goal)
    except (TypeError, ValueError) as error:
        raise DeploymentError(_unreadable_goal(name, error)) from None


def list_deployments() -> dict[str, Deployment]:
    """Every deployment, by name. A deployment whose goal cannot be read (an unknown or
    mistyped option written into Redis by hand) is left out, and named in a warning."""
    store = current_store()
    goals, unreadable = store.read_goals()
    skipped = [_unreadable_goal(name, error) for name, error in unreadable.items()]
    found = {}
    for goal in goals:
        if goal.deleting:
            continue
        try:
            found[goal.name] = Deployment._from_goal(goal)
        except (TypeError, ValueError) as error:
            skipped.append(_unreadable_goal(goal.name, error))
    for line in skipped:
        log.warning("skipped %s", line)
    return found


def deployment_status(name: str) -> DeploymentStatus:
    """One consistent snapshot of deployment ``name`` and its replicas (:func:`taskserve.status.status_of`).

    A replica record that cannot be read is left out and named in ``skipped``; a goal
    that cannot be read raises :class:`DeploymentError` naming it.
    """
    store = current_store()
    unreadable: dict[str, str] = {}
    try:
        goal, health, replicas = store.snapshot(name, unreadable)
    except ValueError as error:       # its goal is not a goal
        raise DeploymentError(_unreadable_goal(name, error)) from None
    if goal is None or goal.deleting:
        raise DeploymentNotFound(name)
    scale = store.autoscale_state(name) if goal.options.get("autoscaling_config") else None
    stats = store.stats(name) if goal.canary is not None else {}
    try:
        return status_of(goal, health, replicas, scale, stats, unreadable.items())
    except (TypeError, ValueError) as error:
        raise DeploymentError(_unreadable_goal(name, error)) from None


def deployment_statuses() -> tuple[list[DeploymentStatus], list[str]]:
    """The status of every deployment that can be read, and one line for each record left
    out: ``deployment NAME: why`` for a goal that cannot be read, ``replica ID: why``
    for a replica record (also in its deployment's ``skipped``). What ``taskserve
    status`` shows: one bad record never hides the others."""
    store = current_store()
    goals, unreadable = store.read_goals()
    skipped = [_unreadable_goal(name, error) for name, error in unreadable.items()]
    statuses = []
    for goal in goals:
        if goal.deleting:
            continue
        try:
            status = deployment_status(goal.name)
        except DeploymentNotFound:
            continue                   # deleted meanwhile
        except DeploymentError as error:
            skipped.append(str(error))
            continue
        statuses.append(status)
        skipped.extend(status.skipped)
    return statuses, skipped


def _unreadable_goal(name: str, error: Union[str, BaseException]) -> str:
    """One line naming a goal that cannot be read and why.

    >>> _unreadable_goal("echo", TypeError("unknown deployment option 'num_cpu'"))
    "deployment echo: its goal cannot be read: unknown deployment option 'num_cpu'"
    """
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"deployment {name}: its goal cannot be read: {reason}"


def scale_deployment(name: str, num_replicas: int, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Set a deployment's replica count without touching its code: a scale only.

    What ``taskserve scale NAME N`` does; running replicas keep running.
    """
    validate_options({"num_replicas": num_replicas})
    store = current_store()
    secret = cluster_secret()

    def rescale(previous: Goal) -> Optional[Goal]:
        if previous.options.get("autoscaling_config"):
            raise ValueError(
                f"deployment {name!r} is autoscaled, so the controller sets its replica count; "
                "change its autoscaling_config (min_replicas, max_replicas), or deploy it with "
                "autoscaling_config=None and num_replicas to fix the count"
            )
        goal = next_goal(previous, scaled(previous, num_replicas)).goal
        return None if goal is None else replace(goal, user_config_signature=previous.user_config_signature)

    goal = store.update_goal(name, _sealed(rescale, secret), "scale")
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

    def reconfigure(previous: Goal) -> Optional[Goal]:
        if not previous.has_reconfigure:
            raise ValueError(
                f"deployment {name!r} has no reconfigure(self, config) method, so it cannot take a "
                "user_config; add one and deploy it again"
            )
        goal = next_goal(previous, reconfigured(previous, user_config),
                         signed_now=goal_signed_now(previous, secret) and _user_config_signed_now(previous, secret)
                         ).goal
        if goal is None:
            return None
        return replace(goal, user_config_signature=sign_user_config(name, goal.code_sha, user_config, secret))

    goal = store.update_goal(name, _sealed(reconfigure, secret), "reconfigure")
    if goal is not None and wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: giving the replicas a new user_config (generation %d)", name, goal.generation)


def restart_deployment(name: str, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Replace every replica of ``name`` in rolling batches, at the same version.

    What ``taskserve restart NAME`` does, to refresh a worker pool.
    """
    store = current_store()
    secret = cluster_secret()

    def restart(previous: Goal) -> Optional[Goal]:
        goal = next_goal(previous, restarted(previous, secrets.token_hex(4))).goal
        return None if goal is None else replace(goal, user_config_signature=previous.user_config_signature)

    goal = store.update_goal(name, _sealed(restart, secret), "restart")
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
    if to_version is not None and to_version == running.version and running.canary is None:
        _show_progress()
        log.info("%s: version %s is the one running; nothing to roll back", name, to_version)
        return running.version

    def roll_back(current: Goal) -> Goal:
        if current.canary is not None and to_version in (None, current.version):
            # Aborts the canary: the stable version stays.
            aborted = without_canary(current).goal
            assert aborted is not None
            return replace(aborted, user_config_signature=current.user_config_signature)
        target = previous_goal(history, current, version=to_version)
        if target is None:
            versions = sorted({e["goal"]["version"] for e in history if e.get("goal")} - {current.version})
            if to_version is not None:
                raise ValueError(
                    f"deployment {name!r} has no version {to_version!r} in its history; "
                    f"known versions: {', '.join(versions) or 'none'}"
                )
            raise ValueError(f"deployment {name!r} has no earlier version to roll back to")
        # A goal of the history is gone back to only if someone with the secret wrote it.
        try:
            check_goal(target, secret)
        except SignatureError as error:
            raise SignatureError(f"cannot roll {name!r} back to version {target.version}: its {error}") from None
        # The target's own code (trusted=False: not the code running now), for which its
        # user_config was signed.
        goal = next_goal(current, rolled_back(current, target), trusted=False).goal
        assert goal is not None and goal.code_sha == target.code_sha
        # The old user_config keeps a signature only if it had a valid one (then signed with
        # the current secret, which may have been rotated since).
        try:
            signature = resign_user_config(name, target.code_sha, target.options.get("user_config"),
                                           target.user_config_signature, secret)
        except SignatureError as error:
            raise SignatureError(f"cannot roll {name!r} back to version {target.version}: its {error}") from None
        return replace(goal, user_config_signature=signature)

    goal = store.update_goal(name, _sealed(roll_back, secret), "rollback")
    assert goal is not None
    if wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: rolling back to version %s (generation %d)", name, goal.version, goal.generation)
    return goal.version


class _CodeCheck:
    """Whether stored code is sealed with the key that signs now (a missing blob is not;
    after a rotation, code sealed with the old key is shipped again), each blob looked
    at once."""

    def __init__(self, store: Store, secret: ClusterSecret) -> None:
        self.store, self.secret = store, ClusterSecret(secret.keys[:1], secret.source)
        self.known: dict[str, bool] = {}

    def __call__(self, code_sha: str) -> bool:
        if code_sha not in self.known:
            try:
                self.known[code_sha] = seal_holds(self.store.get_code(code_sha), self.secret)
            except LookupError:
                self.known[code_sha] = False
        return self.known[code_sha]


def _user_config_signed_now(goal: Goal, secret: ClusterSecret) -> bool:
    """Whether ``goal``'s user_config is signed with the secret that signs now (after a
    rotation it is not, and a deploy of the same options writes the goal again)."""
    expected = sign_user_config(goal.name, goal.code_sha, goal.options.get("user_config"), secret)
    return goal.user_config_signature == expected


def _check_goal(goal: Goal, secret: ClusterSecret) -> Goal:
    """``goal`` if someone with the cluster secret wrote it, else :class:`SignatureError`
    naming the deployment (:func:`taskserve.signing.check_goal`)."""
    try:
        return check_goal(goal, secret)
    except SignatureError as error:
        raise SignatureError(f"deployment {goal.name!r}: {error}") from None


def _goal_holds(goal: Goal, secret: ClusterSecret) -> bool:
    try:
        check_goal(goal, secret)
    except SignatureError:
        return False
    return True


def _sealed(change: Callable[[Goal], Optional[Goal]], secret: ClusterSecret, check: bool = True) -> GoalChange:
    """``change`` as :meth:`Store.update_goal` takes it: the goal it builds on checked
    first (with ``check``: a goal someone without the secret wrote is never built on, nor
    signed), and the goal it returns signed."""

    def sealed(previous: Optional[Goal]) -> Optional[Goal]:
        if check and previous is not None and not previous.deleting:
            _check_goal(previous, secret)
        goal = change(previous)  # type: ignore[arg-type]
        return None if goal is None else sign_goal(goal, secret)

    return sealed


def promote_canary(name: str, wait: bool = True, timeout: Optional[float] = None) -> str:
    """Promote the canary of ``name``: a rolling update of the stable replicas to its
    version (by the usual rules), after which the canary's replicas drain.

    What ``taskserve promote NAME`` does, and what a deploy of the canary's version
    without ``canary`` does. Returns the version promoted.
    """
    store = current_store()
    secret = cluster_secret()

    def promote(current: Goal) -> Goal:
        proposal = promoted(current)
        goal = next_goal(current, proposal).goal
        assert goal is not None and current.canary is not None
        return replace(goal, user_config_signature=current.canary.user_config_signature)

    goal = store.update_goal(name, _sealed(promote, secret), "promote")
    assert goal is not None
    if wait:
        _log_and_wait(store, name, goal.generation, timeout,
                      "%s: promoting canary %s (generation %d)", name, goal.version, goal.generation)
    return goal.version


def set_canary_traffic(name: str, traffic_percent: float, wait: bool = True, timeout: Optional[float] = None) -> None:
    """Send ``traffic_percent`` of the requests of ``name`` to its canary (no replica
    restarts; the canary's replica count follows). What ``taskserve canary NAME --percent P`` does."""
    store = current_store()
    secret = cluster_secret()

    def move(current: Goal) -> Optional[Goal]:
        canary = current.canary
        if canary is None:
            raise ValueError(f"deployment {name!r} runs no canary; start one with "
                             f"`taskserve deploy ... --version V --canary PERCENT`")
        config = check_canary_config({"traffic_percent": traffic_percent, "min_requests": canary.min_requests,
                                      "max_error_rate_increase": canary.max_error_rate_increase,
                                      "max_p95_ratio": canary.max_p95_ratio})
        assert config is not None
        return with_canary(name, current, replace(canary, traffic_percent=config["traffic_percent"])).goal

    goal = store.update_goal(name, _sealed(move, secret), "canary")
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


def sign_legacy_goals() -> dict[str, str]:
    """Sign the goals an earlier taskserve wrote (they carry no signature) where their code
    vouches for them: what ``taskserve up`` does at its start, once after an upgrade.

    Before goals were signed, what decides how code runs (serializer, runtime_env, kind)
    was checked by the agents and replicas against the manifest sealed with the code, and
    a ``user_config`` against its own signature. Such a goal is signed now only if those
    checks pass with this process's secret, and only for a deployment no signed goal was
    ever written for (its history holds none): a goal whose signature someone removed
    later is not signed again. Returns, by deployment, "" for each goal signed and why
    for each one left unsigned (deploy it again to sign it).
    """
    store = current_store()
    secret = cluster_secret()
    outcome: dict[str, str] = {}
    for goal in store.list_goals():
        if goal.signature or goal.deleting:
            continue
        reason = _why_not_vouched(store, goal, secret)
        if reason:
            outcome[goal.name] = reason
            continue

        def sign_it(current: Goal, read: Goal = goal) -> Optional[Goal]:
            return sign_goal(current, secret) if current == read else None   # changed meanwhile: left alone

        written = store.update_goal(goal.name, sign_it, "sign")
        outcome[goal.name] = "" if written is not None else "its goal changed meanwhile"
    return outcome


def _why_not_vouched(store: Store, goal: Goal, secret: ClusterSecret) -> str:
    """Why an unsigned ``goal`` is not one an earlier taskserve wrote and its code vouches
    for ("" when it is): see :func:`sign_legacy_goals`."""
    if any((entry.get("goal") or {}).get("signature") for entry in store.history(goal.name)):
        return "a signed goal was written for it before, so this one was changed since by hand"
    parts = [(goal.code_sha, {**goal.options, "kind": goal.kind}, goal.user_config_signature)]
    if goal.canary is not None:
        canary = goal.canary
        parts.append((canary.code_sha, {**canary.options, "kind": canary.kind}, canary.user_config_signature))
    for code_sha, config, user_config_signature in parts:
        try:
            sealed_with, _ = unseal(store.get_code(code_sha), secret)
            check_manifest(sealed_with, manifest(goal.name, config))
            if config.get("user_config") is not None:
                check_user_config(goal.name, code_sha, config["user_config"], user_config_signature, secret)
        except (LookupError, SignatureError) as error:
            return str(error)
    return ""


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

    # Whatever wrote the goal, deleting it is safe: it is signed so that the controller drains it.
    goal = store.update_goal(name, _sealed(lambda previous: replace(previous, deleting=True), cluster_secret(),
                                           check=False), "delete")
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
