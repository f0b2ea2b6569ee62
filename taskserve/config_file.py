"""Deploying from a file: ``taskserve deploy -f deployments.yaml``.

Every entry is loaded and validated before any is deployed, so a mistake in the
third entry leaves the first two untouched.

Example file::

    deployments:
      - import_path: workers/echo.py:Echo      # FILE.py:ATTR (relative to this file) or MODULE:ATTR
        num_replicas: 2
      - import_path: models.py:Threshold
        name: threshold
        version: "3"
        user_config: {threshold: 0.5}
        init_args: []
        init_kwargs: {}
      - name: legacy                           # the code already in the cluster, by its sha
        code: 3f2a...                          # (what `taskserve export` writes)
        version: "7"

:func:`export` writes the running deployments as such a file, and :func:`changes`
says what applying one would change (``taskserve diff -f FILE``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .api import Deployment, deployment
from .code import pack
from .planner import plural
from .runtime_env import resolve as resolve_runtime_env
from .spec import DeploymentOptions, validate_options
from .state import Goal
from .store import Store

# Options whose change replaces the replicas (SPEC §2); the others apply in place.
ROLLING_OPTIONS = ("num_cpus", "num_gpus", "memory", "runtime_env", "max_concurrent_queries", "serializer")


class DeploymentEntry(BaseModel):
    """One deployment in the file: where its code is, then any deployment option.

    The code is an ``import_path``, or ``code``: the sha of code already in the
    cluster (with a ``name``), as :func:`export` writes it.
    """

    model_config = ConfigDict(extra="allow")

    import_path: Optional[str] = None
    code: Optional[str] = None
    init_args: list = Field(default_factory=list)
    init_kwargs: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "DeploymentEntry":
        if (self.import_path is None) == (self.code is None):
            raise ValueError("give each entry either import_path (FILE.py:ATTR or MODULE:ATTR) or code "
                             "(the sha `taskserve export` wrote)")
        if self.code is not None and not (self.model_extra or {}).get("name"):
            raise ValueError(f"the entry with code {self.code[:12]} needs a name")
        if self.code is not None and (self.init_args or self.init_kwargs):
            raise ValueError("an entry with code runs the constructor arguments stored with it; "
                             "drop init_args and init_kwargs, or use import_path")
        return self

    @property
    def source(self) -> str:
        return self.import_path or f"code {str(self.code)[:12]}"


class DeploymentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployments: list[DeploymentEntry] = Field(min_length=1)


def load_target(reference: str, base_dir: Optional[Path] = None) -> Deployment:
    """``FILE.py:ATTR`` or ``MODULE:ATTR`` -> a Deployment (a bare class or function is wrapped).

    A relative ``FILE.py`` is found from ``base_dir`` (default: the current directory).
    """
    where, sep, attr = reference.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"invalid target {reference!r}: use FILE.py:ATTR or MODULE:ATTR")
    if where.endswith(".py"):
        path = (Path(base_dir or Path.cwd()) / where).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {where!r}; give the path of a Python file, like my_model.py:Model")
        sys.path.insert(0, str(path.parent))
        module_name = f"_taskserve_deploy_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(base_dir or os.getcwd()))
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        raise AttributeError(f"{where} has no attribute {attr!r}; check the name after the ':'")
    target = getattr(module, attr)
    return target if isinstance(target, Deployment) else deployment(target)


def load_deployments_file(path: Path, store: Optional[Store] = None) -> list[Deployment]:
    """Every deployment the file describes, loaded and validated; raises on the first problem.

    ``store`` finds the code of ``code:`` entries (default: the connected cluster's).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no file {str(path)!r}; give the path of a deployments YAML file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from None
    try:
        parsed = DeploymentsFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise ValueError(f"{path}: {where}: {first['msg']}; see `taskserve deploy --help` for the format") from None
    loaded: list[Deployment] = []
    for index, entry in enumerate(parsed.deployments):
        options: dict[str, Any] = dict(entry.model_extra or {})
        try:
            if entry.code is not None:
                loaded.append(_stored(entry.code, options, store))
                continue
            assert entry.import_path is not None
            target = load_target(entry.import_path, base_dir=path.parent)
            loaded.append(target.options(**options, init_args=entry.init_args, init_kwargs=entry.init_kwargs))
        except (ValueError, TypeError, LookupError, OSError) as error:
            raise type(error)(f"{path}: deployments.{index} ({entry.source}): {error}") from None
    names = [item.name for item in loaded]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: deployment {duplicates[0]!r} appears twice; give each entry its own name")
    return loaded


def _stored(code_sha: str, options: dict[str, Any], store: Optional[Store]) -> Deployment:
    """A Deployment of the code ``code_sha`` already in the cluster, with ``options``."""
    if store is None:
        from .connection import current_store

        store = current_store()
    source = _goal_running(store, code_sha, options["name"])
    if source is None:
        raise LookupError(f"no deployment in the cluster runs the code {code_sha}; it was deleted with its "
                          "deployments; use an import_path for this entry")
    return Deployment(None, validate_options(options), _code_sha=source.code_sha, _goal=source)


def _goal_running(store: Store, code_sha: str, name: str) -> Optional[Goal]:
    """A goal (of ``name`` first, then of any deployment, then from ``name``'s history)
    whose code is ``code_sha`` (or starts with it)."""
    goals = store.list_goals()
    goals.sort(key=lambda goal: goal.name != name)
    candidates = [goal for goal in goals if not goal.deleting]
    candidates += [Goal(**entry["goal"]) for entry in reversed(store.history(name)) if entry.get("goal")]
    for goal in candidates:
        if goal.code_sha.startswith(code_sha) and store.has_code(goal.code_sha):
            return goal
    return None


def export(goals: list[Goal]) -> str:
    """The deployments ``goals`` describe as a deployments file that ``deploy -f`` accepts:
    each with the code already in the cluster (``code:``), its version and every option
    that is not the default. Applying it unchanged restarts nothing.

    >>> goal = Goal(name="m", generation=3, version="v2", spec_hash="s", num_replicas=2,
    ...             options={**DeploymentOptions(name="m", num_replicas=2).model_dump(), "num_cpus": 0.5},
    ...             code_sha="ab" * 32, init_sha="i")
    >>> print(export([goal]))  # doctest: +ELLIPSIS
    # taskserve export: ...
    deployments:
    - name: m
      code: abab...
      version: v2
      num_replicas: 2
      num_cpus: 0.5
    <BLANKLINE>
    """
    defaults = DeploymentOptions().model_dump()
    entries = []
    for goal in sorted(goals, key=lambda g: g.name):
        entry: dict[str, Any] = {"name": goal.name, "code": goal.code_sha, "version": goal.version}
        options = goal.options
        if not options.get("autoscaling_config"):
            entry["num_replicas"] = goal.num_replicas
        for key, value in options.items():
            if key in ("name", "num_replicas", "version", "canary") or key not in defaults:
                continue
            if value != defaults[key]:
                entry[key] = value
        entries.append(entry)
    header = ("# taskserve export: the running deployments, each with the code already in the cluster.\n"
              "# Apply with `taskserve deploy -f FILE` (unchanged, it restarts nothing); "
              "`taskserve diff -f FILE` shows what an apply would change.\n")
    return header + yaml.safe_dump({"deployments": entries}, sort_keys=False, default_flow_style=False)


def changes(loaded: list[Deployment], goals: list[Goal], prune: bool = False) -> tuple[list[str], list[str]]:
    """What deploying ``loaded`` would change, given the running ``goals``: one line per
    change, and notes (deployments the file leaves out, kept without ``prune``).

    >>> from taskserve.api import deployment
    >>> class Model:
    ...     def reconfigure(self, config): ...
    >>> goal = Goal(name="m", generation=1, version="1", spec_hash="s", num_replicas=1,
    ...             options=DeploymentOptions(name="m", version="1").model_dump(), code_sha="c",
    ...             init_sha=pack(Model, (), {})[2])
    >>> scaled = deployment(Model).options(name="m", version="1", num_replicas=3, user_config={"t": 1})
    >>> changes([scaled], [goal])[0]
    ['~ m: num_replicas 1 -> 3 (scale); user_config null -> {"t": 1} (reconfigure in place)']
    >>> changes([], [goal], prune=True)[0]
    ['- m: not in the file; deleted (--prune)']
    """
    running = {goal.name: goal for goal in goals if not goal.deleting}
    lines: list[str] = []
    for item in loaded:
        goal = running.get(item.name)
        if goal is None:
            lines.append(f"+ {item.name}: new, {plural(item.num_replicas, 'replica')}, "
                         f"version {item.version or '(generated)'}")
            continue
        found = _differences(item, goal)
        if found:
            lines.append(f"~ {item.name}: " + "; ".join(found))
    notes: list[str] = []
    listed = {item.name for item in loaded}
    for name in sorted(set(running) - listed):
        if prune:
            lines.append(f"- {name}: not in the file; deleted (--prune)")
        else:
            notes.append(f"  {name}: not in the file; kept (`deploy -f FILE --prune` deletes it)")
    return lines, notes


def _differences(item: Deployment, goal: Goal) -> list[str]:
    """How ``item`` differs from the running ``goal``, each with what it does to the replicas."""
    found = []
    if item.version is None:
        found.append("no version in the file, so every replica is replaced (set `version` to keep them)")
    elif item.version != goal.version:
        found.append(f"version {goal.version} -> {item.version} (rolling update)")
    runtime_env, _ = resolve_runtime_env(item.config.runtime_env)
    wanted = item.config.model_copy(update={"runtime_env": runtime_env}).model_dump()
    wanted.pop("canary", None)
    for key in sorted(set(wanted) | set(goal.options)):
        if key in ("name", "version", "canary"):
            continue
        old, new = goal.options.get(key), wanted.get(key)
        if key == "num_replicas":
            old = goal.num_replicas
        if old == new or (isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new)
                          and not isinstance(old, bool)):
            continue
        effect = ("scale" if key in ("num_replicas", "autoscaling_config") else
                  "reconfigure in place" if key == "user_config" else
                  "rolling update" if key in ROLLING_OPTIONS else "applies in place")
        found.append(f"{key} {_short(old)} -> {_short(new)} ({effect})")
    if item._code_sha is None:
        _, _, init_sha = pack(item.func_or_class, item.init_args, item.init_kwargs)
        if init_sha != goal.init_sha:
            found.append("constructor arguments changed (rolling update)")
    elif item._goal is not None and item._goal.init_sha != goal.init_sha:
        found.append("constructor arguments changed (rolling update)")
    return found


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
