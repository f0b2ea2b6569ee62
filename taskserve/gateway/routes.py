"""The gateway's route table: which deployment serves a path.

A request goes to the deployment with the longest route prefix that matches its
path (on ``/`` boundaries); see :meth:`RouteTable.match`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from ..spec import route_of
from ..state import Goal
from ..store import canary_queue_name, queue_name


@dataclass(frozen=True)
class Route:
    """Where requests under ``prefix`` go, how long to wait for an answer, how many
    may wait in the queue (``max_queued``, None: no limit), and why the deployment
    cannot serve at all (``unavailable``, "" when it can). With a canary,
    ``canary_percent`` of the requests go to its version's queue (:meth:`queue_for`).
    """

    prefix: str
    deployment: str
    serializer: str = "json"
    timeout_s: float = 60.0
    max_queued: Optional[int] = None
    unavailable: str = ""
    version: str = ""
    canary_version: str = ""
    canary_percent: float = 0.0

    def queue_for(self, pinned: Optional[str], draw: float) -> tuple[str, str]:
        """``(queue, version)`` of one request: the canary's when ``draw`` (uniform in
        [0, 100)) falls in its share, or when ``pinned`` names its version; else the
        deployment's. ``ValueError`` for a pinned version the deployment does not run.

        >>> route = Route("/m", "m", version="1", canary_version="2", canary_percent=10)
        >>> route.queue_for(None, 5.0), route.queue_for(None, 50.0), route.queue_for("2", 50.0)
        (('taskserve.m@canary', '2'), ('taskserve.m', '1'), ('taskserve.m@canary', '2'))
        """
        if pinned is None or pinned == "":
            to_canary = bool(self.canary_version) and draw < self.canary_percent
        elif pinned == self.canary_version:
            to_canary = True
        elif pinned == self.version:
            to_canary = False
        else:
            runs = repr(self.version) + (f" and the canary {self.canary_version!r}" if self.canary_version else "")
            raise ValueError(f"deployment {self.deployment!r} runs version {runs}, not {pinned!r}; "
                             "send one of those in x-taskserve-version, or leave the header out")
        if to_canary:
            return canary_queue_name(self.deployment), self.canary_version
        return queue_name(self.deployment), self.version


class RouteTable:
    """The deployments by route prefix; the longest matching prefix wins.

    Two deployments with the same prefix: the one whose name sorts first gets it.

    >>> table = RouteTable([Route("/a", "a"), Route("/a/b", "ab"), Route("/", "root")])
    >>> [table.match(p).deployment for p in ("/a", "/a/x", "/a/b/c", "/ab", "/")]
    ['a', 'a', 'ab', 'root', 'root']
    >>> RouteTable([Route("/a", "a")]).match("/ab") is None
    True
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        chosen: dict[str, Route] = {}
        self.conflicts: list[tuple[str, str, str]] = []    # (prefix, kept, ignored)
        for route in sorted(routes, key=lambda r: r.deployment):
            if route.prefix in chosen:
                self.conflicts.append((route.prefix, chosen[route.prefix].deployment, route.deployment))
                continue
            chosen[route.prefix] = route
        self.routes = sorted(chosen.values(), key=lambda r: len(r.prefix), reverse=True)

    @classmethod
    def from_goals(cls, goals: Iterable[Goal], unavailable: Optional[Mapping[str, str]] = None) -> "RouteTable":
        """The routes of the deployments that exist and are served over HTTP.

        ``unavailable`` maps the deployments that cannot serve to why.
        """
        unavailable = unavailable or {}
        routes = []
        for goal in goals:
            prefix = route_of(goal.name, goal.options)
            if goal.deleting or prefix is None:
                continue
            canary = goal.canary
            routes.append(Route(prefix, goal.name, goal.options.get("serializer") or "json",
                                float(goal.options.get("request_timeout_s") or 60),
                                goal.options.get("max_queued_requests"), unavailable.get(goal.name, ""),
                                goal.version, canary.version if canary else "",
                                canary.traffic_percent if canary else 0.0))
        return cls(routes)

    def match(self, path: str) -> Optional[Route]:
        """The route serving ``path``, or None."""
        for route in self.routes:
            prefix = route.prefix
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def to_dict(self) -> dict[str, str]:
        """``{prefix: deployment}``, what ``/-/routes`` shows."""
        return {route.prefix: route.deployment for route in sorted(self.routes, key=lambda r: r.prefix)}
