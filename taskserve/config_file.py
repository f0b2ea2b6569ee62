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
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api import Deployment, deployment


class DeploymentEntry(BaseModel):
    """One deployment in the file: where its code is, then any deployment option."""

    model_config = ConfigDict(extra="allow")

    import_path: str
    init_args: list = Field(default_factory=list)
    init_kwargs: dict = Field(default_factory=dict)


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


def load_deployments_file(path: Path) -> list[Deployment]:
    """Every deployment the file describes, loaded and validated; raises on the first problem."""
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
            target = load_target(entry.import_path, base_dir=path.parent)
            loaded.append(target.options(**options, init_args=entry.init_args, init_kwargs=entry.init_kwargs))
        except (ValueError, TypeError, LookupError, OSError) as error:
            raise type(error)(f"{path}: deployments.{index} ({entry.import_path}): {error}") from None
    names = [item.name for item in loaded]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: deployment {duplicates[0]!r} appears twice; give each entry its own name")
    return loaded
