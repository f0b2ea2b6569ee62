"""Is this controller process healthy: does it lead, or stand by while another leads?

A controller started with ``--health-file PATH`` writes a :class:`HealthReport` there on
each turn of its loop: its id, its pid, whether it holds the lease, and when.
``taskserve controller --check --health-file PATH`` (a container's health check) reads
it and asks Redis who holds the lease; :func:`verdict` decides. Healthy means all of:

- the controller that wrote the file is still running, and wrote it within ``max_age_s``
  (its loop turns: it is not hung, and it reaches Redis, since each turn asks for the lease);
- Redis answers, and the lease is held (the holder renews it every few seconds, so a
  held lease means a live leader);
- the holder is this controller and it knows it leads, or another one and it stands by.

Only Redis and the gateways listen, so the report is a file, not a port. Example::

    taskserve controller --health-file /tmp/taskserve-controller.json            # the controller
    taskserve controller --check --health-file /tmp/taskserve-controller.json    # exit 0: it leads or stands by
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import redis

from .store import Store

HEALTH_MAX_AGE_S = 30.0     # above the longest pass expected, and many turns of a standby's loop


@dataclass(frozen=True)
class HealthReport:
    """What a controller writes to its health file on each turn of its loop."""

    controller_id: str
    pid: int
    leading: bool
    written_at: float       # time.time()


def write_report(path: Path, report: HealthReport) -> None:
    """Replace the file at ``path`` with ``report``, at once (a reader never sees half)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(asdict(report)))
    os.replace(partial, path)


def read_report(path: Path) -> Optional[HealthReport]:
    """The report at ``path``; None when there is none, or it is not one."""
    try:
        fields = json.loads(Path(path).read_text())
        return HealthReport(str(fields["controller_id"]), int(fields["pid"]), bool(fields["leading"]),
                            float(fields["written_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_report(path: Path, controller_id: str) -> None:
    """Remove the file at ``path`` if ``controller_id`` wrote it (a stopped controller is not healthy)."""
    report = read_report(path)
    if report is not None and report.controller_id == controller_id:
        Path(path).unlink(missing_ok=True)


def verdict(report: Optional[HealthReport], running: bool, holder: Optional[str], now: float,
            max_age_s: float = HEALTH_MAX_AGE_S) -> tuple[bool, str]:
    """Whether the controller of ``report`` is healthy, and why, in one line.

    ``running``: its pid is a live process; ``holder``: the controller id Redis names as
    the lease holder (None: nobody leads).

    >>> me = HealthReport("host:7:ab", 7, leading=True, written_at=100.0)
    >>> verdict(me, True, "host:7:ab", now=101.0)
    (True, 'controller host:7:ab leads')
    >>> verdict(HealthReport("host:8:cd", 8, False, 100.0), True, "host:7:ab", now=101.0)
    (True, 'controller host:8:cd stands by; host:7:ab leads')
    >>> verdict(me, True, None, now=101.0)
    (False, 'controller host:7:ab: no controller holds the lease, so none leads')
    >>> verdict(me, True, "host:7:ab", now=200.0)[1]
    'controller host:7:ab last reported 100s ago (more than 30s): its loop is stuck, or it cannot reach Redis'
    """
    if report is None:
        return False, "no health file: the controller was not started with this --health-file, or has not written it yet"
    name = f"controller {report.controller_id}"
    if not running:
        return False, f"{name} (pid {report.pid}) is not running"
    age = now - report.written_at
    if age > max_age_s:
        return False, (f"{name} last reported {age:.0f}s ago (more than {max_age_s:g}s): its loop is stuck, "
                       "or it cannot reach Redis")
    if holder is None:
        return False, f"{name}: no controller holds the lease, so none leads"
    if holder == report.controller_id:
        return True, f"{name} leads"
    if report.leading:
        return False, f"{name} believes it leads, but the lease is {holder}'s"
    return True, f"{name} stands by; {holder} leads"


def check(path: Path, store: Store, max_age_s: float = HEALTH_MAX_AGE_S) -> tuple[bool, str]:
    """:func:`verdict` for the controller whose health file is ``path``, asking Redis for
    the lease holder (unreachable: not healthy)."""
    report = read_report(path)
    if report is None:
        return verdict(None, False, None, time.time(), max_age_s)
    try:
        holder = store.lease_holder()
    except redis.RedisError as error:
        return False, f"controller {report.controller_id}: Redis does not answer ({error})"
    return verdict(report, _running(report.pid), holder, time.time(), max_age_s)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True         # it exists, run by another user
    return True
